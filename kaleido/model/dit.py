"""The Wan2.1 diffusion transformer with Kaleido's reference injection.

Parameter names equal the original Wan2.1 checkpoints (`wan/modules/model.py`), so loading is strict.
References (one latent frame each, never noised) are patch-embedded with the video's patch embedding
and placed FIRST in the sequence: X = [I_1 .. I_n, z]. They share the timestep modulation and the
text cross-attention; their positions come from R-RoPE; the head drops their tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kaleido.model.attention import AttentionBackend, get_attention_backend
from kaleido.model.rope import Grid, sequence_rope


@dataclass(frozen=True)
class DiTConfig:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


DIT_CONFIGS: dict[str, DiTConfig] = {
    # tiny: for tests and the embedded default; text_dim matches the tiny UMT5 (kaleido.model.tiny).
    "tiny": DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, freq_dim=32),
    # mid: a mid-size config for CPU benchmarks (head_dim 128 like the real ones).
    "mid": DiTConfig(dim=512, ffn_dim=1536, num_heads=4, num_layers=4, text_dim=512),
    "1.3B": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14B": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def dit_config(name: str, **overrides) -> DiTConfig:
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT config {name!r}; known: {', '.join(DIT_CONFIGS)}")
    return replace(DIT_CONFIGS[name], **overrides)


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] -> [B, dim] in fp32: cos first, then sin, frequencies 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class WanRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], backend: AttentionBackend
    ) -> torch.Tensor:
        # x: [B, L, dim]; rope: cos/sin [L, head_dim / 2]
        cos, sin = rope
        q = backend.norm_rope(self.q(x), self.norm_q.weight, self.eps, self.num_heads, cos, sin)
        k = backend.norm_rope(self.k(x), self.norm_k.weight, self.eps, self.num_heads, cos, sin)
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        out = backend.attention(q, k, v)  # [B, L, H, D]
        return self.o(out.flatten(2))


class WanCrossAttention(WanSelfAttention):
    def forward(self, x: torch.Tensor, context: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        # x: [B, L, dim], context: [B, L_text, dim]; no rotary positions for text.
        q = backend.norm_rope(self.q(x), self.norm_q.weight, self.eps, self.num_heads)
        k = backend.norm_rope(self.k(context), self.norm_k.weight, self.eps, self.num_heads)
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        return self.o(backend.attention(q, k, v).flatten(2))


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = WanLayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        # shift/scale/gate for attention, then for the FFN
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        time_mod: torch.Tensor,
        context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        backend: AttentionBackend,
    ) -> torch.Tensor:
        # x: [B, L, dim]; time_mod: [B, 6, dim] fp32; context: [B, L_text, dim]
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (self.modulation.float() + time_mod).chunk(6, dim=1)
        h = (self.norm1(x).float() * (1 + scale_a) + shift_a).type_as(x)
        x = (x.float() + self.self_attn(h, rope, backend).float() * gate_a).type_as(x)
        x = x + self.cross_attn(self.norm3(x), context, backend)
        h = (self.norm2(x).float() * (1 + scale_f) + shift_f).type_as(x)
        return (x.float() + self.ffn(h).float() * gate_f).type_as(x)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        # time_emb: [B, dim] fp32, the embedding BEFORE the 6-way projection
        shift, scale = (self.modulation.float() + time_emb[:, None, :]).chunk(2, dim=1)
        return self.head((self.norm(x).float() * (1 + scale) + shift).type_as(x))


class KaleidoDiT(nn.Module):
    """Wan2.1 T2V DiT that also takes reference-image latents (Kaleido S2V)."""

    def __init__(
        self,
        cfg: DiTConfig,
        attention_backend: str = "sdpa",
        rope_variant: str = "shift_wh",
        rope_offset: int = 80,
    ):
        super().__init__()
        self.cfg = cfg
        self.rope_variant = rope_variant
        self.rope_offset = rope_offset
        self.backend = get_attention_backend(attention_backend)
        self.gradient_checkpointing = False
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)

    def set_attention_backend(self, name: str) -> None:
        self.backend = get_attention_backend(name)

    def _embed(self, latents: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """[B, C, F, H, W] -> tokens [B, F*H*W / prod(patch), dim] and the patch grid."""
        x = self.patch_embedding(latents)
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        reference_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity of the video latents.

        latents: [B, C, F, H, W] noisy video latents; timestep: [B] in [0, 1000];
        context: [B, L_text, text_dim] (zero-padded text embeddings);
        reference_latents: [B, n, C, h, w] clean reference latents (one frame each) or None.
        Returns [B, C_out, F, H, W]: video tokens only.
        """
        batch, _, frames, height, width = latents.shape
        pt, ph, pw = self.cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"latent size {(frames, height, width)} is not divisible by patch {self.cfg.patch_size}")
        video_tokens, video_grid = self._embed(latents)
        ref_grids: list[Grid] = []
        tokens = [video_tokens]
        if reference_latents is not None and reference_latents.shape[1] > 0:
            # each reference alone: [B*n, C, 1, h, w] through the shared patch embedding
            n = reference_latents.shape[1]
            ref_tokens, ref_grid = self._embed(reference_latents.flatten(0, 1).unsqueeze(2))
            ref_grids = [ref_grid] * n
            tokens = [ref_tokens.unflatten(0, (batch, n)).flatten(1, 2), video_tokens]
        x = torch.cat(tokens, dim=1)
        rope = sequence_rope(
            video_grid, ref_grids, self.rope_variant, self.rope_offset, self.cfg.head_dim,
            device=x.device, theta=self.cfg.rope_theta,
        )

        # time embedding and projection in their weights' dtype; modulation applied in fp32
        time_dtype = self.time_embedding[0].weight.dtype
        time_emb = self.time_embedding(sinusoidal_embedding(timestep, self.cfg.freq_dim).to(time_dtype)).float()
        time_mod = self.time_projection(time_emb.to(time_dtype)).unflatten(1, (6, self.cfg.dim)).float()
        context = self.text_embedding(context.to(x.dtype))

        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, time_mod, context, rope, self.backend, use_reentrant=False)
            else:
                x = block(x, time_mod, context, rope, self.backend)

        num_video = video_tokens.shape[1]
        x = self.head(x[:, -num_video:], time_emb)  # drop reference tokens
        return self._unpatchify(x, video_grid)

    def _unpatchify(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """[B, f*h*w, pt*ph*pw*C] -> [B, C, f*pt, h*ph, w*pw]."""
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, self.cfg.out_dim)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], self.cfg.out_dim, f * pt, h * ph, w * pw)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
