"""`kaleido samples`: export the registry-shipped sample images."""

from __future__ import annotations

from pathlib import Path

import typer

from kaleido.cli.app import app, fail


@app.command("samples")
def samples(
    out_dir: Path = typer.Argument(Path("artifacts/samples"), help="folder for the PNG files"),
    names: list[str] = typer.Option(None, "--name", help="sample to export (repeatable; default: all)"),
) -> None:
    """Write scikit-image's sample photographs (astronaut, chelsea, coffee, rocket) as PNG references."""
    from kaleido.samples import export_sample_images

    try:
        paths = export_sample_images(out_dir, names or None)
    except ValueError as exc:
        fail(str(exc))
    for path in paths:
        typer.echo(str(path))
