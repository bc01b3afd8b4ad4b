"""Which DeepSpeed checkpoints of a stage are whole, and which one a resume starts from.

DeepSpeed writes `<checkpoints>/<tag>/` (one model-states file, one optimizer-states file per rank) and then a
`latest` file naming the tag. Neither tells a finished save from one cut short: a full disk, a killed pod or an
interrupted copy leaves a folder that `latest` may still name, and DeepSpeed's loader then fails deep inside
torch.load. So the trainer writes `complete.json` into a tag folder once every rank's files are on disk: the
files it holds and their sizes. A tag is intact when its marker is there and every file still has its recorded
size; a resume starts from the newest intact tag and says which newer ones it skipped and why.

Folders written before markers existed (no tag has one) are judged by their torch files alone: each must open as a
zip archive (torch.save's format keeps its directory at the end, so a truncated file fails that cheaply).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kaleido.platform.files import file_sizes, sizes_problem, write_json_atomic

TAG_PREFIX = "step"
MARKER_NAME = "complete.json"


def tag_name(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def checkpoint_tags(folder: Path) -> list[Path]:
    """The tag folders of a checkpoint folder, oldest first (tag names sort by step)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{TAG_PREFIX}*") if p.is_dir())


def write_marker(tag_dir: Path, step: int) -> Path:
    """Record that `tag_dir` is complete: every file in it (relative name -> size). Call after every rank saved."""
    return write_json_atomic(tag_dir / MARKER_NAME, {"step": step, "files": file_sizes(tag_dir, (MARKER_NAME,))})


def _torch_file_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"{path.name} is damaged or truncated ({exc})"
    return None


def tag_problem(tag_dir: Path, markers_in_use: bool = True) -> str | None:
    """Why `tag_dir` cannot be resumed from, or None when it is intact."""
    marker = tag_dir / MARKER_NAME
    if not marker.is_file():
        if markers_in_use:
            return f"no {MARKER_NAME}: its save did not finish"
        torch_files = sorted(tag_dir.glob("*.pt"))
        if not torch_files:
            return "holds no checkpoint files"
        for path in torch_files:
            problem = _torch_file_problem(path)
            if problem:
                return problem
        return None
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MARKER_NAME} is unreadable ({exc})"
    return sizes_problem(tag_dir, files)


@dataclass(frozen=True)
class ResumePoint:
    """The tag a resume starts from (None: nothing intact) and the newer tags skipped, with why."""

    tag: str | None
    skipped: tuple[tuple[str, str], ...]

    def describe_skipped(self) -> str:
        return "; ".join(f"{tag} ({why})" for tag, why in self.skipped)


def resume_point(folder: Path) -> ResumePoint:
    """The newest intact checkpoint of `folder`, and the newer ones that are not intact."""
    tags = checkpoint_tags(folder)
    markers_in_use = any((tag / MARKER_NAME).is_file() for tag in tags)
    skipped: list[tuple[str, str]] = []
    for tag in reversed(tags):
        problem = tag_problem(tag, markers_in_use)
        if problem is None:
            return ResumePoint(tag.name, tuple(skipped))
        skipped.append((tag.name, problem))
    return ResumePoint(None, tuple(skipped))
