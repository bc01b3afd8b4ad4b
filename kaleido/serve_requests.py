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
from kaleido.request_limits import LimitError, Limits, check_image_bytes, check_request, check_text, check_total
from kaleido.serving import INPUTS, SETTING_KINDS, SETTINGS, ServingError

if TYPE_CHECKING:
    from PIL import Image

# Other tools' names for our settings (diffusers' WanPipeline, Wan's generate.py): named in the refusal as a hint
SYNONYMS = {"num_inference_steps": "steps", "sample_steps": "steps", "num_frames": "frames", "frame_num": "frames",
            "sample_guide_scale": "guidance_scale", "guidance": "guidance_scale", "cfg_scale": "guidance_scale",
            "sample_shift": "shift", "flow_shift": "shift", "sample_solver": "sampler", "base_seed": "seed",
            "generator": "seed", "negative": "negative_prompt", "n_prompt": "negative_prompt"}
# Other names for our input fields (a row's keys): named in the refusal as a hint
INPUT_SYNONYMS = {"reference": "references", "refs": "references", "ref": "references", "images": "references",
                  "image": "references", "ref_images": "references", "subjects": "references", "text": "prompt",
                  "caption": "prompt", "input": "prompt"}
# MLflow's JSON request formats (scoring protocol): each names the rows a different way
REQUEST_FORMATS = ("dataframe_records", "dataframe_split", "instances", "inputs")
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
        pass
    # never looked up on disk: whether a path exists on the server is none of the caller's business
    if _looks_like_path(text):
        raise ServingError(f"{what}: looks like a file path; the server does not read local files: send the image "
                           "file's bytes base64-encoded (or as a data:image/...;base64, URI)"
                           + (" or an http(s) URL" if allow_remote else "")) from None
    raise ServingError(f"{what}: not valid base64 and not an http(s) URL; send the image file's bytes "
                       "base64-encoded (or as a data:image/...;base64, URI)") from None


def _looks_like_path(text: str) -> bool:
    """A reference that is a file path rather than broken base64 (base64 has no '.', '\\' or '~'; a path has)."""
    return (not any(char.isspace() for char in text) and len(text) < 4096
            and (text.startswith(("~", "./", "../", "file:")) or "\\" in text or "." in text
                 or (len(text) > 2 and text[1] == ":" and text[0].isalpha())))


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
    check_param_types(given)
    try:
        checked = GenerateConfig.model_validate({**{key: config["defaults"][key] for key in SETTINGS}, **given})
    except ValidationError as error:  # a check of several fields has no loc: its message names them
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}"
                             f"{e['msg'].removeprefix('Value error, ')}" for e in error.errors())
        raise ServingError(f"params: {problems}") from None
    problem = rope_size_problem(checked.height, checked.width, config["rope_variant"], config["rope_offset"])
    if problem:
        raise ServingError(f"params: {problem}")
    return {key: getattr(checked, key) for key in SETTINGS}


def check_unknown_params(given: dict[str, Any]) -> None:
    """ServingError naming every param that is not one of SETTINGS (with our name for another tool's)."""
    hints = {name: f"{name} is called {ours} here" for name, ours in SYNONYMS.items()}
    _refuse_unknown("params {}: not settings of this model", given, SETTINGS, hints, "it takes")


def check_unknown_inputs(given: Any) -> None:
    """ServingError naming every input field (a row's key, a DataFrame column) that is not one of INPUTS; a setting
    sent as a field is pointed to params. MLflow would drop them with only a server-side warning."""
    hints = {**{name: f"{name} is called {ours} here" for name, ours in INPUT_SYNONYMS.items()},
             **{name: f"{name} is a setting: send it in params" for name in SETTINGS}}
    _refuse_unknown("inputs {}: not input fields of this model", given, INPUTS, hints, "a row takes")


