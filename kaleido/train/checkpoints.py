"""Which DeepSpeed checkpoints of a stage are whole, and which one a resume starts from.

DeepSpeed writes `<checkpoints>/<tag>/` (one model-states file, one optimizer-states file per rank) and then a
`latest` file naming the tag. Neither tells a finished save from one cut short: a full disk, a killed pod or an
interrupted copy leaves a folder that `latest` may still name, and DeepSpeed's loader then fails deep inside
torch.load. So the trainer writes `complete.json` into a tag folder once every rank's files are on disk: the
files it holds and their sizes. A tag is intact when its marker is there and every file still has its recorded
size; a resume starts from the newest intact tag and says which newer ones it skipped and why.

Folders written before markers existed (no tag has one) are judged by their torch files alone: each must open as a
zip archive (torch.save's format keeps its directory at the end, so a truncated file fails that cheaply).

The marker is also the checkpoint's seal and its record of the run: every file's sha256 (the ranks hash their share
of the files at the save; a resume verifies them the same way, kaleido.platform.integrity: once per file) and the
run's effective params (`run_params`). A resume compares those with the params it was started with
(`resume_changes`): a difference is refused naming the keys, or, with `--apply-param-changes`, the keys a run may
change mid-way (`applicable_keys`: the stage's lr and steps, the checkpoint and validation cadence) are applied
from the resumed step on and recorded (`changes`: step, old and new values), carried by every later marker.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaleido.config.schema import flatten_dotted
from kaleido.platform.files import file_sizes, sizes_problem, write_json_atomic

if TYPE_CHECKING:
    from kaleido.config import Params

TAG_PREFIX = "step"
MARKER_NAME = "complete.json"


def tag_name(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def checkpoint_tags(folder: Path) -> list[Path]:
    """The tag folders of a checkpoint folder, oldest first (tag names sort by step)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{TAG_PREFIX}*") if p.is_dir())


def write_marker(tag_dir: Path, step: int, sha256: dict[str, str] | None = None, params: dict[str, Any] | None = None,
                 changes: list[dict[str, Any]] | None = None) -> Path:
    """Record that `tag_dir` is complete: every file in it (relative name -> size, and sha256 when given), the
    run's params and the changes applied to them so far. Call after every rank saved."""
    record: dict[str, Any] = {"step": step, "files": file_sizes(tag_dir, (MARKER_NAME,))}
    if sha256 is not None:
        record["sha256"] = sha256
    if params is not None:
        record["params"] = params
        record["changes"] = changes or []
    return write_json_atomic(tag_dir / MARKER_NAME, record)


def read_marker(tag_dir: Path) -> dict[str, Any]:
    """The marker of a tag folder ({} when it has none or it is unreadable)."""
    try:
        return json.loads((tag_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _share(tag_dir: Path, rank: int, world: int) -> list[Path]:
    """Rank `rank`'s share of a tag folder's files: every rank hashes or verifies a slice, not every file."""
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MARKER_NAME)
    return files[rank::world]


def hash_share(tag_dir: Path, rank: int, world: int) -> dict[str, str]:
    """{relative name: sha256} of this rank's share of a just-written tag (verdicts remembered: a resume on this
    machine does not read them again)."""
    from kaleido.platform.integrity import file_sha256, record_verified

    hashes = {}
    for path in _share(tag_dir, rank, world):
        hashes[path.relative_to(tag_dir).as_posix()] = digest = file_sha256(path)
        record_verified(path, digest)
    return hashes


def verify_share(tag_dir: Path, rank: int, world: int) -> str | None:
    """Why a file of this rank's share differs from the sha256 the tag's marker recorded, or None. A marker without
    sha256s (older checkpoints) is trusted on sizes (tag_problem)."""
    from kaleido.platform.integrity import IntegrityError, verify_file

    marker = read_marker(tag_dir)
    hashes, sizes = marker.get("sha256") or {}, marker.get("files") or {}
    for path in _share(tag_dir, rank, world):
        name = path.relative_to(tag_dir).as_posix()
        if name in hashes:
            try:
                verify_file(path, sha256=hashes[name], size=sizes.get(name))
            except IntegrityError:
                return f"{name} differs from the sha256 its marker recorded (corrupted after the save)"
    return None


# ---- the run's params ---------------------------------------------------------------------------------------

RUN_SECTIONS = ("model", "flow_matching", "train")
# never change what a run computes: where it runs and how it is watched
_IGNORED = ("train.kubernetes.", "train.launcher", "train.gpu_memory_gb", "train.encode_batch", "train.nproc_per_node",
            "train.experiment")




def run_params(params: Params) -> dict[str, Any]:
    """{dotted key: JSON value} of the params that decide what a training run computes (model, flow_matching,
    train), as a checkpoint records them."""
    dumped = params.model_dump(mode="json")
    return flatten_dotted({section: dumped[section] for section in RUN_SECTIONS})


def applicable_keys(stage: str) -> tuple[str, ...]:
    """The keys `--apply-param-changes` may change mid-run; any other change needs a fresh run."""
    return (f"train.{stage}.lr", f"train.{stage}.steps", "train.checkpoint_every", "train.keep_checkpoints",
            "train.validation.every")


def resume_changes(recorded: dict[str, Any], current: dict[str, Any], stage: str) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded, current)} of the run's params that differ (other stages' presets and _IGNORED aside)."""
    from kaleido.train.plan import STAGES

    others = tuple(f"train.{name}." for name in STAGES if name != stage)
    changed = {}
    for key in sorted(set(recorded) | set(current)):
        if key.startswith(others) or key.startswith(_IGNORED):
            continue
        old, new = recorded.get(key), current.get(key)
        if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
            changed[key] = (old, new)
    return changed


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in changes.items())


def resume_problem(folder: Path, params: Params, stage: str, apply: bool) -> str | None:
    """Why `--resume` from `folder`'s newest intact checkpoint cannot go on with `params`, or None.

    Refused: any change of the run's params without `apply`, and with `apply` a change of a key that is not in
    applicable_keys. A checkpoint written before params were recorded cannot be compared (None)."""
    point = resume_point(folder)
    if point.tag is None:
        return None
    recorded = read_marker(folder / point.tag).get("params")
    if recorded is None:
        return None
    changes = resume_changes(recorded, run_params(params), stage)
    if not changes:
        return None
    fixed = {key: value for key, value in changes.items() if key not in applicable_keys(stage)}
    if fixed:
        return (f"--resume: params changed since this run's checkpoint {point.tag} was written: "
                f"{describe_changes(fixed)}; these cannot change mid-run. Put them back, or start a fresh run "
                "without --resume")
    if not apply:
        return (f"--resume: params changed since this run's checkpoint {point.tag} was written: "
                f"{describe_changes(changes)}. Put them back to continue the run as it was, or pass "
                "--apply-param-changes to continue with the new values from that step on (recorded in the "
                "run's checkpoints, MLflow run and export)")
    return None


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


def resume_point(folder: Path, known: dict[str, str] | None = None) -> ResumePoint:
    """The newest intact checkpoint of `folder`, and the newer ones that are not intact (`known`: tag -> problem
    found by a deeper check, e.g. a sha256 that differs)."""
    tags = checkpoint_tags(folder)
    markers_in_use = any((tag / MARKER_NAME).is_file() for tag in tags)
    skipped: list[tuple[str, str]] = []
    for tag in reversed(tags):
        problem = (known or {}).get(tag.name) or tag_problem(tag, markers_in_use)
        if problem is None:
            return ResumePoint(tag.name, tuple(skipped))
        skipped.append((tag.name, problem))
    return ResumePoint(None, tuple(skipped))
