"""Read and write the DiT in the three layouts it ships in: original Wan2.1, diffusers and official Kaleido (SAT).

Wan key names are canonical (they are KaleidoDiT's parameter names): every reader yields Wan-keyed shards and
every writer starts from Wan keys. The format is told by the tensor names, not by file names, because Wan2.1
and diffusers use the same file names (`diffusion_pytorch_model*.safetensors`).

Loading never holds a checkpoint twice: the model is built on the meta device and each shard's tensors
(memory-mapped by safetensors / `torch.load(mmap=True)`) are assigned as the parameters themselves.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from kaleido.model.dit import DiTConfig, KaleidoDiT
from kaleido.model.keymaps import diffusers_key_to_wan, sat_to_wan, wan_key_to_diffusers, wan_to_sat
from kaleido.model.settings import SETTINGS_KEY, ModelSettings, settings_from_config, settings_from_metadata

if TYPE_CHECKING:
    from kaleido.model.lora import Adapter

log = logging.getLogger(__name__)

FORMATS = ("wan", "diffusers", "sat")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
CONFIG_NAME = "config.json"
SAT_MODEL_FILE = "mp_rank_00_model_states.pt"
SAT_TAG = "1"  # the sub-folder the official Kaleido release uses; `latest` names it
SAT_PREFIX = "model.diffusion_model."
DEFAULT_SHARD_BYTES = 5 * 10**9
WAN_HEAD_DIM = 128  # every released Wan2.1 model; the fallback when no config names the head count
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_MAX_LISTED = 20

ACCEPTED_LAYOUTS = (
    "wan: a .safetensors / .pt / .pth file, or a folder with diffusion_pytorch_model.safetensors (or "
    "diffusion_pytorch_model-0000N-of-0000M.safetensors shards + diffusion_pytorch_model.safetensors.index.json) "
    "holding Wan2.1 names (blocks.0.self_attn.q.weight); "
    "diffusers: the same folder layout holding diffusers names (blocks.0.attn1.to_q.weight) with a "
    "WanTransformer3DModel config.json; "
    "sat: a folder with a `latest` file and <tag>/mp_rank_00_model_states.pt (official Kaleido), "
    "that <tag> sub-folder, or the .pt file itself"
)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint cannot be found, recognised, or does not match the model; the message says how to fix it."""


@dataclass(frozen=True)
class _Layout:
    """Where a checkpoint's tensors live and how they are named."""

    path: Path  # what the caller gave
    format: str  # key convention: wan | diffusers | sat
    files: tuple[Path, ...]  # tensor files in read order (shards)
    config_file: Path | None
    prefixed: bool  # keys carry `model.diffusion_model.`; keys without it belong to other sub-models


# ---- locating and recognising ---------------------------------------------------------------------------


def _no_checkpoint(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}. Accepted layouts: {ACCEPTED_LAYOUTS}")


def _tensor_files(path: Path) -> tuple[tuple[Path, ...], Path | None]:
    """The tensor files of a checkpoint path and the config.json next to them (if any)."""
    if not path.exists():
        raise _no_checkpoint(path, "no such file or folder")
    if path.is_file():
        if path.suffix == ".safetensors" or path.suffix in _TORCH_SUFFIXES:
            config = path.parent / CONFIG_NAME
            if path.name == SAT_MODEL_FILE and (path.parent.parent / "latest").is_file():
                config = path.parent.parent / CONFIG_NAME
            return (path,), config if config.is_file() else None
        raise _no_checkpoint(path, f"unsupported file type {path.suffix!r}")
    config = path / CONFIG_NAME
    config_file = config if config.is_file() else None
    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        model_file = path / tag / SAT_MODEL_FILE
        if not model_file.is_file():
            raise _no_checkpoint(path, f"`latest` names {tag!r} but {model_file} does not exist")
        return (model_file,), config_file
    if (path / SAT_MODEL_FILE).is_file():
        parent_config = path.parent / CONFIG_NAME
        return (path / SAT_MODEL_FILE,), parent_config if parent_config.is_file() else None
    if (path / INDEX_NAME).is_file():
        weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        shards = tuple(path / name for name in sorted(set(weight_map.values())))
        absent = [str(s) for s in shards if not s.is_file()]
        if absent:
            raise _no_checkpoint(path, f"{INDEX_NAME} lists shards that do not exist: {', '.join(absent)}")
        return shards, config_file
    if (path / WEIGHTS_NAME).is_file():
        return (path / WEIGHTS_NAME,), config_file
    raise _no_checkpoint(path, "no DiT checkpoint in this folder")


