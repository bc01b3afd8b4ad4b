"""Pydantic models for params.yaml.

Defaults here equal the shipped Kaleido / paper values where that costs nothing; the values in the
repository's params.yaml are the embedded (laptop, tiny-model) default and say so in comments.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

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

# The negative prompt of the shipped sampling config (`zai-org/Kaleido` configs/sampling/
# sample_wanvae_concat_14b.yaml, `sample_neg_prompt`): Wan2.1's standard negative prompt without its
# "画得不好的脸部" (badly drawn faces) term. It lists what to avoid: oversaturated, overexposed, static,
# blurry details, subtitles, worst/low quality, JPEG artefacts, extra fingers, deformed limbs, messy
# background, three legs, crowded background, walking backwards.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class ParamsError(ValueError):
    """params.yaml is missing or invalid; the message names the key, the value and what is allowed."""


def _mentions(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a field's type (with its Optional / list / tuple / dict arguments) names one of `kinds`."""
    if annotation in kinds:
        return True
    return any(_mentions(arg, kinds) for arg in getattr(annotation, "__args__", ()) if arg is not Ellipsis)


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, list | tuple):
        return any(_holds_bool(item) for item in value)
    if isinstance(value, dict):
        return any(_holds_bool(item) for item in value.values())
    return False


class _Section(BaseModel):
    # allow_inf_nan=False: a `.nan` or `.inf` in params.yaml (or an override) is an error, not a silent value
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """Strict numbers: pydantic's lax mode reads `true` as 1 (bool is an int in Python), so `micro_batch: true`
        would train with micro-batch 1. A bool is refused wherever the field is a number and not also a bool."""
        field = cls.model_fields.get(info.field_name or "")
        if field is None or not _holds_bool(value):
            return value
        if _mentions(field.annotation, (int, float)) and not _mentions(field.annotation, (bool,)):
            raise ValueError(f"{value!r} holds true/false where a number belongs (true is not 1 here); write a number")
        return value


# A noise seed: 0 .. 2^63 - 1 (what torch.Generator.manual_seed takes); generate.seed may also be -1 = random.
MAX_SEED = 2**63 - 1
MAX_STEPS = 1000  # the flow-matching schedulers' training timesteps: more sampling steps than that repeat them


def rope_size_problem(height: int, width: int, variant: str, offset: int) -> str | None:
    """Why a video of height x width pixels does not fit the R-RoPE layout, or None.

    References sit at h/w positions offset, offset+1, ... (latent patches; one patch = 16 pixels). A video wider
    or taller than 16 * offset pixels would put its own tokens at those positions too, so references and video
    would share rotary positions: the shipped offset 80 supports up to 1280 pixels (official config: `max_h`,
    `max_w` = 80, "max w or h / 8 / 2"). `none` shifts nothing; `shift_w` / `shift_h` only their axis.
    """
    axes = {"none": (), "shift_w": ("width",), "shift_h": ("height",)}.get(variant, ("height", "width"))
    sizes = {"height": height, "width": width}
    for axis in axes:
        if sizes[axis] > 16 * offset:
            return (
                f"{axis}={sizes[axis]}: R-RoPE ({variant}) places reference tokens from latent patch {offset} "
                f"(model.rope.offset) on, so a video may be at most {16 * offset} pixels on that axis; the video's "
                f"{sizes[axis] // 16} patches would share positions with the references. Lower the size (the "
                "shipped model: 1280 px) or raise model.rope.offset (positions the released model never saw)"
            )
    return None


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
    vae_dtype: DTypeName | None = Field(
        None, description="VAE dtype; null: bfloat16 on a GPU (as the shipped Kaleido runs it), float32 on CPU"
    )
    text_len: int = Field(512, ge=1, description="text tokens the DiT sees (zero-padded), Wan: 512")
    lora: Path | None = Field(
        None, description="a LoRA adapter merged into the DiT at load (peft, diffusers or Wan/ComfyUI layout)")
    lora_scale: float = Field(1.0, description="multiplier on the adapter's alpha / rank (0: the base model)")


class GenerateConfig(_Section):
    frames: int = Field(81, ge=1, description="pixel frames; must be 4k+1 for the Wan VAE")
    height: int = Field(512, ge=16, description="shipped sampling size 512x896 (training: 480x832)")
    width: int = Field(896, ge=16)
    fps: int = Field(16, ge=1)
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(6.0, ge=0.0, description="CFG on text only; references kept in both")
    shift: float = Field(7.0, gt=0.0, description="flow-matching sigma shift at sampling")
    sampler: Literal["euler", "unipc"] = "euler"
    seed: int = Field(0, ge=-1, le=MAX_SEED, description="noise seed; -1 draws a random one (Wan's convention), "
                      "which the output's metadata records")
    negative_prompt: str = Field(
        WAN_NEGATIVE_PROMPT, description="the shipped sampling config's (Wan's standard, Chinese); \"\" for none"
    )
    # Memory options (kaleido/model/memory.py estimates each; benchmarks/generate_throughput.py --sweep measures them)
    text_encoder_device: Literal["auto", "cpu"] = Field(
        "auto", description="cpu keeps umT5 (11 GB in bf16) off the GPU: Wan's --t5_cpu")
    release_encoders: bool = Field(
        False, description="move the text encoder and VAE to the CPU after encoding; the VAE returns to decode")
    offload: Literal["none", "blocks"] = Field(
        "none", description="blocks: DiT blocks wait on the CPU and visit the GPU one at a time (diffusers group "
        "offloading); slower, far less GPU memory")

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
    reference_dropout: float = Field(
        0.0, ge=0.0, le=1.0, description="probability that a micro-batch trains without its references (official "
        "subject_cond_dropout, shipped 0); 1.0 trains text-to-video")

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


