"""`kaleido gate`: decide whether a candidate model may be promoted, from its evaluation's metrics.json.

The rule (also printed in every report and decision):
- Each case gives one score per metric; an evaluation's score is the mean over cases. With few cases
  that mean is noisy, so every check uses a percentile bootstrap over cases (two-sided, `confidence`
  level, seeded: the same inputs always give the same decision).
- Floor: a metric passes its floor unless the UPPER bound of the CI of the candidate's mean is below it.
- Regression (only when a baseline, by default the champion, exists): pair the cases both evaluated
  (same id and content) and bootstrap the mean of the differences candidate - baseline. The metric
  fails only if the UPPER bound of that CI is below -tolerance, i.e. the data show a drop larger than
  the tolerance; a noisy difference that might be zero does not fail.
- Validation loss (`val_loss`, LOWER is better; the held-out flow-matching loss of training, one case per
  held-out sample): versus the baseline it fails only if the LOWER bound of the CI of the mean difference
  (candidate - baseline) is above +tolerance (a clear rise). With no baseline the candidate must beat the model
  it started from: it fails unless the UPPER bound of the CI of mean(candidate - base) is below 0.
  `gate.ceilings` are the floors of lower-is-better metrics.
- Reference reliance (`reference_reliance`: held-out val loss with shuffled references minus with the sample's own,
  one case per held-out sample with references; kaleido/train/validation.py): a low val loss does not show that a
  model reads its references, so the candidate must SHOW reliance: it fails unless the LOWER bound of the CI of its
  mean is above `gate.reference_reliance.floor` (the one rule besides beating the base model where the burden of
  proof is on the candidate: a model that ignores its references scores ~0 and cannot show it). Versus the
  baseline it is checked like any higher-is-better metric, with `gate.reference_reliance.tolerance`.
So apart from those two, a candidate fails only on evidence: noise alone cannot fail it. The price is that with few
cases a slightly worse candidate can pass; more cases shrink the intervals and sharpen the gate. With one case
the interval is the point itself. No champion: the floors alone decide. Evaluations made with other
generation settings or other metric backbones are not comparable: the gate refuses (GateError) rather
than guess.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaleido.eval.metrics import METRICS, bootstrap_mean

# Metrics the gate reads: the evaluation's (higher is better) and training's held-out loss (lower is better).
VAL_LOSS = "val_loss"
RELIANCE = "reference_reliance"  # held-out val loss with shuffled references - with own; higher is better
LOWER_IS_BETTER = frozenset({VAL_LOSS})
VALIDATION_METRICS = (VAL_LOSS, RELIANCE)  # per held-out sample, from training's validation (not generated cases)
GATE_METRICS = (*METRICS, VAL_LOSS, RELIANCE)

if TYPE_CHECKING:
    from kaleido.config import Params
    from kaleido.config.schema import GateConfig


class GateError(RuntimeError):
    """The gate cannot decide (missing or incomparable evaluations); exit code 2, not a failed gate."""


def rule_text(config: GateConfig) -> str:
    """The decision rule with this configuration's numbers, for reports and logs."""
    floors = ", ".join(f"{k} >= {v:g}" for k, v in config.floors.items()) or "none"
    tolerances = ", ".join(f"{k}: {v:g}" for k, v in config.tolerances.items())
    level = f"{config.confidence:.0%}"
    rule = config.reference_reliance
    reliance = ("Reference reliance (held-out val loss with shuffled references - with own): "
                + ("no floor" if rule.floor is None else
                   f"fails unless the lower bound of the {level} CI of the candidate's mean is above {rule.floor:g}")
                + f"; regression tolerance {rule.tolerance:g}. ")
    return (
        f"Floors ({floors}): a metric fails its floor only if the upper bound of the {level} bootstrap CI of the "
        f"candidate's mean over cases is below the floor. Regression versus the baseline (the champion by "
        f"default): over the cases both evaluated, a metric fails only if the upper bound of the {level} "
        f"bootstrap CI of the mean per-case difference (candidate - baseline) is below -tolerance "
        f"(tolerance {config.regression_tolerance:g}{'; ' + tolerances if tolerances else ''}). {reliance}"
        f"{config.bootstrap_samples} resamples, seed {config.seed}. No baseline: the floors alone decide."
    )


