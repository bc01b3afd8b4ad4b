"""Training under faults, in real processes (2 CPU ranks on gloo): the MLflow server killed mid-run, a full disk at a
checkpoint, a truncated newest checkpoint (docs/operations.md, "When things fail")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from _faults import BIN, MlflowServer, resize, small_disk, wait_for
from test_train import SPECS, VAL_SPECS, write_dataset

from kaleido.config import load_params
from kaleido.train.tracking import read_loss_curve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_assets, params_for):
    """The tiny dataset and its latent cache; `params(name, overrides)` -> a params.yaml writing under runs/<name>."""
    from kaleido.train.encode import run_encode

    folder = tmp_path_factory.mktemp("train-faults")
    write_dataset(folder / "data", SPECS, val_specs=VAL_SPECS)

    def params(name: str, overrides: dict | None = None) -> Path:
        base = {
            "train.dataset": str(folder / "data" / "dataset"), "train.latents": str(folder / "latents"),
            "train.output_dir": str(folder / "runs" / name), "train.pretrain.steps": 8, "train.checkpoint_every": 4,
            "train.experiment": "kaleido-train-faults", "platform.mlflow_tracking_uri": "",
        }  # fmt: skip
        return params_for(folder / "params" / name, tiny_assets, {**base, **(overrides or {})})

    run_encode(load_params(params("encode")), progress=False)
    return {"folder": folder, "params": params}


def _train(params: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [str(BIN / "kaleido"), "train", "--stage", "pretrain", "--params", str(params), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def _output(params: Path) -> Path:
    return Path(load_params(params).train.output_dir) / "pretrain"


def _last_line(result: subprocess.CompletedProcess) -> str:
    return (result.stdout + result.stderr).strip().splitlines()[-1]


def tag_name(step: int) -> str:
    """DeepSpeed's tag folder of the checkpoint at `step` (what the trainer names it)."""
    return f"step{step:08d}"


def newest_intact(out: Path) -> str | None:
    from kaleido.train.checkpoints import resume_point

    return resume_point(out / "checkpoints").tag


# ---- the MLflow server dies mid-run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed_mid_training(env):
    """A 40-step run logging into a private MLflow server that is SIGKILLed after the second step."""
    server = MlflowServer(env["folder"] / "mlflow")
    try:
        uri = server.start()
        params = env["params"]("outage", {"platform.mlflow_tracking_uri": uri, "train.pretrain.steps": 40})
        out = _output(params)
        command = [str(BIN / "kaleido"), "train", "--stage", "pretrain", "--params", str(params)]
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            def two_steps() -> bool:
                if run.poll() is not None:
                    raise AssertionError(f"training ended before the kill:\n{run.communicate()[0][-4000:]}")
                return (out / "loss.csv").is_file() and len(read_loss_curve(out / "loss.csv")) >= 2

            wait_for(two_steps, 180, "two training steps")
            killed = server.kill()
            output, _ = run.communicate(timeout=240)
            ended = time.monotonic()
        finally:
            if run.poll() is None:
                run.kill()
        yield {"server": server, "uri": uri, "params": params, "out": out, "returncode": run.returncode,
               "output": output, "seconds": ended - killed}
    finally:
        server.stop()  # also when the set-up failed: no server outlives the tests


def test_mlflow_killed_mid_training_checkpoints_and_stops_with_the_way_to_resume(killed_mid_training):
    run = killed_mid_training
    out = run["out"]
    assert run["returncode"] == 2, run["output"][-4000:]
    last = run["output"].strip().splitlines()[-1]
    assert last.startswith(f"error: the MLflow server at {run['uri']} stopped answering (logging "), last
    assert "`kaleido train --stage pretrain --resume`" in last and "uploads the steps it missed" in last
    assert "warning: MLflow at " in run["output"]  # the failed request was reported when it happened
    stopped = len(read_loss_curve(out / "loss.csv"))
    assert 2 <= stopped < 40
    assert f"training stopped after step {stopped}: checkpoint" in last
    # nothing lost: the checkpoint is at the very step the tracking died, intact
    assert newest_intact(out) == tag_name(stopped)
    assert run["seconds"] < 60, f"{run['seconds']:.0f} s from the kill to the exit (MLflow's defaults: ~8 minutes)"


@pytest.fixture(scope="module")
def server_back(killed_mid_training):
    killed_mid_training["server"].start()  # the same store on the same port: the run left RUNNING is there
    return killed_mid_training


