"""The promotion gate: floors, the bootstrap regression rule, exit codes, and decisions in MLflow tags."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.config.schema import GateConfig
from kaleido.eval.gate import GateError, decide, rule_text

SETTINGS = {"frames": 5, "height": 32, "width": 48, "steps": 2}


def _doc(scores: dict[str, list[float]], registry: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    count = len(next(iter(scores.values())))
    cases = [{"id": f"case{i}", "category": "object", "fingerprint": f"fp{i}",
              "metrics": {key: values[i] for key, values in scores.items()}} for i in range(count)]
    model = {"ref": "test", **({"registry": registry} if registry else {})}
    document = {"schema": 1, "model": model, "settings": dict(SETTINGS), "backbones": dict.fromkeys(scores, "same"),
                "cases": cases, "overall": {key: float(np.mean(v)) for key, v in scores.items()}}
    document.update(extra)
    return document


def _noisy(mean: float, spread: float, count: int = 6, seed: int = 0) -> list[float]:
    return list(mean + np.random.default_rng(seed).uniform(-spread, spread, count))


def test_floors_fail_only_on_evidence() -> None:
    config = GateConfig(floors={"s2v_consistency": 0.5})
    assert decide(_doc({"s2v_consistency": [0.6, 0.7, 0.65]}), None, config).passed
    clearly_low = decide(_doc({"s2v_consistency": [0.30, 0.31, 0.29, 0.30]}), None, config)
    assert not clearly_low.passed
    assert clearly_low.reasons()["s2v_consistency"].startswith("fail: floor FAILED (mean 0.3000")
    # mean just under the floor but the cases disagree wildly: not evidence, so no failure
    noisy = decide(_doc({"s2v_consistency": [0.05, 0.95, 0.1, 0.8]}), None, config)
    assert noisy.passed and noisy.checks[0].estimate < 0.5 < noisy.checks[0].high
    alone = decide(_doc({"s2v_consistency": [0.6], "motion_smoothness": [0.9]}), None, config)
    assert any("floors alone decide" in note for note in alone.notes)


def test_a_missing_metric_means_the_gate_cannot_decide() -> None:
    """Before: with gate.metrics null a candidate lacking a metric the champion has passed with no check on it."""
    baseline = _doc({"s2v_consistency": [0.7, 0.7, 0.7], "motion_smoothness": [0.95, 0.95, 0.95]})
    candidate = _doc({"motion_smoothness": [0.96, 0.96, 0.96]})  # s2v_consistency not computed
    with pytest.raises(GateError, match=r"no scores for s2v_consistency \(needed by the baseline\)"):
        decide(candidate, baseline, GateConfig())
    with pytest.raises(GateError, match=r"s2v_consistency \(needed by gate.metrics\)"):
        decide(candidate, None, GateConfig(metrics=["s2v_consistency", "motion_smoothness"]))
    with pytest.raises(GateError, match=r"s2v_consistency \(needed by gate.floors\)"):
        decide(candidate, None, GateConfig(floors={"s2v_consistency": 0.5}))
    # a metric only the candidate has is fine: no baseline to compare it with, said in the notes
    richer = _doc({"s2v_consistency": [0.7, 0.7, 0.7], "motion_smoothness": [0.95, 0.95, 0.95],
                   "aesthetic_quality": [0.5, 0.5, 0.5]})
    decision = decide(richer, _doc({"s2v_consistency": [0.7] * 3, "motion_smoothness": [0.95] * 3}), GateConfig())
    assert decision.passed and any("aesthetic_quality: the baseline has no scores" in n for n in decision.notes)


def test_regression_uses_paired_bootstrap_against_the_baseline() -> None:
    config = GateConfig(regression_tolerance=0.02)
    baseline = _doc({"s2v_consistency": _noisy(0.70, 0.1, seed=1), "motion_smoothness": _noisy(0.95, 0.01, seed=2)})
    base = baseline["cases"]
    # noise only: each case moves by a little, both ways
    jitter = _doc({"s2v_consistency": [c["metrics"]["s2v_consistency"] + d for c, d in
                                       zip(base, [0.03, -0.04, 0.02, -0.03, 0.01, -0.02], strict=True)],
                   "motion_smoothness": [c["metrics"]["motion_smoothness"] for c in base]})
    assert decide(jitter, baseline, config).passed
    # every case drops by ~0.1: clearly beyond the tolerance
    drop = _doc({"s2v_consistency": [c["metrics"]["s2v_consistency"] - 0.1 + d for c, d in
                                     zip(base, [0.01, -0.01, 0.0, 0.01, -0.01, 0.0], strict=True)],
                 "motion_smoothness": [c["metrics"]["motion_smoothness"] + 0.01 for c in base]})
    decision = decide(drop, baseline, config, "cand", "base")
    assert not decision.passed
    reasons = decision.reasons()
    assert reasons["s2v_consistency"].startswith("fail: regression FAILED (mean diff vs baseline -0.1000")
    assert "drop beyond tolerance 0.02" in reasons["s2v_consistency"]
    assert reasons["motion_smoothness"].startswith("pass")
    # a looser per-metric tolerance lets the same drop through
    assert decide(drop, baseline, GateConfig(tolerances={"s2v_consistency": 0.15})).passed
    # the same inputs always give the same decision (seeded bootstrap)
    assert [c.high for c in decide(drop, baseline, config).checks] == [c.high for c in decision.checks]


def test_incomparable_evaluations_are_refused() -> None:
    config = GateConfig()
    candidate = _doc({"s2v_consistency": [0.5, 0.6]})
    other_settings = _doc({"s2v_consistency": [0.5, 0.6]})
    other_settings["settings"]["steps"] = 50
    with pytest.raises(GateError, match="different settings"):
        decide(candidate, other_settings, config)
    other_backbone = _doc({"s2v_consistency": [0.5, 0.6]})
    other_backbone["backbones"]["s2v_consistency"] = "another CLIP"
    with pytest.raises(GateError, match="different backbones"):
        decide(candidate, other_backbone, config)
    # the same weights in other folders (another machine) stay comparable
    here, there = _doc({"s2v_consistency": [0.5, 0.6]}), _doc({"s2v_consistency": [0.5, 0.6]})
    here["backbones"]["s2v_consistency"] = "SAM vit_h /data/models/sam_vit_h.pth + CLIP from /data/clip"
    there["backbones"]["s2v_consistency"] = "SAM vit_h /home/ci/cache/sam_vit_h.pth + CLIP from /opt/clip"
    assert decide(here, there, config).passed
    disjoint = _doc({"s2v_consistency": [0.5, 0.6]})
    for case in disjoint["cases"]:
        case["fingerprint"] = "changed"
    with pytest.raises(GateError, match="share no eval case"):
        decide(candidate, disjoint, config)


def test_rule_is_stated_with_the_numbers() -> None:
    text = rule_text(GateConfig(floors={"motion_smoothness": 0.9}, confidence=0.9))
    assert "motion_smoothness >= 0.9" in text and "90% bootstrap CI" in text and "-tolerance" in text


def _params(folder: Path, uri: str = "", name: str = "kaleido-s2v", gate: dict | None = None) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"platform": {"mlflow_tracking_uri": uri, "registered_model": name},
                                    "gate": gate or {"floors": {"s2v_consistency": 0.5}}}))
    return path


def test_cli_exit_codes_with_local_metrics(tmp_path: Path) -> None:
    runner = CliRunner()
    params = _params(tmp_path)
    good, bad = tmp_path / "good.json", tmp_path / "bad"
    good.write_text(json.dumps(_doc({"s2v_consistency": [0.8, 0.7, 0.75]})))
    bad.mkdir()
    (bad / "metrics.json").write_text(json.dumps(_doc({"s2v_consistency": [0.2, 0.21, 0.19]})))
    result = runner.invoke(app, ["gate", "--candidate", str(good), "--params", str(params),
                                 "--out", str(tmp_path / "decision.json")])
    assert result.exit_code == 0, result.output
    assert "gate PASS" in result.output and "not a registry version" in result.output
    assert json.loads((tmp_path / "decision.json").read_text())["passed"] is True
    result = runner.invoke(app, ["gate", "--candidate", str(bad), "--params", str(params)])
    assert result.exit_code == 1 and "gate FAIL" in result.output and "s2v_consistency: fail" in result.output
    # a regression against an explicit baseline file
    result = runner.invoke(app, ["gate", "--candidate", str(bad), "--baseline", str(good), "--params",
                                 str(_params(tmp_path, gate={"floors": {}}))])
    assert result.exit_code == 1 and "regression FAILED" in result.output
    result = runner.invoke(app, ["gate", "--candidate", str(tmp_path / "nope.json"), "--params", str(params)])
    assert result.exit_code == 2 and "no metrics.json" in result.output


def _register_with_evaluation(registry: Any, tmp_path: Path, tag: str, document: dict[str, Any] | None) -> str:
    from kaleido.registry import Lineage

    client = registry.client
    experiment = client.get_experiment_by_name("gate-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("gate-tests")
    run = client.create_run(experiment_id)
    checkpoint = tmp_path / f"ckpt-{tag}"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    version = registry.register(run.info.run_id, checkpoint, Lineage("g", "d", "p", run.info.run_id))
    if document is not None:  # what `kaleido evaluate --model models:/name/N` leaves behind
        document["model"]["registry"] = {"name": registry.name, "version": version}
        folder = tmp_path / f"eval-{tag}"
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(document))
        eval_run = client.create_run(experiment_id)
        client.log_artifact(eval_run.info.run_id, str(folder / "metrics.json"))
        client.set_model_version_tag(registry.name, version, "eval.run_id", eval_run.info.run_id)
    return version


def test_gate_against_the_champion_writes_tags(mlflow_server: str, tmp_path: Path) -> None:
    from kaleido.registry import ModelRegistry

    registry = ModelRegistry(mlflow_server, f"kaleido-gate-{uuid.uuid4().hex[:8]}")
    params = _params(tmp_path, mlflow_server, registry.name, {"floors": {"s2v_consistency": 0.3}})
    runner = CliRunner()
    first = _register_with_evaluation(registry, tmp_path, "a", _doc({"s2v_consistency": [0.7, 0.72, 0.69, 0.71]}))
    # no champion yet: the floors alone decide
    result = runner.invoke(app, ["gate", "--candidate", f"models:/{registry.name}/{first}", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert "no baseline" in result.output and registry.gate_decision(first) == "passed"
    registry.promote(first)
    # a clearly worse candidate, still above the floor: the regression check fails it
    worse = _register_with_evaluation(registry, tmp_path, "b", _doc({"s2v_consistency": [0.5, 0.52, 0.49, 0.5]}))
    result = runner.invoke(app, ["gate", "--candidate", f"models:/{registry.name}/{worse}", "--params", str(params)])
    assert result.exit_code == 1, result.output
    assert f"vs models:/{registry.name}/{first}" in result.output
    assert registry.gate_decision(worse) == "failed"
    reasons = json.loads(registry.version_tags(worse)["gate.reasons"])
    assert reasons["s2v_consistency"].startswith("fail: floor ok") and "regression FAILED" in reasons["s2v_consistency"]
    # an unevaluated version cannot be gated: exit 2, nothing recorded
    bare = _register_with_evaluation(registry, tmp_path, "c", None)
    result = runner.invoke(app, ["gate", "--candidate", f"models:/{registry.name}/{bare}", "--params", str(params)])
    assert result.exit_code == 2 and "has no evaluation" in result.output
    assert registry.gate_decision(bare) is None


def _validated(doc: dict[str, Any], losses: list[float], base: list[float] | None = None,
               fingerprint: str = "valset") -> dict[str, Any]:
    """An evaluation document with a training's held-out losses (lower is better)."""
    from kaleido.train.validation import case_fingerprint

    cases = [{"id": f"val{i}", "fingerprint": case_fingerprint(fingerprint, f"val{i}"),
              "metrics": {"val_loss": loss, **({"val_loss_base": base[i]} if base else {})}}
             for i, loss in enumerate(losses)]
    doc["validation"] = {"fingerprint": fingerprint, "cases": cases, "loss": float(np.mean(losses))}
    doc["overall"]["val_loss"] = float(np.mean(losses))
    return doc