def _numpy_rng_globals() -> list:
    """The pickle globals of a NumPy RNG state (np.random.get_state(): ('MT19937', uint32 array, pos, has_gauss,
    cached_gaussian)), which the official SAT/DeepSpeed trainer saves beside the weights (`np_rng_state`).

    Only these are allowed on top of torch's weights-only set: they rebuild an array, nothing else. NumPy 2
    pickles the array rebuilder as numpy._core.multiarray._reconstruct, NumPy 1.x as numpy.core.multiarray.
    """
    import numpy as np

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),  # numpy.dtypes.UInt32DType, how NumPy >= 1.25 may name the state's dtype
    ]


# Top-level entries of an official SAT / DeepSpeed checkpoint besides the weights ("module"), for messages.
_EXTRA_NAMES = {
    "random_rng_state": "Python RNG state", "np_rng_state": "NumPy RNG state", "torch_rng_state": "torch RNG state",
    "cuda_rng_state": "CUDA RNG state", "rng_tracker_states": "model-parallel RNG states",
    "client_lr_scheduler": "LR scheduler state", "lr_scheduler": "LR scheduler state", "optimizer": "optimizer state",
    "ds_config": "DeepSpeed config", "param_shapes": "ZeRO parameter shapes",
}


def _describe_extra(key: str, value: object) -> str:
    if isinstance(value, bool | int | float | str) and len(str(value)) <= 40:
        return f"{key}={value}"
    if key in _EXTRA_NAMES:
        return f"{key} ({_EXTRA_NAMES[key]})"
    return f"{key} ({type(value).__name__})"


