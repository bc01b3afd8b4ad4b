"""The requests a registered version takes: references, settings, limits, and one video per row.

Inputs (one row per video): `prompt` (string) and `references` (a list of images, each base64 PNG/JPEG, raw or as
a `data:image/...;base64,` URI; http(s) URLs only when the model was registered with serve.allow_remote_references,
since a served endpoint must not fetch arbitrary addresses for its callers, and never local paths, which a remote
caller could use to read the server's files). Params: kaleido.serving.SETTINGS, their defaults the `generate`
section of params.yaml at registration.

Every request is checked whole before any model work (`check_rows`): its settings by the CLI's schema, every text
field, every reference's size and the generation's cost against the limits (kaleido/request_limits.py; the version
carries serve.max_* of its registration, `kaleido serve` applies the current params.yaml's). Params the model does
not take are refused naming them (diffusers' and Wan's names for ours, e.g. `num_inference_steps`, get a hint):
accepting two names for one setting would let a request carry two different values. A generation stops at the next
denoising step once `CANCEL` (set by `kaleido serve` for a request that timed out or whose client left) says so.
"""

from __future__ import annotations

import base64
import binascii
import json
import tempfile
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaleido.platform.integrity import IntegrityError
from kaleido.request_limits import LimitError, Limits, check_image_bytes, check_request, check_text
from kaleido.serving import SETTINGS, ServingError

if TYPE_CHECKING:
    from PIL import Image

# Other tools' names for our settings (diffusers' WanPipeline, Wan's generate.py): named in the refusal as a hint
SYNONYMS = {"num_inference_steps": "steps", "sample_steps": "steps", "num_frames": "frames", "frame_num": "frames",
            "sample_guide_scale": "guidance_scale", "guidance": "guidance_scale", "cfg_scale": "guidance_scale",
            "sample_shift": "shift", "flow_shift": "shift", "sample_solver": "sampler", "base_seed": "seed",
            "generator": "seed", "negative": "negative_prompt", "n_prompt": "negative_prompt"}
# Set by `kaleido serve` around a request: a callable that says "stop" (timed out, client gone); None elsewhere.
CANCEL: ContextVar[Callable[[], bool] | None] = ContextVar("kaleido_cancel", default=None)


# ---- references -------------------------------------------------------------------------------------------


def reference_bytes(value: Any, what: str, allow_remote: bool = False, max_bytes: int | None = None) -> bytes:
    """The image file bytes of a reference sent as base64, a data URI or (if `allow_remote`) an http(s) URL (at
    most `max_bytes` read from it).

    Raises ServingError naming `what` (e.g. "references[0]") and the fix."""
    if not isinstance(value, str) or not value.strip():
        raise ServingError(f"{what}: expected a base64 image string (or data URI), got {type(value).__name__}")
    text = value.strip()
    if text.startswith(("http://", "https://")):
        if not allow_remote:
            raise ServingError(f"{what}: URLs are off for this model (serve.allow_remote_references); send base64")
        import urllib.request

        with urllib.request.urlopen(text, timeout=30) as response:  # http(s) only, checked above
            return response.read() if max_bytes is None else response.read(max_bytes + 1)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise ServingError(f"{what}: not a file, an http(s) URL or valid base64 (send the image file's bytes, "
                           "base64-encoded)") from None


def decode_reference(value: Any, index: int, allow_remote: bool = False, max_pixels: int | None = None) -> Image.Image:
    """One reference of a request as RGB, through the project's one image loader (orientation, bit depth, ...)."""
    what = f"references[{index}]"
    data = reference_bytes(value, what, allow_remote)
    return decode_reference_bytes(data, what, max_pixels)


def decode_reference_bytes(data: bytes, what: str, max_pixels: int | None = None) -> Image.Image:
    """Image file bytes as RGB, through the project's one image loader."""
    from kaleido.model.media import ImageError, load_image

    with tempfile.NamedTemporaryFile(suffix=".img") as handle:
        handle.write(data)
        handle.flush()
        try:
            return load_image(Path(handle.name), what, max_pixels)
        except ImageError as exc:  # the temporary file's name is the server's business, not the caller's
            raise ServingError(str(exc).replace(f" {handle.name}", "").replace(handle.name, "<upload>")) from None


def one_line(text: str, limit: int = 1000) -> str:
    """The first line of a message, at most `limit` characters: what a refused caller is told."""
    first = (text.strip().splitlines() or [""])[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."


def refusal_message(exc: BaseException) -> str | None:
    """Our one-line reason for a refused request (bad input, over a limit, cancelled), or None for anything
    else (a fault of the server, logged with its traceback there and answered without it)."""
    from kaleido.model.generate import GenerationCancelled

    if isinstance(exc, ServingError | LimitError | IntegrityError | GenerationCancelled):
        return one_line(str(exc))
    return None


# ---- requests ---------------------------------------------------------------------------------------------


def request_settings(config: dict[str, Any], params: dict[str, Any] | None) -> dict[str, Any]:
    """A request's settings (its params over the model's params.yaml defaults), checked by the same schema as
    `kaleido generate` (4k+1 frames, sizes divisible by 16, steps <= 1000, finite floats, seed -1 = random) and
    the R-RoPE size limit of this model. Raises ServingError naming every bad value."""
    from pydantic import ValidationError

    from kaleido.config.schema import GenerateConfig, rope_size_problem

    given = {key: value for key, value in (params or {}).items() if value is not None}
    check_unknown_params(given)
    try:
        checked = GenerateConfig.model_validate({**{key: config["defaults"][key] for key in SETTINGS}, **given})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in error.errors())
        raise ServingError(f"params: {problems}") from None
    problem = rope_size_problem(checked.height, checked.width, config["rope_variant"], config["rope_offset"])
    if problem:
        raise ServingError(f"params: {problem}")
    return {key: getattr(checked, key) for key in SETTINGS}


