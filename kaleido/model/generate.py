"""Subject-to-video sampling: references + prompt -> video, as the shipped Kaleido samples.

Flow matching with the diffusers schedulers (Euler or UniPC, sigma shift), classifier-free guidance
on the TEXT only: both branches see the reference latents, the unconditional one gets the negative
prompt. Every request is validated before any model runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from kaleido.config.schema import WAN_NEGATIVE_PROMPT
from kaleido.model.media import load_reference_image, to_rgb
from kaleido.model.vae import validate_video_size

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from kaleido.config import Params
    from kaleido.model.lora import Adapter
    from kaleido.model.text_encoder import PromptTruncation, TextEncoder
    from kaleido.model.vae import WanVAE

log = logging.getLogger(__name__)

SAMPLERS = ("euler", "unipc")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NUM_TRAIN_TIMESTEPS = 1000

ReferenceInput = str | Path | Image.Image


def validate_request(
    reference_images: Sequence[ReferenceInput],
    frames: int,
    height: int,
    width: int,
    max_references: int,
    steps: int = 1,
    sampler: str = "euler",
    max_pixels: int | None = None,
) -> list[Image.Image]:
    """Check a request without touching a model; return the references as RGB images.

    Raises ValueError naming the bad input and the fix. Cheap checks come first so a bad size is
    reported without reading any image.
    """
    if isinstance(reference_images, str | Path | Image.Image):
        reference_images = [reference_images]
    count = len(reference_images)
    if count > max_references:
        raise ValueError(
            f"{count} references given, the model supports at most {max_references}; "
            f"pass at most {max_references} --ref images (model.max_references in params.yaml)"
        )
    validate_video_size(frames, height, width)
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least 1 sampling step")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: unknown; use one of {', '.join(SAMPLERS)}")
    images = []
    for index, item in enumerate(reference_images):
        if isinstance(item, Image.Image):  # in memory: the same orientation/bit-depth/alpha rules as a file
            images.append(to_rgb(item, Path(getattr(item, "filename", "") or f"<reference {index}>"), "reference"))
        else:
            images.append(load_reference_image(item, max_pixels))
    return images


class NumericalError(RuntimeError):
    """Generation produced NaN or Inf values; the message names where, the dtype and the fix."""


class GenerationCancelled(RuntimeError):
    """The caller's `cancel` check said stop (a served request timed out or its client left); the message says
    after how many denoising steps."""


@dataclass(frozen=True)
class GenerationSettings:
    """The sampling settings of one generation (params.yaml `generate`, after command-line overrides)."""

    frames: int
    height: int
    width: int
    fps: int
    steps: int
    guidance_scale: float
    shift: float
    sampler: str
    seed: int  # -1: a random seed, drawn at generation time
    negative_prompt: str

    @classmethod
    def from_params(cls, params: Params) -> GenerationSettings:
        g = params.generate
        return cls(g.frames, g.height, g.width, g.fps, g.steps, g.guidance_scale, g.shift, g.sampler, g.seed,
                   g.negative_prompt)

    def call_kwargs(self) -> dict:
        """The keyword arguments of S2VPipeline.__call__."""
        kwargs = asdict(self)
        kwargs.pop("fps")
        return kwargs

    def metadata(self, prompt: str, references: list[str], seed: int) -> dict[str, str]:
        """What the written video records about itself (mp4 metadata): the prompt and the seed actually used."""
        import json

        settings = {**asdict(self), "seed": seed, "requested_seed": self.seed}
        return {"comment": json.dumps({"prompt": prompt, "references": references, **settings}, ensure_ascii=False)}


def check_prompts(params: Params, prompts: Sequence[tuple[str, str]]) -> list[tuple[str, PromptTruncation]]:
    """Warn (logger) for every prompt longer than model.text_len tokens, with the count and the dropped words.

    Loads only the tokenizer (no model), so it runs before any model is loaded. `prompts` pairs what a prompt
    is (for the message) with its text; returns the truncated ones.
    """
    from kaleido.model.text_encoder import load_tokenizer, prompt_truncation

    model = params.model
    tokenizer = load_tokenizer(_required_path(params, "tokenizer" if model.tokenizer is not None else "text_encoder"))
    found = []
    for what, prompt in prompts:
        truncation = prompt_truncation(tokenizer, prompt, model.text_len) if prompt else None
        if truncation is not None:
            log.warning(truncation.message(what))
            found.append((what, truncation))
    return found


def make_scheduler(
    sampler: str, shift: float, steps: int, device: str | torch.device = "cpu"
) -> FlowMatchEulerDiscreteScheduler | UniPCMultistepScheduler:
    """A fresh diffusers flow-matching scheduler with its `steps` timesteps set (schedulers keep per-run state,
    so never share one).

    Euler follows the shipped sampler (`zai-org/Kaleido` sgm/modules/diffusionmodules/sampling.py,
    `make_hunyuan_timesteps` with shift_scale 7): sigma_i = shift u / (1 + (shift - 1) u) for
    u = linspace(1, 0, steps + 1), i.e. shifted ONCE; the DiT gets timestep 1000 sigma. UniPC uses Wan2.1's
    settings (flow sigmas with the same shift).
    """
    if sampler == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
        # Explicit sigmas: without them diffusers' Euler starts from its already-shifted training sigmas and
        # shifts again (the last step then jumps from ~0.05 to 0).
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist(), device=device)
        return scheduler
    if sampler == "unipc":
        from diffusers import UniPCMultistepScheduler

        # Wan2.1's sampler settings (its diffusers scheduler config)
        scheduler = UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            solver_order=2,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            final_sigmas_type="zero",
        )
        scheduler.set_timesteps(steps, device=device)
        return scheduler
    raise ValueError(f"sampler={sampler!r}: unknown; use one of {', '.join(SAMPLERS)}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_blocks(dit: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """The DiT's blocks on the CPU, each moved to `device` for its own forward and back (diffusers' group
    offloading, block level, one block per group); the layers outside the blocks follow the same hooks.
    GPU memory holds one block at a time (14B: 0.7 GB instead of 28.6 GB) at the cost of a transfer per block."""
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(dit, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1)
    return dit


class SequenceParallelGeneration:
    """Generation on every rank of a torchrun job, one Ulysses group: each rank holds a slice of the tokens."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    @classmethod
    def from_environment(cls) -> SequenceParallelGeneration:
        """Join the torchrun job (NCCL on GPUs, gloo on CPU; DeepSpeed's init, which its Ulysses attention needs)."""
        import deepspeed
        import torch.distributed as dist

        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def attach(self, pipe: S2VPipeline) -> None:
        """Ulysses hooks on the pipeline's DiT (heads must divide by the ranks)."""
        from kaleido.train.sequence_parallel import UlyssesSequenceParallel

        UlyssesSequenceParallel().attach(pipe.dit)

    def shared_seed(self, seed: int) -> int:
        """The same seed on every rank: -1 is drawn once, on rank 0."""
        import torch.distributed as dist

        value = [int.from_bytes(os.urandom(8), "little") >> 1 if seed == -1 else seed]
        dist.broadcast_object_list(value, src=0)
        return int(value[0])