def test_val_loss_is_lower_is_better_against_the_champion() -> None:
    config = GateConfig(tolerances={"val_loss": 0.02})
    scores = {"s2v_consistency": [0.7] * 6}
    champion = _validated(_doc(scores), _noisy(0.30, 0.05, seed=3))
    champion_losses = [c["metrics"]["val_loss"] for c in champion["validation"]["cases"]]
    better = _validated(_doc(scores), [v - 0.05 for v in champion_losses])
    assert decide(better, champion, config).passed
    worse = _validated(_doc(scores), [v + 0.2 + d for v, d in zip(champion_losses, _noisy(0, 0.01, seed=4),
                                                                    strict=True)])
    decision = decide(worse, champion, config, "cand", "champion")
    assert not decision.passed
    assert decision.reasons()["val_loss"].startswith("fail: regression FAILED (mean diff vs baseline +0.2")
    assert "rise beyond tolerance 0.02" in decision.reasons()["val_loss"]
    assert decision.reasons()["s2v_consistency"].startswith("pass")
    # a different held-out set is not comparable (run_gate re-validates the champion first)
    with pytest.raises(GateError, match="different held-out sets"):
        decide(_validated(_doc(scores), champion_losses, fingerprint="other"), champion, config)


def test_without_a_champion_the_candidate_must_beat_its_base_model() -> None:
    scores = {"s2v_consistency": [0.7] * 5}
    learned = _validated(_doc(scores), [0.20, 0.22, 0.19, 0.25, 0.21], base=[2.1, 2.2, 2.0, 2.3, 2.1])
    decision = decide(learned, None, GateConfig())
    assert decision.passed and decision.reasons()["val_loss"].startswith("pass: improvement ok")
    broken = _validated(_doc(scores), [3.1, 3.4, 2.9, 3.3, 3.0], base=[2.1, 2.2, 2.0, 2.3, 2.1])
    refused = decide(broken, None, GateConfig())
    assert not refused.passed
    assert "NOT clearly lower than the base model's" in refused.reasons()["val_loss"]
    assert decide(_validated(_doc(scores), [1.0] * 5, base=[1.0] * 5), None, GateConfig()).passed is False
    # a ceiling bounds it from above
    ceiling = decide(learned, None, GateConfig(ceilings={"val_loss": 0.1}))
    assert not ceiling.passed and "ceiling FAILED" in ceiling.reasons()["val_loss"]
    with pytest.raises(ValueError, match=r"gate\.ceilings, not gate\.floors"):
        GateConfig(floors={"val_loss": 0.1})