def _refuse_unknown(what: str, given: Any, known: tuple[str, ...], hints: dict[str, str], takes: str) -> None:
    """ServingError `what` (formatted with the unknown names) with the hints for them and the names `known`."""
    unknown = sorted(set(map(str, given)) - set(known))
    if unknown:
        said = [hints[name] for name in unknown if name in hints]
        raise ServingError(what.format(unknown) + (f" ({'; '.join(said)})" if said else "")
                           + f"; {takes} {', '.join(known)}")


_KIND_NAMES = {"long": "a whole number", "double": "a number", "string": "text"}


def _json_kind(value: Any) -> str:
    from numbers import Integral, Real

    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, str):
        return "text"
    if isinstance(value, Integral):
        return "a whole number"
    if isinstance(value, Real):
        return "a number"
    return {list: "a list", tuple: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def check_param_types(given: dict[str, Any]) -> None:
    """ServingError naming every param whose JSON type is not its setting's (SETTING_KINDS, the signature's): a
    number sent as text ("5"), a fraction where a whole number belongs, text sent as a number. (A bool where a number
    belongs is left to the schema, which says so.)"""
    problems = []
    for key, value in given.items():
        kind, got = SETTING_KINDS[key], _json_kind(value)
        fits = {"long": got == "a whole number" or got == "true/false",
                "double": got in ("a whole number", "a number", "true/false"), "string": got == "text"}[kind]
        if fits:
            continue
        hint = ""
        if got == "text" and kind != "string":
            hint = f" (send {value.strip()} without quotes)" if _is_number(value) else ""
        elif got == "a number" and kind == "long":
            hint = " (no decimal point)"
        problems.append(f"{key}={json.dumps(value, default=str)}: expected {_KIND_NAMES[kind]}, got {got}{hint}")
    if problems:
        raise ServingError(f"params: {'; '.join(problems)}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def request_rows(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a JSON request in any of MLflow's formats, as records ({"prompt", "references"} per video):
    dataframe_records (a list of objects), dataframe_split ({"columns", "data"}), instances (a list of objects) or
    inputs (a list of objects, an object of columns {"prompt": [...], "references": [[...], ...]}, or one object).
    MLflow's own parsing of instances / inputs turns the rows' reference lists into numpy arrays and fails on rows
    with different numbers of references; `kaleido serve` hands MLflow the rows as dataframe_records instead.
    ServingError saying which shape is expected."""
    formats = [key for key in REQUEST_FORMATS if key in request]
    extra = sorted(set(request) - {*REQUEST_FORMATS, "params"})
    if len(formats) != 1 or extra:
        raise ServingError(f"the request must have exactly one of the input fields {', '.join(REQUEST_FORMATS)} "
                           f"(and optionally params); got {sorted(request)}")
    kind = formats[0]
    value = request[kind]
    shape = ('{"' + kind + '": [{"prompt": "...", "references": ["<base64 image>"]}, ...]}')
    if kind == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("columns"), list) or not isinstance(
                value.get("data"), list) or set(value) - {"columns", "data", "index"}:
            raise ServingError('dataframe_split must be an object {"columns": ["prompt", "references"], "data": '
                               '[["...", ["<base64 image>"]], ...]}')
        columns = value["columns"]
        rows = []
        for number, row in enumerate(value["data"]):
            if not isinstance(row, list) or len(row) != len(columns):
                raise ServingError(f"dataframe_split: data[{number}] must be a list of {len(columns)} values, one per "
                                   f"column {columns}")
            rows.append(dict(zip(map(str, columns), row, strict=True)))
        return rows
    if kind == "inputs" and isinstance(value, dict):
        if not any(isinstance(column, list) for key, column in value.items() if key != "references") and not (
                isinstance(value.get("references"), list) and value["references"]
                and all(isinstance(item, list) for item in value["references"])):
            return [value]  # one row: {"prompt": "...", "references": [...]}
        columns = {key: column for key, column in value.items()}
        bad = sorted(key for key, column in columns.items() if not isinstance(column, list))
        lengths = {len(column) for column in columns.values() if isinstance(column, list)}
        if bad or len(lengths) != 1:
            raise ServingError('inputs as columns must be an object of lists of one length, one item per video: '
                               '{"inputs": {"prompt": ["..."], "references": [["<base64 image>"]]}}'
                               + (f"; {bad} {'is' if len(bad) == 1 else 'are'} not a list" if bad else
                                  f"; the lists have lengths {sorted(lengths)}"))
        return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    if not isinstance(value, list):
        raise ServingError(f"{kind} must be a list of objects, one per video: {shape}")
    return value


def _row_references(row: dict[str, Any], what: str) -> list[Any]:
    refs = row.get("references")
    if refs is None or (isinstance(refs, float) and refs != refs):  # absent, or NaN in a DataFrame column
        return []
    if isinstance(refs, str | bytes):
        raise ServingError(f"{what}references must be a list of images (base64 or URL), got a string; send "
                           '["<base64 image>"]')
    if not hasattr(refs, "__iter__") or isinstance(refs, dict):
        raise ServingError(f"{what}references must be a list of images (base64 or URL), got {_json_kind(refs)}")
    refs = list(refs)
    for index, item in enumerate(refs):
        if not isinstance(item, str):
            raise ServingError(f"{what}references[{index}]: expected a base64 image string (or data URI), got "
                               f"{_json_kind(item)}")
    return refs


def check_rows(config: dict[str, Any], model_input: Any, params: dict[str, Any] | None,
               limits: Limits | None = None) -> tuple[dict[str, Any], list[tuple[str, list[bytes]]]]:
    """Every check of a request before any model work: its settings (request_settings), its input fields (no
    unknown ones), then per row the prompt and negative prompt (text, length), the references (count, bytes as sent)
    and the generation's cost against `limits` (default: the version's, model_config.limits), then the cost of all
    rows together (check_total). Returns (settings, [(prompt, reference bytes)]).
    ServingError / LimitError naming the row, the field or the limit."""
    rows = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else list(model_input)
    if not rows:
        raise ServingError("the request has no rows; send one row per video (prompt, references)")
    settings = request_settings(config, params)
    limits = limits or Limits.from_config(config.get("limits"))
    max_refs = int(config.get("max_references", 3))
    allow_remote = bool(config.get("allow_remote_references"))
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ServingError(f"row {number}: expected an object with prompt and references, got {_json_kind(row)}")
    check_unknown_inputs({key for row in rows for key in row})
    costs, row_refs = [], []
    for number, row in enumerate(rows):
        what = f"row {number}: " if len(rows) > 1 else ""
        refs = _row_references(row, what)
        if len(refs) > max_refs:
            raise ServingError(f"{what}{len(refs)} references, the model takes at most {max_refs} "
                               "(model.max_references)")
        costs.append(check_request(limits, row.get("prompt"), settings["negative_prompt"], settings["frames"],
                                   settings["height"], settings["width"], settings["steps"],
                                   settings["guidance_scale"], len(refs), what))
        row_refs.append(refs)
    check_total(costs, limits)  # before any reference is decoded
    checked = []
    for number, (row, refs) in enumerate(zip(rows, row_refs, strict=True)):
        what = f"row {number}: " if len(rows) > 1 else ""
        data = []
        for index, value in enumerate(refs):
            label = f"{what}references[{index}]"
            check_text(label, value, multiline=False)
            # base64 is 4/3 of the bytes: refuse an oversized image before decoding it
            check_image_bytes(label, len(value.partition(",")[2] if value.startswith("data:") else value) * 3 // 4,
                              limits)
            blob = reference_bytes(value, label, allow_remote, limits.max_image_bytes)
            check_image_bytes(label, len(blob), limits)
            data.append(blob)
        checked.append((row.get("prompt"), data))
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