def test_a_fresh_start_marks_the_run_the_outage_left_behind_failed(server_back, env):
    from mlflow import MlflowClient

    run = server_back
    from kaleido.train.tracking import RUN_RECORD

    left = json.loads((run["out"] / RUN_RECORD).read_text())["run_id"]
    client = MlflowClient(run["uri"])
    assert client.get_run(left).info.status == "RUNNING"
    # a copy of the stopped stage, started afresh (no --resume): the old run is marked, a new one is made
    params = env["params"]("outage-fresh", {"platform.mlflow_tracking_uri": run["uri"], "train.pretrain.steps": 2})
    shutil.copytree(run["out"], _output(params))
    fresh = _train(params)
    assert fresh.returncode == 0, (fresh.stdout + fresh.stderr)[-4000:]
    said = fresh.stdout + fresh.stderr  # the ranks' lines come through the launcher's stdout
    assert f"warning: MLflow run {left} of the interrupted training of stage pretrain was left RUNNING" in said
    assert client.get_run(left).info.status == "FAILED"
    assert json.loads((_output(params) / RUN_RECORD).read_text())["run_id"] != left


def test_resume_after_the_outage_continues_the_run_and_uploads_the_missed_steps(server_back):
    from mlflow import MlflowClient

    run = server_back
    resumed = _train(run["params"], "--resume")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert "that MLflow run" in resumed.stdout and "had missed" in resumed.stdout
    client = MlflowClient(run["uri"])
    run_id = json.loads((run["out"] / "metrics.json").read_text())["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 41))  # every step once: none lost, none twice
    logged = {m.step: m.value for m in history}
    assert logged == pytest.approx({int(r["step"]): r["loss"] for r in read_loss_curve(run["out"] / "loss.csv")})


# ---- a full disk at a checkpoint -------------------------------------------------------------------------------

# Where no tmpfs can be mounted: torch.save raises what it raises on a full disk, for one checkpoint tag.
_FULL_DISK_SITE = '''
import os
_TAG = os.environ.get("KALEIDO_TEST_FULL_DISK_AT")
if _TAG:
    import torch

    _save = torch.save

    def _full(obj, f, *args, **kwargs):
        if _TAG in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 23424 vs 23318")
        return _save(obj, f, *args, **kwargs)

    torch.save = _full
'''


def test_a_full_disk_at_a_checkpoint_names_it_and_the_previous_one_resumes(env, tmp_path):
    disk = tmp_path / "disk"
    # a checkpoint of the tiny model is ~2.4 MB: step 4's fits, step 8's does not
    with small_disk(disk, "3500k") as mounted:
        params = env["params"]("full-disk", {"train.output_dir": str(disk / "runs"), "train.pretrain.steps": 12})
        out = _output(params)
        inject: dict[str, str] = {}
        if not mounted:
            (tmp_path / "site").mkdir()
            (tmp_path / "site" / "sitecustomize.py").write_text(_FULL_DISK_SITE)
            inject = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
                      "KALEIDO_TEST_FULL_DISK_AT": tag_name(8)}
        full = _train(params, env=inject)
        assert full.returncode == 2, (full.stdout + full.stderr)[-4000:]
        line = _last_line(full)
        assert line.startswith(f"error: {out / 'checkpoints' / tag_name(8)}: no space left on device ("), line
        assert "MB free)" in line and f"the previous checkpoint {tag_name(4)} is intact" in line
        assert "--resume" in line and "inline_container" not in line
        assert newest_intact(out) == tag_name(4)
        if mounted:
            resize(disk, "32m")  # room again
        resumed = _train(params, "--resume")  # without the injection: the disk has room
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
        assert [int(r["step"]) for r in read_loss_curve(out / "loss.csv")] == list(range(1, 13))
        assert newest_intact(out) == tag_name(12)


# ---- a truncated newest checkpoint -----------------------------------------------------------------------------


