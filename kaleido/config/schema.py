"""Pydantic models for params.yaml.

Defaults here equal the shipped Kaleido / paper values where that costs nothing; the values in the
repository's params.yaml are the embedded (laptop, tiny-model) default and say so in comments.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RopeVariant = Literal[
    "none",
    "shift_w",
    "shift_h",
    "shift_wh",
    "shift_wh_no_overlap",
    "time_fixed_neg",
    "time_staggered_neg",
    "time_future",
]
AttentionBackendName = Literal["reference", "sdpa", "triton"]
DTypeName = Literal["float32", "bfloat16", "float16"]


class ParamsError(ValueError):
    """params.yaml is missing or invalid; the message names the key, the value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class RopeConfig(_Section):
    # Shipped Kaleido: shift_wh with a constant offset of 80 shared by every reference.
    variant: RopeVariant = "shift_wh"
    offset: int = Field(80, ge=0, description="spatial offset (latent patches) of reference tokens")


class ModelConfig(_Section):
    arch: Literal["tiny", "1.3B", "14B"] = "tiny"
    # Local paths (no hub downloads). Relative paths resolve against the folder of params.yaml.
    checkpoint: Path | None = Field(None, description="DiT weights: Wan2.1, diffusers or Kaleido SAT layout")
    vae: Path | None = Field(None, description="diffusers AutoencoderKLWan folder")
    text_encoder: Path | None = Field(None, description="transformers UMT5EncoderModel folder")
    tokenizer: Path | None = Field(None, description="tokenizer folder (umt5 sentencepiece)")
    attention_backend: AttentionBackendName = "sdpa"
    rope: RopeConfig = RopeConfig()
    max_references: int = Field(3, ge=1, le=16)
    dtype: DTypeName = "float32"
    text_len: int = Field(512, ge=1, description="text tokens the DiT sees (zero-padded), Wan: 512")


class GenerateConfig(_Section):
    frames: int = Field(81, ge=1, description="pixel frames; must be 4k+1 for the Wan VAE")
    height: int = Field(480, ge=16)
    width: int = Field(832, ge=16)
    fps: int = Field(16, ge=1)
    steps: int = Field(50, ge=1)
    guidance_scale: float = Field(6.0, ge=0.0, description="CFG on text only; references kept in both")
    shift: float = Field(7.0, gt=0.0, description="flow-matching sigma shift at sampling")
    sampler: Literal["euler", "unipc"] = "euler"
    seed: int = 0
    negative_prompt: str = ""

    @model_validator(mode="after")
    def _vae_compatible(self) -> GenerateConfig:
        if (self.frames - 1) % 4 != 0:
            raise ValueError(f"frames={self.frames}: the Wan VAE needs 4k+1 frames (e.g. 1, 5, 9, ..., 81)")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % 16 != 0:
                raise ValueError(f"{name}={value}: must be a multiple of 16 (VAE stride 8 x patch 2)")
        return self


class FlowMatchingConfig(_Section):
    # Rectified flow as shipped: sigma ~ logistic-normal, then a resolution-dependent shift.
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0.0)
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = Field(256, ge=1)
    max_seq_len: int = Field(4096, ge=2)
    text_dropout: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> FlowMatchingConfig:
        if self.max_seq_len <= self.base_seq_len:
            raise ValueError(
                f"max_seq_len={self.max_seq_len} must exceed base_seq_len={self.base_seq_len}"
            )
        return self


class SampleMix(_Section):
    # Paper's best mix crop:segment:inpaint:redux = 1:5:3:1.
    crop: float = Field(1.0, ge=0.0)
    segment: float = Field(5.0, ge=0.0)
    inpaint: float = Field(3.0, ge=0.0)
    redux: float = Field(1.0, ge=0.0)


class IngestConfig(_Section):
    sources: list[str] = Field(default_factory=lambda: ["raw/**/*.mp4"], description="globs under data.root")
    shot_detector: Literal["transnetv2", "pyscenedetect"] = "pyscenedetect"
    scene_threshold: float = Field(27.0, gt=0.0, description="PySceneDetect ContentDetector threshold")
    min_scene_frames: int = Field(15, ge=1)
    transnet_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    clip_min_seconds: float = Field(2.0, gt=0.0)
    clip_max_seconds: float = Field(15.0, gt=0.0)
    fps: float = Field(16.0, gt=0.0, description="clips are resampled to this frame rate")
    height: int = Field(480, ge=16, description="clips are resized (short side) and centre-cropped to this size")
    width: int = Field(832, ge=16)

    @model_validator(mode="after")
    def _clip_span(self) -> IngestConfig:
        if self.clip_max_seconds < self.clip_min_seconds:
            raise ValueError(
                f"clip_max_seconds={self.clip_max_seconds} is below clip_min_seconds={self.clip_min_seconds}"
            )
        return self


class CaptionConfig(_Section):
    captioner: Literal["sidecar", "vlm"] = "sidecar"
    sidecar: Path | None = Field(None, description="JSON/JSONL/CSV of captions, relative to data.root")
    vlm: Path | None = Field(None, description="local transformers vision-language model folder")
    max_new_tokens: int = Field(64, ge=1)
    frames: int = Field(4, ge=1, description="frames shown to the VLM per clip")


class VisionModelsConfig(_Section):
    # Local paths only; relative paths resolve against the folder of params.yaml.
    grounding_dino: Path | None = None
    sam: Path | None = Field(None, description="segment-anything checkpoint file (.pth)")
    sam_type: Literal["vit_b", "vit_l", "vit_h", "tiny"] = "vit_b"
    clip: Path | None = Field(None, description="open_clip checkpoint file")
    clip_arch: str = "ViT-B-32"
    face: Path | None = Field(None, description="insightface model root; None disables the face check")
    flux_fill: Path | None = Field(None, description="diffusers FluxFillPipeline folder; None disables inpaint")
    flux_redux: Path | None = Field(None, description="diffusers FluxPriorReduxPipeline folder; None disables redux")