# what cameras, phones and editors write (GoPro .MP4, iPhone .MOV, OBS/HandBrake .mkv, browsers' .webm, .avi)
DEFAULT_SOURCES = ("raw/**/*.mp4", "raw/**/*.mov", "raw/**/*.m4v", "raw/**/*.mkv", "raw/**/*.webm", "raw/**/*.avi")


class IngestConfig(_Section):
    sources: list[str] = Field(default_factory=lambda: list(DEFAULT_SOURCES),
                               description="globs under data.root, matched case-insensitively (GOPR0001.MP4)")
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
        # clips are H.264 mp4 at an integer frame rate in yuv420p (2x2 chroma): whole fps, even sizes
        if self.fps != round(self.fps):
            raise ValueError(f"fps={self.fps}: clips are written at a whole frame rate (e.g. 16, 24, 25)")
        for name in ("height", "width"):
            if getattr(self, name) % 2:
                raise ValueError(f"{name}={getattr(self, name)}: must be even (yuv420p video)")
        return self


class CaptionConfig(_Section):
    captioner: Literal["sidecar", "vlm"] = "sidecar"
    sidecar: Path | None = Field(None, description="JSON/JSONL/CSV of captions, relative to data.root")
    vlm: Path | None = Field(None, description="local transformers vision-language model folder")
    max_new_tokens: int = Field(64, ge=1)
    frames: int = Field(4, ge=1, description="frames shown to the VLM per clip")
    prompt: str = Field(
        "Describe this video in one detailed sentence: the main subjects (people, animals, objects, "
        "characters), what they do, and the background.",
        description="instruction given to the VLM with the frames",
    )
    taxonomy: Path | None = Field(
        None, description="subject taxonomy YAML (relative to params.yaml); None: kaleido/data/taxonomy.yaml"
    )


class VisionModelsConfig(_Section):
    # Local paths only; relative paths resolve against the folder of params.yaml.
    grounding_dino: Path | None = Field(None, description="transformers Grounding DINO folder (model + processor)")
    sam: Path | None = Field(None, description="segment-anything checkpoint file (.pth)")
    sam_type: Literal["vit_b", "vit_l", "vit_h", "tiny"] = "vit_b"
    clip: Path | None = Field(None, description="open_clip checkpoint file, or a folder with open_clip_config.json")
    clip_arch: str = Field("ViT-B-32", description="open_clip architecture of a checkpoint FILE")
    face: Path | None = Field(None, description="insightface model root; None disables the face check")
    face_model: str = Field("buffalo_l", description="insightface model pack under <face>/models/")
    flux_fill: Path | None = Field(None, description="diffusers FluxFillPipeline folder; None disables inpaint")
    flux_redux: Path | None = Field(None, description="diffusers FluxPriorReduxPipeline folder; None disables redux")
    flux_base: Path | None = Field(None, description="diffusers FluxPipeline folder (FLUX.1-dev) that redux feeds")
    flux_dtype: DTypeName = Field("bfloat16", description="FLUX weights dtype (float32 on CPU)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    factory: str | None = Field(
        None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="'module:function' that builds models by pool key (vlm, grounding_dino, sam, clip, face, "
        "flux_fill, flux_redux) instead of the built-in loaders; returns None for a key it leaves to them "
        "(kaleido.data.models). Importable on every worker and Ray node",
    )

    @model_validator(mode="after")
    def _redux_needs_base(self) -> VisionModelsConfig:
        if self.flux_redux is not None and self.flux_base is None:
            raise ValueError(
                "flux_redux is set but flux_base is null: the Redux prior only makes image embeddings; "
                "set flux_base to the FluxPipeline folder (FLUX.1-dev) it feeds, or flux_redux to null"
            )
        return self


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
    max_references: int = Field(3, ge=1, description="subjects kept per clip (highest detection score first)")
    cross_pair_ratio: float = Field(0.4, ge=0.0, le=1.0, description="paper's best: 0.4")
    sample_mix: SampleMix = SampleMix()
    crop_margin: float = Field(0.0, ge=0.0, le=1.0, description="crop references: box grown by this fraction per side")
    mask_dilation: int = Field(4, ge=0, description="pixels added around a subject mask before inpainting")
    flux_max_side: int = Field(1024, ge=16, description="FLUX fill works at most at this size (long side)")
    inpaint_steps: int = Field(28, ge=1)
    inpaint_guidance: float = Field(30.0, ge=0.0, description="FLUX.1-Fill-dev default")
    redux_steps: int = Field(28, ge=1)
    redux_guidance: float = Field(2.5, ge=0.0, description="FLUX.1-dev guidance for Redux variations")
    redux_size: int = Field(512, ge=16, description="side of the square Redux variation")
    background_prompts: list[str] = Field(
        default_factory=lambda: [
            "a plain light grey studio backdrop",
            "a sunny city park with green trees",
            "a quiet beach under a blue sky",
            "a cozy living room with a sofa",
            "a busy city street in daylight",
            "a snowy mountain landscape",
        ],
        description="new backgrounds painted around a subject for inpaint references (one drawn per subject)",
    )
    plate_prompt: str = Field(
        "an empty scene, background only, no people, no animals, no objects in front",
        description="prompt for removing subjects from a frame (background plates)",
    )

    @model_validator(mode="after")
    def _prompts(self) -> ReferenceConfig:
        if not self.background_prompts:
            raise ValueError("background_prompts is empty: give at least one background description")
        return self


