"""Training records: an MLflow run (params, per-step metrics), the loss curve as CSV, live progress lines.

Only rank 0 records. The CSV (`<output>/<stage>/loss.csv`) is what DVC plots read; a resumed run
rewrites it up to its checkpoint's step and continues, so the file always shows one curve. The
MLflow run of an interrupted training is reopened on resume (its id travels in the checkpoint), and the
steps it lacks (an outage) are uploaded from the CSVs.

MLflow outages: every request is bounded (platform.mlflow_request_*: MLflow's own defaults retry for ~8 minutes
per request). A request that still fails while the server does not answer its health check makes the tracker
"down": a `warning:` line, then local records only; the trainer checkpoints and stops (see trainer.py). A failure
while the server answers is the request's own error and is raised as it is.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kaleido.platform.files import named_os_errors

if TYPE_CHECKING:
    from kaleido.config.schema import PlatformConfig

log = logging.getLogger(__name__)

CSV_FIELDS = (
    "step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time_s", "peak_memory_gb",
)  # fmt: skip
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on one param value
MLFLOW_BATCH = 100  # params per log_batch request


RUN_RECORD = "mlflow_run.json"  # <stage output>/: the run this stage logs into (marked FAILED if left behind)


class TrackingUnavailable(RuntimeError):
    """The MLflow server stopped answering (after the bounded retries); `what` is the request that failed."""

    def __init__(self, uri: str, what: str, why: str):
        self.uri, self.what, self.why = uri, what, why
        super().__init__(f"the MLflow server at {uri} does not answer ({what}: {why})")


def mlflow_request_env(platform: PlatformConfig) -> dict[str, str]:
    """MLflow's own request limits (its MLFLOW_HTTP_REQUEST_* environment variables) from params.yaml."""
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(platform.mlflow_request_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(platform.mlflow_request_backoff),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(platform.mlflow_request_timeout_s),
    }


@contextmanager
def mlflow_request_limits(platform: PlatformConfig) -> Iterator[None]:
    """Bound every MLflow request made inside the block (MLflow reads these variables at each request)."""
    from unittest import mock  # the stdlib's set-and-restore of os.environ

    with mock.patch.dict(os.environ, mlflow_request_env(platform)):
        yield


