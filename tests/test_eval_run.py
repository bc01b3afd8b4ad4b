"""`kaleido evaluate` end to end (tiny models, built-in set, real MLflow server) and its resume logic."""

from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.config import load_params
from kaleido.eval.evalset import init_builtin
from kaleido.eval.interpolation import FarnebackInterpolator
from kaleido.eval.run import EvalError, MetricSuite, evaluate, resolve_model

METRIC_KEYS = {"subject_consistency", "background_consistency", "motion_smoothness", "aesthetic_quality",
               "imaging_quality", "clip_text_score", "s2v_consistency", "s2v_decoupling"}


def _eval_params(folder: Path, assets: Path, vision: dict[str, Path], tiny_eval: dict[str, Path],
                 params_for: Callable[..., Path], overrides: dict[str, Any] | None = None) -> Path:
    settings: dict[str, Any] = {
        "data.models.grounding_dino": str(vision["grounding_dino"]),
        "data.models.sam": str(vision["sam"]),
        "data.models.sam_type": "tiny",
        "data.models.clip": str(vision["clip"]),
        "eval.models.dino": str(tiny_eval["dino"]),
        "eval.models.aesthetic_clip": str(vision["clip"]),
        "eval.models.aesthetic_head": str(tiny_eval["aesthetic_head"]),
        "eval.models.musiq": str(tiny_eval["musiq"]),
        # tiny videos; one S2V frame per video keeps the tiny SAM (1024 px encoder) affordable on a CPU
        "eval.frames": 5, "eval.height": 32, "eval.width": 48, "eval.steps": 2, "eval.s2v.max_frames": 1,
        "platform.mlflow_tracking_uri": "",
    }
    return params_for(folder, assets, {**settings, **(overrides or {})})