class ValidationSplitConfig(_Section):
    # A held-out validation set, split by SOURCE VIDEO: no clip of a validation video is ever trained on.
    share: float = Field(
        0.2, ge=0.0, lt=1.0,
        description="share of source videos held out (a source is held out when its seeded hash draw is below it: "
        "adding sources never moves another); at least one when there are two or more sources, never every source",
    )


class CurationClusterConfig(_Section):
    # What curation's model stages run on: `kaleido curate --plan` plans for it; every launch checks its plan.
    gpus: int | Literal["auto"] = Field(
        "auto", description="GPUs curation gets: auto = the visible ones (local) or the Ray cluster's; a number "
        "plans for a cluster from any machine (prod: the RayCluster's GPU workers x GPUs each)",
    )
    gpu_memory_gb: float = Field(80.0, gt=0, description="one GPU's memory (H100: 80)")

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("gpus must be >= 0 or 'auto'")
        return value


# Keys replaced by the stable shard keys (kaleido.data.keys): a clear message instead of "unknown key".
_RETIRED_DATA_KEYS = {
    "shard_size": "data.shards (a fixed number of work shards; a source video goes to sha256(path) mod shards)",
    "samples_per_tar": "data.dataset_shards (a fixed number of tar / latent shards, keyed like the work shards)",
}


class DataConfig(_Section):
    root: str = Field(
        "data", min_length=1,
        description="the data root: a folder (relative to params.yaml) or s3://bucket/prefix (worked in a local "
        "staging folder, platform.staging; every finished shard is uploaded)",
    )
    staging: str | None = Field(
        None, description="local folder an s3:// data.root is worked in (null: its folder under platform.staging); "
        "`data` keeps dvc.yaml's outs in the DVC workspace",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)
    workers: int = Field(2, ge=1, description="parallel shard workers (local processes)")
    shards: int = Field(
        4096, ge=1, le=99_999,
        description="work shards of ingest, caption and curate: a source video's shard is sha256(its path) mod "
        "shards, so adding a source redoes only its shard; changing this number redoes every stage",
    )
    dataset_shards: int = Field(
        1024, ge=1, le=99_999,
        description="dataset shards (pairing, tars, latent shards): shard g holds the work shards b with "
        "b mod dataset_shards = g; cross-pair donors come from the same dataset shard. Must divide data.shards",
    )
    ray_address: str | None = Field(
        None, description="run shards on Ray at this address: 'local' starts one on loopback, 'auto' joins the "
        "cluster this process runs in (a Ray job), host:port or ray://host:10001 a running cluster",
    )
    ray_submit: str | None = Field(
        None, description="a Ray cluster's job API (http://head:8265): the data commands submit themselves there as "
        "Ray jobs and stream their logs (kaleido.data.ray_jobs); null: they run here",
    )
    ingest: IngestConfig = IngestConfig()
    caption: CaptionConfig = CaptionConfig()
    models: VisionModelsConfig = VisionModelsConfig()
    grounding: GroundingConfig = GroundingConfig()
    filters: FilterConfig = FilterConfig()
    references: ReferenceConfig = ReferenceConfig()
    validation: ValidationSplitConfig = ValidationSplitConfig()
    cluster: CurationClusterConfig = CurationClusterConfig()

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for key, replacement in _RETIRED_DATA_KEYS.items():
                if key in raw:
                    raise ValueError(f"data.{key} was replaced by {replacement}: remove data.{key} and set that key")
        return raw

    @model_validator(mode="after")
    def _shards_nest(self) -> DataConfig:
        if self.shards % self.dataset_shards:
            raise ValueError(
                f"data.dataset_shards={self.dataset_shards} must divide data.shards={self.shards} (dataset shard g "
                "holds the work shards b with b mod dataset_shards = g); e.g. shards 4096 with dataset_shards 1024"
            )
        return self


