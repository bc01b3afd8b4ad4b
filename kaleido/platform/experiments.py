"""DVC experiments around the flow: one `dvc exp show` row per model version, a readable column set, and a loud note
when params.yaml is not the committed one (a `dvc exp run` leaves its params in the workspace).

Why rows and not commits: the flow never commits to your branch (a run that rewrites your git history surprises, and a
flow-run pod on the cluster has no checkout to commit to). After registering a version it runs `dvc exp save --name
<model>-v<N>`: a git ref under refs/exps with that run's params.yaml, dvc.lock and metric files, the branch and the
workspace untouched. `dvc exp show` lists it under the baseline (whose metrics stay empty until you commit dvc.lock
and the metric files yourself); `dvc exp apply <model>-v<N>` brings that version's params and data version back.

`dvc exp show` has one column per params.yaml key (hundreds). `kaleido experiments` shows the documented column set:
the experiment and its date, the results (`RESULT_COLUMNS`: clips and samples of the data, train loss, held-out loss
before and after training, every overall eval metric) and the params that differ between the rows.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from kaleido.config.schema import flatten_dotted

# the files a flow run's experiment row carries (those that exist): the data version and the results
EXPERIMENT_FILES = (
    "dvc.lock",
    "data/stats/stats.json",
    "runs/train/pretrain/metrics.json",
    "runs/train/pretrain/loss.csv",
    "runs/train/pretrain/val_loss.csv",
    "runs/train/pretrain/val_loss.json",
    "runs/eval/pretrain/summary.json",
    "runs/eval/pretrain/cases.csv",
)
# `kaleido experiments`: these columns always (DVC names a metric `<file>:<key>` only when two files share a key)
RESULT_COLUMNS = r"^(Experiment|Created)$|^(.*:)?(clips|samples|final_loss|val_loss_base|val_loss|overall\..+)$"


def save_command(dvc: str, repo: Path, name: str, stages: Iterable[str]) -> list[str]:
    """`dvc exp save --name NAME --force -I FILE... STAGE...` for the flow run's files that exist (untracked ones
    included), limited to the `stages` the run ran: without them DVC refuses the save over a stage the flow does not
    run (the DVC `evaluate` stage's outputs, say)."""
    include = [arg for file in EXPERIMENT_FILES if (repo / file).is_file() for arg in ("-I", file)]
    return [dvc, "exp", "save", "--name", name, "--force", *include, *stages]


def identity_env(repo: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """GIT_AUTHOR_* / GIT_COMMITTER_* for `dvc exp save` where git has no user configured (a CI machine, a pod):
    an experiment is a commit under refs/exps, and git refuses a commit without a name. Empty when one is set.
    `env`: the environment the save runs in (default: this process's)."""
    try:
        email = subprocess.run(["git", "config", "user.email"], cwd=repo, capture_output=True, text=True, timeout=30,
                               env=dict(env) if env is not None else None)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if email.returncode == 0 and email.stdout.strip():
        return {}
    return {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
            for what, value in (("NAME", "Kaleido flow"), ("EMAIL", "kaleido-flow@localhost"))}  # fmt: skip


def experiment_name(model: str, version: str) -> str:
    """The experiment of a registered version: `<model>-v<N>` (git ref names allow neither spaces nor `..`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}-v{version}").replace("..", ".")




def _rows(shown: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for row in shown:
        yield row
        for experiment in row.get("experiments") or []:
            yield from experiment.get("revs") or []


def changed_params(shown: list[dict[str, Any]]) -> list[str]:
    """The dotted params.yaml keys whose values differ between the rows of `dvc exp show --json`."""
    values: dict[str, set[str]] = {}
    present: dict[str, int] = {}
    rows = 0
    for row in _rows(shown):
        files = (row.get("data") or {}).get("params") or {}
        params = (files.get("params.yaml") or {}).get("data")
        if not isinstance(params, Mapping):
            continue
        rows += 1
        for key, value in flatten_dotted(params).items():
            values.setdefault(key, set()).add(json.dumps(value, sort_keys=True))
            present[key] = present.get(key, 0) + 1
    # a key missing from some rows differs too (a knob added since)
    return sorted(key for key, seen in values.items() if len(seen) > 1 or present[key] < rows)


def show_command(dvc: str, changed: list[str], extra: Iterable[str] = ()) -> list[str]:
    """`dvc exp show` limited to RESULT_COLUMNS and the `changed` params."""
    keep = RESULT_COLUMNS + "".join(f"|^{re.escape(key)}$" for key in changed)
    return [dvc, "exp", "show", "--no-pager", "--drop", ".*", "--keep", keep, *extra]


def params_drift(repo: Path, name: str = "params.yaml") -> list[str] | None:
    """`key: committed -> now` for each params.yaml key that differs from git HEAD's, None outside git (or when HEAD
    has no params.yaml). A plain `dvc exp run -S` leaves its values here: the next run would train with them."""
    try:
        committed = subprocess.run(["git", "show", f"HEAD:./{name}"], cwd=repo, capture_output=True, text=True,
                                   timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if committed.returncode or not (repo / name).is_file():
        return None
    try:
        before = flatten_dotted(yaml.safe_load(committed.stdout) or {})
        after = flatten_dotted(yaml.safe_load((repo / name).read_text()) or {})
    except yaml.YAMLError:
        return [f"{name} is not valid YAML"]
    missing = object()
    lines = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, missing), after.get(key, missing)
        if old != new:
            shown_old = "(absent)" if old is missing else json.dumps(old)
            shown_new = "(absent)" if new is missing else json.dumps(new)
            lines.append(f"{key}: {shown_old} -> {shown_new}")
    return lines


def drift_warning(repo: Path) -> str | None:
    """The loud note a run prints when params.yaml is not the committed one; None when it is (or outside git)."""
    lines = params_drift(repo)
    if not lines:
        return None
    shown = "\n  ".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
    return ("params.yaml differs from your last commit (edited, or left by a `dvc exp run`); this run uses:\n"
            f"  {shown}\n"
            "`git checkout params.yaml` goes back to the committed values; `dvc exp run --temp -C dvc.lock -S ...` "
            "sweeps without touching the workspace.")