def _load_torch_file_with_extras(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A torch state dict, memory-mapped and unwrapped from DeepSpeed's {"module": ...} and similar, plus a
    one-line description of every other top-level entry (RNG states, iteration, DeepSpeed config, ...).

    Loading stays weights-only (no code from the file runs): torch's tensor-only unpickler plus exactly the
    NumPy globals of an RNG state (`_numpy_rng_globals`). Any other global is refused with its name.
    """
    try:
        # mmap needs the zip format (torch >= 1.6); a legacy file is read into memory instead.
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise CheckpointError(
                f"{path}: refused: the file needs {', '.join(unsafe)} to load, which is neither a tensor nor an "
                "RNG state, and loading never runs code from a checkpoint. Re-save the weights alone (e.g. "
                "torch.save(state_dict) or safetensors) in a process that trusts the file"
            ) from None
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({exc})") from exc
    except Exception as exc:  # zip, mmap and truncation errors have many types; all mean the same to the user
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({exc})") from exc
    extras: list[str] = []
    for wrapper in ("module", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            extras += [_describe_extra(k, v) for k, v in state.items() if k != wrapper and v is not None]
            state = state[wrapper]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state, extras


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a zip-format torch file needs beyond the weights-only set and the NumPy RNG ones."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip file, or unreadable: the caller reports the load error itself
        return []
    allowed = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
               "numpy.dtype", "numpy.dtypes.UInt32DType"}
    return [name for name in found if name not in allowed]


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a torch file (see `_load_torch_file_with_extras`)."""
    return _load_torch_file_with_extras(path)[0]


def checkpoint_extras(path: str | Path) -> list[str]:
    """What a checkpoint's torch files hold besides the DiT weights, one description per entry (not loaded).

    An official SAT/DeepSpeed checkpoint lists e.g. `iteration=1000`, `np_rng_state (NumPy RNG state)`,
    `ds_version=0.14.4`; a safetensors checkpoint lists nothing.
    """
    extras: list[str] = []
    for file in _locate(path).files:
        if file.suffix != ".safetensors":
            extras += _load_torch_file_with_extras(file)[1]
    return extras


_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


def safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor name -> {"dtype", "shape", "data_offsets"}, __metadata__) of a .safetensors file, from its header.

    Reads only the 8-byte length and the JSON header (the format's first bytes), never maps the file:
    `safe_open` maps it whole, which fails for a 28-57 GB single-file 14B checkpoint on a machine with less
    memory (ENOMEM) although the header is a few hundred KB. CheckpointError names a truncated or damaged file.
    """
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                what = "empty (0 bytes)" if not prefix else f"truncated ({len(prefix)} bytes)"
                raise CheckpointError(f"{path}: not a safetensors file: {what}; download or export it again")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: not a safetensors file (header length {length} bytes is implausible)")
            blob = handle.read(length)
            size = path.stat().st_size
            if len(blob) < length:
                raise CheckpointError(f"{path}: truncated header: {len(blob)} of its {length} header bytes are "
                                      f"there (the file has {size} bytes); download or export it again")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: damaged safetensors header (truncated, or not safetensors)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    try:
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path}: damaged safetensors header (a tensor entry lacks its data offsets)") from None
    if 8 + length + end > size:
        raise CheckpointError(
            f"{path}: truncated: the header describes {8 + length + end} bytes, the file has {size}; "
            "download or export it again"
        )
    if 8 + length + end < size:
        # safetensors refuses such a file too ("not fully covered"), with no file name
        raise CheckpointError(
            f"{path}: size mismatch: the header describes {8 + length + end} bytes, the file has {size} (damaged, or "
            "written twice at once); download or export it again"
        )
    return header, metadata


def check_weight_files(path: str | Path) -> list[Path]:
    """Check every .safetensors file of `path` (a file, or a model folder and its sub-folders) from its header.

    The one check every weight loader runs before handing a folder to safetensors, diffusers or transformers,
    whose own errors on a truncated or empty file ("incomplete metadata, file not fully covered") name no file.
    CheckpointError names the file and says what is wrong (empty, truncated header, size mismatch). Reads only the
    headers: cheap even for a 57 GB checkpoint. Returns the files checked.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors")) if path.is_dir() else []
    for file in files:
        if file.suffix == ".safetensors":
            safetensors_header(file)
    return files


def _file_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        return list(safetensors_header(path)[0])
    return list(_load_torch_file(path))


def _key_format(keys: Iterable[str]) -> str | None:
    """wan | diffusers | sat from tensor names (the ground truth), None when none of them fits."""
    names = [k.removeprefix(SAT_PREFIX) for k in keys]
    if any(n.startswith(("mixins.", "transformer.layers.")) for n in names):
        return "sat"
    # Both Wan and diffusers have `blocks.` and `patch_embedding.`: test the names only diffusers has first.
    if any(n.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in n for n in names):
        return "diffusers"
    wan_top = ("patch_embedding.", "text_embedding.", "time_embedding.", "time_projection.", "head.")
    if any(n.startswith(wan_top) or ".self_attn." in n or ".cross_attn." in n for n in names):
        return "wan"
    return None


def _locate(path: str | Path) -> _Layout:
    path = Path(path)
    files, config_file = _tensor_files(path)
    if files[0].suffix == ".safetensors" and len(files) > 1:
        keys = list(json.loads((path / INDEX_NAME).read_text())["weight_map"])
    else:
        keys = _file_keys(files[0])
    fmt = _key_format(keys)
    if fmt is None:
        shown = ", ".join(keys[:5]) or "no tensors"
        raise _no_checkpoint(path, f"tensor names match no known DiT layout (first: {shown})")
    prefixed = any(k.startswith(SAT_PREFIX) for k in keys)
    return _Layout(path, fmt, files, config_file, prefixed)


def detect_format(path: str | Path) -> str:
    """The format of a checkpoint file or folder: "wan", "diffusers" or "sat"; CheckpointError for anything else."""
    return _locate(path).format


# ---- configs ---------------------------------------------------------------------------------------------


def _config_from_json(data: Mapping, source: Path) -> DiTConfig | None:
    """DiTConfig from a Wan2.1 (`WanModel`) or diffusers (`WanTransformer3DModel`) config.json."""
    name = data.get("_class_name")
    theta = float(data.get("rope_theta", 10000.0))
    try:
        if name == "WanTransformer3DModel" or "num_attention_heads" in data:
            heads = int(data["num_attention_heads"])
            in_dim = int(data.get("in_channels", 16))
            return DiTConfig(
                dim=heads * int(data["attention_head_dim"]), ffn_dim=int(data["ffn_dim"]), num_heads=heads,
                num_layers=int(data["num_layers"]), in_dim=in_dim, out_dim=int(data.get("out_channels") or in_dim),
                text_dim=int(data.get("text_dim", 4096)), freq_dim=int(data.get("freq_dim", 256)),
                patch_size=tuple(data.get("patch_size", (1, 2, 2))), eps=float(data.get("eps", 1e-6)),
                rope_theta=theta,
            )
        if name == "WanModel" or "num_heads" in data:
            return DiTConfig(
                dim=int(data["dim"]), ffn_dim=int(data["ffn_dim"]), num_heads=int(data["num_heads"]),
                num_layers=int(data["num_layers"]), in_dim=int(data.get("in_dim", 16)),
                out_dim=int(data.get("out_dim", 16)), text_dim=int(data.get("text_dim", 4096)),
                freq_dim=int(data.get("freq_dim", 256)), patch_size=tuple(data.get("patch_size", (1, 2, 2))),
                eps=float(data.get("eps", 1e-6)), rope_theta=theta,
            )
    except KeyError as exc:
        raise CheckpointError(f"{source}: config lacks {exc.args[0]!r}; fix the file or pass --arch") from exc
    return None


def read_config(path: str | Path) -> DiTConfig | None:
    """The DiTConfig a checkpoint describes (config.json, or our metadata in a single .safetensors file).

    None when there is no config, or the config.json is not a Wan2.1 / diffusers Wan one.
    """
    data, source = _config_data(path)
    return None if data is None else _config_from_json(data, Path(source))


def _config_data(path: str | Path) -> tuple[dict | None, str]:
    """The parsed Wan / diffusers config a checkpoint carries (config.json, else the metadata of one .safetensors
    file) and where it was read; (None, path) when there is none."""
    files, config_file = _tensor_files(Path(path))
    if config_file is not None:
        data = json.loads(config_file.read_text())
        if _config_from_json(data, config_file) is not None:
            return data, str(config_file)
    if len(files) == 1 and files[0].suffix == ".safetensors":
        embedded = safetensors_header(files[0])[1].get("config")
        if embedded:
            return json.loads(embedded), str(files[0])
    return None, str(path)


def read_settings(path: str | Path, lora: str | Path | Adapter | None = None) -> ModelSettings | None:
    """The ModelSettings (R-RoPE variant and offset, text_len, max_references) the model at `path` was trained with,
    None when its files do not say (Wan2.1 releases, the official Kaleido checkpoint). With a LoRA adapter that
    records its own (a LoRA training export), the adapter's win: it was trained with them. ValueError for a damaged
    record."""
    if lora is not None:
        from kaleido.model.lora import Adapter, adapter_file

        if isinstance(lora, Adapter):
            found = settings_from_metadata({"kaleido_lora": json.dumps(lora.meta)}, "the LoRA adapter")
        else:
            file = adapter_file(lora)
            found = settings_from_metadata(safetensors_header(file)[1], str(file))
        if found is not None:
            return found
    data, source = _config_data(path)
    return None if data is None else settings_from_config(data, source)


def infer_config(shapes: Mapping[str, torch.Size]) -> DiTConfig:
    """A DiTConfig from Wan-keyed tensor shapes.

    The head count is not in any shape: it is taken as dim / 128 (Wan's head_dim) when that divides.
    """

    def shape(key: str) -> torch.Size:
        if key not in shapes:
            raise CheckpointError(f"cannot infer the DiT config: no tensor {key!r}; pass --arch or a config.json")
        return shapes[key]

    dim, in_dim, *patch = shape("patch_embedding.weight")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError("cannot infer the DiT config: no `blocks.N.` tensors; pass --arch or a config.json")
    if dim % WAN_HEAD_DIM:
        raise CheckpointError(
            f"cannot infer the number of attention heads: dim={dim} is not a multiple of Wan's head_dim "
            f"{WAN_HEAD_DIM}; pass --arch (or config=) or put a config.json next to the checkpoint"
        )
    patch_size = tuple(int(p) for p in patch)
    return DiTConfig(
        dim=dim, ffn_dim=shape("blocks.0.ffn.0.weight")[0], num_heads=dim // WAN_HEAD_DIM,
        num_layers=max(blocks) + 1, in_dim=in_dim,
        out_dim=shape("head.head.weight")[0] // (patch_size[0] * patch_size[1] * patch_size[2]),
        text_dim=shape("text_embedding.0.weight")[1], freq_dim=shape("time_embedding.0.weight")[1],
        patch_size=patch_size,
    )


def _wan_config_json(config: DiTConfig, settings: ModelSettings | None = None) -> dict:
    text_len = settings.text_len if settings is not None else 512
    data = {
        "_class_name": "WanModel", "model_type": "t2v", "patch_size": list(config.patch_size), "text_len": text_len,
        "in_dim": config.in_dim, "dim": config.dim, "ffn_dim": config.ffn_dim, "freq_dim": config.freq_dim,
        "text_dim": config.text_dim, "out_dim": config.out_dim, "num_heads": config.num_heads,
        "num_layers": config.num_layers, "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True,
        "eps": config.eps,
    }
    return _with_settings(_with_theta(data, config), settings)


def _diffusers_config_json(config: DiTConfig, settings: ModelSettings | None = None) -> dict:
    try:
        version = importlib_metadata.version("diffusers")
    except importlib_metadata.PackageNotFoundError:
        version = "0.42.1"
    data = {
        "_class_name": "WanTransformer3DModel", "_diffusers_version": version,
        "patch_size": list(config.patch_size), "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim, "in_channels": config.in_dim, "out_channels": config.out_dim,
        "text_dim": config.text_dim, "freq_dim": config.freq_dim, "ffn_dim": config.ffn_dim,
        "num_layers": config.num_layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
        "eps": config.eps, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }
    return _with_settings(_with_theta(data, config), settings)


def _with_settings(data: dict, settings: ModelSettings | None) -> dict:
    # `_`-prefixed: diffusers' and Wan's config loaders drop such keys silently
    if settings is not None:
        data[SETTINGS_KEY] = settings.to_dict()
    return data


def _with_theta(data: dict, config: DiTConfig) -> dict:
    # Neither Wan nor diffusers has the key (both hard-code 10000); write it only when it differs.
    if config.rope_theta != 10000.0:
        data["rope_theta"] = config.rope_theta
    return data


# ---- reading ---------------------------------------------------------------------------------------------


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    """One file's own tensors, memory-mapped."""
    if file.suffix == ".safetensors":
        safetensors_header(file)  # a truncated shard is named here, not in safetensors' own anonymous error
        with safe_open(file, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    return _load_torch_file(file)


def _read_file_meta(file: Path) -> dict[str, torch.Tensor]:
    """Like _read_file but meta tensors from the headers: shapes and dtypes, no data."""
    if file.suffix == ".safetensors":
        return {
            key: torch.empty(entry["shape"], dtype=_SAFETENSORS_DTYPES.get(entry["dtype"], torch.uint8), device="meta")
            for key, entry in safetensors_header(file)[0].items()
        }
    return {k: torch.empty_like(v, device="meta") for k, v in _load_torch_file(file).items()}


def _to_wan(shard: Mapping[str, torch.Tensor], layout: _Layout) -> dict[str, torch.Tensor]:
    """Rename one shard to Wan keys; a name with no Wan counterpart is kept as is (reported as unexpected)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in shard.items():
        if layout.prefixed and not key.startswith(SAT_PREFIX):
            continue  # another sub-model of the same file (VAE, text encoder), not the DiT
        name = key if layout.format == "sat" else key.removeprefix(SAT_PREFIX)
        try:
            if layout.format == "sat":
                out.update(sat_to_wan({name: value}))  # one key at a time: fused q/k/v split per tensor
                continue
            out[diffusers_key_to_wan(name) if layout.format == "diffusers" else name] = value
        except (KeyError, ValueError):
            out[key] = value
    return out


def _iter_wan(layout: _Layout, read: Callable[[Path], dict[str, torch.Tensor]] = _read_file) -> Iterator[dict]:
    # map() keeps no reference to a shard once it is handed out (a generator's loop variable would, and a
    # converted shard's source mapping would then live on while the next one is read).
    return map(lambda file: _to_wan(read(file), layout), layout.files)


def iter_wan_shards(path: str | Path) -> Iterator[dict[str, torch.Tensor]]:
    """Wan-keyed tensors of a checkpoint, one file (shard) at a time; tensors are memory-mapped where possible."""
    return _iter_wan(_locate(path))


def read_shapes(path: str | Path) -> dict[str, torch.Size]:
    """Wan-keyed tensor shapes of a checkpoint, from the file headers (no tensor data is read)."""
    layout = _locate(path)
    return {k: v.shape for shard in _iter_wan(layout, _read_file_meta) for k, v in shard.items()}


# ---- checking --------------------------------------------------------------------------------------------


def expected_shapes(config: DiTConfig) -> dict[str, torch.Size]:
    """Wan key -> shape of every tensor a KaleidoDiT with this config holds (built on meta: free)."""
    with torch.device("meta"):
        model = KaleidoDiT(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {len(items)} {title}:\n" + "\n".join(f"    {item}" for item in shown) + more


@dataclass
class _Mismatch:
    """Missing, unexpected and wrong-shaped tensors, collected over all shards and reported together."""

    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[tuple[str, torch.Size, torch.Size]]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)

    def error(self, what: str, fmt: str, config: DiTConfig, config_source: str) -> CheckpointError:
        parts = [f"{what} does not match the DiT (format {fmt}; config from {config_source}: {config}):"]
        if self.missing:
            parts.append(_listing("missing keys", self.missing))
        if self.unexpected:
            parts.append(_listing("unexpected keys", self.unexpected))
        if self.wrong_shape:
            rows = [f"{k}: expected {tuple(e)}, got {tuple(g)}" for k, e, g in self.wrong_shape]
            parts.append(_listing("wrong shapes", rows))
        parts.append(
            "Fix: pass the right --arch (or config), or check that the checkpoint is a Wan2.1 T2V DiT "
            "(I2V / VACE variants have extra tensors)."
        )
        return CheckpointError("\n".join(parts))


def _compare(shapes: Mapping[str, torch.Size], expected: Mapping[str, torch.Size]) -> _Mismatch:
    return _Mismatch(
        missing=[k for k in expected if k not in shapes],
        unexpected=[k for k in shapes if k not in expected],
        wrong_shape=[(k, expected[k], s) for k, s in shapes.items() if k in expected and s != expected[k]],
    )


def _resolve_config(layout: _Layout, config: DiTConfig | None) -> tuple[DiTConfig, str]:
    """The config to use and where it came from (for error messages)."""
    if config is not None:
        return config, "the given config (--arch)"
    found = read_config(layout.path)
    if found is not None:
        return found, str(layout.config_file or layout.files[0])
    return infer_config(read_shapes(layout.path)), f"tensor shapes (head_dim {WAN_HEAD_DIM} assumed)"


# ---- loading ---------------------------------------------------------------------------------------------


def load_dit(
    path: str | Path,
    config: DiTConfig | None = None,
    attention_backend: str = "sdpa",
    rope_variant: str | None = None,
    rope_offset: int | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    lora: str | Path | Adapter | None = None,
    lora_scale: float = 1.0,
) -> KaleidoDiT:
    """Build a KaleidoDiT from a checkpoint in any supported layout, shard by shard.

    lora: a LoRA adapter (a file or folder in the peft, diffusers or Wan/ComfyUI layout, or an already loaded
    kaleido.model.lora.Adapter) merged into the weights with lora_scale (W += lora_scale * alpha / rank * B @ A);
    the checkpoint files are not touched.

    The model is created on the meta device (no memory, no random init) and every tensor read is assigned
    as the parameter itself, so peak memory stays near one model size. Missing, unexpected and wrong-shaped
    tensors are all reported together in one CheckpointError. dtype=None keeps the checkpoint's dtypes.
    rope_variant / rope_offset None: what the checkpoint (or its LoRA adapter) records it was trained with
    (read_settings), else the shipped shift_wh / 80; callers holding params.yaml values resolve them first
    (kaleido.model.settings.resolve_settings) and pass them.
    device="meta" checks every name and shape at full size without memory (a dry run of the load).
    On the CPU without a dtype change the parameters stay memory-mapped views of the files (copy-on-write):
    replace checkpoint files (as save_dit does), never rewrite them in place while such a model lives.
    """
    layout = _locate(path)
    config, config_source = _resolve_config(layout, config)
    if rope_variant is None or rope_offset is None:
        try:
            recorded = read_settings(path, lora) or ModelSettings()
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        rope_variant = recorded.rope_variant if rope_variant is None else rope_variant
        rope_offset = recorded.rope_offset if rope_offset is None else rope_offset
    with torch.device("meta"):
        model = KaleidoDiT(config, attention_backend, rope_variant, rope_offset)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    seen: set[str] = set()
    problems = _Mismatch([], [], [])
    dry_run = torch.device(device).type == "meta"
    for shard in _iter_wan(layout, _read_file_meta if dry_run else _read_file):
        accepted = {}
        for key, tensor in shard.items():
            if key not in expected:
                problems.unexpected.append(key)
            elif tensor.shape != expected[key]:  # kept out of load_state_dict: it would raise on the first shard
                problems.wrong_shape.append((key, expected[key], tensor.shape))
                seen.add(key)
            else:
                accepted[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
                seen.add(key)
        model.load_state_dict(accepted, strict=False, assign=True)
        del shard, accepted  # drop this shard's source references before the next one is read
    problems.missing = [k for k in expected if k not in seen]
    if problems:
        raise problems.error(f"checkpoint {layout.path}", layout.format, config, config_source)
    extras = checkpoint_extras(layout.path) if any(f.suffix != ".safetensors" for f in layout.files) else []
    if extras:
        log.info("%s: also holds (not loaded): %s", layout.path, ", ".join(extras))
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta and not dry_run:
        raise CheckpointError(f"{layout.path}: tensors not loaded (still on meta): {left_on_meta[:_MAX_LISTED]}")
    if lora is not None and not dry_run:
        from kaleido.model.lora import Adapter, load_adapter, merge_lora

        adapter = lora if isinstance(lora, Adapter) else load_adapter(lora)[0]
        model = merge_lora(model, adapter, lora_scale)
    return model


# ---- writing ---------------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """Bytes from "5GB", "500MB", "1.5GiB", "64KiB" or a plain integer (GB = 10**9, GiB = 2**30)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read size {text!r}: use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit == "B":
        return int(number)
    base = 1024 if unit.endswith("IB") else 1000
    return int(number * base ** powers[unit[0]])


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that owns exactly its bytes (views would drag their whole storage into the file)."""
    tensor = tensor.detach()
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return tensor.contiguous().clone()


def _clear_previous(folder: Path) -> None:
    # A stale index or shard from an earlier save would shadow or mix with the new one. Unlinking (rather than
    # overwriting) keeps the old data valid for a model that still has those files memory-mapped.
    for old in folder.glob("diffusion_pytorch_model*.safetensors*"):
        old.unlink()


class _ShardWriter:
    """Writes safetensors shards of at most max_bytes each (a larger tensor gets a shard of its own)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        folder.mkdir(parents=True, exist_ok=True)
        _clear_previous(folder)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self.pending and self.pending_bytes + tensor.nbytes > self.max_bytes:
            self._flush()
        self.pending[key] = _compact(tensor)
        self.pending_bytes += tensor.nbytes
        self.total_bytes += tensor.nbytes

    def _flush(self) -> None:
        # The shard count is unknown until the end: write under a temporary name, rename in close().
        part = self.folder / f"diffusion_pytorch_model-{len(self.parts) + 1:05d}.safetensors.partial"
        save_file(self.pending, part, metadata={"format": "pt"})
        self.parts.append((part, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self.pending or not self.parts:
            self._flush()
        if len(self.parts) == 1:
            final = self.folder / WEIGHTS_NAME
            self.parts[0][0].replace(final)
            return [final]
        count = len(self.parts)
        weight_map: dict[str, str] = {}
        written = []
        for index, (part, keys) in enumerate(self.parts, start=1):
            final = self.folder / f"diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"
            part.replace(final)
            weight_map.update(dict.fromkeys(keys, final.name))
            written.append(final)
        index_data = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index_data, indent=2) + "\n")
        return [*written, self.folder / INDEX_NAME]


def _write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _write_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]], dst: Path, fmt: str, config: DiTConfig, max_shard_bytes: int,
    settings: ModelSettings | None = None,
) -> list[Path]:
    """wan / diffusers folder: shards (renamed to the format's keys) + index + config.json."""
    writer = _ShardWriter(dst, max_shard_bytes)
    for key, tensor in tensors:
        writer.add(wan_key_to_diffusers(key) if fmt == "diffusers" else key, tensor)
    written = writer.close()
    config_data = (_diffusers_config_json(config, settings) if fmt == "diffusers"
                   else _wan_config_json(config, settings))
    return [*written, _write_json(dst / CONFIG_NAME, config_data)]


