"""What each curation model weighs: parameter counts from meta-device builds, bytes per parameter, the source.

The counts come from building the model on PyTorch's meta device (no weights, no memory) from the configured
folder's own config when it is on this machine, else from the published architecture of the model params.yaml
names (the released configs' hyper-parameters, written below with where they come from). Nothing is downloaded.

Used by the curation planner (kaleido.data.plan) for GPU memory per actor; every count says how it was made.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from kaleido.config.schema import Params

# bytes per parameter of each dtype name params.yaml uses
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Component:
    """One network of a model pool: its parameter count, the dtype it runs in and where the count comes from."""

    name: str
    parameters: int
    dtype: str
    source: str

    @property
    def bytes(self) -> int:
        return self.parameters * DTYPE_BYTES[self.dtype]


def _count(build: Callable[[], Any]) -> int:
    import torch

    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- published architectures (hyper-parameters of the released configs) ------------------------------------

# IDEA-Research/grounding-dino-base: Swin-B (window 12, 384 px pretraining) + BERT-base text encoder, 6+6 layers
GROUNDING_DINO_BASE = {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 12,
                       "image_size": 384}
# segment_anything.build_sam: encoder width, depth, heads, global-attention blocks of each released checkpoint
SAM_ENCODERS = {"vit_b": (768, 12, 12, [2, 5, 8, 11]), "vit_l": (1024, 24, 16, [5, 11, 17, 23]),
                "vit_h": (1280, 32, 16, [7, 15, 23, 31])}
# google/t5-v1_1-xxl encoder (FLUX.1's text_encoder_2 folder): d_model 4096, gated-GELU FFN 10240, 24 layers
T5_XXL = {"d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu"}
# openai/clip-vit-large-patch14 text tower (FLUX.1's text_encoder folder)
CLIP_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 768}
# FLUX.1 VAE (AutoencoderKL, 16 latent channels)
FLUX_VAE = {"latent_channels": 16, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
# google/siglip-so400m-patch14-384 vision tower (FLUX.1-Redux-dev's image_encoder)
SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                 "image_size": 384, "patch_size": 14}
# FLUX.1-Fill-dev: the FLUX.1-dev transformer with 384 input channels (64 latent + 320 mask/image conditioning)
FLUX_FILL_IN_CHANNELS = 384
QWEN25_VL_7B = 8_292_166_656  # Qwen/Qwen2.5-VL-7B-Instruct model card: 8.29B parameters (bf16 safetensors)
INSIGHTFACE_DET_10G_BYTES = 16_923_827  # buffalo_l/det_10g.onnx, the only module the face check loads (fp32)


# ---- one function per model ---------------------------------------------------------------------------------


def grounding_dino(path: Path | None) -> list[Component]:
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    config = _json(path / "config.json") if path is not None else None
    if config is not None:
        cfg, source = GroundingDinoConfig.from_dict(config), f"meta-device build of {path}/config.json"
    else:
        backbone = SwinConfig(**GROUNDING_DINO_BASE, out_features=["stage2", "stage3", "stage4"])
        cfg = GroundingDinoConfig(backbone_config=backbone)
        source = "meta-device build of the published grounding-dino-base architecture (Swin-B 384, BERT-base)"
    return [Component("Grounding DINO", _count(lambda: GroundingDinoForObjectDetection(cfg)), "float32", source)]


def sam(sam_type: str) -> list[Component]:
    from kaleido.vision.segmentation import build_sam

    origin = "kaleido.vision.tiny" if sam_type == "tiny" else "released hyper-parameters"
    source = f"meta-device build of segment_anything's {sam_type} ({origin})"
    return [Component(f"SAM {sam_type}", _count(lambda: build_sam(sam_type)), "float32", source)]


class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly": a build for counting has no weights
    by design, so the warning is noise on every `kaleido curate --plan`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """Silence that one open_clip warning during a counting build, nothing else. open_clip calls logging.warning(),
    which on a root logger without handlers would also install basicConfig's stderr handler for the whole process:
    a NullHandler held for the build keeps the root logger as it was."""
    root, drop, hold = logging.getLogger(), _DropRandomInitWarning(), logging.NullHandler()
    root.addFilter(drop)
    root.addHandler(hold)
    try:
        yield
    finally:
        root.removeHandler(hold)
        root.removeFilter(drop)


def clip(path: Path | None, arch: str) -> list[Component]:
    import open_clip

    config = _json(path / "open_clip_config.json") if path is not None and path.is_dir() else None
    if config is not None and "model_cfg" in config:
        model_cfg = config["model_cfg"]
        count = _count(lambda: open_clip.CLIP(**model_cfg))
        source = f"meta-device build of {path}/open_clip_config.json"
    else:
        with _without_random_init_warning():
            count = _count(lambda: open_clip.create_model(arch, pretrained=None, device="meta"))
        source = f"meta-device build of open_clip {arch}"
    return [Component(f"CLIP {arch}", count, "float32", source)]


def face(path: Path | None, pack: str) -> list[Component]:
    det = None
    if path is not None:
        for folder in (path / "models" / pack, path):
            found = sorted(folder.glob("det_*.onnx")) if folder.is_dir() else []
            if found:
                det = found[0]
                break
    if det is not None:
        size, source = det.stat().st_size, f"size of {det} (fp32 ONNX)"
    else:
        size, source = INSIGHTFACE_DET_10G_BYTES, f"published size of insightface {pack}/det_10g.onnx (fp32)"
    return [Component("insightface detector", size // 4, "float32", source)]


def _diffusers_component(folder: Path | None, cls: Any, default: dict[str, Any], what: str) -> tuple[int, str]:
    config = _json(folder / "config.json") if folder is not None else None
    if config is not None:
        return _count(lambda: cls.from_config(config)), f"meta-device build of {folder}/config.json"
    return _count(lambda: cls(**default)), f"meta-device build of the published {what} architecture"


def _flux_transformer(folder: Path | None, in_channels: int, what: str) -> tuple[int, str]:
    from diffusers import FluxTransformer2DModel

    defaults = {"in_channels": in_channels, "out_channels": 64}  # diffusers' defaults = FLUX.1-dev's other dims
    return _diffusers_component(folder, FluxTransformer2DModel, defaults, what)


def _text_encoders(pipeline: Path | None) -> list[tuple[str, int, str]]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out = []
    for sub, label, cls, config_cls, default, what in (
        ("text_encoder", "CLIP-L text", CLIPTextModel, CLIPTextConfig, CLIP_L_TEXT, "CLIP ViT-L/14 text"),
        ("text_encoder_2", "T5-XXL encoder", T5EncoderModel, T5Config, T5_XXL, "T5 v1.1 XXL encoder"),
    ):
        config = _json(pipeline / sub / "config.json") if pipeline is not None else None
        if config is not None:
            cfg, source = config_cls.from_dict(config), f"meta-device build of {pipeline}/{sub}/config.json"
        else:
            cfg, source = config_cls(**default), f"meta-device build of the published {what} architecture"
        out.append((label, _count(lambda cls=cls, cfg=cfg: cls(cfg)), source))
    return out


def _vae(pipeline: Path | None) -> tuple[int, str]:
    from diffusers import AutoencoderKL

    return _diffusers_component(pipeline / "vae" if pipeline else None, AutoencoderKL, FLUX_VAE, "FLUX.1 VAE")


def flux_fill(path: Path | None, dtype: str) -> list[Component]:
    folder = path if path is not None and path.is_dir() else None
    count, source = _flux_transformer(folder / "transformer" if folder else None, FLUX_FILL_IN_CHANNELS,
                                      "FLUX.1-Fill-dev transformer")
    parts = [Component("FLUX.1 Fill transformer", count, dtype, source)]
    parts += [Component(label, n, dtype, src) for label, n, src in _text_encoders(folder)]
    vae_count, vae_source = _vae(folder)
    return [*parts, Component("FLUX.1 VAE", vae_count, dtype, vae_source)]


def flux_redux(redux: Path | None, base: Path | None, dtype: str) -> list[Component]:
    """Redux prior (SigLIP + embedder) feeding the base FLUX.1-dev transformer and VAE; with the released text
    widths the text encoders are not loaded (kaleido.vision.flux.FluxRedux)."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel

    redux_dir = redux if redux is not None and redux.is_dir() else None
    base_dir = base if base is not None and base.is_dir() else None
    config = _json(redux_dir / "image_encoder" / "config.json") if redux_dir else None
    if config is not None:
        siglip = SiglipVisionConfig.from_dict(config)
        siglip_source = f"meta-device build of {redux_dir}/image_encoder/config.json"
    else:
        siglip = SiglipVisionConfig(**SIGLIP_SO400M)
        siglip_source = "meta-device build of the published SigLIP so400m-patch14-384 vision tower"
    embedder, embedder_source = _diffusers_component(redux_dir / "image_embedder" if redux_dir else None,
                                                     ReduxImageEncoder, {}, "Redux image embedder")
    count, source = _flux_transformer(base_dir / "transformer" if base_dir else None, 64, "FLUX.1-dev transformer")
    vae_count, vae_source = _vae(base_dir)
    return [
        Component("SigLIP image encoder", _count(lambda: SiglipVisionModel(siglip)), dtype, siglip_source),
        Component("Redux image embedder", embedder, dtype, embedder_source),
        Component("FLUX.1-dev transformer", count, dtype, source),
        Component("FLUX.1 VAE", vae_count, dtype, vae_source),
    ]


