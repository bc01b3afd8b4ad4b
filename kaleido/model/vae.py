"""The Wan2.1 video VAE (diffusers `AutoencoderKLWan`) with Wan's per-channel latent normalisation.

Latents the DiT sees are normalised: z = (mu - latents_mean) / latents_std, with the posterior MEAN
(not a sample) so encoding is deterministic. References are encoded one image at a time as a single
latent frame, after the shipped fit-and-white-pad to the video size.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from kaleido.model.media import reference_pixels

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

# Pixel sizes: the VAE downsamples 8x spatially, the DiT patchifies 2x on top; time 4x with a causal first frame.
TEMPORAL_STRIDE = 4
SPATIAL_MULTIPLE = 16


def _nearest_valid_frames(frames: int) -> str:
    low = max(1, (frames - 1) // TEMPORAL_STRIDE * TEMPORAL_STRIDE + 1)
    high = low + TEMPORAL_STRIDE
    return f"{low} or {high}" if low != frames else str(frames)


def validate_video_size(frames: int, height: int, width: int) -> None:
    """ValueError naming the bad value and the nearest valid ones: frames 4k+1, height/width multiples of 16."""
    if frames < 1 or (frames - 1) % TEMPORAL_STRIDE != 0:
        raise ValueError(
            f"frames={frames}: the Wan VAE needs 4k+1 frames (1, 5, 9, ..., 81); "
            f"use e.g. {_nearest_valid_frames(max(frames, 1))}"
        )
    for name, value in (("height", height), ("width", width)):
        if value < SPATIAL_MULTIPLE or value % SPATIAL_MULTIPLE != 0:
            low = max(SPATIAL_MULTIPLE, value // SPATIAL_MULTIPLE * SPATIAL_MULTIPLE)
            raise ValueError(
                f"{name}={value}: must be a positive multiple of {SPATIAL_MULTIPLE} "
                f"(VAE stride 8 x DiT patch 2); use e.g. {low} or {low + SPATIAL_MULTIPLE}"
            )


class WanVAE:
    """Encode/decode videos and reference images with normalised Wan latents."""

    def __init__(self, model: AutoencoderKLWan, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        # cast only when needed: diffusers warns on any `.to(dtype=...)` of this model
        if model.dtype != dtype:
            model = model.to(dtype=dtype)
        self.model = model.to(device=device).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        config = model.config
        self.z_dim = int(config.z_dim)
        shape = (1, self.z_dim, 1, 1, 1)
        self.latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(shape).to(self.device)
        self.latents_std = torch.tensor(config.latents_std, dtype=torch.float32).view(shape).to(self.device)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> WanVAE:
        from diffusers import AutoencoderKLWan

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"VAE folder {path}: no config.json (expected a diffusers AutoencoderKLWan folder)")
        from kaleido.model.checkpoint import check_weight_files

        check_weight_files(path)  # diffusers' own error on a truncated file names no file
        model = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
        return cls(model, device=device, dtype=dtype)

    def to_device(self, device: str | torch.device) -> WanVAE:
        """Move the VAE (weights and latent statistics) to `device` (generate.release_encoders parks it on the CPU)."""
        self.device = torch.device(device)
        self.model.to(self.device)
        self.latents_mean = self.latents_mean.to(self.device)
        self.latents_std = self.latents_std.to(self.device)
        return self

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[C, F, H, W] of the latents of a (frames, height, width) video."""
        return (self.z_dim, (frames - 1) // TEMPORAL_STRIDE + 1, height // 8, width // 8)

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] (uint8 0..255 or float in [-1, 1]) -> normalised latents [B, 16, (T-1)/4+1, H/8, W/8]."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got shape {tuple(video.shape)}")
        validate_video_size(video.shape[2], video.shape[3], video.shape[4])
        if video.dtype == torch.uint8:
            video = video.float() / 127.5 - 1.0
        video = video.to(device=self.device, dtype=self.dtype)
        mu = self.model.encode(video).latent_dist.mode()  # the mean: deterministic
        return (mu.float() - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latents [B, 16, F, h, w] -> video [B, 3, 4(F-1)+1, 8h, 8w] in [-1, 1] (float32).

        clamp=False returns the decoder's raw values (to check them for NaN/Inf before clamping hides them).
        """
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"latents must be [B, {self.z_dim}, F, h, w], got shape {tuple(latents.shape)}")
        mu = latents.float().to(self.device) * self.latents_std + self.latents_mean
        video = self.model.decode(mu.to(self.dtype)).sample.float()
        return video.clamp(-1.0, 1.0) if clamp else video

    def preprocess_reference(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """Fit + white-pad to the video size -> [3, height, width] in [-1, 1] (`media.reference_pixels`)."""
        return reference_pixels(image, height, width)

    @torch.no_grad()
    def encode_reference(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """One reference image -> ONE normalised latent frame [16, 1, height/8, width/8]."""
        validate_video_size(1, height, width)
        pixels = self.preprocess_reference(image, height, width)
        return self.encode_video(pixels[None, :, None])[0]  # encoded alone: T = 1

    def encode_references(self, images: list[Image.Image], height: int, width: int) -> torch.Tensor:
        """n reference images -> [n, 16, height/8, width/8] (each encoded on its own)."""
        if not images:
            return torch.zeros(0, self.z_dim, height // 8, width // 8, device=self.device)
        return torch.stack([self.encode_reference(image, height, width)[:, 0] for image in images])
