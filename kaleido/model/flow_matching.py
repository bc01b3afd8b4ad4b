"""Rectified-flow training objective as the shipped Kaleido trains it.

x_t = (1 - s) x0 + s eps, the DiT predicts the velocity eps - x0 at timestep 1000 s.
s ~ logistic-normal(mean, std), then the resolution-dependent shift s' = e^mu / (e^mu + 1/s - 1) with
mu linear in the number of tokens of ONE latent frame (0.5 at 256 tokens, 1.15 at 4096, not clamped):
larger frames are noised harder. The frame count does not enter: at 480x832 (1,560 tokens per latent
frame) mu = 0.7207 and the median sigma is sigmoid(mu) = 0.673 for 81 frames as for 1. This is the
official rule (`zai-org/Kaleido`, sgm/modules/diffusionmodules/loss.py, RFLoss with schedule_shift: True:
image_seq_len = W*H // pw // ph of the video latent, get_lin_function(x1=256, y1=0.5, x2=4096, y2=1.15),
time_shift(mode="normal")). Text is dropped (replaced by the empty-prompt embedding) with probability `text_dropout` so
that classifier-free guidance on text works at sampling. References are never noised; with probability
`reference_dropout` (default 0, as shipped) a micro-batch trains without them (1.0: text-to-video training). The
loss covers video tokens only (the DiT's head already drops reference tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kaleido.config import FlowMatchingConfig


def shift_mu(num_tokens: int, cfg: FlowMatchingConfig) -> float:
    """mu of the time shift, linear in the token count through (base_seq_len, base_shift), (max_seq_len, max_shift).

    num_tokens is the token count of one latent frame (`frame_token_count`). Not clamped, as shipped:
    a frame above max_seq_len tokens extrapolates (720x1280: 3,600 tokens, mu 1.066).
    """
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_seq_len - cfg.base_seq_len)
    return cfg.base_shift + slope * (num_tokens - cfg.base_seq_len)


def time_shift(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """s' = e^mu / (e^mu + (1/s - 1)); s' > s for mu > 0 (more noise)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigma - 1.0))


def sample_sigmas(
    batch: int, num_tokens: int, cfg: FlowMatchingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[batch] noise levels in (0, 1): logistic-normal, then shifted for `num_tokens` tokens per latent frame."""
    normal = torch.randn(batch, generator=generator) * cfg.logit_std + cfg.logit_mean
    return time_shift(torch.sigmoid(normal), shift_mu(num_tokens, cfg))


def frame_token_count(latent_shape: torch.Size | tuple[int, ...], patch_size: tuple[int, int, int]) -> int:
    """Tokens of ONE latent frame as the shipped loss counts them: (H * W) // pw // ph for latents [..., H, W].

    480x832 video -> latents 60x104 -> 1,560; 512x896 -> 1,792; 720x1280 -> 3,600. The official code divides
    the product (not each side) in this order; for the even latent sizes of every supported video they agree.
    """
    height, width = latent_shape[-2:]
    return height * width // patch_size[2] // patch_size[1]


@dataclass
class FlowMatchingBatch:
    latents: torch.Tensor  # [B, C, F, H, W] clean video latents (normalised)
    context: torch.Tensor  # [B, L, text_dim] text embeddings, zero-padded
    null_context: torch.Tensor  # [L, text_dim] or [B, L, text_dim]: the empty prompt's embedding
    reference_latents: torch.Tensor | None = None  # [B, n, C, h, w], clean


def flow_matching_loss(
    model: torch.nn.Module,
    batch: FlowMatchingBatch,
    cfg: FlowMatchingConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean-squared velocity error over the video latents. Returns (loss, diagnostics)."""
    x0 = batch.latents
    bsz = x0.shape[0]
    sigma = sample_sigmas(bsz, frame_token_count(x0.shape, model.cfg.patch_size), cfg, generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device=x0.device, dtype=x0.dtype)
    s = sigma.view(bsz, 1, 1, 1, 1).to(x0.dtype)
    noisy = (1 - s) * x0 + s * noise
    target = noise - x0

    drop = torch.rand(bsz, generator=generator) < cfg.text_dropout
    context = batch.context
    if drop.any():
        null = batch.null_context.expand_as(context).to(context.dtype)
        context = torch.where(drop.view(bsz, 1, 1).to(context.device), null, context)

    references = batch.reference_latents
    # drawn only when enabled: a run without reference dropout keeps the random stream it always had
    if cfg.reference_dropout > 0 and float(torch.rand(1, generator=generator)) < cfg.reference_dropout:
        references = None
    prediction = model(noisy, sigma * 1000.0, context, references)
    loss = F.mse_loss(prediction.float(), target.float())
    return loss, {"sigma": sigma.detach(), "text_dropped": drop}
