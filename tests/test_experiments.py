"""DVC experiments around the flow: a `dvc exp show` row per run (dvc exp save), the documented column set of
`kaleido experiments`, and the loud note when a sweep left its params in the workspace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

IDENTITY = ["-c", "user.email=test@kaleido.test", "-c", "user.name=test"]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *IDENTITY, *args], cwd=repo, check=True, capture_output=True)


def _repo(tmp_path: Path, params: dict) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "params")
    return repo


def test_params_drift_names_what_differs_from_the_commit(tmp_path: Path) -> None:
    from kaleido.platform.experiments import drift_warning, params_drift

    repo = _repo(tmp_path, {"train": {"lr": 0.001, "lora": {"enabled": False}}, "seed": 1})
    assert params_drift(repo) == [] and drift_warning(repo) is None
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.001, "lora": {"enabled": True}},
                                                      "extra": "x"}))
    assert params_drift(repo) == ['extra: (absent) -> "x"', "seed: 1 -> (absent)",
                                  "train.lora.enabled: false -> true"]
    warning = drift_warning(repo)
    assert warning and "train.lora.enabled: false -> true" in warning and "git checkout params.yaml" in warning
    outside = tmp_path / "no-git"
    outside.mkdir()
    (outside / "params.yaml").write_text("a: 1\n")
    assert params_drift(outside) is None


def test_changed_params_of_exp_show_rows() -> None:
    from kaleido.platform.experiments import changed_params, show_command

    def row(params: dict, experiments: list | None = None) -> dict:
        return {"data": {"params": {"params.yaml": {"data": params}}}, "experiments": experiments}

    shown = [row({"a": 1, "b": {"c": 2, "d": [1, 2]}},
                 [{"revs": [row({"a": 1, "b": {"c": 3, "d": [1, 2]}})]}, {"revs": [row({"a": 1, "b": {"c": 2}})]}])]
    assert changed_params(shown) == ["b.c", "b.d"]
    keep = show_command("dvc", ["b.c"])[-1]
    assert keep.endswith(r"|^b\.c$") and "val_loss" in keep


def test_a_saved_run_is_an_experiment_row_with_the_documented_columns(tmp_path: Path) -> None:
    """`dvc exp save` as the flow runs it (untracked dvc.lock and metrics, no git identity configured): the run is a
    row of `dvc exp show`, the branch and the workspace do not move; `kaleido experiments` shows results and the one
    param that differs, not every key."""
    from kaleido.platform.experiments import experiment_name, identity_env, save_command

    dvc = str(Path(sys.executable).with_name("dvc"))
    params = {"data": {"seed": 1, "shard_size": 8}, "train": {"lr": 0.001, "steps": 3}}
    repo = _repo(tmp_path, params)
    subprocess.run([dvc, "init", "-q"], cwd=repo, check=True)
    metrics = repo / "runs/train/pretrain/metrics.json"
    script = (f"import json, pathlib, yaml; p = yaml.safe_load(open('params.yaml'));"
              f"pathlib.Path('{metrics.relative_to(repo)}').parent.mkdir(parents=True, exist_ok=True);"
              f"json.dump({{'final_loss': p['train']['lr'] * 100, 'val_loss': 0.5, 'steps': 3}},"
              f" open('{metrics.relative_to(repo)}', 'w'))")
    stage = {"cmd": f"{sys.executable} -c \"{script}\"", "params": ["train.lr"],
             "metrics": [{"runs/train/pretrain/metrics.json": {"cache": False}}]}
    # a stage the flow does not run (DVC's evaluate): its output is missing when the flow saves
    evaluate = {"cmd": "echo report > report.html", "deps": ["runs/train/pretrain/metrics.json"],
                "outs": ["report.html"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage, "evaluate": evaluate}}))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "pipeline")
    env = {**os.environ, "HOME": str(tmp_path / "home"), "GIT_CONFIG_NOSYSTEM": "1"}  # no git identity anywhere
    (tmp_path / "home").mkdir()

    def run(*args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=repo, env={**env, **(extra or {})}, capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    run(dvc, "repro", "-q", "train")
    head = run("git", "rev-parse", "HEAD").stdout
    identity = identity_env(repo, env)
    assert identity["GIT_COMMITTER_NAME"] == "Kaleido flow"
    run(*save_command(dvc, repo, experiment_name("kaleido-s2v", "1"), ["train"]), extra=identity)
    (repo / "params.yaml").write_text(yaml.safe_dump({**params, "train": {"lr": 0.002, "steps": 3}}))
    run(dvc, "repro", "-q", "train")
    run(*save_command(dvc, repo, experiment_name("kaleido-s2v", "2"), ["train"]), extra=identity)
    assert run("git", "rev-parse", "HEAD").stdout == head  # the branch did not move
    assert "lr: 0.002" in (repo / "params.yaml").read_text()  # nor did the workspace
    shown = json.loads(run(dvc, "exp", "show", "--json").stdout)
    names = {rev.get("name") for row in shown for exp in row.get("experiments") or [] for rev in exp["revs"]}
    assert {"kaleido-s2v-v1", "kaleido-s2v-v2"} <= names
    table = run(str(Path(sys.executable).with_name("kaleido")), "experiments", "--md").stdout
    header = table.splitlines()[0]
    assert "train.lr" in header and "final_loss" in header and "val_loss" in header
    assert "data.seed" not in header and "steps" not in header  # unchanged params and other metrics stay out
    assert "kaleido-s2v-v2" in table and "0.2" in table