class TrainValidationConfig(_Section):
    # Held-out flow-matching loss at fixed (sample, noise seed, noise level) triples (SD3, Esser et al. 2024):
    # at step 0 (the base model), every `every` steps and at the end; kaleido/train/validation.py.
    every: int = Field(10, ge=0, description="optimizer steps between evaluations; 0: only at the start and the end")
    sigmas: list[float] = Field(
        default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], min_length=1,
        description="fixed noise levels (each in (0, 1)); the loss is reported per level and averaged",
    )
    max_samples: int = Field(64, ge=1, description="validation samples used (the first ones of the val split)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the fixed noise, one tensor per (sample, level)")

    @model_validator(mode="after")
    def _levels_inside(self) -> TrainValidationConfig:
        bad = [s for s in self.sigmas if not 0.0 < s < 1.0]
        if bad:
            raise ValueError(f"sigmas {bad}: every noise level must lie strictly between 0 and 1")
        return self


# The DiT's linear layers a LoRA adapter may target, named as in Wan2.1's model.py (per block).
LORA_ATTENTION_TARGETS: tuple[str, ...] = tuple(f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo")
LORA_TARGETS: tuple[str, ...] = (*LORA_ATTENTION_TARGETS, "ffn.0", "ffn.2")


def lora_target_problem(targets: list[str] | tuple[str, ...]) -> str | None:
    """Why `targets` are not a valid LoRA target list (unknown, empty or repeated names), or None."""
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        what = f"unknown {unknown}" if unknown else "empty"
        return f"target_modules={list(targets)}: {what}; use Wan module names: {', '.join(LORA_TARGETS)}"
    if len(set(targets)) != len(targets):
        return f"target_modules={list(targets)} names a module twice"
    return None


class TrainSamplesConfig(_Section):
    # Held-out samples generated while training (kaleido/train/samples.py): videos and a contact sheet in MLflow.
    every: int = Field(0, ge=0, description="optimizer steps between sample sets; 0: none (CI-sized runs)")
    count: int = Field(2, ge=1, le=16, description="samples per set: the first ones of the val split")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="sample i's noise seed is seed + i, the same at every step")


class LoraSettings(_Section):
    """LoRA fine-tuning of a stage (peft). Every base weight stays frozen; targets are Wan module names."""

    enabled: bool = False
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0.0, description="scale alpha / rank on B @ A (peft lora_alpha)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_ATTENTION_TARGETS),
        description="per-block linear layers: self_attn.q/k/v/o, cross_attn.q/k/v/o, and optionally ffn.0, ffn.2",
    )

    @model_validator(mode="after")
    def _known_targets(self) -> LoraSettings:
        problem = lora_target_problem(self.target_modules)
        if problem:
            raise ValueError(problem)
        return self


