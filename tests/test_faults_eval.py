"""Evaluation under faults, in real processes: two runners on one --out, the MLflow server killed mid-run, a full
disk, a run left behind (docs/operations.md, "When things fail")."""

from __future__ import annotations

import errno
import json
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _faults import BIN, MlflowServer, mp4_top_level_boxes, resize, small_disk, wait_for

from kaleido.eval.evalset import init_builtin
from kaleido.platform.files import lock_path

CASES = 5  # the built-in eval set


def _params(folder: Path, assets: Path, params_for: Callable[..., Path], overrides: dict[str, Any] | None = None
            ) -> Path:
    """Tiny videos, one cheap metric (Farneback motion smoothness: no backbone to load), no tracking."""
    settings = {"eval.frames": 5, "eval.height": 32, "eval.width": 48, "eval.steps": 2,
                "eval.metrics": ["motion_smoothness"], "platform.mlflow_tracking_uri": ""}  # fmt: skip
    return params_for(folder, assets, {**settings, **(overrides or {})})


def _evaluate(params: Path, assets: Path, evalset: Path, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "kaleido"), "evaluate", "--model", str(assets / "transformer"), "--eval-set", str(evalset),
            "--out", str(out), "--params", str(params), "--quiet", *extra]  # fmt: skip


@pytest.fixture
def evalset(tmp_path: Path) -> Path:
    init_builtin(tmp_path / "set")
    return tmp_path / "set"


@pytest.mark.slow
def test_a_second_evaluation_into_the_same_folder_is_refused_naming_the_first(
    tiny_assets: Path, params_for: Callable[..., Path], evalset: Path, tmp_path: Path
) -> None:
    params = _params(tmp_path / "cfg", tiny_assets, params_for)
    out = tmp_path / "out"
    command = _evaluate(params, tiny_assets, evalset, out, "--no-mlflow")
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder = lock_path(out).with_name(lock_path(out).name + ".holder")
        wait_for(lambda: holder.is_file() or (out / "cases").is_dir(), 60, "the first evaluation to start")
        second = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert first.poll() is None, "the first evaluation ended before the second one started"
    finally:
        stdout, stderr = first.communicate(timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    refusal = second.stderr.strip().splitlines()[-1]
    assert refusal.startswith(f"error: {out} is being written by pid {first.pid} on "), refusal
    assert "kaleido evaluate" in refusal and "another output folder" in refusal
    assert "evaluating" not in second.stderr  # refused before any work
    assert first.returncode == 0, stderr[-3000:]
    assert len(json.loads(stdout[stdout.index("{"):])["generated"]) == CASES
    for case in (out / "cases").iterdir():  # one writer: every video whole, one `moov` each
        assert mp4_top_level_boxes(case / "video.mp4").count("moov") == 1, case.name
    assert not [p.name for p in out.rglob(".*tmp-*")]  # no temporary file left behind


@pytest.fixture(scope="module")
def killed_mid_evaluation(tiny_assets: Path, params_for: Callable[..., Path], tmp_path_factory) -> Any:
    """`kaleido evaluate` logging into a private MLflow server that is SIGKILLed after the first case."""
    folder = tmp_path_factory.mktemp("eval-outage")
    init_builtin(folder / "set")
    server = MlflowServer(folder / "mlflow")
    try:
        uri = server.start()
        params = _params(folder / "cfg", tiny_assets, params_for, {
            "platform.mlflow_tracking_uri": uri, "eval.experiment": f"eval-faults-{uuid.uuid4().hex[:8]}"})
        out = folder / "out"
        command = _evaluate(params, tiny_assets, folder / "set", out)
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: any((out / "cases").glob("*/result.json")), 90, "the first case")
            server.kill()  # mid-run: the other cases are still being generated
            stdout, stderr = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
        yield {"server": server, "uri": uri, "out": out, "command": command, "returncode": run.returncode,
               "stdout": stdout, "stderr": stderr, "ended": time.time()}
    finally:
        server.stop()  # also when the set-up failed: no server outlives the tests


