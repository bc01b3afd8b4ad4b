"""Data stages as Ray jobs: `kaleido ingest|caption|curate|write-dataset` submit themselves to a Ray cluster.

With `data.ray_submit` set (the cluster's job API, e.g. http://kaleido-curation-head-svc.kaleido.svc:8265), a data
command does not run its stage here: it submits the same command line as a Ray job (Ray's job submission API),
prints the job's log as it comes (so a Prefect task that runs the command streams it into the flow's log), stops the
job when interrupted, and exits with the job's result. Inside the job (KALEIDO_RAY_JOB=1) the command runs for
real, as the driver on the cluster, with `data.ray_address` (usually "auto"). The job starts in the submitter's
working directory: every node must see the same paths (KubeRay pods mount the flow-run pod's volumes at the same
places, k8s/overlays/prod/raycluster.yaml), or the data root must be object storage.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from kaleido.config.schema import Params

IN_JOB = "KALEIDO_RAY_JOB"  # set in the job's environment: run the stage, do not submit again
FORWARDED = ("PYTHONPATH", "KALEIDO_CACHE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
             "AWS_REGION")  # configuration (never credentials: the cluster's pods hold their own)


class RayJobFailed(RuntimeError):
    """The submitted job ended FAILED or STOPPED; the message names the job and where its log is."""


def should_submit(params: Params) -> bool:
    return bool(params.data.ray_submit) and os.environ.get(IN_JOB) != "1"


def submit_and_follow(params: Params, argv: Sequence[str], *, cwd: str | Path | None = None,
                      echo: Callable[[str], None] | None = None, poll_s: float = 1.0) -> str:
    """Submit `kaleido <argv>` as a Ray job at data.ray_submit, print its log until it ends; returns the job id.

    Raises RayJobFailed (job FAILED / STOPPED) and ConnectionError (no job API at that address).
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = str(params.data.ray_submit)
    out = echo or (lambda text: print(text, end="", flush=True))
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # Ray raises ConnectionError / RuntimeError with its own words
        raise ConnectionError(f"data.ray_submit={address}: no Ray job API answers there ({exc}); start the "
                              "curation RayCluster or set data.ray_submit: null to run the stage here") from None
    folder = Path(cwd or os.getcwd()).resolve()
    entrypoint = f"cd {shlex.quote(str(folder))} && " + shlex.join(["kaleido", *argv])
    env = {IN_JOB: "1", **{key: os.environ[key] for key in FORWARDED if key in os.environ}}
    stage = argv[0] if argv else "data"
    job_id = client.submit_job(
        entrypoint=entrypoint, submission_id=f"kaleido-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        runtime_env={"env_vars": env}, metadata={"kaleido": stage, "cwd": str(folder)},
    )
    out(f"submitted Ray job {job_id} to {address}: {entrypoint}\n")
    try:
        asyncio.run(_follow(client, job_id, out))
        status = client.get_job_status(job_id)
        while not status.is_terminal():  # the log ended a moment before the status did
            time.sleep(poll_s)
            status = client.get_job_status(job_id)
    except BaseException:  # interrupted (Ctrl-C, a cancelled flow run): the job must not go on alone
        client.stop_job(job_id)
        raise
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        raise RayJobFailed(f"Ray job {job_id} {status.value}: {info.message or 'see its log above'} "
                           f"(`ray job logs {job_id} --address {address}`)")
    return job_id


async def _follow(client: object, job_id: str, out: Callable[[str], None]) -> None:
    async for lines in client.tail_job_logs(job_id):  # type: ignore[attr-defined]
        out(lines)


def main_argv() -> list[str]:
    """This process's `kaleido` arguments (what the job runs again on the cluster)."""
    return list(sys.argv[1:])
