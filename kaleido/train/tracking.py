"""Training records: an MLflow run (params, per-step metrics), the loss curve as CSV, a tqdm bar.

Only rank 0 records. The CSV (`<output>/<stage>/loss.csv`) is what DVC plots read; a resumed run
rewrites it up to its checkpoint's step and continues, so the file always shows one curve. The
MLflow run of an interrupted training is reopened on resume (its id travels in the checkpoint).
"""

from __future__ import annotations

import csv
import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

CSV_FIELDS = (
    "step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time_s", "peak_memory_gb",
)  # fmt: skip
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on one param value
MLFLOW_BATCH = 100  # params per log_batch request


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists become JSON (MLflow params are strings)."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    text = json.dumps(data) if isinstance(data, list | tuple) else ("" if data is None else str(data))
    return {prefix[:-1]: text[:MLFLOW_PARAM_CHARS]}


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch on GPU; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class LossCurve:
    """loss.csv, one row per optimizer step, flushed as written (a killed run keeps its rows)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with path.open() as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        self._handle = path.open("w", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=CSV_FIELDS)
        self._writer.writeheader()
        self._writer.writerows(kept)
        self._handle.flush()

    def add(self, row: dict[str, float]) -> None:
        self._writer.writerow({key: row.get(key, "") for key in CSV_FIELDS})
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class ValidationCurve:
    """val_loss.csv: step, loss, then the loss at each fixed noise level; resumed like loss.csv."""

    def __init__(self, path: Path, levels: list[str], resume_step: int | None):
        self.path = path
        self.fields = ["step", "loss", *(f"loss_sigma_{level}" for level in levels)]
        kept: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with path.open() as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        self._handle = path.open("w", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=self.fields)
        self._writer.writeheader()
        self._writer.writerows(kept)
        self._handle.flush()

    def add(self, step: int, loss: float, per_level: dict[str, float]) -> None:
        row = {"step": step, "loss": loss, **{f"loss_sigma_{k}": v for k, v in per_level.items()}}
        self._writer.writerow({key: row.get(key, "") for key in self.fields})
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_loss_curve(path: str | Path) -> list[dict[str, float]]:
    with Path(path).open() as handle:
        # a blank cell (a metric the step did not have) reads as NaN
        return [{key: float(value or "nan") for key, value in row.items()} for row in csv.DictReader(handle)]


class Tracker:
    """Rank 0's records of one training stage. Every method is a no-op on other ranks."""

    def __init__(
        self,
        active: bool,
        output: Path,
        total_steps: int,
        start_step: int,
        resume: bool,
        progress: bool = True,
    ):
        self.active = active
        self.output = output
        self.run_id: str | None = None
        self._mlflow: Any = None
        self.curve = LossCurve(output / "loss.csv", start_step if resume else None) if active else None
        self.val_curve: ValidationCurve | None = None
        self._resume_step = start_step if resume else None
        self.bar: Any = None
        if active and progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc=output.name, unit="step", file=sys.stderr,
                mininterval=0.5, dynamic_ncols=True,
            )  # fmt: skip

    def start_mlflow(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        params: dict[str, str],
        tags: dict[str, str],
        run_id: str | None = None,
    ) -> str | None:
        """Open (or, with run_id, reopen) the MLflow run; params are logged once, on a new run."""
        if not self.active or not uri:
            return None
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=run_name)
        self._mlflow = mlflow
        self.run_id = run.info.run_id
        if run_id is None:
            items = sorted(params.items())
            for start in range(0, len(items), MLFLOW_BATCH):
                mlflow.log_params(dict(items[start : start + MLFLOW_BATCH]))
        mlflow.set_tags(tags)
        return self.run_id

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        assert self.curve is not None
        self.curve.add({"step": step, **metrics})
        if self._mlflow is not None:
            finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
            self._mlflow.log_metrics(finite, step=step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)
            self.bar.update(1)

    def log_validation(self, step: int, metrics: dict[str, float], per_level: dict[str, float]) -> None:
        """val/loss (and per level) at `step`: val_loss.csv and MLflow."""
        if not self.active:
            return
        if self.val_curve is None:
            self.val_curve = ValidationCurve(self.output / "val_loss.csv", list(per_level), self._resume_step)
        self.val_curve.add(step, metrics["val/loss"], per_level)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)
        if self.bar is not None:
            self.bar.write(f"step {step}: val/loss {metrics['val/loss']:.4f}")

    def log_artifacts(self, paths: list[Path], tags: dict[str, str]) -> None:
        if self._mlflow is None:
            return
        for path in paths:
            if path.is_file():
                self._mlflow.log_artifact(str(path))
        self._mlflow.set_tags(tags)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        if self.curve is not None:
            self.curve.close()
        if self.val_curve is not None:
            self.val_curve.close()
        if self._mlflow is not None:
            self._mlflow.end_run(status=status)
            self._mlflow = None
