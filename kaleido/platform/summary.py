"""The one summary a run of the flow ends with: what data, what training did, what the gate decided, where to look.

`run_summary` builds the rows from the flow's result and the files the stages wrote; the flow publishes them as the
Prefect markdown artifact `kaleido-summary`, and `kaleido platform run` (`make run`) prints the same artifact as
its last screen.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUMMARY_KEY = "kaleido-summary"


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_summary(
    repo: Path, result: Mapping[str, Any], prefect_ui: str = "", mlflow_ui: str = "", aliases: list[str] | None = None
) -> list[tuple[str, str]]:
    """(label, value) rows: data version and counts, training, validation loss, each eval metric with the gate's
    verdict, the registered version and its aliases, the sample, the UIs."""
    rows: list[tuple[str, str]] = []
    version = result.get("data_version") or {}
    if version:
        rows.append(("data version", f"dataset {version.get('dvc_data_hash', '-')} at git "
                                     f"{str(version.get('git_revision', '-'))[:12]}"))
    stats = result.get("stats") or {}
    if stats:
        rejected = stats.get("rejections", {}).get("by_reason", {})
        top = ", ".join(f"{reason} {count}" for reason, count in sorted(rejected.items(), key=lambda kv: -kv[1])[:4])
        rows.append(("clips", f"{stats.get('clips', 0)} kept; {sum(rejected.values())} rejected"
                              + (f" ({top})" if top else "")))
        split = stats.get("validation", {})
        held = ", ".join(split.get("val_sources", [])) or "none"
        rows.append(("samples", f"{stats.get('samples', 0)}: {split.get('train_samples', '-')} train, "
                                f"{split.get('val_samples', '-')} held out (sources: {held}); "
                                f"{stats.get('cross_pair_samples', 0)} cross-paired"))
    train = _read(repo / "runs/train/pretrain/metrics.json") if "version" in result or stats else {}
    if train:
        rows.append(("training", f"{train.get('steps')} steps, train loss {_fmt(train.get('first_loss'))} -> "
                                 f"{_fmt(train.get('final_loss'))}"))
        if train.get("val_loss") is not None:
            rows.append(("validation loss", f"{_fmt(train.get('val_loss_base'))} (base model) -> "
                                            f"{_fmt(train.get('val_loss'))} (trained), held-out samples"))
        if train.get("reference_reliance") is not None:
            rows.append(("reference reliance", f"{_fmt(train.get('reference_reliance_base'))} (base model) -> "
                                               f"{_fmt(train.get('reference_reliance'))} (trained): val loss with "
                                               "shuffled references - with own"))
        elif train.get("val_loss") is not None:  # said, not left out: the number issue 23 asks for everywhere
            held = (stats.get("validation") or {}).get("val_samples", "too few")
            rows.append(("reference reliance", f"n/a: not measured ({held} held-out sample(s); it needs two with "
                                               "references in one bucket to swap them); raise "
                                               "data.validation.share or add sources"))
    evaluation = result.get("evaluation") or {}
    reasons = (result.get("gate") or {}).get("reasons") or {}
    for metric, value in (evaluation.get("overall") or {}).items():
        verdict = reasons.get(metric, "")
        short = verdict.split(" (")[0] if verdict else "not gated"
        rows.append((f"eval {metric}", f"{_fmt(value)}  gate: {short}"))
    gate = result.get("gate") or {}
    if gate:
        failed = [metric for metric, reason in reasons.items() if reason.startswith("fail")]
        rows.append(("gate", "PASS" if gate.get("passed") else f"FAIL on {', '.join(failed) or 'its checks'}"))
        for metric in failed:
            rows.append((f"why {metric}", reasons[metric][:300]))
    if result.get("version"):
        rows.append(("model version", f"v{result['version']}" + (f" ({', '.join(aliases)})" if aliases else
                                                                   " (no alias)")))
    if result.get("experiment"):
        rows.append(("DVC experiment", f"{result['experiment']} (`kaleido experiments`, `dvc exp show`)"))
    sample = result.get("sample")
    if sample:
        rows.append(("sample video", str(sample)))
        rows.append(("contact sheet", str(Path(sample).with_suffix(".png"))))
    if prefect_ui:
        rows.append(("Prefect UI", prefect_ui))
    if mlflow_ui:
        rows.append(("MLflow UI", mlflow_ui))
    return rows


def to_markdown(rows: list[tuple[str, str]], title: str = "Kaleido run summary") -> str:
    body = "\n".join(f"| {label} | {value.replace('|', '/')} |" for label, value in rows)
    return f"## {title}\n\n| | |\n|---|---|\n{body}\n"


def markdown_rows(markdown: str) -> list[tuple[str, str]]:
    """The (label, value) rows back from `to_markdown`'s table (for printing the Prefect artifact)."""
    rows = []
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0] and set(cells[0]) != {"-"}:
            rows.append((cells[0], cells[1]))
    return rows


def to_text(rows: list[tuple[str, str]]) -> str:
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)
