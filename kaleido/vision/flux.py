"""FLUX.1 tools through diffusers, from local pipeline folders: Fill (inpainting) and Redux (variation).

- `FluxInpainter` (FluxFillPipeline, e.g. a local FLUX.1-Fill-dev): repaints the masked pixels; the
  curation uses it to erase a subject's original background (paper section 3.2 step 5) and to
  remove subjects from a frame (background plates for cross-pair composites).
- `FluxRedux` (FluxPriorReduxPipeline, e.g. FLUX.1-Redux-dev, feeding the base FluxPipeline, e.g.
  FLUX.1-dev): a new image of the same subject (pose / motion enrichment, step 6).
Both are optional: a null path disables the matching sample type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kaleido.vision import ImageLike, resolve_device, to_pil, to_rgb_array

# Text embeddings the released Redux prior emits when no text encoder is loaded: T5-XXL (512 x 4096)
# and CLIP-L pooled (768) zeros; its image tokens are appended to them.
RELEASED_TEXT_DIMS = (4096, 768)
T5_TOKENS = 512


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _check_pipeline_dir(path: Path, key: str, example: str) -> None:
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{key} = {path}: no model_index.json; point it at a local diffusers pipeline folder "
            f"(save_pretrained layout, e.g. a copy of {example}) or set it to null to disable"
        )


def processing_size(height: int, width: int, multiple: int, max_side: int) -> tuple[int, int]:
    """(h, w) scaled down to fit `max_side`, each rounded down to a multiple of `multiple` (>= multiple)."""
    scale = min(1.0, max_side / max(height, width))
    h = max(multiple, int(height * scale) // multiple * multiple)
    w = max(multiple, int(width * scale) // multiple * multiple)
    return h, w


def _generator(seed: int) -> Any:
    import torch

    return torch.Generator(device="cpu").manual_seed(int(seed))


class FluxInpainter:
    """`inpaint(image, mask, prompt, seed)`: pixels outside the mask are returned unchanged."""

    name = "flux_fill"

    def __init__(self, pipe: Any, steps: int = 28, guidance: float = 30.0, max_side: int = 1024) -> None:
        self.pipe = pipe
        self.steps = int(steps)
        self.guidance = float(guidance)
        self.max_side = int(max_side)
        self.multiple = int(pipe.vae_scale_factor) * 2  # VAE stride x the 2x2 latent packing

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | None = None,
        dtype: str = "bfloat16",
        steps: int = 28,
        guidance: float = 30.0,
        max_side: int = 1024,
    ) -> FluxInpainter:
        from diffusers import FluxFillPipeline

        path = Path(path)
        _check_pipeline_dir(path, "data.models.flux_fill", "FLUX.1-Fill-dev")
        pipe = FluxFillPipeline.from_pretrained(str(path), dtype=_torch_dtype(dtype), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(resolve_device(device)), steps, guidance, max_side)

    def inpaint(self, image: ImageLike, mask: np.ndarray, prompt: str, seed: int = 0) -> np.ndarray:
        original = to_rgb_array(image)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != original.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match the image {original.shape[:2]}")
        if not mask.any():
            return original.copy()
        height, width = original.shape[:2]
        h, w = processing_size(height, width, self.multiple, self.max_side)
        result = self.pipe(
            prompt=prompt,
            image=to_pil(original).resize((w, h), Image.Resampling.BICUBIC),
            mask_image=Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST),
            height=h,
            width=w,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            generator=_generator(seed),
        ).images[0]
        painted = np.asarray(result.convert("RGB").resize((width, height), Image.Resampling.BICUBIC))
        # the VAE round trip alters every pixel slightly: keep the original outside the mask
        return np.where(mask[:, :, None], painted, original)


class FluxRedux:
    """`vary(image, seed)`: Redux image tokens -> base FLUX -> a new `size` x `size` image of the subject."""

    name = "flux_redux"

    def __init__(
        self,
        prior: Any,
        base: Any,
        steps: int = 28,
        guidance: float = 2.5,
        size: int = 512,
        text_dims: tuple[int, int] | None = None,
    ) -> None:
        self.prior = prior
        self.base = base
        self.steps = int(steps)
        self.guidance = float(guidance)
        multiple = int(base.vae_scale_factor) * 2
        self.size = max(multiple, int(size) // multiple * multiple)
        self.text_dims = text_dims  # None: the prior's own zero text embeddings (released dims)

    @classmethod
    def from_pretrained(
        cls,
        redux_path: str | Path,
        base_path: str | Path,
        device: str | None = None,
        dtype: str = "bfloat16",
        steps: int = 28,
        guidance: float = 2.5,
        size: int = 512,
    ) -> FluxRedux:
        from diffusers import FluxPipeline, FluxPriorReduxPipeline, FluxTransformer2DModel

        redux_path, base_path = Path(redux_path), Path(base_path)
        _check_pipeline_dir(redux_path, "data.models.flux_redux", "FLUX.1-Redux-dev")
        _check_pipeline_dir(base_path, "data.models.flux_base", "FLUX.1-dev")
        torch_dtype = _torch_dtype(dtype)
        config = FluxTransformer2DModel.load_config(str(base_path / "transformer"))
        dims = (int(config["joint_attention_dim"]), int(config["pooled_projection_dim"]))
        if dims == RELEASED_TEXT_DIMS:
            # The prior's built-in zero text embeddings fit: skip the text encoders (T5-XXL alone is ~9 GB).
            encoders = {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}
            base = FluxPipeline.from_pretrained(
                str(base_path), dtype=torch_dtype, local_files_only=True, **encoders
            )
            prior = FluxPriorReduxPipeline.from_pretrained(
                str(redux_path), dtype=torch_dtype, local_files_only=True
            )
            text_dims = None
        else:
            # Other text widths (small test models): the prior hard-codes 4096/768 zeros without text
            # encoders, so hand it the base's encoders and pass zero embeddings of the right width.
            base = FluxPipeline.from_pretrained(str(base_path), dtype=torch_dtype, local_files_only=True)
            prior = FluxPriorReduxPipeline.from_pretrained(
                str(redux_path),
                dtype=torch_dtype,
                local_files_only=True,
                text_encoder=base.text_encoder,
                tokenizer=base.tokenizer,
                text_encoder_2=base.text_encoder_2,
                tokenizer_2=base.tokenizer_2,
            )
            text_dims = dims
        device = resolve_device(device)
        for pipe in (prior, base):
            pipe.set_progress_bar_config(disable=True)
        return cls(prior.to(device), base.to(device), steps, guidance, size, text_dims)

    def vary(self, image: ImageLike, seed: int = 0) -> np.ndarray:
        import torch

        kwargs: dict[str, Any] = {}
        if self.text_dims is not None:
            dtype = self.base.transformer.dtype
            device = self.base._execution_device
            kwargs["prompt_embeds"] = torch.zeros((1, T5_TOKENS, self.text_dims[0]), dtype=dtype, device=device)
            kwargs["pooled_prompt_embeds"] = torch.zeros((1, self.text_dims[1]), dtype=dtype, device=device)
        prior_out = self.prior(image=to_pil(image), **kwargs)
        result = self.base(
            prompt_embeds=prior_out.prompt_embeds,
            pooled_prompt_embeds=prior_out.pooled_prompt_embeds,
            height=self.size,
            width=self.size,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            generator=_generator(seed),
        ).images[0]
        return np.asarray(result.convert("RGB"))
