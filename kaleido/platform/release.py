"""The release step: pin the prod overlay's images by digest, and the check that refuses an unpinned overlay.

The prod overlay names every image by digest (k8s/overlays/prod/kustomization.yaml `images:`); the repository
ships the all-zero digest as the UNRELEASED marker. The kaleido image is also named, with the same digest, in
the overlay's params.yaml (train.kubernetes.image) and work-pool-gpu.json (its `image` default), which kustomize
does not rewrite. `pin_images` writes a release's digests into all of them (a line edit: comments stay);
`unpinned` lists every all-zero digest left, and `kaleido release check` (run by `make deploy-prod` before `kubectl
apply`) refuses an overlay that has any.
"""

from __future__ import annotations

import re
from pathlib import Path

PLACEHOLDER = "sha256:" + "0" * 64
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
KALEIDO = "kaleido"  # the platform's own image: named in three files


class ReleaseError(ValueError):
    """A digest that is malformed or all zeros, an image the overlay does not name, or an unpinned overlay."""


def _images(text: str) -> list[tuple[str, str | None, int]]:
    """(name, newName or None, line index of its `digest:`) of each entry of a kustomization's `images:` list."""
    lines = text.splitlines()
    found: list[tuple[str, str | None, int]] = []
    inside, name, new_name = False, None, None
    for index, line in enumerate(lines):
        if re.match(r"^images:\s*$", line):
            inside = True
            continue
        if inside and line and not line.startswith((" ", "-", "#")):
            break
        if not inside:
            continue
        if match := re.match(r"^\s*-\s*name:\s*(\S+)", line):
            name, new_name = match.group(1), None
        elif match := re.match(r"^\s*newName:\s*(\S+)", line):
            new_name = match.group(1)
        elif (match := re.match(r"^\s*digest:\s*(\S+)", line)) and name is not None:
            found.append((name, new_name, index))
    return found


def unpinned(overlay: Path) -> list[str]:
    """Where the overlay still carries the all-zero digest (file: image), [] when every image is pinned."""
    overlay = Path(overlay)
    problems = []
    kustomization = overlay / "kustomization.yaml"
    lines = kustomization.read_text().splitlines()
    for name, _, index in _images(kustomization.read_text()):
        if PLACEHOLDER in lines[index]:
            problems.append(f"{kustomization}: {name}")
    for extra in (overlay / "params.yaml", overlay / "work-pool-gpu.json"):
        if extra.is_file() and PLACEHOLDER in extra.read_text():
            problems.append(f"{extra}: {KALEIDO}")
    return problems


def check_pinned(overlay: Path) -> None:
    """ReleaseError naming every all-zero digest left in the overlay."""
    problems = unpinned(overlay)
    if problems:
        raise ReleaseError(
            f"{overlay} is not released: the all-zero digest is still set for "
            f"{'; '.join(problems)}. Push the images and pin them first: `kaleido release pin --image "
            "NAME=sha256:<digest> ...` (`make release DIGESTS=...`)"
        )


def pin_images(overlay: Path, digests: dict[str, str]) -> list[str]:
    """Write `digests` (image name as the kustomization names it -> sha256:...) into the overlay; the kaleido
    image's digest also into params.yaml and work-pool-gpu.json. Returns what changed; ReleaseError for a
    malformed or all-zero digest, or a name the overlay does not list (nothing is written then)."""
    overlay = Path(overlay)
    for name, digest in digests.items():
        if not DIGEST.match(digest):
            raise ReleaseError(f"{name}={digest}: a digest is sha256:<64 hex digits> (`docker buildx imagetools "
                               "inspect IMAGE` or the push's output shows it)")
        if digest == PLACEHOLDER:
            raise ReleaseError(f"{name}: the all-zero digest is the UNRELEASED marker, not a release")
    kustomization = overlay / "kustomization.yaml"
    text = kustomization.read_text()
    entries = {name: (new_name, index) for name, new_name, index in _images(text)}
    unknown = sorted(set(digests) - set(entries))
    if unknown:
        raise ReleaseError(f"{kustomization} names no image {unknown}; it lists {sorted(entries)}")
    lines = text.splitlines(keepends=True)
    changed = []
    for name, digest in digests.items():
        _, index = entries[name]
        lines[index] = re.sub(r"sha256:[0-9a-f]{64}", digest, lines[index])
        changed.append(f"{kustomization}: {name}@{digest}")
    updates = {kustomization: "".join(lines)}
    if KALEIDO in digests:
        repository = entries[KALEIDO][0] or KALEIDO
        for extra in (overlay / "params.yaml", overlay / "work-pool-gpu.json"):
            if extra.is_file():
                content = extra.read_text()
                pattern = re.escape(repository) + r"@sha256:[0-9a-f]{64}"
                if not re.search(pattern, content):
                    raise ReleaseError(f"{extra} does not name {repository}@sha256:...; nothing was written")
                updates[extra] = re.sub(pattern, f"{repository}@{digests[KALEIDO]}", content)
                changed.append(f"{extra}: {repository}@{digests[KALEIDO]}")
    for path, content in updates.items():
        path.write_text(content)
    return changed
