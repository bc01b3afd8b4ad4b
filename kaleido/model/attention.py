"""One attention entry point with a backend switch.

A backend supplies two operations the DiT needs:
  norm_rope(x, weight, eps, heads, cos, sin): RMSNorm over the full dim (Wan's norm_q / norm_k),
      split into heads, then (optionally) the rotary rotation. [B, L, dim] -> [B, L, H, D]
  attention(q, k, v): non-causal softmax attention. [B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D]
Backends: `reference` (plain PyTorch math, float64 capable), `sdpa` (torch's fused kernels) and
whatever registers later (`kernels` registers `triton`). The model never branches on the name.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kaleido.model.rope import apply_rope


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    norm_rope: Callable[..., torch.Tensor]
    attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


_BACKENDS: dict[str, AttentionBackend] = {}
# Backends that live outside the library and register themselves on import.
_LAZY_BACKENDS: dict[str, str] = {"triton": "kernels.backend"}


def register_attention_backend(backend: AttentionBackend) -> None:
    _BACKENDS[backend.name] = backend


def get_attention_backend(name: str) -> AttentionBackend:
    """The backend registered under `name`; lazily imports out-of-library ones."""
    if name not in _BACKENDS and name in _LAZY_BACKENDS:
        try:
            __import__(_LAZY_BACKENDS[name])
        except ImportError as exc:  # the kernel package is optional at run time
            warnings.warn(f"attention backend {name!r} unavailable ({exc}); using 'sdpa'", stacklevel=2)
            return _BACKENDS["sdpa"]
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; registered: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Wan's RMSNorm: statistics in fp32 (or float64), result back in x's dtype, times weight."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    normed = xc * torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def reference_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    heads: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    x = rms_norm(x, weight, eps).unflatten(-1, (heads, -1))  # [B, L, H, D]
    if cos is not None:
        x = apply_rope(x, cos, sin)
    return x


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in the inputs' precision promoted to at least fp32."""
    compute = torch.promote_types(q.dtype, torch.float32)
    qc, kc, vc = (t.to(compute).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    scores = qc @ kc.transpose(-1, -2) / math.sqrt(q.shape[-1])
    out = torch.softmax(scores, dim=-1) @ vc
    return out.transpose(1, 2).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


register_attention_backend(AttentionBackend("reference", reference_norm_rope, reference_attention))
register_attention_backend(AttentionBackend("sdpa", reference_norm_rope, sdpa_attention))
