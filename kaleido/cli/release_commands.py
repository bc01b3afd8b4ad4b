"""`kaleido release pin|check`: image digests of the prod overlay (kaleido/platform/release.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kaleido.cli.app import app, fail

release_app = typer.Typer(help="Pin the prod overlay's images by digest; refuse an unpinned overlay.",
                          no_args_is_help=True)
app.add_typer(release_app, name="release")
OverlayOption = Annotated[Path, typer.Option("--overlay", help="the kustomize overlay to release")]


@release_app.command("pin")
def pin(
    image: Annotated[list[str], typer.Option("--image", help="NAME=sha256:<digest> (repeat), NAME as the overlay's "
                                             "kustomization.yaml lists it (kaleido, postgres, ...)")],
    overlay: OverlayOption = Path("k8s/overlays/prod"),
) -> None:
    """Write the pushed images' digests into the overlay (kustomization.yaml; for kaleido also params.yaml and
    work-pool-gpu.json)."""
    from kaleido.platform.release import ReleaseError, pin_images

    digests = {}
    for item in image:
        name, sep, digest = item.partition("=")
        if not sep or not name:
            fail(f"--image {item}: expected NAME=sha256:<digest>")
        digests[name] = digest
    try:
        for line in pin_images(overlay, digests):
            typer.echo(f"pinned {line}")
    except ReleaseError as exc:
        fail(str(exc))


@release_app.command("check")
def check(overlay: OverlayOption = Path("k8s/overlays/prod")) -> None:
    """Exit 2 naming every image still at the all-zero UNRELEASED digest (run before deploying the overlay)."""
    from kaleido.platform.release import ReleaseError, check_pinned

    try:
        check_pinned(overlay)
    except ReleaseError as exc:
        fail(str(exc))
    typer.echo(f"{overlay}: every image is pinned by digest")