def _write_wan_file(state: Mapping[str, torch.Tensor], dst: Path, config: DiTConfig,
                    settings: ModelSettings | None = None) -> list[Path]:
    """One .safetensors file; the config travels in its metadata since no config.json sits beside it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "config": json.dumps(_wan_config_json(config, settings))}
    partial = dst.with_name(dst.name + ".partial")
    save_file({k: _compact(v) for k, v in state.items()}, partial, metadata=meta)
    partial.replace(dst)  # never truncate a file that a loaded model may still have memory-mapped
    return [dst]


def _write_sat(state: Mapping[str, torch.Tensor], dst: Path, config: DiTConfig,
               settings: ModelSettings | None = None) -> list[Path]:
    """<dst>/1/mp_rank_00_model_states.pt = {"module": SAT state dict}, <dst>/latest = "1", plus config.json."""
    model_file = dst / SAT_TAG / SAT_MODEL_FILE
    model_file.parent.mkdir(parents=True, exist_ok=True)
    sat = wan_to_sat({k: _compact(v) for k, v in state.items()})
    partial = model_file.with_name(model_file.name + ".partial")
    torch.save({"module": {k: _compact(v) for k, v in sat.items()}}, partial)
    partial.replace(model_file)  # as in _write_wan_file: the old file may still be memory-mapped
    (dst / "latest").write_text(SAT_TAG + "\n")
    # Not part of the official layout; it makes the folder self-describing (the head count is not in any shape).
    return [model_file, dst / "latest", _write_json(dst / CONFIG_NAME, _wan_config_json(config, settings))]


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")


def save_dit(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | Path,
    format: str,
    config: DiTConfig,
    max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
    settings: ModelSettings | None = None,
) -> list[Path]:
    """Write Wan-keyed weights in `format`; returns the files written.

    wan: `path` ending in .safetensors -> one file; otherwise a folder (shards + index when larger than
    max_shard_bytes, Wan config.json). diffusers: a folder diffusers' from_pretrained reads. sat: the official
    Kaleido DeepSpeed layout. The tensors are checked against `config` first. `settings` (what the model was
    trained with: R-RoPE, text_len, max_references) are written with the config in every layout; None writes no
    record (a random init, or weights whose training is unknown), and loaders then use params.yaml's.
    """
    _check_format(format)
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    problems = _compare({k: v.shape for k, v in state.items()}, expected_shapes(config))
    if problems:
        raise problems.error("state dict to save", "wan", config, "the caller")
    dst = Path(path)
    if format == "sat":
        return _write_sat(state, dst, config, settings)
    if format == "wan" and dst.suffix == ".safetensors":
        return _write_wan_file(state, dst, config, settings)
    return _write_sharded(state.items(), dst, format, config, parse_size(max_shard_bytes), settings)


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to_format: str,
    max_shard_bytes: int | str | None = None,
    config: DiTConfig | None = None,
) -> list[Path]:
    """Convert a checkpoint to `to_format`, streaming shard by shard; returns the files written.

    The source is checked against its config (from `config`, its config.json, or its shapes) from the file
    headers before anything is written. sat output is one file, so it gathers (memory-mapped) tensors first.
    The source's model settings (read_settings) travel to the destination.
    """
    _check_format(to_format)
    layout = _locate(src)
    dst = Path(dst)
    target = dst.resolve()
    # The folders a writer fills: the file itself, its folder, and for SAT the folder holding `latest`.
    occupied = {layout.path.resolve()}
    for file in layout.files:
        file = file.resolve()
        occupied |= {file, file.parent, file.parent.parent} if file.name == SAT_MODEL_FILE else {file, file.parent}
    if target in occupied:
        # Writing there would delete or overwrite files that are still being read (memory-mapped).
        raise CheckpointError(f"{dst}: the destination holds the source checkpoint; write to another path")
    config, config_source = _resolve_config(layout, config)
    problems = _compare(read_shapes(src), expected_shapes(config))
    if problems:
        raise problems.error(f"checkpoint {layout.path}", layout.format, config, config_source)
    settings = read_settings(src)
    shards = _iter_wan(layout)
    if to_format == "sat" or (to_format == "wan" and dst.suffix == ".safetensors"):
        gathered = {k: v for shard in shards for k, v in shard.items()}
        if to_format == "sat":
            return _write_sat(gathered, dst, config, settings)
        return _write_wan_file(gathered, dst, config, settings)
    tensors = ((k, v) for shard in shards for k, v in shard.items())
    return _write_sharded(tensors, dst, to_format, config, parse_size(max_shard_bytes or DEFAULT_SHARD_BYTES),
                          settings)


@dataclass(frozen=True)
class CheckpointInfo:
    """What `inspect_checkpoint` found."""

    path: Path
    format: str
    files: tuple[Path, ...]
    config: DiTConfig
    config_source: str
    num_parameters: int
    dtypes: dict[str, int]  # dtype name -> number of tensors
    extras: tuple[str, ...] = ()  # other entries of the file (RNG states, iteration, ...), not loaded


def inspect_checkpoint(path: str | Path, config: DiTConfig | None = None) -> CheckpointInfo:
    """Format, config, parameter count and dtypes from the file headers; CheckpointError if it does not fit."""
    layout = _locate(path)
    config, config_source = _resolve_config(layout, config)
    metas = {k: v for shard in _iter_wan(layout, _read_file_meta) for k, v in shard.items()}
    problems = _compare({k: v.shape for k, v in metas.items()}, expected_shapes(config))
    if problems:
        raise problems.error(f"checkpoint {layout.path}", layout.format, config, config_source)
    dtypes: dict[str, int] = {}
    for tensor in metas.values():
        name = str(tensor.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + 1
    return CheckpointInfo(
        path=layout.path, format=layout.format, files=layout.files, config=config, config_source=config_source,
        num_parameters=sum(t.numel() for t in metas.values()), dtypes=dtypes,
        extras=tuple(checkpoint_extras(path)),
    )