@pytest.mark.slow
def test_evaluate_registry_model_end_to_end_then_resume_and_gate(
    tiny_assets: Path, tiny_vision: dict[str, Path], tiny_eval: dict[str, Path], params_for: Callable[..., Path],
    mlflow_server: str, tmp_path: Path,
) -> None:

    from kaleido.registry import Lineage, ModelRegistry

    name = f"kaleido-eval-{uuid.uuid4().hex[:8]}"
    params = _eval_params(tmp_path / "cfg", tiny_assets, tiny_vision, tiny_eval, params_for, {
        "platform.mlflow_tracking_uri": mlflow_server, "platform.registered_model": name,
        "eval.experiment": f"eval-{name}",
    })
    registry = ModelRegistry(mlflow_server, name)
    client = registry.client
    run = client.create_run(client.create_experiment(f"train-{name}"))
    version = registry.register(run.info.run_id, tiny_assets / "transformer", Lineage("g", "d", "p", "r"))

    runner = CliRunner()
    assert runner.invoke(app, ["eval-set", "init", str(tmp_path / "set")]).exit_code == 0
    import yaml

    spec = yaml.safe_load((tmp_path / "set" / "evalset.yaml").read_text())  # one prompt past the 512 tokens
    spec["cases"][0]["prompt"] += " The camera slowly pans to the left." * 90
    (tmp_path / "set" / "evalset.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    long_case = spec["cases"][0]["id"]
    command = ["evaluate", "--model", f"models:/{name}/{version}",
               "--eval-set", str(tmp_path / "set"), "--out", str(tmp_path / "out"), "--params", str(params),
               "--quiet"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert len(summary["generated"]) == 5 and summary["skipped"] == []
    assert f"warning: case {long_case}: prompt has " in result.output

    document = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(document["overall"]) == METRIC_KEYS
    assert all(value is not None and np.isfinite(value) for value in document["overall"].values())
    assert set(document["per_category"]) == {"human", "animal", "object", "multi-subject"}
    assert document["text_metric"]["key"] == "clip_text_score"  # labelled, never passed off as ViCLIP
    assert "Farneback" in document["backbones"]["motion_smoothness"]
    assert document["model"]["registry"] == {"name": name, "version": version}
    for case in document["cases"]:
        assert set(case["metrics"]) == METRIC_KEYS and 0.0 <= case["metrics"]["s2v_consistency"] <= 1.0
        assert (tmp_path / "out" / "cases" / case["id"] / "video.mp4").is_file()
    summary_file = json.loads((tmp_path / "out" / "summary.json").read_text())  # DVC's metrics file
    assert summary_file == {"overall": document["overall"], "per_category": document["per_category"]}
    with (tmp_path / "out" / "cases.csv").open() as handle:  # DVC's per-case plot
        rows = list(csv.DictReader(handle))
    assert [row["id"] for row in rows] == [case["id"] for case in document["cases"]]
    assert float(rows[0]["s2v_consistency"]) == pytest.approx(document["cases"][0]["metrics"]["s2v_consistency"])
    report = (tmp_path / "out" / "report.html").read_text()
    assert "not ViCLIP" in report and "Farneback" in report and "astronaut-and-cat" in report
    assert report.count("data:image/jpeg;base64,") >= 5 + 6  # a strip per case + reference thumbnails
    assert "upper bound" in report  # the gate rule is stated
    truncated = [case for case in document["cases"] if case.get("prompt_truncation")]
    assert [case["id"] for case in truncated] == [long_case] and truncated[0]["prompt_truncation"]["kept"] == 512
    assert report.count("the model read the first 512") == 1

    # MLflow: one run with overall + per-category metrics and the artifacts; the version points at it
    run_id = document["mlflow"]["run_id"]
    logged = client.get_run(run_id).data.metrics
    assert logged["s2v_consistency"] == pytest.approx(document["overall"]["s2v_consistency"])
    assert "multi-subject/s2v_decoupling" in logged
    artifacts = {item.path for item in client.list_artifacts(run_id)}
    assert {"metrics.json", "report.html", "cases.csv", "cases"} <= artifacts
    assert registry.version_tags(version)["eval.run_id"] == run_id

    # a re-run scores nothing again
    again = runner.invoke(app, command)
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout[again.stdout.index("{"):])
    assert summary["generated"] == [] and len(summary["skipped"]) == 5

    # the embedded default floors are met honestly by the tiny model (no champion: floors alone)
    gated = runner.invoke(app, ["gate", "--candidate", f"models:/{name}/{version}", "--params", str(params)])
    assert gated.exit_code == 0, gated.output
    assert registry.gate_decision(version) == "passed"
    strict = _eval_params(tmp_path / "strict", tiny_assets, tiny_vision, tiny_eval, params_for, {
        "platform.mlflow_tracking_uri": mlflow_server, "platform.registered_model": name,
        "gate.floors": {"motion_smoothness": 1.01},
    })
    refused = runner.invoke(app, ["gate", "--candidate", str(tmp_path / "out"), "--params", str(strict)])
    assert refused.exit_code == 1 and "motion_smoothness: fail" in refused.output
    assert registry.gate_decision(version) == "failed"  # the local metrics.json names its registry version


class _FakePipeline:
    """Deterministic frames from the seed; counts generations (the resume logic needs no real model)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, prompt: str, references: Any, seed: int, progress: bool, **request: Any) -> np.ndarray:
        self.calls.append(prompt)
        rng = np.random.default_rng(seed)
        base = rng.integers(0, 255, (1, request["height"], request["width"], 3), dtype=np.uint8)
        return np.repeat(base, request["frames"], axis=0)


def test_resume_skips_scored_cases_and_redoes_changed_ones(tmp_path: Path) -> None:
    import yaml

    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump({"generate": {"frames": 5, "height": 32, "width": 48},
                                           "platform": {"mlflow_tracking_uri": ""}}))
    params = load_params(params_path)
    init_builtin(tmp_path / "set")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    suite = MetricSuite(metrics=["motion_smoothness"], interpolator=FarnebackInterpolator(),
                        descriptions={"motion_smoothness": "farneback"})
    pipeline = _FakePipeline()

    def run(**kwargs: Any) -> Any:
        return evaluate(params, str(checkpoint), tmp_path / "set", tmp_path / "out", suite=suite, pipeline=pipeline,
                        progress=False, echo=lambda line: None, **kwargs)

    first = run()
    assert len(first.generated) == 5 and len(pipeline.calls) == 5
    assert first.document["overall"] == {"motion_smoothness": 1.0}  # static fake videos
    assert run().generated == [] and len(pipeline.calls) == 5
    spec = tmp_path / "set" / "evalset.yaml"
    spec.write_text(spec.read_text().replace("at dawn", "at dusk"))  # one case changes
    assert run().generated == ["rocket-launch"]
    assert len(run(fresh=True).generated) == 5
    (checkpoint / "model.safetensors").write_bytes(b"new weights!")  # another model: everything again
    assert len(run().generated) == 5
    html = (tmp_path / "out" / "report.html").read_text()
    assert "rocket-launch" in html and "Motion smoothness" in html


def test_model_references_are_checked(tmp_path: Path) -> None:
    import yaml

    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump({"platform": {"mlflow_tracking_uri": ""}}))
    params = load_params(params_path)
    with pytest.raises(EvalError, match="no such file or folder"):
        resolve_model(str(tmp_path / "missing"), params)
    with pytest.raises(EvalError, match="mlflow_tracking_uri"):
        resolve_model("models:/kaleido-s2v@champion", params)
    source = resolve_model(str(tmp_path), params)
    assert source.identity.startswith("path:") and source.registry_name is None


def test_unreachable_tracking_server_fails_before_any_work(tmp_path: Path) -> None:
    import socket

    import yaml

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump({"platform": {"mlflow_tracking_uri": f"http://127.0.0.1:{port}"}}))
    init_builtin(tmp_path / "set")
    pipeline = _FakePipeline()
    with pytest.raises(EvalError, match=r"does not answer.*--no-mlflow"):
        evaluate(load_params(params_path), str(tmp_path), tmp_path / "set", tmp_path / "out", pipeline=pipeline,
                 progress=False, echo=lambda line: None)
    assert pipeline.calls == []