@pytest.mark.slow
def test_mlflow_killed_mid_evaluation_writes_everything_locally_and_fails_fast(killed_mid_evaluation: Any) -> None:
    run = killed_mid_evaluation
    out, uri, stderr = run["out"], run["uri"], run["stderr"]
    assert run["returncode"] == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the MLflow server at {uri} does not answer (creating the evaluation run"), last
    assert "run the same `kaleido evaluate` again" in last and "Traceback" not in stderr
    # the results came first: complete on disk, naming no run (none holds them)
    document = json.loads((out / "metrics.json").read_text())
    assert len(document["cases"]) == CASES and "mlflow" not in document
    assert (out / "report.html").is_file() and (out / "cases.csv").is_file()
    assert json.loads(run["stdout"][run["stdout"].index("{"):])["mlflow_run_id"] is None
    stalled = run["ended"] - (out / "metrics.json").stat().st_mtime
    assert stalled < 30, f"{stalled:.1f} s between the results and the exit (MLflow's defaults: ~4 minutes)"


@pytest.mark.slow
def test_after_the_outage_the_same_command_logs_without_generating_again(killed_mid_evaluation: Any) -> None:
    run = killed_mid_evaluation
    run["server"].start()  # the same store on the same port
    again = subprocess.run(run["command"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout[again.stdout.index("{"):])
    assert summary["generated"] == [] and len(summary["skipped"]) == CASES
    from mlflow import MlflowClient

    logged = MlflowClient(run["uri"]).get_run(summary["mlflow_run_id"])
    assert logged.info.status == "FINISHED" and "motion_smoothness" in logged.data.metrics
    assert json.loads((run["out"] / "metrics.json").read_text())["mlflow"]["run_id"] == summary["mlflow_run_id"]


class _FakePipeline:
    """Noise frames from the seed (the logging and writing paths need no real model)."""

    def __call__(self, prompt: str, references: Any, seed: int, progress: bool, **request: Any) -> Any:
        import numpy as np

        rng = np.random.default_rng(seed)
        return rng.integers(0, 255, (request["frames"], request["height"], request["width"], 3), dtype=np.uint8)


def _fake_run(tmp_path: Path, uri: str = "", experiment: str = "eval-faults") -> dict[str, Any]:
    import yaml

    from kaleido.config import load_params
    from kaleido.eval.interpolation import FarnebackInterpolator
    from kaleido.eval.run import MetricSuite

    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump({"generate": {"frames": 5, "height": 32, "width": 48},
                                           "eval": {"experiment": experiment},
                                           "platform": {"mlflow_tracking_uri": uri}}))  # fmt: skip
    init_builtin(tmp_path / "set")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    suite = MetricSuite(metrics=["motion_smoothness"], interpolator=FarnebackInterpolator(),
                        descriptions={"motion_smoothness": "farneback"})
    return {"params": load_params(params_path), "model": str(checkpoint), "eval_set": tmp_path / "set",
            "suite": suite, "pipeline": _FakePipeline(), "progress": False, "echo": lambda line: None}


def test_a_run_left_behind_in_the_output_folder_is_marked_failed(mlflow_server: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from kaleido.eval.run import evaluate
    from kaleido.train.tracking import RUN_RECORD

    experiment = f"eval-faults-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server)
    stale = client.create_run(client.create_experiment(experiment)).info.run_id  # what a dying server left RUNNING
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_RECORD).write_text(json.dumps({"run_id": stale, "tracking_uri": mlflow_server}))
    summary = evaluate(out_dir=out, **_fake_run(tmp_path, mlflow_server, experiment))
    assert client.get_run(stale).info.status == "FAILED"
    assert client.get_run(summary.mlflow_run_id).info.status == "FINISHED"
    assert json.loads((out / RUN_RECORD).read_text())["run_id"] == summary.mlflow_run_id


def test_a_full_disk_names_the_file_and_keeps_the_previous_results_whole(tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    """The disk fills up between two evaluations into one folder: the second one's first write (metrics.json; every
    case is reused) fails. A real tmpfs shrunk to what it holds where the machine allows one; an injected ENOSPC
    otherwise."""
    from kaleido.cli.app import app
    from kaleido.eval.run import evaluate
    from kaleido.platform.files import describe_os_error

    run = _fake_run(tmp_path)
    out = tmp_path / "disk" / "out"
    with small_disk(out, "2m") as mounted:
        evaluate(out_dir=out, **run)
        before = (out / "metrics.json").read_bytes()
        if mounted:
            used = subprocess.run(["df", "--output=used", "-k", str(out)], capture_output=True, text=True,
                                  check=True).stdout.split()[-1]  # fmt: skip
            resize(out, f"{used}k")  # full: not one more page
        else:
            write_text = Path.write_text

            def full(self: Path, *args: Any, **kwargs: Any) -> int:
                if self.parent == out:
                    raise OSError(errno.ENOSPC, "No space left on device")  # write() names no file
                return write_text(self, *args, **kwargs)

            monkeypatch.setattr(Path, "write_text", full)
        with pytest.raises(OSError) as caught:
            evaluate(out_dir=out, **run)
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(out / "metrics.json")
        assert (out / "metrics.json").read_bytes() == before  # the previous results, whole
        assert not [p.name for p in out.rglob(".*tmp-*")]  # no partial temporary file
        line = describe_os_error(caught.value)
        assert line.startswith(f"{out / 'metrics.json'}: no space left on device (") and "MB free" in line
        # the CLI turns it into that one line and exit 2 (KaleidoTyper), not a traceback
        monkeypatch.setattr("kaleido.eval.run.evaluate", lambda *a, **k: evaluate(out_dir=out, **run))
        with pytest.raises(SystemExit) as exited:
            app(["evaluate", "--model", run["model"], "--out", str(out), "--no-mlflow", "--quiet"])
        assert exited.value.code == 2
        assert f"error: {out / 'metrics.json'}: no space left on device (" in capsys.readouterr().err
