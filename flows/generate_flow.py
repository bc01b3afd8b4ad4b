"""Asynchronous generation: the Prefect deployment `kaleido/generate` (flow name `kaleido`, like the pipeline's).

    prefect deployment run kaleido/generate -p prompt="A cat plays with a ball" \\
        -p references='["artifacts/samples/chelsea.png"]' [-p model=models:/kaleido-s2v/3] [-p steps=50] --watch

It runs on the same work pools as training (a GPU pod on the cluster), calls `kaleido generate --model ...` in the
checkout (the model defaults to the registry's `champion`), writes the video and its contact sheet under
artifacts/generated/<flow run id>/, logs both to an MLflow run of the `kaleido-generate` experiment (the cluster's
artifact store) and publishes a markdown artifact with their locations. Use it for generations longer than a served
request may take (kaleido/serving.py).

Its inputs are confined before anything runs (`check_inputs`; a refusal ends the run FAILED with one line, no
traceback):
- references are uploads (base64 image bytes or a `data:image/...;base64,` URI) or files under serve.reference_roots
  of the checkout, given relative to it; an absolute path or one with `..` is refused with the same message whether
  or not the file exists (a caller learns nothing about the machine's files), and so is a path that leaves the roots
  through a link; http(s) URLs only with serve.allow_remote_references (the worker would fetch for the caller);
- `repo=` may only name the deployment's own checkout (another folder's params.yaml would be read and run);
- every text field is checked for NUL and control characters, and the request's cost against the serve limits
  (kaleido/request_limits.py, the same as `kaleido serve` and `kaleido generate`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed, State

from flows.kaleido_flow import _bin, _params, run_command
from kaleido.platform.files import atomic_path
from kaleido.request_limits import LimitError, Limits, check_image_bytes, check_request, check_text

SETTINGS = ("seed", "steps", "frames", "height", "width", "guidance_scale", "shift", "sampler", "negative_prompt")
# the first bytes of the image formats the loader reads: how an upload is told from a path
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


class RefusedInput(ValueError):
    """An input the deployment does not accept; the message names it and what to send instead."""


def checkout_root(repo: str | None) -> Path:
    """The deployment's own checkout ($KALEIDO_REPO, else the working directory); `repo` may only name it."""
    own = Path(os.environ.get("KALEIDO_REPO") or Path.cwd()).resolve()
    if repo:
        check_text("repo", repo, multiline=False)
        if Path(repo).expanduser().resolve() != own:
            raise RefusedInput(f"repo={repo!r}: this deployment runs in its own checkout only; leave repo out")
    return own


def _upload(text: str) -> bytes | None:
    """The bytes of a base64 / data-URI image, or None when `text` is not one (then it is a path)."""
    body = text.partition(",")[2] if text.startswith("data:") else text
    try:
        data = base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error):
        if text.startswith("data:"):
            raise RefusedInput("a data URI whose payload is not valid base64; send data:image/png;base64,<bytes>") \
                from None
        return None
    return data if text.startswith("data:") or data.startswith(IMAGE_MAGIC) else None