class LRSchedule(_Section):
    """SwissArmyTransformer's learning-rate schedule as the official Kaleido trainer builds it
    (sat/training/deepspeed_training.py `get_learning_rate_scheduler`, sat/training/learning_rates.py `AnnealingLR`);
    kaleido/train/optim.py states the rule. Defaults: the shipped SFT config
    (configs/training/video_wanx_14B_concat.yaml: mode finetune, lr_decay_style constant, SAT's --warmup 0.01)."""

    mode: Literal["pretrain", "finetune"] = Field(
        "finetune", description="SAT --mode: finetune adds the automatic warmup (auto_warmup_steps, auto_warmup_rate)")
    warmup: float = Field(0.01, ge=0.0, le=1.0, description="SAT --warmup: linear warmup over this share of N")
    decay_style: Literal["constant", "linear", "cosine", "exponential"] = Field(
        "constant", description="SAT --lr-decay-style after the warmup (SAT's `exponential` is constant too)")
    decay_ratio: float = Field(0.1, gt=0.0, le=1.0, description="SAT --lr-decay-ratio: cosine ends at lr * ratio")
    decay_iters: int | None = Field(None, ge=1, description="SAT --lr-decay-iters; None: the stage's steps")
    auto_warmup_steps: int = Field(100, ge=0, description="finetune: the first steps run at most auto_warmup_rate*lr")
    auto_warmup_rate: float = Field(0.05, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _finite_warmup(self) -> LRSchedule:
        if self.mode == "finetune" and self.auto_warmup_steps > 0 and self.warmup == 0:
            # SAT divides by the warmup length inside the automatic warmup (ZeroDivisionError there)
            raise ValueError("mode finetune with warmup 0: SAT's automatic warmup divides by the warmup length; "
                             "give warmup > 0 (shipped 0.01) or auto_warmup_steps 0")
        return self


class StagePreset(_Section):
    lr: float = Field(gt=0.0)
    steps: int = Field(ge=1, description="optimizer steps")
    global_batch: int = Field(ge=1, description="samples per optimizer step over all data-parallel ranks")
    init: Path | None = Field(
        None, description="DiT weights to start from; None: model.checkpoint (pretrain), the pretrain export (sft)"
    )
    dataset: str | None = Field(None, description="this stage's tar shards (folder or s3://); None: train.dataset")
    latents: str | None = Field(None, description="this stage's latent cache (folder or s3://); None: train.latents")
    lora: LoraSettings = LoraSettings()
    schedule: LRSchedule = LRSchedule()


_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"  # a Kubernetes resource quantity
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class KubernetesToleration(_Section):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class KubernetesConfig(_Section):
    """Multi-node training as an Indexed Job + headless Service (`kaleido.train.launch_kubernetes`)."""

    # YAML reads `cpu: 8` as an int; quantities are strings to Kubernetes.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), coerce_numbers_to_str=True
    )

    namespace: str = Field("kaleido", pattern=_DNS_LABEL, max_length=63)
    image: str = Field("kaleido:0.1.0", min_length=1, description="training image (the kaleido package + torch)")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    nodes: int = Field(1, ge=1, description="pods (torchrun nodes); the Job's completions and parallelism")
    gpus_per_node: int = Field(1, ge=0, description="nvidia.com/gpu per pod = torchrun processes; 0: one CPU process")
    cpu: str = Field("8", pattern=_QUANTITY, description="CPU request = limit per pod")
    memory: str = Field("64Gi", pattern=_QUANTITY, description="memory request = limit per pod")
    shm_size: str = Field("16Gi", pattern=_QUANTITY, description="/dev/shm (RAM) for dataloader workers and NCCL")
    node_selector: dict[str, str] = Field(default_factory=dict, description="e.g. {nvidia.com/gpu.present: 'true'}")
    tolerations: list[KubernetesToleration] = Field(
        default_factory=lambda: [KubernetesToleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        description="GPU nodes are usually tainted; the default tolerates the NVIDIA taint",
    )
    data_claim: str = Field("kaleido-data", pattern=_DNS_LABEL, description="PVC with data.root (mounted read-only)")
    checkpoints_claim: str = Field(
        "kaleido-checkpoints", pattern=_DNS_LABEL, description="PVC mounted as the params folder: weights, checkpoints"
    )
    mlflow_secret: str = Field(
        "mlflow-credentials", pattern=_DNS_LABEL, description="Secret with MLFLOW_TRACKING_USERNAME/PASSWORD keys"
    )
    mlflow_tracking_uri: str = Field("http://mlflow.kaleido.svc:5000", description="tracking server, as pods see it")
    object_store_secret: str = Field(
        "object-store-credentials", pattern=_DNS_LABEL,
        description="Secret whose keys become the pods' environment (optional): AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY and, for MinIO / GCS interop, AWS_ENDPOINT_URL; for s3:// data and latents",
    )
    master_port: int = Field(29500, ge=1024, le=65535)
    backoff_limit: int = Field(0, ge=0, description="pod failures retried (preemptions never count)")
    active_deadline_seconds: int | None = Field(None, ge=1, description="wall-clock limit of the whole Job")
    ttl_seconds_after_finished: int = Field(86400, ge=0, description="a finished Job (and its pods) is then removed")
    run_as_user: int = Field(1000, ge=1, description="non-root uid (and gid, fsGroup) of the training pods")
    service_account: str | None = Field(None, description="pod service account; the API token is never mounted")


class TrainConfig(_Section):
    zero_stage: Literal[1, 2, 3] = 2
    micro_batch: int = Field(1, ge=1)
    grad_clip: float = Field(0.1, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay of the decayed group (the official "
                                "groups: biases and LayerNorm affine weights get none; kaleido/train/optim.py)")
    sequence_parallel: int = Field(1, ge=1, description="DeepSpeed-Ulysses degree: ranks sharing one sequence")
    activation_checkpointing: bool = True
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: fp32 master weights and Adam moments in CPU memory (ZeRO 1-3)")
    offload_parameters: bool = Field(False, description="ZeRO-Infinity: parameters in CPU memory too (ZeRO-3 only)")
    reduce_bucket_size: int = Field(
        500_000_000, ge=1_000_000, description="DeepSpeed's gradient reduce bucket (values); allocated whole")
    gpu_memory_gb: float | None = Field(
        80.0, gt=0.0, description="memory of one GPU; every launch refuses a plan estimated above it (null: no check)")
    validation: TrainValidationConfig = TrainValidationConfig()
    samples: TrainSamplesConfig = TrainSamplesConfig()
    nproc_per_node: int = Field(8, ge=1, description="processes (GPUs) the local launcher starts")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    dataset: str = Field("data/dataset", min_length=1,
                         description="training tar shards (kaleido.data.writer): a folder or s3://bucket/prefix")
    latents: str = Field("artifacts/latents", min_length=1,
                         description="latent cache written by `kaleido encode`: a folder or s3://bucket/prefix")
    latents_staging: str | None = Field(
        None, description="for an s3:// train.latents: the local folder `kaleido encode` writes it in, keeping only "
        "the index and the shard markers once a shard is uploaded (a DVC out that pins every shard by sha256; the "
        "tensors live in the bucket); null: under platform.staging, tensors kept",
    )
    output_dir: Path = Field(Path("runs/train"), description="<output_dir>/<stage>/: checkpoints, export, loss curve")
    frames: int = Field(81, ge=1, description="pixel frames per clip at most (4k+1); shorter clips keep 4k+1 of theirs")
    buckets: list[tuple[int, int]] = Field(
        default_factory=lambda: [(480, 832)],
        description="training (height, width) sizes; each clip goes to the nearest aspect ratio",
    )
    cache_dtype: DTypeName = Field("bfloat16", description="dtype of the cached latents and text embeddings")
    encode_batch: int = Field(1, ge=1, description="clips (or references) per VAE call in `kaleido encode`")
    encode_ranks: int = Field(
        8, ge=1, description="processes (GPUs) `kaleido encode` splits the latent shards over (torchrun, like "
        "training); each encodes a disjoint, resumable share",
    )
    checkpoint_every: int = Field(500, ge=1, description="optimizer steps between DeepSpeed checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="newest DeepSpeed checkpoints kept on disk")
    experiment: str = Field("kaleido-train", min_length=1, description="MLflow experiment of the training runs")
    launcher: Literal["local", "kubernetes"] = "local"
    kubernetes: KubernetesConfig = KubernetesConfig()
    pretrain: StagePreset = StagePreset(lr=1e-5, steps=10_000, global_batch=256)
    sft: StagePreset = StagePreset(lr=5e-6, steps=5_000, global_batch=256)

    @model_validator(mode="after")
    def _shapes(self) -> TrainConfig:
        if (self.frames - 1) % 4 != 0:
            raise ValueError(f"frames={self.frames}: the Wan VAE needs 4k+1 frames (e.g. 1, 5, 9, ..., 81)")
        if not self.buckets:
            raise ValueError("buckets is empty: give at least one [height, width] training size")
        for height, width in self.buckets:
            if height < 16 or width < 16 or height % 16 or width % 16:
                raise ValueError(f"buckets: [{height}, {width}] must be multiples of 16 (VAE stride 8 x patch 2)")
        if self.offload_parameters and self.zero_stage != 3:
            raise ValueError(f"offload_parameters needs zero_stage 3 (got {self.zero_stage}): only ZeRO-3 partitions "
                             "the parameters it could move to the CPU")
        for beta in self.betas:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas={list(self.betas)}: each must lie in [0, 1)")
        return self


class EvalModelsConfig(_Section):
    """Metric backbones, local paths only (relative to params.yaml). VBench's choices in the descriptions."""

    dino: Path | None = Field(None, description="timm folder (config.json + weights) or weights file: DINO ViT-B/16")
    dino_arch: str = Field("vit_base_patch16_224.dino", description="timm architecture of a DINO weights FILE")
    clip: Path | None = Field(None, description="open_clip ViT-B/32 (background consistency, S2V, CLIP text score); "
                              "None: data.models.clip")
    clip_arch: str = Field("ViT-B-32", description="open_clip architecture of a CLIP checkpoint FILE")
    aesthetic_clip: Path | None = Field(None, description="open_clip ViT-L/14 for the LAION aesthetic head")
    aesthetic_clip_arch: str = Field("ViT-L-14", description="open_clip architecture of that checkpoint FILE")
    aesthetic_head: Path | None = Field(None, description="LAION sa_0_4_vit_l_14_linear.pth (Linear 768 -> 1)")
    musiq: Path | None = Field(None, description="pyiqa MUSIQ checkpoint (musiq_spaq_ckpt-358bb6af.pth)")
    interpolator: Literal["farneback", "torchscript"] = Field(
        "farneback", description="motion smoothness: farneback (OpenCV, no weights) or a TorchScript AMT-S export"
    )
    interpolator_path: Path | None = Field(None, description="TorchScript interpolation network (interpolator: "
                                           "torchscript)")
    viclip: Path | None = Field(None, description="ViCLIP TorchScript export; None: labelled CLIP image-text score")
    grounding_dino: Path | None = Field(None, description="None: data.models.grounding_dino")
    sam: Path | None = Field(None, description="None: data.models.sam")
    sam_type: Literal["vit_b", "vit_l", "vit_h", "tiny"] | None = Field(None, description="None: data.models.sam_type")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")


class S2VEvalConfig(_Section):
    box_threshold: float = Field(0.35, ge=0.0, le=1.0, description="Grounding DINO box threshold (its default)")
    text_threshold: float = Field(0.25, ge=0.0, le=1.0, description="Grounding DINO text threshold (its default)")
    detections_per_term: int = Field(1, ge=1, description="boxes kept per subject term and frame (highest first)")
    max_frames: int | None = Field(None, ge=1, description="frames scored per video, evenly spread; None: every frame")


def _metric_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from kaleido.eval.metrics import METRIC_CHOICES, METRICS

    return METRIC_CHOICES, tuple(METRICS)


class EvalConfig(_Section):
    seed: int = Field(0, ge=0, description="noise seed of eval cases that give none")
    eval_set: Path = Field(Path("artifacts/evalset"), description="default eval-set folder (kaleido eval-set init)")
    metrics: list[str] = Field(
        default_factory=lambda: list(_metric_names()[0]),
        description="metrics to compute; text_alignment is ViCLIP when eval.models.viclip is set, else CLIP",
    )
    # None: the generate section's value. Evaluations are only comparable at equal settings.
    frames: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=16)
    width: int | None = Field(None, ge=16)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    experiment: str = Field("kaleido-eval", min_length=1, description="MLflow experiment of evaluation runs")
    models: EvalModelsConfig = EvalModelsConfig()
    s2v: S2VEvalConfig = S2VEvalConfig()

    @model_validator(mode="after")
    def _valid(self) -> EvalConfig:
        choices = _metric_names()[0]
        unknown = [name for name in self.metrics if name not in choices]
        if unknown:
            raise ValueError(f"metrics: unknown {unknown}; choose from {', '.join(choices)}")
        if not self.metrics:
            raise ValueError("metrics is empty: list at least one metric")
        if self.frames is not None and (self.frames - 1) % 4 != 0:
            raise ValueError(f"frames={self.frames}: the Wan VAE needs 4k+1 frames (e.g. 1, 5, 9, ..., 81)")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value % 16 != 0:
                raise ValueError(f"{name}={value}: must be a multiple of 16 (VAE stride 8 x patch 2)")
        return self


class RelianceRule(_Section):
    """The gate's reference-reliance rule (kaleido.eval.gate): held-out val loss with shuffled references minus
    with the sample's own (kaleido.train.validation), per held-out sample."""

    floor: float | None = Field(
        0.0, description="the candidate must SHOW reliance: the lower bound of the bootstrap CI of its mean must "
        "exceed this (null: no floor)")
    tolerance: float = Field(0.01, ge=0.0, description="versus the champion: fails on a clear drop (the upper bound "
                             "of the paired CI of candidate - champion below -tolerance)")


class GateConfig(_Section):
    """Promotion gate (kaleido gate). Scores are per-case means; the rule is stated in kaleido.eval.gate."""

    metrics: list[str] | None = Field(None, description="metrics checked for regression; None: all both runs have")
    floors: dict[str, float] = Field(default_factory=dict, description="absolute minimum per metric")
    ceilings: dict[str, float] = Field(
        default_factory=dict, description="absolute maximum per lower-is-better metric (val_loss)"
    )
    regression_tolerance: float = Field(0.02, ge=0.0, description="allowed drop of a metric versus the champion")
    tolerances: dict[str, float] = Field(default_factory=dict, description="per-metric regression_tolerance")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="two-sided bootstrap confidence level")
    bootstrap_samples: int = Field(2000, ge=100)
    seed: int = Field(0, ge=0, description="bootstrap resampling seed (decisions are reproducible)")
    reference_reliance: RelianceRule = RelianceRule()

    @model_validator(mode="after")
    def _known_metrics(self) -> GateConfig:
        # val_loss: training's held-out loss, lower is better; reference_reliance: its shuffled-references gap
        known = (*_metric_names()[1], "val_loss", "reference_reliance")
        named = [*(self.metrics or []), *self.floors, *self.tolerances, *self.ceilings]
        unknown = sorted({name for name in named if name not in known})
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(known)}")
        if "val_loss" in self.floors:
            raise ValueError("val_loss is lower-is-better: bound it with gate.ceilings, not gate.floors")
        for where in ("floors", "ceilings", "tolerances"):
            if "reference_reliance" in getattr(self, where):
                raise ValueError(f"gate.{where}.reference_reliance: set gate.reference_reliance.floor / tolerance "
                                 "(its floor asks for evidence of reliance, unlike gate.floors)")
        negative = sorted(name for name, value in self.tolerances.items() if value < 0)
        if negative:
            raise ValueError(f"tolerances must be >= 0: {negative}")
        return self