def _relied(doc: dict[str, Any], reliance: list[float], losses: list[float] | None = None,
            fingerprint: str = "val-fp") -> dict[str, Any]:
    """A validated candidate whose held-out samples also carry reference_reliance (validation_block's cases)."""
    losses = losses or [0.2] * len(reliance)
    doc = _validated(doc, losses, base=[2.0] * len(losses), fingerprint=fingerprint)
    for case, value in zip(doc["validation"]["cases"], reliance, strict=True):
        case["metrics"]["reference_reliance"] = value
    doc["overall"]["reference_reliance"] = float(np.mean(reliance))
    return doc


def test_reference_reliance_needs_evidence_above_its_floor() -> None:
    scores = {"s2v_consistency": [0.7] * 6}
    reads = _relied(_doc(scores), _noisy(0.08, 0.03, seed=5))
    decision = decide(reads, None, GateConfig())
    assert decision.passed, decision.reasons()
    assert decision.reasons()["reference_reliance"].startswith("pass: floor ok")
    # the same low val loss, references ignored: reliance is noise around 0, so its CI reaches below the floor
    ignores = _relied(_doc(scores), _noisy(0.0, 0.02, seed=6))
    refused = decide(ignores, None, GateConfig())
    assert not refused.passed
    assert refused.reasons()["val_loss"].startswith("pass")  # the loss rule alone would have passed it
    assert "does NOT show reliance above the floor 0" in refused.reasons()["reference_reliance"]
    # floor null: the rule is off; a candidate without reliance cases is named in the notes, not passed silently
    assert decide(ignores, None, GateConfig(reference_reliance={"floor": None})).passed
    assert any("no reference reliance" in note for note in decide(_validated(_doc(scores), [0.2] * 6, base=[2.0] * 6),
                                                                  None, GateConfig()).notes)
    with pytest.raises(ValueError, match=r"gate\.reference_reliance\.floor"):
        GateConfig(floors={"reference_reliance": 0.1})


def test_reference_reliance_must_not_regress_against_the_champion() -> None:
    scores = {"s2v_consistency": [0.7] * 6}
    champion = _relied(_doc(scores), _noisy(0.10, 0.01, seed=7))
    same = _relied(_doc(scores), _noisy(0.10, 0.01, seed=8))
    assert decide(same, champion, GateConfig()).passed
    weaker = _relied(_doc(scores), _noisy(0.05, 0.01, seed=9))  # still clearly above the floor, but halved
    decision = decide(weaker, champion, GateConfig(reference_reliance={"tolerance": 0.01}))
    assert not decision.passed and "drop beyond tolerance 0.01" in decision.reasons()["reference_reliance"]
    assert decide(weaker, champion, GateConfig(reference_reliance={"tolerance": 0.1})).passed
    rule = rule_text(GateConfig())
    assert "Reference reliance" in rule and "lower bound" in rule