def confine_reference(value: Any, index: int, root: Path, roots: list[Path], allow_remote: bool,
                      limits: Limits) -> Path | bytes:
    """A reference as image bytes (an upload, or a URL when allowed) or a file under one of `roots` (folders of
    the checkout `root`). RefusedInput / LimitError naming references[index]; one message for every path outside
    the roots, so that a refusal says nothing about which files exist."""
    what = f"references[{index}]"
    text = check_text(what, value, multiline=False).strip()
    data = _upload(text)
    if data is not None:
        check_image_bytes(what, len(data), limits)
        return data
    if text.startswith(("http://", "https://")):
        if not allow_remote:
            raise RefusedInput(f"{what}: URLs are off for this deployment (serve.allow_remote_references); send the "
                               "image as base64 or a data URI")
        from kaleido.serve_requests import reference_bytes

        data = reference_bytes(text, what, allow_remote=True, max_bytes=limits.max_image_bytes)
        check_image_bytes(what, len(data), limits)
        return data
    allowed = ", ".join(path.as_posix() for path in roots)
    outside = RefusedInput(f"{what}: not an upload and not a file under serve.reference_roots ({allowed}); give a "
                           "path relative to the checkout inside one of them, or send the image as base64 / a data URI")
    relative = PurePosixPath(text)
    if not text or relative.is_absolute() or text.startswith("~") or ".." in relative.parts or "\\" in text:
        raise outside
    path = (root / relative).resolve()  # links resolved: a link out of a root is outside
    bases = [(root / base).resolve() for base in roots]
    if not any(path.is_relative_to(base) and path != base for base in bases):
        raise outside
    if not path.is_file():
        raise RefusedInput(f"{what}: {text}: no such file under serve.reference_roots")
    check_image_bytes(what, path.stat().st_size, limits)
    return path


def check_inputs(params: Any, root: Path, prompt: Any, references: list[Any], model: str,
                 settings: dict[str, Any]) -> list[Path | bytes]:
    """Every check of a request before any work: text fields, cost, references (confine_reference)."""
    g = params.generate
    effective = {key: settings[key] if settings.get(key) is not None else getattr(g, key) for key in SETTINGS}
    if model:
        check_text("model", model, multiline=False)
    check_text("sampler", effective["sampler"], multiline=False)
    if not isinstance(references, list | tuple):
        raise RefusedInput("references: expected a list of images (base64, data URIs or files under "
                           "serve.reference_roots)")
    if len(references) > params.model.max_references:
        raise RefusedInput(f"{len(references)} references, the model takes at most {params.model.max_references} "
                           "(model.max_references)")
    limits = Limits.from_params(params)
    check_request(limits, prompt, effective["negative_prompt"], effective["frames"], effective["height"],
                  effective["width"], effective["steps"], effective["guidance_scale"], len(references))
    roots = list(params.serve.reference_roots)
    return [confine_reference(value, i, root, roots, params.serve.allow_remote_references, limits)
            for i, value in enumerate(references)]


def stage_reference(value: Path | bytes, folder: Path, index: int) -> Path:
    """A checked reference as a file the CLI reads: a file of the roots as is, an upload saved under `folder`."""
    if isinstance(value, Path):
        return value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"reference-{index}.img"
    with atomic_path(path) as tmp:
        tmp.write_bytes(value)
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
) -> dict[str, Any] | State:
    """One video from a registered version (default: the champion); returns where it and its contact sheet are.

    A refused input ends the run FAILED with one line naming it (check_inputs), before any model work."""
    settings = {"seed": seed, "steps": steps, "frames": frames, "height": height, "width": width,
                "guidance_scale": guidance_scale, "shift": shift, "sampler": sampler,
                "negative_prompt": negative_prompt}
    try:
        root = checkout_root(repo)
        params = _params(root)
        checked = check_inputs(params, root, prompt, list(references or []), model, settings)
    except (RefusedInput, LimitError) as exc:
        return Failed(message=f"refused: {exc}")
    model = model or f"models:/{params.platform.registered_model}@champion"
    run_id = str(runtime.flow_run.id or "local")
    out = root / "artifacts" / "generated" / run_id
    refs = [stage_reference(value, out / "references", i) for i, value in enumerate(checked)]
    options = [arg for key, value in settings.items() if value is not None
               for arg in (f"--{key.replace('_', '-')}", str(value))]
    video = out / "video.mp4"
    result = run_command([_bin("kaleido"), "generate", "--model", model, "--prompt", prompt,
                          *[arg for ref in refs for arg in ("--ref", str(ref))], *options, "--out", str(video)], root)
    printed = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    said_seed = printed.get("seed", "").split(" ")[0]
    seed_used = int(said_seed) if said_seed.isdigit() else None  # a number in the result, not its text
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
