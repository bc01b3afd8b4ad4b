"""Pure-PyTorch references for the Triton kernels, float64 by default.

They reuse the model's own reference math (`kaleido.model.attention`, `kaleido.model.rope`), which
computes in the inputs' precision promoted to at least fp32: casting the inputs to float64 first
gives the float64 ground truth the kernel tests compare against. Gradients flow through the casts,
so `torch.autograd.grad` on these gives float64 reference gradients for fp32 leaves.
"""

from __future__ import annotations

import math

import torch

from kaleido.model.attention import reference_attention, reference_norm_rope


def norm_rope_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    heads: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """RMSNorm over the full dim then (optionally) interleaved RoPE, all in `dtype`: [B, L, dim] -> [B, L, H, D]."""
    cos = cos.to(dtype) if cos is not None else None
    sin = sin.to(dtype) if sin is not None else None
    return reference_norm_rope(x.to(dtype), weight.to(dtype), eps, heads, cos, sin)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """softmax(q k^T * scale) v in `dtype`; [B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D]."""
    q = q.to(dtype)
    if softmax_scale is not None:
        # reference_attention divides by sqrt(D); pre-scaling q gives any other scale.
        q = q * (softmax_scale * math.sqrt(q.shape[-1]))
    return reference_attention(q, k.to(dtype), v.to(dtype))