class GroundingConfig(_Section):
    frames_per_clip: int = Field(3, ge=1)
    box_threshold: float = Field(0.35, ge=0.0, le=1.0)
    text_threshold: float = Field(0.25, ge=0.0, le=1.0)


class FilterConfig(_Section):
    min_area: float = Field(1 / 32, ge=0.0, le=1.0, description="mask area / frame area")
    max_area: float = Field(0.8, ge=0.0, le=1.0)
    clip_min_score: float = Field(0.2, description="cosine(image, 'a photo of a {category}')")
    max_iou: float = Field(0.8, ge=0.0, le=1.0, description="instances overlapping more are dropped")
    min_brightness: float = Field(30.0, ge=0.0, le=255.0)
    max_brightness: float = Field(225.0, ge=0.0, le=255.0)
    min_sharpness: float = Field(50.0, ge=0.0, description="variance of the Laplacian")
    face_min_score: float = Field(0.5, ge=0.0, le=1.0)


class ReferenceConfig(_Section):
    max_references: int = Field(3, ge=1)
    cross_pair_ratio: float = Field(0.4, ge=0.0, le=1.0, description="paper's best: 0.4")
    sample_mix: SampleMix = SampleMix()


class DataConfig(_Section):
    root: Path = Path("data")
    seed: int = 0
    workers: int = Field(2, ge=1, description="parallel shard workers (local processes)")
    shard_size: int = Field(8, ge=1, description="clips per work shard")
    ray_address: str | None = Field(None, description="run shards on Ray at this address ('local' starts one)")
    ingest: IngestConfig = IngestConfig()
    caption: CaptionConfig = CaptionConfig()
    models: VisionModelsConfig = VisionModelsConfig()
    grounding: GroundingConfig = GroundingConfig()
    filters: FilterConfig = FilterConfig()
    references: ReferenceConfig = ReferenceConfig()


class StagePreset(_Section):
    lr: float = Field(gt=0.0)
    steps: int = Field(ge=1)
    global_batch: int = Field(ge=1)


class TrainConfig(_Section):
    zero_stage: Literal[1, 2, 3] = 2
    micro_batch: int = Field(1, ge=1)
    grad_clip: float = Field(0.1, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    sequence_parallel: int = Field(1, ge=1)
    activation_checkpointing: bool = True
    launcher: Literal["local", "kubernetes"] = "local"
    pretrain: StagePreset = StagePreset(lr=1e-5, steps=10_000, global_batch=256)
    sft: StagePreset = StagePreset(lr=5e-6, steps=5_000, global_batch=256)


class EvalConfig(_Section):
    seed: int = 0


class GateConfig(_Section):
    floors: dict[str, float] = Field(default_factory=dict)
    regression_tolerance: float = Field(0.02, ge=0.0)


class PlatformConfig(_Section):
    registered_model: str = "kaleido-s2v"
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    prefect_api_url: str = "http://127.0.0.1:4200/api"


class Params(_Section):
    model: ModelConfig = ModelConfig()
    generate: GenerateConfig = GenerateConfig()
    flow_matching: FlowMatchingConfig = FlowMatchingConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    platform: PlatformConfig = PlatformConfig()
    # The folder relative paths resolve against (the folder of params.yaml); not a knob.
    base_dir: Path = Field(Path("."), exclude=True)

    def resolve(self, path: Path | None) -> Path | None:
        """A path from params.yaml, made absolute against the folder that holds params.yaml."""
        if path is None:
            return None
        path = Path(os.path.expanduser(str(path)))
        return path if path.is_absolute() else (self.base_dir / path).resolve()


def _describe_error(error: dict[str, Any], source: str) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "<root>"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{key}' (value {error['input']!r}); remove it or fix its spelling"
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    return f"{source}: {key}{shown}: {error['msg']}"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The keys allowed at the parent of `loc`, for the unknown-key message."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return None
        if not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return sorted(name for name in model.model_fields if name != "base_dir")


def validate_params(raw: dict[str, Any], source: str = "params.yaml", base_dir: Path | None = None) -> Params:
    """Validate a parsed params mapping; raise ParamsError listing every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            line = _describe_error(error, source)
            if error["type"] == "extra_forbidden":
                allowed = _allowed_keys(Params, tuple(error["loc"]))
                if allowed:
                    line += f"; allowed here: {', '.join(allowed)}"
            lines.append(line)
        raise ParamsError("invalid parameters:\n  " + "\n  ".join(lines)) from None
    params.base_dir = (base_dir or Path(".")).resolve()
    return params


def find_params_file(start: Path | None = None) -> Path:
    """$KALEIDO_PARAMS, else the nearest params.yaml from `start` (default: cwd) upwards."""
    env = os.environ.get("KALEIDO_PARAMS")
    if env:
        return Path(env)
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "params.yaml"
        if candidate.is_file():
            return candidate
    raise ParamsError(
        f"no params.yaml found in {here} or its parents; run from the repository root or set KALEIDO_PARAMS"
    )


def load_params(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml. `overrides` maps dotted keys (`generate.steps`) to values."""
    path = Path(path) if path is not None else find_params_file()
    if not path.is_file():
        raise ParamsError(f"{path}: file not found; pass --params PATH or create it from the repository's")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return validate_params(raw, source=str(path), base_dir=path.parent)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {dotted}: '{part}' is not a section")
    node[leaf] = value


def params_hash(params: Params) -> str:
    """A stable hash of every knob (lineage tag for registered models)."""
    blob = json.dumps(params.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