class ServeConfig(_Section):
    # How registered versions are served (kaleido/serving.py, kaleido/serve_app.py): `kaleido serve`, pyfunc,
    # `kaleido generate`, the `kaleido/generate` deployment. The request limits (kaleido/request_limits.py) are one
    # cost model for all of them, checked before any model work.
    allow_remote_references: bool = Field(
        False, description="let requests name references by http(s) URL (the server fetches them); off: base64 only",
    )
    max_tokens: int = Field(
        90_000, ge=1, description="latent tokens per denoising step (video + references; one token = 4 frames x "
        "16 x 16 pixels): bounds memory. Shipped 720x1280x81 with 3 references: 86,400",
    )
    max_token_steps: int = Field(
        10_000_000, ge=1, description="tokens x steps x CFG branches (2 when guidance_scale != 1), summed over a "
        "request's rows (one video each): bounds a request's time. "
        "Shipped 720x1280x81, 3 references, 50 steps, CFG: 8,640,000",
    )
    max_prompt_chars: int = Field(
        10_000, ge=1, description="characters of the prompt and of the negative prompt (past model.text_len tokens "
        "the text encoder cuts them, with a warning)")
    max_image_bytes: int = Field(20_000_000, ge=1, description="bytes of one reference image file, as sent")
    max_request_bytes: int = Field(100_000_000, ge=1024, description="bytes of one HTTP request body (kaleido serve)")
    concurrency: int = Field(
        1, ge=1, le=64, description="generations one server runs at once; more are refused (503 + Retry-After), "
        "never queued",
    )
    retry_after_s: int = Field(30, ge=1, description="the Retry-After a busy server answers with")
    timeout_s: float = Field(
        900.0, gt=0, description="seconds a served request may run; then it is answered 504 and its generation stops "
        "at the next denoising step (so does one whose client went away)",
    )
    reference_roots: list[Path] = Field(
        default_factory=lambda: [Path("artifacts/samples"), Path("artifacts/uploads")],
        description="folders (relative to the checkout) whose files the kaleido/generate deployment may read as "
        "references; anything else is sent as base64 / a data URI",
    )