def vlm(path: Path | None) -> list[Component]:
    config = _json(path / "config.json") if path is not None else None
    if config is not None:
        from transformers import AutoConfig, AutoModelForImageTextToText

        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        count = _count(lambda: AutoModelForImageTextToText.from_config(cfg))
        return [Component("captioning VLM", count, "bfloat16", f"meta-device build of {path}/config.json")]
    return [Component("captioning VLM", QWEN25_VL_7B, "bfloat16", "published count of Qwen2.5-VL-7B-Instruct")]


@cache
def _footprints(key: str, frozen: str) -> tuple[Component, ...]:
    args = json.loads(frozen)
    paths = {name: Path(value) if isinstance(value, str) else None for name, value in args.items()}
    builders: dict[str, Callable[[], list[Component]]] = {
        "vlm": lambda: vlm(paths["vlm"]),
        "grounding_dino": lambda: grounding_dino(paths["grounding_dino"]),
        "sam": lambda: sam(args["sam_type"]),
        "clip": lambda: clip(paths["clip"], args["clip_arch"]),
        "face": lambda: face(paths["face"], args["face_model"]),
        "flux_fill": lambda: flux_fill(paths["flux_fill"], args["flux_dtype"]),
        "flux_redux": lambda: flux_redux(paths["flux_redux"], paths["flux_base"], args["flux_dtype"]),
    }
    return tuple(builders[key]())


def model_components(params: Params, key: str) -> tuple[Component, ...]:
    """The networks the curation pool `key` loads (vlm, grounding_dino, sam, clip, face, flux_fill, flux_redux),
    counted on the meta device from the configured folders (or the published architectures when they are not on
    this machine)."""
    m = params.data.models

    def where(value: Path | None) -> str | None:
        resolved = params.resolve(value) if value is not None else None
        return str(resolved) if resolved is not None else None

    args = {
        "vlm": where(params.data.caption.vlm), "grounding_dino": where(m.grounding_dino), "clip": where(m.clip),
        "face": where(m.face), "flux_fill": where(m.flux_fill), "flux_redux": where(m.flux_redux),
        "flux_base": where(m.flux_base), "sam_type": m.sam_type, "clip_arch": m.clip_arch,
        "face_model": m.face_model, "flux_dtype": m.flux_dtype,
    }
    return _footprints(key, json.dumps(args, sort_keys=True))