def short_error(exc: BaseException) -> str:
    """`Type: first line` of an exception, at most 300 characters (MLflow's messages carry whole URLs and bodies)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]


def tracking_failure(uri: str, what: str, exc: BaseException) -> TrackingUnavailable | None:
    """TrackingUnavailable when `exc` came with a server that no longer answers its health check; None when the
    server answers (then the error is the request's own and must not be mistaken for an outage)."""
    from kaleido.platform.services import tracking_problem

    problem = tracking_problem(uri, timeout=5)
    if problem is None:
        return None
    log.debug("MLflow request failed (%s): %s", what, exc)
    # the health check's answer ("connection refused", "timed out") says it shorter than MLflow's retry report
    return TrackingUnavailable(uri, what, problem.removeprefix(f"{uri.rstrip('/')}/health: "))


def call_tracking(uri: str, what: str, call: Callable[[], Any]) -> Any:
    """`call()` (an MLflow request); an outage becomes TrackingUnavailable, any other error stays as it is."""
    try:
        return call()
    except Exception as exc:
        failure = tracking_failure(uri, what, exc)
        if failure is None:
            raise
        raise failure from exc


def mark_left_behind(uri: str, record: Path, what: str, keep: str | None = None) -> str | None:
    """Mark FAILED the MLflow run named in `record` (RUN_RECORD) if it is still RUNNING: a run that an outage,
    a kill or a full disk left behind. `keep`: a run id that is being continued (a resume), never marked. Returns the
    id when it was marked. Best effort: a server that does not answer leaves it for the next start (with a warning).
    """
    try:
        data = json.loads(record.read_text())
        run_id = data["run_id"]
        recorded_uri = str(data.get("tracking_uri") or uri)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if run_id == keep or recorded_uri.rstrip("/") != uri.rstrip("/"):  # continued, or on another server
        return None
    from mlflow import MlflowClient

    try:
        client = MlflowClient(uri)
        if client.get_run(run_id).info.status != "RUNNING":
            return None
        client.set_terminated(run_id, "FAILED")
    except Exception as exc:
        log.warning("MLflow run %s of an earlier %s could not be checked or marked FAILED at %s (%s); the next start "
                    "tries again", run_id, what, uri, short_error(exc))
        return None
    log.warning("MLflow run %s of the interrupted %s was left RUNNING at %s; marked FAILED", run_id, what, uri)
    return run_id


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {prefix + "a.b": "1"}; lists become JSON (MLflow params are strings)."""
    from kaleido.config.schema import flatten_dotted

    def text(value: Any) -> str:
        return json.dumps(value) if isinstance(value, list | tuple) else ("" if value is None else str(value))

    return {key: text(value)[:MLFLOW_PARAM_CHARS] for key, value in flatten_dotted(data, prefix).items()}


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch on GPU; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class _Csv:
    """A CSV written row by row and flushed as written (a killed run keeps its rows); a resumed run keeps the rows
    up to its checkpoint's step and continues after them."""

    def __init__(self, path: Path, fields: list[str], resume_step: int | None):
        self.path = path
        self.fields = fields
        kept: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with path.open() as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        with named_os_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = path.open("w", newline="")
            self._writer = csv.DictWriter(self._handle, fieldnames=fields)
            self._writer.writeheader()
            self._writer.writerows(kept)
            self._handle.flush()

    def _add(self, row: dict[str, Any]) -> None:
        with named_os_errors(self.path):
            self._writer.writerow({key: row.get(key, "") for key in self.fields})
            self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class LossCurve(_Csv):
    """loss.csv, one row per optimizer step."""

    def __init__(self, path: Path, resume_step: int | None):
        super().__init__(path, list(CSV_FIELDS), resume_step)

    def add(self, row: dict[str, float]) -> None:
        self._add(row)


class ValidationCurve(_Csv):
    """val_loss.csv: step, loss, then the loss at each fixed noise level."""

    def __init__(self, path: Path, levels: list[str], resume_step: int | None):
        super().__init__(path, ["step", "loss", *(f"loss_sigma_{level}" for level in levels)], resume_step)

    def add(self, step: int, loss: float, per_level: dict[str, float]) -> None:
        self._add({"step": step, "loss": loss, **{f"loss_sigma_{k}": v for k, v in per_level.items()}})


def read_loss_curve(path: str | Path) -> list[dict[str, float]]:
    with Path(path).open() as handle:
        # a blank cell (a metric the step did not have) reads as NaN
        return [{key: float(value or "nan") for key, value in row.items()} for row in csv.DictReader(handle)]


class Tracker:
    """Rank 0's records of one training stage. Every method is a no-op on other ranks.

    `down` is set (TrackingUnavailable) when the MLflow server stopped answering: from then on the tracker records
    locally only, and the trainer checkpoints and stops at the end of the step.
    """

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
        self.uri = ""
        self.down: TrackingUnavailable | None = None
        self._mlflow: Any = None
        self.curve = LossCurve(output / "loss.csv", start_step if resume else None) if active else None
        self.val_curve: ValidationCurve | None = None
        self._resume_step = start_step if resume else None
        self.bar: Any = None
        if active and progress:
            from kaleido.platform.progress import Progress  # a bar on a terminal, a line per interval in a log

            self.bar = Progress(f"train {output.name}", total_steps, "step", initial=start_step, stream=sys.stderr)

    def start_mlflow(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        params: dict[str, str],
        tags: dict[str, str],
        run_id: str | None = None,
    ) -> str | None:
        """Open (or, with run_id, reopen) the MLflow run; params are logged once, on a new run.

        A reopened run gets the steps it lacks from loss.csv / val_loss.csv (an outage stopped the last start).
        TrackingUnavailable when the server does not answer: nothing was trained yet, so nothing is lost.
        """
        if not self.active or not uri:
            return None
        import mlflow

        self.uri = uri

        def start() -> str:
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(experiment)
            run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=run_name)
            if run_id is None:
                items = sorted(params.items())
                for start in range(0, len(items), MLFLOW_BATCH):
                    mlflow.log_params(dict(items[start : start + MLFLOW_BATCH]))
            mlflow.set_tags(tags)
            return run.info.run_id

        self.run_id = call_tracking(uri, "starting the run", start)
        self._mlflow = mlflow
        from kaleido.platform.files import write_json_atomic

        write_json_atomic(self.output / RUN_RECORD, {"run_id": self.run_id, "tracking_uri": uri,
                                                     "experiment": experiment})
        if run_id is not None:
            self._upload_missing()
        return self.run_id

    def _call(self, what: str, call: Callable[[], Any]) -> None:
        """One MLflow request; an outage marks the tracker down (one warning), later requests are skipped."""
        if self._mlflow is None or self.down is not None:
            return
        try:
            call_tracking(self.uri, what, call)
        except TrackingUnavailable as exc:
            self.down = exc
            log.warning("MLflow at %s: %s failed after %s retries (%s): recording locally only (loss.csv, "
                        "val_loss.csv)", self.uri, what, os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "its"),
                        exc.why)

    def _upload_missing(self) -> None:
        """The steps of loss.csv / val_loss.csv (up to the checkpoint) that the reopened run lacks."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        assert self.run_id is not None
        client = MlflowClient(self.uri)
        uploads: list[Any] = []
        stamp = int(time.time() * 1000)
        sources = [(self.output / "loss.csv", "loss", "")]
        sources.append((self.output / "val_loss.csv", "val/loss", "val/"))
        for path, probe, prefix in sources:
            if not path.is_file():
                continue
            logged = {m.step for m in call_tracking(self.uri, "reading the run's history",
                                                    lambda probe=probe: client.get_metric_history(self.run_id, probe))}
            for row in read_loss_curve(path):
                step = int(row["step"])
                if step in logged or (self._resume_step is not None and step > self._resume_step):
                    continue
                for key, value in row.items():
                    if key != "step" and math.isfinite(value):
                        uploads.append(Metric(prefix + key, value, stamp, step))
        for start in range(0, len(uploads), 1000):  # MLflow's limit per log_batch
            batch = uploads[start : start + 1000]
            call_tracking(self.uri, "uploading missed steps", lambda batch=batch: client.log_batch(self.run_id,
                                                                                                 metrics=batch))
        if uploads:
            steps = sorted({m.step for m in uploads})
            print(f"uploaded {len(uploads)} metric values of steps {steps[0]}..{steps[-1]} that MLflow run "
                  f"{self.run_id} had missed", flush=True)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        assert self.curve is not None
        self.curve.add({"step": step, **metrics})
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        self._call(f"logging step {step}", lambda: self._mlflow.log_metrics(finite, step=step))
        if self.bar is not None:
            self.bar.update(1, loss=metrics["loss"], lr=f"{metrics['lr']:.2e}")

    def log_validation(self, step: int, metrics: dict[str, float], per_level: dict[str, float]) -> None:
        """val/loss (and per level) at `step`: val_loss.csv and MLflow."""
        if not self.active:
            return
        if self.val_curve is None:
            self.val_curve = ValidationCurve(self.output / "val_loss.csv", list(per_level), self._resume_step)
        self.val_curve.add(step, metrics["val/loss"], per_level)
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        self._call(f"logging the validation of step {step}", lambda: self._mlflow.log_metrics(finite, step=step))
        if self.bar is not None:
            self.bar.write(f"step {step}: val/loss {metrics['val/loss']:.4f}")

    def log_samples(self, step: int, folder: Path) -> None:
        """A step's training samples (videos, contact sheet) as MLflow artifacts under samples/<folder name>."""
        if not self.active:
            return
        self._call(f"uploading the samples of step {step}",
                   lambda: self._mlflow.log_artifacts(str(folder), artifact_path=f"samples/{folder.name}"))

    def record_param_changes(self, history: list[dict[str, Any]]) -> None:
        """A resume that applied changed params: the run's `param_changes` tag (every change, with its step) and the
        new values as `changed_at_step_<N>.<key>` params (MLflow never overwrites a logged param)."""
        if not history:
            return
        latest = history[-1]

        def record() -> None:
            assert self._mlflow is not None
            self._mlflow.set_tag("param_changes", json.dumps(history)[:MLFLOW_PARAM_CHARS])
            self._mlflow.log_params({f"changed_at_step_{latest['step']}.{key}": json.dumps(new)
                                     for key, (_, new) in latest["changes"].items()})

        self._call("recording the changed params", record)

    def log_artifacts(self, paths: list[Path], tags: dict[str, str]) -> None:
        def upload() -> None:
            for path in paths:
                if path.is_file():
                    self._mlflow.log_artifact(str(path))
            self._mlflow.set_tags(tags)

        self._call("uploading the run's files", upload)

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
            # a server that is down is not asked again: the run stays RUNNING and the next start marks it FAILED
            # (a fresh start) or reopens it (--resume)
            self._call(f"ending the run ({status})", lambda: self._mlflow.end_run(status=status))
            self._mlflow = None