class PlatformConfig(_Section):
    registered_model: str = "kaleido-s2v"
    model_assets: Literal["reference", "copy"] = Field(
        "reference", description="VAE / text encoder / tokenizer of a registered version: uploaded once per content "
        "hash and referenced (reference), or copied into every version (copy)",
    )
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    # Bounds on every MLflow request of training and evaluation (MLflow's env vars MLFLOW_HTTP_REQUEST_*): MLflow's
    # own defaults (7 retries, backoff factor 2, 120 s timeout) stall a run ~8 minutes when the server dies.
    mlflow_request_retries: int = Field(
        2, ge=0, le=10, description="retries of a failed MLflow request (MLFLOW_HTTP_REQUEST_MAX_RETRIES)"
    )
    mlflow_request_backoff: int = Field(
        1, ge=0, le=120,
        description="backoff factor between those retries, seconds (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR: the n-th "
        "retry waits factor x 2^(n-1))",
    )
    mlflow_request_timeout_s: int = Field(
        30, ge=1, description="seconds one MLflow request may wait for the server (MLFLOW_HTTP_REQUEST_TIMEOUT)"
    )
    prefect_api_url: str = "http://127.0.0.1:4200/api"
    state_dir: Path = Field(
        Path(".platform"), description="local services' pid files, logs, Prefect home, MLflow store, DVC remote"
    )
    work_pool: str = Field("local", min_length=1, description="Prefect process work pool of the embedded default")
    dvc_remote: str = Field(
        ".platform/dvc-remote", min_length=1, description="DVC remote the flow pushes data versions to (path or URL)"
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-protocol endpoint (MinIO, GCS interoperability, ...) when $AWS_ENDPOINT_URL is not set; "
        "an address only: credentials come from the standard AWS variables or the pod's role, never from here",
    )
    staging: str | None = Field(
        None, description="local folder where s3:// data roots, datasets and latent caches are worked in and read "
        "through (null: $KALEIDO_CACHE/staging)",
    )
    sample_prompt: str = Field(
        "An astronaut plays with a cat next to a cup of coffee on a table",
        description="prompt of the video the flow generates with the champion at the end",
    )
    sample_refs: list[Path] = Field(
        default_factory=lambda: [Path(f"artifacts/samples/{n}.png") for n in ("astronaut", "chelsea", "coffee")],
        description="reference images of that video",
    )