def vae_dtype(name: str | None, device: str | torch.device) -> torch.dtype:
    """model.vae_dtype, or for null the shipped choice: bfloat16 on a GPU (`zai-org/Kaleido` runs its WanVAE in
    bf16 for sampling and for training latents), float32 on CPU (where bf16 convolutions are slow)."""
    if name is not None:
        return DTYPES[name]
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def frames_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float pixels -> uint8 as the shipped sampler converts them: clamp((x + 1) / 2, 0, 1) * 255, then
    TRUNCATED (numpy astype). Truncation is ~0.5 level darker on average than rounding; kept for fidelity."""
    return (((video.float() + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def _required_path(params: Params, key: str) -> Path:
    value = getattr(params.model, key)
    path = params.resolve(value)
    if path is None:
        raise FileNotFoundError(f"model.{key} is not set in params.yaml; point it at a local folder")
    if not path.exists():
        tiny = params.model.arch == "tiny"
        hint = " (run `kaleido init-tiny` to write the tiny random-weight assets)" if tiny else ""
        raise FileNotFoundError(f"model.{key}: {path} does not exist{hint}")
    return path


def check_lora(params: Params) -> Adapter | None:
    """model.lora, read once and checked against model.checkpoint's headers (rank, shapes, modules) before any
    model loads; None when no adapter is set. FileNotFoundError / LoraError (a ValueError) naming the key and
    file."""
    if params.model.lora is None:
        return None
    from kaleido.model.checkpoint import read_shapes
    from kaleido.model.lora import LoraError, adapter_summary, check_fits, load_adapter

    path = _required_path(params, "lora")
    checkpoint = _required_path(params, "checkpoint")
    try:
        adapter, layout = load_adapter(path)
        check_fits(adapter, read_shapes(checkpoint), f"model.checkpoint ({checkpoint})")
    except LoraError as exc:
        raise LoraError(f"model.lora: {exc}") from None
    log.info("model.lora: %s, scale %g", adapter_summary(adapter, layout), params.model.lora_scale)
    return adapter


@dataclass
class _Branches:
    """The DiT inputs that stay fixed over the sampling loop."""

    context: torch.Tensor  # [B, L, text_dim]: cond first, then uncond when CFG is on
    reference_latents: torch.Tensor | None  # [B, n, 16, h, w], repeated per branch


class S2VPipeline:
    """DiT + VAE + text encoder. `pipe(prompt, reference_images, ...) -> uint8 frames [T, H, W, 3]`."""

    def __init__(
        self,
        dit: torch.nn.Module,
        vae: WanVAE,
        text_encoder: TextEncoder,
        *,
        text_len: int = 512,
        max_references: int = 3,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_cfg: bool = True,
        release_encoders: bool = False,
        offload: str = "none",
    ):
        if offload not in ("none", "blocks"):
            raise ValueError(f"offload={offload!r}: use 'none' or 'blocks'")
        if offload == "blocks":
            self.dit = offload_blocks(dit.to(dtype=dtype).eval(), device)
        else:
            self.dit = dit.to(device=device, dtype=dtype).eval()
        self.release_encoders = release_encoders
        self.offload = offload
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_len = text_len
        self.max_references = max_references
        self.device = torch.device(device)
        self.dtype = dtype
        self.last_seed: int | None = None  # the seed of the last generation (after -1 is drawn)
        # One forward for both CFG branches (batch 2) is faster; False halves activation memory.
        self.batch_cfg = batch_cfg
        text_dim = getattr(getattr(dit, "cfg", None), "text_dim", None)
        # text_encoder None: a pipeline that samples from given text embeddings only (`sample`), as training does
        if text_encoder is not None and text_dim is not None and text_dim != text_encoder.dim:
            raise ValueError(
                f"text encoder width {text_encoder.dim} does not match the DiT's text_dim {text_dim}; "
                "model.text_encoder and model.checkpoint must belong to the same model"
            )

    def placement(self) -> str:
        """Where the parts live while sampling, in words (the memory options as applied, for logs)."""
        parts = [f"DiT on {self.device}" + (" (blocks wait on cpu, one at a time on the device)"
                                            if self.offload == "blocks" else "")]
        parts.append(f"text encoder on {self.text_encoder.device}")
        parts.append(f"VAE on {self.vae.device}")
        if self.release_encoders:
            parts.append("encoders released to cpu after encoding")
        return ", ".join(parts)

    @classmethod
    def from_params(cls, params: Params, device: str | torch.device | None = None) -> S2VPipeline:
        """Load every model from the local paths of `params.model` (no hub access)."""
        from kaleido.model.checkpoint import load_dit, read_config, read_settings
        from kaleido.model.dit import dit_config
        from kaleido.model.settings import ModelSettings, resolve_settings
        from kaleido.model.text_encoder import TextEncoder
        from kaleido.model.vae import WanVAE

        model, options = params.model, params.generate
        device = torch.device(device) if device is not None else default_device()
        dtype = DTYPES[model.dtype]
        # blocks wait on the CPU (offload) / umT5 stays there (Wan's --t5_cpu)
        dit_device = torch.device("cpu") if options.offload == "blocks" else device
        text_device = torch.device("cpu") if options.text_encoder_device == "cpu" else device
        checkpoint = _required_path(params, "checkpoint")
        vae_path = _required_path(params, "vae")
        text_path = _required_path(params, "text_encoder")
        tokenizer_path = _required_path(params, "tokenizer") if model.tokenizer is not None else text_path
        lora = check_lora(params)  # a bad adapter fails here, before any model loads
        # A checkpoint with a config (config.json or embedded) describes itself; a bare Wan .pth gets the arch's.
        config = None if read_config(checkpoint) is not None else dit_config(model.arch)
        # the weights run as they were trained (R-RoPE, text length): a disagreeing params.yaml is named, not used
        where = f"{checkpoint}" + (f" with the LoRA adapter {model.lora}" if lora is not None else "")
        settings = resolve_settings(read_settings(checkpoint, lora), ModelSettings.from_params(params), where)
        dit = load_dit(
            checkpoint,
            config=config,
            attention_backend=model.attention_backend,
            rope_variant=settings.rope_variant,
            rope_offset=settings.rope_offset,
            dtype=dtype,
            device=dit_device,
            lora=lora,
            lora_scale=model.lora_scale,
        )
        vae = WanVAE.from_pretrained(vae_path, device=device, dtype=vae_dtype(model.vae_dtype, device))
        text_encoder = TextEncoder.from_pretrained(text_path, tokenizer_path, device=text_device, dtype=dtype)
        return cls(
            dit,
            vae,
            text_encoder,
            text_len=settings.text_len,
            max_references=settings.max_references,
            device=device,
            dtype=dtype,
            release_encoders=options.release_encoders,
            offload=options.offload,
        )

    def encode_prompts(self, prompt: str, negative_prompt: str, cfg: bool) -> torch.Tensor:
        """[1 or 2, text_len, d]: the prompt, then the negative prompt when CFG is on."""
        prompts = [prompt, negative_prompt] if cfg else [prompt]
        return self.text_encoder.encode(prompts, self.text_len).to(device=self.device, dtype=self.dtype)

    def encode_references(self, images: list[Image.Image], height: int, width: int) -> torch.Tensor | None:
        """[1, n, 16, h, w] white-padded reference latents (one frame each), or None without references."""
        if not images:
            return None
        latents = self.vae.encode_references(images, height, width)
        return latents[None].to(device=self.device, dtype=self.dtype)

    def _run_dit(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, refs: torch.Tensor | None
    ) -> torch.Tensor:
        # Low-precision weights run under autocast as Wan does: the DiT keeps its time embedding in fp32.
        low_precision = self.dtype in (torch.bfloat16, torch.float16)
        with torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=low_precision):
            return self.dit(x, t, context, refs).float()

    def _velocity(
        self, latents: torch.Tensor, t: torch.Tensor, inputs: _Branches, guidance_scale: float, cfg: bool
    ) -> torch.Tensor:
        x = latents.to(self.dtype)
        if not cfg:
            return self._run_dit(x, t.expand(1), inputs.context, inputs.reference_latents)
        if self.batch_cfg:
            refs = inputs.reference_latents
            v_cond, v_uncond = self._run_dit(
                x.expand(2, *x.shape[1:]), t.expand(2), inputs.context,
                None if refs is None else refs.expand(2, *refs.shape[1:]),
            ).chunk(2)
        else:
            v_cond = self._run_dit(x, t.expand(1), inputs.context[:1], inputs.reference_latents)
            v_uncond = self._run_dit(x, t.expand(1), inputs.context[1:], inputs.reference_latents)
        # CFG on text only: both branches saw the same references.
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        reference_images: Sequence[ReferenceInput] = (),
        frames: int = 81,
        height: int = 512,
        width: int = 896,
        steps: int = 50,
        guidance_scale: float = 6.0,
        shift: float = 7.0,
        sampler: str = "euler",
        seed: int = 0,
        negative_prompt: str = WAN_NEGATIVE_PROMPT,
        progress: bool = True,
        warn_truncation: bool = True,
        output_type: str = "frames",
        cancel: Callable[[], bool] | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Generate a video; returns uint8 frames [frames, height, width, 3].

        seed -1 draws a random seed (Wan's convention); `self.last_seed` holds the seed used. A prompt longer
        than `text_len` tokens is truncated with a warning (unless the caller checked it: warn_truncation=False).
        NumericalError when the latents or the decoded frames hold NaN/Inf (e.g. a float16 model overflowing).
        output_type "latents" returns the final normalised latents [1, 16, F, h, w] (float32) without decoding.
        `cancel` is asked before the encoders, before every denoising step and before the decode; when it returns
        True the generation stops there (GenerationCancelled): a timed-out request frees its memory within a step.
        """
        if output_type not in ("frames", "latents"):
            raise ValueError(f"output_type={output_type!r}: use 'frames' or 'latents'")
        images = validate_request(reference_images, frames, height, width, self.max_references, steps, sampler)
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if not -1 <= int(seed) <= 2**63 - 1:
            raise ValueError(f"seed={seed}: use 0 .. 2^63-1, or -1 for a random seed")
        if seed == -1:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        self.last_seed = int(seed)
        cfg = guidance_scale != 1.0  # g = 1 makes the uncond branch cancel out: skip its cost
        if warn_truncation:
            for what, text in (("prompt", prompt), ("negative prompt", negative_prompt if cfg else "")):
                truncation = self.text_encoder.truncation(text, self.text_len) if text else None
                if truncation is not None:
                    log.warning(truncation.message(what))

        def stop_if_asked(done: int) -> None:
            if cancel is not None and cancel():
                raise GenerationCancelled(f"generation stopped after {done} of {steps} denoising steps (cancelled)")

        stop_if_asked(0)
        inputs = _Branches(
            context=self.encode_prompts(prompt, negative_prompt, cfg),
            reference_latents=self.encode_references(images, height, width),
        )
        if self.release_encoders:  # the DiT gets the GPU to itself while it samples
            self._park(self.text_encoder, self.vae)

        latents = self._denoise(inputs, (frames, height, width), steps, guidance_scale, cfg, shift, sampler, seed,
                                progress, stop_if_asked)
        if output_type == "latents":
            return latents.float()
        stop_if_asked(steps)
        if self.release_encoders:
            self.vae.to_device(self.device)
        return self._decode(latents)

    @torch.no_grad()
    def sample(
        self,
        context: torch.Tensor,
        null_context: torch.Tensor | None,
        reference_latents: torch.Tensor | None,
        frames: int,
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        shift: float,
        sampler: str,
        seed: int,
    ) -> np.ndarray:
        """uint8 frames [frames, height, width, 3] from ENCODED inputs: context [text_len, text_dim] (the prompt's
        padded embeddings), null_context [text_len, text_dim] (the negative / empty prompt's, for CFG; None: no
        CFG), reference_latents [n, 16, h, w] or None. The same sampling loop as a prompt's; used for the samples
        training draws from its latent cache (kaleido.train.samples), which has no text encoder loaded."""
        latents = self.sample_latents(context, null_context, reference_latents, frames, height, width, steps,
                                      guidance_scale, shift, sampler, seed)
        return self._decode(latents)

    @torch.no_grad()
    def sample_latents(
        self,
        context: torch.Tensor,
        null_context: torch.Tensor | None,
        reference_latents: torch.Tensor | None,
        frames: int,
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        shift: float,
        sampler: str,
        seed: int,
    ) -> torch.Tensor:
        """`sample` without the decode: the final normalised latents [1, 16, F, h, w] (float32)."""
        cfg = guidance_scale != 1.0 and null_context is not None
        stacked = torch.stack([context, null_context]) if cfg and null_context is not None else context[None]
        refs = None if reference_latents is None or not len(reference_latents) else reference_latents[None]
        inputs = _Branches(context=stacked.to(device=self.device, dtype=self.dtype),
                           reference_latents=None if refs is None else refs.to(device=self.device, dtype=self.dtype))
        return self._denoise(inputs, (frames, height, width), steps, guidance_scale, cfg, shift, sampler, seed,
                             False).float()

    def _denoise(self, inputs: _Branches, size: tuple[int, int, int], steps: int, guidance_scale: float, cfg: bool,
                 shift: float, sampler: str, seed: int, progress: bool,
                 stop_if_asked: Callable[[int], None] = lambda done: None) -> torch.Tensor:
        """The sampling loop: seeded noise [1, 16, F, h, w] -> final latents. `stop_if_asked(steps done)` runs
        before every step (a cancelled request raises there)."""
        from kaleido.platform.progress import track

        scheduler = make_scheduler(sampler, shift, steps, self.device)
        # Noise from a CPU generator: the same seed gives the same video on any device.
        shape = (1, *self.vae.latent_shape(*size))
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

        for step, t in enumerate(
            track(scheduler.timesteps, "generate: sampling", unit="step", enabled=progress), start=1
        ):
            stop_if_asked(step - 1)
            # timesteps are sigma * 1000 (UniPC rounds them to integers); the DiT takes that scale
            timestep = t.to(device=self.device, dtype=torch.float32).reshape(1)
            velocity = self._velocity(latents, timestep, inputs, guidance_scale, cfg)
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
            self._check_finite(latents, f"the latents after sampling step {step} of {steps}", self.dtype, "model.dtype")
        return latents

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        decoded = self.vae.decode(latents, clamp=False)
        self._check_finite(decoded, "the frames the VAE decoded", self.vae.dtype, "model.vae_dtype")
        video = decoded.clamp(-1.0, 1.0)[0]  # [3, T, H, W] in [-1, 1]
        return frames_to_uint8(video).permute(1, 2, 3, 0).cpu().numpy()

    def _park(self, *models: Any) -> None:
        for model in models:
            model.to_device("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @staticmethod
    def _check_finite(tensor: torch.Tensor, what: str, dtype: torch.dtype, key: str) -> None:
        """NumericalError instead of a silent black or noisy video (clamp and uint8 hide NaN and Inf)."""
        bad = ~torch.isfinite(tensor)
        if bad.any():
            name = str(dtype).removeprefix("torch.")
            fix = ("float16's range (max 65504) overflows in this model: use bfloat16 (GPU) or float32"
                   if dtype == torch.float16 else "check the checkpoint for NaN/Inf weights, or use float32")
            raise NumericalError(
                f"generation produced NaN/Inf in {what} ({bad.sum().item()} of {bad.numel()} values; {key}={name}): "
                f"{fix} ({key} in params.yaml)"
            )