def check_unknown_params(given: dict[str, Any]) -> None:
    """ServingError naming every param that is not one of SETTINGS (with our name for another tool's)."""
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        hints = [f"{name} is called {SYNONYMS[name]} here" for name in unknown if name in SYNONYMS]
        raise ServingError(f"params {unknown}: not settings of this model"
                           + (f" ({'; '.join(hints)})" if hints else "") + f"; it takes {', '.join(SETTINGS)}")


def _row_references(row: dict[str, Any], number: int) -> list[Any]:
    refs = row.get("references")
    if refs is None or (isinstance(refs, float) and refs != refs):  # absent, or NaN in a DataFrame column
        return []
    if not isinstance(refs, str) and hasattr(refs, "__len__") and len(refs) == 0:
        return []
    if isinstance(refs, str):
        return [refs]
    if not hasattr(refs, "__iter__") or isinstance(refs, dict):
        raise ServingError(f"row {number}: `references` must be a list of base64 images, got {type(refs).__name__}")
    return list(refs)


def check_rows(config: dict[str, Any], model_input: Any, params: dict[str, Any] | None,
               limits: Limits | None = None) -> tuple[dict[str, Any], list[tuple[str, list[bytes]]]]:
    """Every check of a request before any model work: its settings (request_settings), then per row the prompt
    and negative prompt (text, length), the references (count, bytes as sent) and the generation's cost against
    `limits` (default: the version's, model_config.limits). Returns (settings, [(prompt, reference bytes)]).
    ServingError / LimitError naming the row, the field or the limit."""
    rows = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else list(model_input)
    if not rows:
        raise ServingError("the request has no rows; send one row per video (prompt, references)")
    settings = request_settings(config, params)
    limits = limits or Limits.from_config(config.get("limits"))
    max_refs = int(config.get("max_references", 3))
    allow_remote = bool(config.get("allow_remote_references"))
    checked = []
    for number, row in enumerate(rows):
        what = f"row {number}: " if len(rows) > 1 else ""
        if not isinstance(row, dict):
            raise ServingError(f"row {number}: expected an object with prompt and references")
        refs = _row_references(row, number)
        if len(refs) > max_refs:
            raise ServingError(f"{what}{len(refs)} references, the model takes at most {max_refs} "
                               "(model.max_references)")
        prompt = row.get("prompt")
        check_request(limits, prompt, settings["negative_prompt"], settings["frames"], settings["height"],
                      settings["width"], settings["steps"], settings["guidance_scale"], len(refs), what)
        data = []
        for index, value in enumerate(refs):
            label = f"{what}references[{index}]"
            if isinstance(value, str):
                check_text(label, value, multiline=False)
                # base64 is 4/3 of the bytes: refuse an oversized image before decoding it
                check_image_bytes(label, len(value.partition(",")[2] if value.startswith("data:") else value) * 3 // 4,
                                  limits)
            blob = reference_bytes(value, label, allow_remote, limits.max_image_bytes)
            check_image_bytes(label, len(blob), limits)
            data.append(blob)
        checked.append((prompt, data))
    return settings, checked


def generate_rows(pipe: Any, config: dict[str, Any], model_input: Any, params: dict[str, Any] | None,
                  limits: Limits | None = None) -> Any:
    """One video per input row -> a DataFrame (video bytes, frames, fps, width, height, seed).

    The whole request is checked first (check_rows); a generation stops between denoising steps when CANCEL says
    so (GenerationCancelled)."""
    import pandas as pd

    from kaleido.model.media import write_video

    defaults = config["defaults"]
    settings, rows = check_rows(config, model_input, params, limits)  # before any model work
    images_per_row = [[decode_reference_bytes(blob, f"references[{i}]", config.get("max_image_pixels"))
                       for i, blob in enumerate(blobs)] for _, blobs in rows]
    cancel = CANCEL.get()
    outputs = []
    for (prompt, _), images in zip(rows, images_per_row, strict=True):
        frames = pipe(prompt, images, settings["frames"], settings["height"], settings["width"], settings["steps"],
                      float(settings["guidance_scale"]), float(settings["shift"]), settings["sampler"],
                      settings["seed"], settings["negative_prompt"], progress=False, cancel=cancel)
        with tempfile.TemporaryDirectory(prefix="kaleido-predict-") as tmp:
            path = write_video(frames, Path(tmp) / "video.mp4", fps=int(defaults["fps"]),
                               metadata={"comment": json.dumps({"prompt": prompt, "seed": pipe.last_seed})})
            video = path.read_bytes()
        outputs.append({"video": video, "frames": int(frames.shape[0]), "fps": int(defaults["fps"]),
                        "width": int(frames.shape[2]), "height": int(frames.shape[1]), "seed": int(pipe.last_seed)})
    return pd.DataFrame(outputs, columns=["video", "frames", "fps", "width", "height", "seed"])