def test_resume_skips_a_truncated_newest_checkpoint_for_the_newest_intact_one(env):
    params = env["params"]("truncated")
    first = _train(params)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    out = _output(params)
    reference = read_loss_curve(out / "loss.csv")
    newest = out / "checkpoints" / tag_name(8) / "mp_rank_00_model_states.pt"
    size = newest.stat().st_size
    with newest.open("r+b") as handle:  # an interrupted copy, a disk that filled up after the save
        handle.truncate(size // 2)

    resumed = _train(params, "--resume")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    said = (resumed.stdout + resumed.stderr).splitlines()
    warning = next(line for line in said if line.startswith("warning: resuming from"))
    assert f"resuming from {tag_name(4)}, the newest intact checkpoint" in warning
    assert f"skipped {tag_name(8)} (mp_rank_00_model_states.pt is {size // 2} bytes, {size} were written" in warning
    # steps 5-8 trained again from step 4: the same curve, bit for bit
    def curve(rows: list[dict[str, float]]) -> list[tuple[float, ...]]:
        return [(row["step"], row["loss"], row["grad_norm"], row["lr"]) for row in rows]

    assert curve(read_loss_curve(out / "loss.csv")) == curve(reference)

    for tag in (4, 8):  # nothing intact: refused before any process starts, naming both
        shard = out / "checkpoints" / tag_name(tag) / "mp_rank_00_model_states.pt"
        if shard.is_file():
            with shard.open("r+b") as handle:
                handle.truncate(100)
    refused = _train(params, "--resume")
    assert refused.returncode == 2
    assert "--resume: no intact DeepSpeed checkpoint" in refused.stderr and tag_name(4) in refused.stderr


# ---- a resume that cannot lie ----------------------------------------------------------------------------------


def test_a_resume_with_edited_params_is_refused_or_applied_and_recorded_and_a_corrupted_checkpoint_skipped(
        env, server_back):
    """The probe: params.yaml edited during training (lr 0.001 -> 0.5), then --resume: the banner said the new lr,
    every resumed step ran at the old one, and the run's params kept the old values. Now the resume is refused naming
    the keys, or with --apply-param-changes the new values are used and recorded (output, loss.csv, MLflow, export).
    The newest checkpoint is also corrupted in place (same size): its sha256 differs from its marker's, so the resume
    starts from the one before, and says so."""
    import yaml
    from mlflow import MlflowClient

    from kaleido.train.trainer import EXIT_AFTER_STEP_ENV

    uri = server_back["uri"]
    params = env["params"]("edited", {"platform.mlflow_tracking_uri": uri, "train.checkpoint_every": 2})
    out = _output(params)
    killed = _train(params, env={EXIT_AFTER_STEP_ENV: "5"})  # checkpoints at steps 2 and 4, killed after step 5
    assert killed.returncode != 0 and newest_intact(out) == tag_name(4), (killed.stdout + killed.stderr)[-3000:]
    marker = json.loads((out / "checkpoints" / tag_name(4) / "complete.json").read_text())
    assert marker["params"]["train.pretrain.lr"] == 1e-3 and len(marker["sha256"]) == len(marker["files"])
    shard = out / "checkpoints" / tag_name(4) / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    raw = yaml.safe_load(params.read_text())
    raw["train"]["pretrain"].update(lr=1e-2, steps=10)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    refused = _train(params, "--resume")
    said = refused.stdout + refused.stderr
    assert refused.returncode == 2, said[-3000:]
    assert "params changed since this run's checkpoint" in said and "--apply-param-changes" in said
    assert "train.pretrain.lr 0.001 -> 0.01" in said and "train.pretrain.steps 8 -> 10" in said
    raw["model"]["rope"]["offset"] = 79  # not a change a run can take mid-way, flag or not
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    fixed = _train(params, "--resume", "--apply-param-changes")
    assert fixed.returncode == 2 and "model.rope.offset 80 -> 79" in fixed.stderr and "cannot change mid-run" in \
        fixed.stderr
    raw["model"]["rope"]["offset"] = 80
    params.write_text(yaml.safe_dump(raw, sort_keys=False))

    applied = _train(params, "--resume", "--apply-param-changes")
    said = applied.stdout + applied.stderr
    assert applied.returncode == 0, said[-4000:]
    assert f"resuming from {tag_name(2)}" in said and f"skipped {tag_name(4)} (mp_rank_00_model_states.pt differs " \
        "from the sha256 its marker recorded" in said
    assert ("resumed at step 2 with changed params (applied from step 3): train.pretrain.lr 0.001 -> 0.01, "
            "train.pretrain.steps 8 -> 10") in said
    rows = read_loss_curve(out / "loss.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert [r["lr"] for r in rows[:2]] == pytest.approx([5e-4, 1e-3])  # warmup at the old lr
    assert all(r["lr"] == pytest.approx(1e-2) for r in rows[2:])  # every resumed step at the new one
    change = [{"step": 2, "changes": {"train.pretrain.lr": [1e-3, 1e-2], "train.pretrain.steps": [8, 10]}}]
    assert json.loads((out / "export.json").read_text())["param_changes"] == change
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["param_changes"] == change and metrics["steps"] == 10
    assert json.loads((out / "checkpoints" / tag_name(10) / "complete.json").read_text())["changes"] == change
    run = MlflowClient(uri).get_run(metrics["mlflow_run_id"])
    assert json.loads(run.data.tags["param_changes"]) == change
    assert run.data.params["changed_at_step_2.train.pretrain.lr"] == "0.01"
    assert run.data.params["train.pretrain.lr"] == "0.001"  # what the first steps ran with, kept
