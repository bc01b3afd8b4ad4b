"""Asynchronous generation: the Prefect deployment `kaleido/generate` (flow name `kaleido`, like the pipeline's).

    prefect deployment run kaleido/generate -p prompt="A cat plays with a ball" \\
        -p references='["artifacts/samples/chelsea.png"]' [-p model=models:/kaleido-s2v/3] [-p steps=50] --watch

It runs on the same work pools as training (a GPU pod on the cluster), calls `kaleido generate --model ...` in the
checkout (the model defaults to the registry's `champion`; references are files of the checkout, base64 images or
data URIs, or http(s) URLs), writes the video and its contact sheet under artifacts/generated/<flow run id>/, logs
both to an MLflow run of the `kaleido-generate` experiment (the cluster's artifact store) and publishes a markdown
artifact with their locations. Use it for generations longer than a served request may take (kaleido/serving.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact

from flows.kaleido_flow import _bin, _params, run_command
from kaleido.platform.files import atomic_path

SETTINGS = ("seed", "steps", "frames", "height", "width", "guidance_scale", "shift", "sampler", "negative_prompt")


def stage_reference(value: str, folder: Path, index: int, repo: Path) -> Path:
    """A reference as a file the CLI reads: a file of the checkout as is; an http(s) URL, a data URI or base64
    bytes saved under `folder` (kaleido.serving.reference_bytes, as the served model reads them). URLs are allowed
    here: the request comes from an operator with access to the deployment, fetched by the cluster's own worker
    (a served endpoint keeps them off unless serve.allow_remote_references)."""
    from kaleido.serving import reference_bytes

    text = value.strip()
    if len(text) < 4096:  # short enough to be a path
        path = Path(text) if Path(text).is_absolute() else repo / text
        if path.is_file():
            return path.resolve()
    data = reference_bytes(text, f"references[{index}] ({text[:60]!r})", allow_remote=True)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"reference-{index}.img"
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


@flow(name="kaleido", log_prints=True)
def generate(
    prompt: str,
    references: list[str] | None = None,
    model: str = "",
    seed: int | None = None,
    steps: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    sampler: str | None = None,
    negative_prompt: str | None = None,
    repo: str | None = None,
) -> dict[str, Any]:
    """One video from a registered version (default: the champion); returns where it and its contact sheet are."""
    root = Path(repo or os.environ.get("KALEIDO_REPO") or Path.cwd()).resolve()
    params = _params(root)
    model = model or f"models:/{params.platform.registered_model}@champion"
    run_id = str(runtime.flow_run.id or "local")
    out = root / "artifacts" / "generated" / run_id
    refs = [stage_reference(value, out / "references", i, root) for i, value in enumerate(references or [])]
    settings = {"seed": seed, "steps": steps, "frames": frames, "height": height, "width": width,
                "guidance_scale": guidance_scale, "shift": shift, "sampler": sampler,
                "negative_prompt": negative_prompt}
    options = [arg for key, value in settings.items() if value is not None
               for arg in (f"--{key.replace('_', '-')}", str(value))]
    video = out / "video.mp4"
    result = run_command([_bin("kaleido"), "generate", "--model", model, "--prompt", prompt,
                          *[arg for ref in refs for arg in ("--ref", str(ref))], *options, "--out", str(video)], root)
    printed = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    seed_used = printed.get("seed", "").split(" ")[0] or None
    # the version the alias pointed at when it ran (an alias moves; the record must not)
    outcome: dict[str, Any] = {"video": str(video), "contact_sheet": str(video.with_suffix(".png")),
                               "model": printed.get("model", model), "requested": model, "seed": seed_used,
                               "prompt": prompt}
    model = outcome["model"]
    uri = params.platform.mlflow_tracking_uri
    if uri:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("kaleido-generate")
        experiment_id = experiment.experiment_id if experiment else client.create_experiment("kaleido-generate")
        run = client.create_run(experiment_id, run_name=f"generate {run_id[:8]}",
                                tags={"kaleido.model": model, "prefect.flow_run_id": run_id})
        client.log_artifact(run.info.run_id, str(video))
        client.log_artifact(run.info.run_id, str(video.with_suffix(".png")))
        client.log_text(run.info.run_id, json.dumps(outcome, indent=2), "request.json")
        client.set_terminated(run.info.run_id, "FINISHED")
        outcome["mlflow_artifacts"] = f"{client.get_run(run.info.run_id).info.artifact_uri}"
    create_markdown_artifact(
        f"## Generated with {model}\n\n| | |\n|---|---|\n| video | `{outcome['video']}` |\n"
        f"| contact sheet | `{outcome['contact_sheet']}` |\n| seed | {seed_used} |\n"
        + (f"| MLflow artifacts | `{outcome['mlflow_artifacts']}` |\n" if "mlflow_artifacts" in outcome else "")
        + f"\nprompt: {prompt}\n",
        key="kaleido-generated", description="where the video and its contact sheet are",
    )  # fmt: skip
    get_run_logger().info("video: %s", outcome["video"])
    return outcome