@dataclass
class Check:
    metric: str
    kind: str  # floor | regression
    passed: bool
    reason: str
    estimate: float
    low: float
    high: float
    n: int
    threshold: float


@dataclass
class GateDecision:
    passed: bool
    checks: list[Check]
    rule: str
    candidate: str
    baseline: str | None
    notes: list[str] = field(default_factory=list)
    registry_version: str | None = None

    def reasons(self) -> dict[str, str]:
        """{metric: 'pass|fail: why'} with every check of that metric."""
        grouped: dict[str, list[Check]] = {}
        for check in self.checks:
            grouped.setdefault(check.metric, []).append(check)
        return {
            metric: ("pass" if all(c.passed for c in checks) else "fail") + ": "
            + "; ".join(f"{c.kind} {'ok' if c.passed else 'FAILED'} ({c.reason})" for c in checks)
            for metric, checks in grouped.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "candidate": self.candidate,
            "baseline": self.baseline,
            "registry_version": self.registry_version,
            "reasons": self.reasons(),
            # strict JSON: a metric the candidate lacks has no estimate (None, not NaN)
            "checks": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(c).items()}
                       for c in self.checks],
            "notes": self.notes,
            "rule": self.rule,
        }


def _case_scores(document: dict[str, Any], metric: str) -> dict[tuple[str, str], float]:
    """(case id, fingerprint) -> score; validation-loss metrics come from the held-out samples' cases."""
    from_validation = metric.startswith(VALIDATION_METRICS)
    cases = document.get("validation", {}).get("cases", []) if from_validation else document.get("cases", [])
    return {
        (case["id"], case.get("fingerprint", "")): float(case["metrics"][metric])
        for case in cases
        if case.get("metrics", {}).get(metric) is not None
    }


_FOLDERS = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^/\\\s,;()]+)*[/\\]")


def portable(description: str | None) -> str | None:
    """A backbone description without folders: the same weights evaluated on another machine (other local
    paths) stay comparable; another file name or architecture does not."""
    return None if description is None else _FOLDERS.sub("", description)


def _comparable(candidate: dict[str, Any], baseline: dict[str, Any], metrics: list[str]) -> None:
    if set(VALIDATION_METRICS) & set(metrics):
        ours, theirs = (doc.get("validation", {}).get("fingerprint") for doc in (candidate, baseline))
        if ours != theirs:
            raise GateError(
                f"val_loss: candidate and baseline were validated on different held-out sets ({ours} vs {theirs}); "
                "the gate recomputes the baseline's loss when the validation cache is on this machine"
            )
    if not [m for m in metrics if m not in VALIDATION_METRICS]:
        return
    if candidate.get("settings") != baseline.get("settings"):
        raise GateError(
            f"candidate and baseline were generated with different settings ({candidate.get('settings')} vs "
            f"{baseline.get('settings')}); evaluate both with the same eval/generate settings"
        )
    for metric in metrics:
        ours, theirs = candidate.get("backbones", {}).get(metric), baseline.get("backbones", {}).get(metric)
        if portable(ours) != portable(theirs):
            raise GateError(
                f"{metric}: candidate and baseline used different backbones ({ours!r} vs {theirs!r}); "
                "re-evaluate the baseline with the same eval.models"
            )


