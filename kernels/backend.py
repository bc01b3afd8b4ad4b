"""The `triton` attention backend of the DiT (`model.attention_backend: triton` in params.yaml).

Importing this module registers it (`kaleido.model.attention` imports it lazily when the backend
is first requested). Where the kernels cannot run, each call falls back to the PyTorch path the
`sdpa` backend uses (reference RMSNorm + RoPE, torch SDPA) and a one-line warning is issued once per
reason: triton not importable, CPU tensors without the Triton interpreter (TRITON_INTERPRET=1 must
be set before the kernels are imported: Triton 3.8 reads it when kernels are decorated), or a
dtype / head size the kernels do not cover.
"""

from __future__ import annotations

import warnings

import torch

from kaleido.model.attention import (
    AttentionBackend,
    reference_norm_rope,
    register_attention_backend,
    sdpa_attention,
)

try:
    from kernels import flash_attention as _flash
    from kernels import norm_rope as _norm
    from kernels._common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, interpreting

    _IMPORT_ERROR: str | None = None
except (ImportError, OSError, RuntimeError) as exc:  # no triton, or a triton that cannot load its runtime
    _IMPORT_ERROR = f"triton is not usable ({type(exc).__name__}: {exc})".replace("\n", " ")

_WARNED: set[str] = set()


def unavailable_reason(tensors: tuple[torch.Tensor, ...], head_dim: int) -> str | None:
    """Why the Triton kernels cannot run on these tensors, or None when they can."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    interpret = interpreting()
    if {_flash.INTERPRETED, _norm.INTERPRETED} != {interpret}:
        # The interpreter is chosen when kernels are decorated and consulted again at launch.
        return "TRITON_INTERPRET changed after the kernels were imported"
    for t in tensors:
        if t.device.type == "cpu" and not interpret:
            return "tensors are on CPU and TRITON_INTERPRET=1 is not set (Triton needs a GPU otherwise)"
        if t.device.type not in ("cuda", "cpu"):
            return f"device type {t.device.type!r} is not supported"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype} is not supported (bf16, fp16, fp32)"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} is not supported ({', '.join(map(str, SUPPORTED_HEAD_DIMS))})"
    return None


def _warn_fallback(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"triton attention backend unavailable: {reason}; using PyTorch sdpa/reference math",
                      RuntimeWarning, stacklevel=3)


def norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    heads: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Backend op: fused RMSNorm over the full dim (+ RoPE when cos/sin are given). [B, L, dim] -> [B, L, H, D]."""
    reason = unavailable_reason((x,), x.shape[-1] // heads)
    if reason is not None:
        _warn_fallback(reason)
        return reference_norm_rope(x, weight, eps, heads, cos, sin)
    return _norm.fused_norm_rope(x, weight, eps, heads, cos, sin)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Backend op: non-causal flash attention. [B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D]."""
    reason = unavailable_reason((q, k, v), q.shape[-1])
    if reason is not None:
        _warn_fallback(reason)
        return sdpa_attention(q, k, v)
    # The kernel wants one storage dtype; mixed inputs (e.g. an fp32 norm weight upcasting only
    # some of them elsewhere) follow the query's.
    k, v = k.to(q.dtype), v.to(q.dtype)
    return _flash.flash_attention(q, k, v)


TRITON_BACKEND = AttentionBackend("triton", norm_rope, attention)
register_attention_backend(TRITON_BACKEND)
