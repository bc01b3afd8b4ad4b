"""The DVC workspace of a flow-run pod on Kubernetes, refreshed from the image's checkout.

The image (Dockerfile) holds the repository at /opt/kaleido. Flow-run pods work in /workspace, on the checkpoints
PVC, where DVC keeps its cache, dvc.lock and the stage outputs between runs. Before each flow run the pod's
`workspace` init container calls `kaleido platform sync-workspace`: the image's files are copied over the
workspace (code, dvc.yaml, prefect.yaml always match the image that runs them) and the outputs stay. The image has
no .git, so DVC runs there with `core.no_scm` and the data version names the image's revision
(KALEIDO_GIT_REVISION, a build argument).
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REVISION_ENV = "KALEIDO_GIT_REVISION"  # the image's git revision (Dockerfile build argument GIT_REVISION)
MARKER = ".kaleido-image.json"  # which image last refreshed the workspace
# What a run writes (or a developer's machine holds) is never copied from, nor overwritten in, the workspace.
KEPT = frozenset({"data", "artifacts", "runs", ".platform", ".git", ".venv", ".dvc/cache", ".dvc/tmp",
                  ".dvc/config.local", "dvc.lock", MARKER})  # fmt: skip


class WorkspaceError(RuntimeError):
    """The image's checkout or the workspace folder is not usable; the message says which and why."""


@dataclass(frozen=True)
class SyncReport:
    copied: int
    unchanged: int
    no_scm: bool

    def summary(self) -> str:
        scm = "without git (core.no_scm)" if self.no_scm else "in its git repository"
        return f"workspace: files {self.copied} copied, {self.unchanged} unchanged; DVC runs {scm}"


def _kept(relative: Path) -> bool:
    """An output folder or file of the repository root (by its path from the root), or compiled Python."""
    parts = relative.parts
    return "__pycache__" in parts or any("/".join(parts[: i + 1]) in KEPT for i in range(len(parts)))


def sync_workspace(source: Path, target: Path) -> SyncReport:
    """Copy the checkout at `source` over `target` (files that differ), keeping every output; set DVC up there."""
    from kaleido.platform.services import _bin

    source, target = Path(source), Path(target)
    if not (source / "dvc.yaml").is_file():
        raise WorkspaceError(f"{source} has no dvc.yaml: --source must be the repository checkout of the image")
    target.mkdir(parents=True, exist_ok=True)
    copied = unchanged = 0
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or _kept(relative):
            continue
        destination = target / relative
        if destination.is_file() and filecmp.cmp(path, destination, shallow=False):
            unchanged += 1
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
        copied += 1
    no_scm = not (target / ".git").exists()
    if no_scm:
        command = [_bin("dvc"), "config", "--local", "core.no_scm", "true"]
        result = subprocess.run(command, cwd=target, capture_output=True, text=True)
        if result.returncode:
            raise WorkspaceError(f"`{' '.join(command)}` failed in {target}:\n{result.stderr[-2000:]}")
    revision = os.environ.get(REVISION_ENV, "unknown")
    marker = {"source": str(source), "revision": revision, "synced_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (target / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return SyncReport(copied, unchanged, no_scm)