def decide(
    candidate: dict[str, Any],
    baseline: dict[str, Any] | None,
    config: GateConfig,
    candidate_ref: str = "candidate",
    baseline_ref: str | None = None,
) -> GateDecision:
    """Apply the floors and (with a baseline) the paired regression check; see the module docstring.

    GateError (cannot decide, exit 2) when the candidate's evaluation lacks a metric the decision needs: one that
    gate.metrics or gate.floors names, or (with gate.metrics null) one the baseline has. A candidate that simply
    did not compute a metric must not pass without the check on it.
    """
    available = [key for key in GATE_METRICS if _case_scores(candidate, key)]
    if config.metrics is not None:
        gated, named_by = list(config.metrics), "gate.metrics"
    else:
        in_baseline = [key for key in GATE_METRICS if baseline is not None and _case_scores(baseline, key)]
        gated, named_by = sorted(set(available) | set(in_baseline), key=list(GATE_METRICS).index), "the baseline"
    needed = {metric: named_by for metric in gated} | {metric: "gate.floors" for metric in config.floors}
    needed |= {metric: "gate.ceilings" for metric in config.ceilings}
    missing = {metric: why for metric, why in needed.items() if not _case_scores(candidate, metric)}
    if missing:
        listed = ", ".join(f"{metric} (needed by {why})" for metric, why in missing.items())
        raise GateError(
            f"cannot decide: the candidate's evaluation has no scores for {listed}; re-evaluate the candidate with "
            "those metrics in eval.metrics, or drop them from gate.metrics / gate.floors"
        )
    checks: list[Check] = []
    notes: list[str] = []
    boot = {"confidence": config.confidence, "samples": config.bootstrap_samples, "seed": config.seed}

    for metric, floor in config.floors.items():
        scores = _case_scores(candidate, metric)
        ci = bootstrap_mean(list(scores.values()), **boot)
        passed = ci.high >= floor
        relation = ">=" if passed else "<"
        checks.append(Check(metric, "floor", passed,
                            f"mean {ci.mean:.4f}, CI [{ci.low:.4f}, {ci.high:.4f}] upper {relation} floor {floor:g}",
                            ci.mean, ci.low, ci.high, ci.n, floor))

    for metric, ceiling in config.ceilings.items():
        ci = bootstrap_mean(list(_case_scores(candidate, metric).values()), **boot)
        passed = ci.low <= ceiling
        relation = "<=" if passed else ">"
        reason = f"mean {ci.mean:.4f}, CI [{ci.low:.4f}, {ci.high:.4f}] lower {relation} ceiling {ceiling:g}"
        checks.append(Check(metric, "ceiling", passed, reason, ci.mean, ci.low, ci.high, ci.n, ceiling))

    rule = config.reference_reliance
    if rule.floor is not None and _case_scores(candidate, RELIANCE):
        ci = bootstrap_mean(list(_case_scores(candidate, RELIANCE).values()), **boot)
        passed = ci.low > rule.floor
        verdict = "shows reliance above" if passed else "does NOT show reliance above"
        checks.append(Check(RELIANCE, "floor", passed,
                            f"mean {ci.mean:+.4f}, CI [{ci.low:+.4f}, {ci.high:+.4f}] over {ci.n} held-out sample(s): "
                            f"lower bound {verdict} the floor {rule.floor:g}", ci.mean, ci.low, ci.high, ci.n,
                            rule.floor))
    elif candidate.get("validation"):
        unchecked = "its floor is not checked" if rule.floor is not None else "no floor is set"
        notes.append(f"{RELIANCE}: the candidate's validation has no reference reliance (fewer than two held-out "
                     f"samples with references in one bucket, or trained before it was measured): {unchecked}")
    if baseline is None and VAL_LOSS in gated:
        checks.append(_beats_base(candidate, boot, notes))
    if baseline is not None:
        comparable = [m for m in gated if _case_scores(baseline, m) and _case_scores(candidate, m)]
        _comparable(candidate, baseline, comparable)
        for metric in gated:
            ours, theirs = _case_scores(candidate, metric), _case_scores(baseline, metric)
            if not theirs:
                notes.append(f"{metric}: the baseline has no scores for it; no regression check")
                continue
            common = sorted(set(ours) & set(theirs))
            if not common:
                raise GateError(
                    f"{metric}: candidate and baseline share no eval case (same id and content); evaluate both on "
                    "the same eval set"
                )
            dropped = len(set(ours) ^ set(theirs))
            if dropped:
                notes.append(f"{metric}: {dropped} case(s) evaluated by only one side are left out of the pairing")
            tolerance = rule.tolerance if metric == RELIANCE else config.tolerances.get(metric,
                                                                                         config.regression_tolerance)
            ci = bootstrap_mean([ours[k] - theirs[k] for k in common], **boot)
            if metric in LOWER_IS_BETTER:
                passed = ci.low <= tolerance
                verdict = "no clear rise beyond" if passed else "rise beyond"
                threshold = tolerance
            else:
                passed = ci.high >= -tolerance
                verdict = "no clear drop beyond" if passed else "drop beyond"
                threshold = -tolerance
            checks.append(Check(
                metric, "regression", passed,
                f"mean diff vs baseline {ci.mean:+.4f}, CI [{ci.low:+.4f}, {ci.high:+.4f}] over {ci.n} paired "
                f"case(s): {verdict} tolerance {tolerance:g}",
                ci.mean, ci.low, ci.high, ci.n, threshold,
            ))
    else:
        notes.append("no baseline (no champion yet): the floors alone decide")
    if not checks:
        notes.append("nothing to check: no floors and no baseline; the gate passes by default")
    return GateDecision(
        passed=all(check.passed for check in checks),
        checks=checks,
        rule=rule_text(config),
        candidate=candidate_ref,
        baseline=baseline_ref,
        notes=notes,
    )