class MediaConfig(_Section):
    # Every user image (generate --ref, eval-set references, curation, samples) goes through one loader.
    max_image_pixels: int = Field(
        120_000_000, ge=1,
        description="images above this many pixels are refused before decoding (a 102 Mpx medium-format photo "
        "passes; RGB at the limit is 360 MB in memory)",
    )


class Params(_Section):
    media: MediaConfig = MediaConfig()
    model: ModelConfig = ModelConfig()
    generate: GenerateConfig = GenerateConfig()
    flow_matching: FlowMatchingConfig = FlowMatchingConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    platform: PlatformConfig = PlatformConfig()
    serve: ServeConfig = ServeConfig()
    # The folder relative paths resolve against (the folder of params.yaml); not a knob.
    base_dir: Path = Field(Path("."), exclude=True)

    @model_validator(mode="after")
    def _sizes_fit_rope(self) -> Params:
        rope = self.model.rope
        sizes = [("generate", self.generate.height, self.generate.width)]
        sizes.append(("eval", self.eval.height or self.generate.height, self.eval.width or self.generate.width))
        sizes += [(f"train.buckets[{i}]", h, w) for i, (h, w) in enumerate(self.train.buckets)]
        for where, height, width in sizes:
            problem = rope_size_problem(height, width, rope.variant, rope.offset)
            if problem:
                raise ValueError(f"{where}: {problem}")
        return self

    def resolve(self, path: Path | str | None) -> Path | None:
        """A path from params.yaml, made absolute against the folder that holds params.yaml."""
        if path is None:
            return None
        if isinstance(path, str) and path.startswith("s3://"):
            raise ValueError(f"{path} is an object-storage location, not a local path (kaleido.platform.storage)")
        path = Path(os.path.expanduser(str(path)))
        return path if path.is_absolute() else (self.base_dir / path).resolve()


def _describe_error(error: dict[str, Any], source: str) -> str:
    if not error["loc"]:  # a check across sections (model_validator): its message names the keys itself
        return f"{source}: {str(error['msg']).removeprefix('Value error, ')}"
    key = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{key}' (value {error['input']!r}); remove it or fix its spelling"
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    return f"{source}: {key}{shown}: {str(error['msg']).removeprefix('Value error, ')}"


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
        set_dotted(raw, dotted, value)
    return validate_params(raw, source=str(path), base_dir=path.parent)


def flatten_dotted(node: Any, prefix: str = "") -> dict[str, Any]:
    """A parsed params mapping as {"a.b.c": leaf}: the dotted keys `set_dotted`, `-S` and DVC use (lists are leaves)."""
    if isinstance(node, Mapping):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten_dotted(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c = value` in a parsed params mapping, creating sections on the way."""
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
