"""Every data path stays inside the data root, and where each stage writes under it.

User-supplied manifests, sidecar caption files and source globs name files by path. A path that
leaves the configured root (an absolute path elsewhere, a `..` escape, a symlink pointing out) could
read or overwrite anything the pipeline's user can reach, so it is refused with a `Rejection`
instead of being followed. Every stage resolves paths through `resolve_inside`.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from kaleido.data.records import Rejection

OUTSIDE_ROOT = "path_outside_root"
BAD_PATH = "bad_path"


class PathOutsideRoot(ValueError):
    """A path resolves outside the data root; `reason` is the Rejection key, `kind` says how."""

    def __init__(self, message: str, kind: str, reason: str = OUTSIDE_ROOT) -> None:
        super().__init__(message)
        self.kind = kind  # "absolute" | "parent" | "symlink" | "invalid"
        self.reason = reason


def _is_within(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def resolve_inside(root: str | Path, value: str | Path) -> Path:
    """The absolute, symlink-free path of `value` (relative to `root`, or absolute); refuse escapes.

    `~` is NOT expanded: a user file saying "~/x" means a folder named "~" under the root.
    """
    text = os.fspath(value)
    if not text or "\x00" in text:
        raise PathOutsideRoot(f"path {text!r} is empty or contains a NUL byte", kind="invalid", reason=BAD_PATH)
    root_real = Path(root).resolve()
    candidate = Path(text)
    joined = candidate if candidate.is_absolute() else root_real / candidate
    lexical = Path(os.path.normpath(joined))
    if not _is_within(lexical, root_real) and not _is_within(lexical, Path(os.path.abspath(root))):
        if candidate.is_absolute():
            raise PathOutsideRoot(f"absolute path {text} lies outside the data root {root_real}", kind="absolute")
        raise PathOutsideRoot(f"path {text} uses '..' to leave the data root {root_real}", kind="parent")
    real = joined.resolve()  # follows every symlink on the way
    if not _is_within(real, root_real):
        raise PathOutsideRoot(
            f"path {text} is (or passes through) a symlink that points outside the data root, to {real}",
            kind="symlink",
        )
    return real


def check_inside(root: str | Path, value: str | Path, stage: str, item: str | None = None) -> Path | Rejection:
    """`resolve_inside`, but a refusal comes back as a Rejection (for stages that must not crash)."""
    try:
        return resolve_inside(root, value)
    except PathOutsideRoot as exc:
        return Rejection(stage=stage, item=item or os.fspath(value), reason=exc.reason, detail=str(exc))


def output_folder(root: str | Path, name: str | Path) -> Path:
    """`<root>/<name>`, a folder a stage writes (and may clear): refused when it is a symlink or resolves
    outside the root, so that no stage writes, or deletes, outside the data root through a link.

    PathOutsideRoot (kind "symlink") names the link and its target; the fix is to replace the link
    with a real folder (or point data.root at the other disk).
    """
    root_real = Path(root).resolve()
    folder = root_real / name
    if folder.is_symlink() or not _is_within(folder.resolve(), root_real):
        raise PathOutsideRoot(
            f"output folder {folder} is a symlink (to {folder.resolve()}); stages write and clear their folders, so "
            f"they must be real folders inside the data root {root_real}: replace the link with a folder, or set "
            "data.root to the disk the link points to",
            kind="symlink",
        )
    return folder


def remove_inside(root: str | Path, path: str | Path) -> None:
    """Delete `path` (a file or a folder tree) when it lies inside the root; never through a symlink.

    A symlink is unlinked (its target is untouched); a path resolving outside the root is refused
    (PathOutsideRoot). shutil.rmtree itself does not follow links inside the tree.
    """
    root_real = Path(root).resolve()
    path = Path(path)
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    if not _is_within(path.resolve(), root_real):
        raise PathOutsideRoot(f"refusing to delete {path}: it lies outside the data root {root_real}", kind="symlink")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def relative_to_root(root: str | Path, path: str | Path) -> str:
    """`path` (inside the root) as the POSIX relative string records carry."""
    return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_name(text: str, limit: int = 48) -> str:
    """A file-name- and webdataset-key-safe version of `text` (no dots: webdataset splits keys on them)."""
    cleaned = _UNSAFE.sub("_", text).strip("_")
    return cleaned[:limit] or "x"


@dataclass(frozen=True)
class DataLayout:
    """Where each stage reads and writes, all under the data root.

    <root>/<stage>/shard-NNNNN/   per-shard outputs with a _SUCCESS marker (see shards.py)
    <root>/manifests/             merged stage outputs: clips.jsonl, captions.jsonl, samples.jsonl ...
    <root>/manifests/rejections/  <stage>.jsonl: everything dropped, with the reason
    <root>/dataset/               the webdataset training shards (writer.py)
    <root>/stats/                 stats.json and the PNG plots (stats.py)
    """

    root: Path

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def clips_manifest(self) -> Path:
        return self.manifests / "clips.jsonl"

    @property
    def captions_manifest(self) -> Path:
        return self.manifests / "captions.jsonl"

    @property
    def instances_manifest(self) -> Path:
        return self.manifests / "instances.jsonl"

    @property
    def samples_manifest(self) -> Path:
        return self.manifests / "samples.jsonl"

    @property
    def dataset_manifest(self) -> Path:
        """The samples as written to the tar shards (their JSON metadata), one row each."""
        return self.manifests / "dataset.jsonl"

    def rejections(self, stage: str) -> Path:
        return self.manifests / "rejections" / f"{stage}.jsonl"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def stats(self) -> Path:
        return self.root / "stats"