def _beats_base(candidate: dict[str, Any], boot: dict[str, Any], notes: list[str]) -> Check:
    """No baseline: the candidate's held-out loss must be lower than its base model's (evidence of learning)."""
    ours, base = _case_scores(candidate, VAL_LOSS), _case_scores(candidate, VAL_LOSS + "_base")
    common = sorted(set(ours) & set(base))
    if not common:
        raise GateError("cannot decide: the candidate's validation has no base-model losses (val_loss_base); "
                        "retrain so that training evaluates step 0")
    ci = bootstrap_mean([ours[k] - base[k] for k in common], **boot)
    passed = ci.high < 0
    verdict = "lower than" if passed else "NOT clearly lower than"
    notes.append("no champion: val_loss is checked against the base model the candidate was trained from")
    return Check(
        VAL_LOSS, "improvement", passed,
        f"mean diff vs base model {ci.mean:+.4f}, CI [{ci.low:+.4f}, {ci.high:+.4f}] over {ci.n} held-out "
        f"sample(s): {verdict} the base model's",
        ci.mean, ci.low, ci.high, ci.n, 0.0,
    )


# ---- finding evaluations --------------------------------------------------------------------------


@dataclass
class Evaluation:
    document: dict[str, Any]
    ref: str
    registry_name: str | None = None
    registry_version: str | None = None


def _registry(params: Params, name: str) -> Any:
    from kaleido.registry import ModelRegistry

    uri = params.platform.mlflow_tracking_uri
    if not uri:
        raise GateError("a registry reference needs platform.mlflow_tracking_uri in params.yaml")
    return ModelRegistry(uri, name)


def load_evaluation(ref: str, params: Params) -> Evaluation | None:
    """A metrics.json (file or folder holding one) or models:/name/N | models:/name@alias.

    An alias that no version holds yet (no champion) gives None.
    """
    if not ref.startswith("models:/"):
        path = Path(ref)
        path = path / "metrics.json" if path.is_dir() else path
        if not path.is_file():
            raise GateError(f"{ref}: no metrics.json there; pass a metrics.json or models:/<name>/<version>")
        try:
            document = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise GateError(f"{path}: not valid JSON ({exc})") from None
        registry = (document.get("model") or {}).get("registry") or {}
        return Evaluation(document, str(path), registry.get("name"), registry.get("version"))

    from kaleido.registry import RegistryError, parse_model_ref

    try:
        name, selector = parse_model_ref(ref)
        registry = _registry(params, name)
        if selector.startswith("@"):
            version = registry.alias_version(selector[1:])
            if version is None:
                return None
        else:
            version = registry.resolve(selector)
        tags = registry.version_tags(version)
    except GateError:
        raise
    except RegistryError as exc:
        raise GateError(str(exc)) from None
    except Exception as exc:  # MLflow's own errors: unknown model or version, unreachable server
        raise GateError(f"{ref}: cannot read the registry: {str(exc)[:300]}") from None
    run_id = tags.get("eval.run_id")
    if not run_id:
        raise GateError(
            f"{name} version {version} has no evaluation (tag eval.run_id); run "
            f"`kaleido evaluate --model models:/{name}/{version}` first"
        )
    with tempfile.TemporaryDirectory(prefix="kaleido-gate-") as tmp:
        local = registry.client.download_artifacts(run_id, "metrics.json", tmp)
        document = json.loads(Path(local).read_text())
    return Evaluation(document, f"models:/{name}/{version}", name, str(version))


