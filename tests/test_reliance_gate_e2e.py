"""End to end: a candidate trained with its references dropped (flow_matching.reference_dropout 1.0) learns the
clips well enough that its held-out val loss beats its base model's, yet the gate refuses it on reference reliance.
The real path: the multi-subject task's tars -> `kaleido encode` -> `kaleido train` (DeepSpeed) -> `kaleido
evaluate` (the trained export generating the built-in eval set) -> `kaleido gate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_gate_refuses_a_candidate_that_ignores_its_references(tiny_assets: Path, tmp_path: Path) -> None:
    from kaleido.config import load_params
    from kaleido.eval.evalset import init_builtin
    from kaleido.eval.gate import run_gate
    from kaleido.eval.run import evaluate
    from kaleido.train import multi_subject as ms
    from kaleido.train.encode import run_encode

    assets = {key: str(tiny_assets / ("transformer" if key == "checkpoint" else key))
              for key in ("checkpoint", "vae", "text_encoder", "tokenizer")}
    data, latents = tmp_path / "data", tmp_path / "latents"
    ms.write_dataset(data, ms.make_samples(48, 12))
    settings = ms.TrainSettings(steps=150)
    params_path = ms.task_params(tmp_path / "dropped", data, latents, assets, assets["checkpoint"], "shift_wh",
                                 settings, reference_dropout=1.0)
    run_encode(load_params(params_path), progress=False)
    stage = ms.train(params_path)  # `kaleido train`: DeepSpeed, the real loss with its references dropped
    summary = json.loads((stage / "metrics.json").read_text())
    assert summary["val_loss"] < 0.7 * summary["val_loss_base"]  # it learned the clips

    raw = yaml.safe_load(params_path.read_text())
    raw["eval"] = {"metrics": ["motion_smoothness"], "frames": 5, "height": 32, "width": 96, "steps": 2}
    raw["gate"] = {"floors": {}, "reference_reliance": {"floor": 0.0}}
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(params_path)
    init_builtin(tmp_path / "set")
    evaluation = evaluate(params, str(stage / "export"), tmp_path / "set", tmp_path / "eval", log_mlflow=False,
                          progress=False, echo=lambda line: None)
    assert "reference_reliance" in evaluation.document["overall"]  # the training's record, attached
    decision = run_gate(params, str(tmp_path / "eval"), record=False)
    reasons = decision.reasons()
    assert not decision.passed, reasons
    assert reasons["val_loss"].startswith("pass"), reasons  # the loss alone would have promoted it
    assert reasons["reference_reliance"].startswith("fail: floor FAILED"), reasons
    assert "does NOT show reliance above the floor 0" in reasons["reference_reliance"]