def _align_validation(candidate: Evaluation, baseline: Evaluation, params: Params) -> list[str]:
    """Make the baseline's val_loss comparable: when it was validated on another held-out set (or none), evaluate
    the baseline's weights on the candidate's set (the same cache, samples, levels and noise). GateError if not."""
    ours = candidate.document["validation"]
    theirs = baseline.document.get("validation", {})
    if theirs.get("fingerprint") == ours["fingerprint"]:
        return []
    from kaleido.train.validation import recompute_block

    if not (baseline.registry_name and baseline.registry_version):
        raise GateError(f"val_loss: the baseline {baseline.ref} was validated on another held-out set and is not a "
                        "registry version this gate could re-validate; pass a registry baseline")
    registry = _registry(params, baseline.registry_name)
    with tempfile.TemporaryDirectory(prefix="kaleido-gate-") as tmp:
        from kaleido.serving import model_weights

        try:  # ServingError is a ValueError
            checkpoint, lora = model_weights(registry.download(baseline.registry_version, Path(tmp) / "weights"),
                                             params.platform.mlflow_tracking_uri or None)
            block = recompute_block(checkpoint, ours, lora=lora)
        except (ValueError, OSError) as exc:
            raise GateError(f"val_loss: cannot re-validate the baseline {baseline.ref}: {exc}") from None
    baseline.document = {**baseline.document, "validation": block}
    return [f"val_loss: the baseline {baseline.ref} was validated on another held-out set; re-validated on the "
            f"candidate's ({len(block['cases'])} samples): {block['loss']:.4f}"]


def run_gate(
    params: Params,
    candidate: str,
    baseline: str | None = None,
    record: bool = True,
) -> GateDecision:
    """Load both evaluations, decide, and write the decision onto the candidate's model version tags."""
    found = load_evaluation(candidate, params)
    if found is None:
        raise GateError(f"{candidate}: no model version holds that alias")
    baseline_ref = baseline or f"models:/{params.platform.registered_model}@champion"
    if baseline is None and not params.platform.mlflow_tracking_uri:
        base = None  # no registry configured: no champion to compare with
    else:
        base = load_evaluation(baseline_ref, params)
    notes = []
    if base is None and baseline is not None:
        notes.append(f"baseline {baseline}: no model version holds that alias")
    if base is not None and found.registry_version is not None and (base.registry_name, base.registry_version) == (
        found.registry_name, found.registry_version
    ):
        notes.append(f"the candidate is the baseline ({base.ref}): no regression check")
        base = None
    if base is not None and set(VALIDATION_METRICS) & set(found.document.get("overall", {})):
        notes += _align_validation(found, base, params)
    decision = decide(found.document, base.document if base else None, params.gate, found.ref,
                      base.ref if base else None)
    decision.registry_version = found.registry_version
    decision.notes[:0] = notes
    if record and found.registry_name and found.registry_version:
        registry = _registry(params, found.registry_name)
        demoted = registry.record_gate(found.registry_version, decision.passed, decision.reasons())
        decision.notes.append(f"decision written to {found.registry_name} version {found.registry_version} tags")
        if demoted:
            decision.notes.append(demoted)
    elif record:
        decision.notes.append("the candidate is not a registry version: decision not recorded in MLflow")
    return decision
