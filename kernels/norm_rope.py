"""Fused RMSNorm + 3D RoPE for the DiT's Q and K, forward and backward, in one Triton pass each way.

Forward, per token row x [dim = heads * head_dim]:
    n = x * rsqrt(mean(x^2) + eps) * weight          (Wan's norm_q / norm_k: over the FULL dim)
    y[2i], y[2i+1] = n[2i] c - n[2i+1] s, n[2i] s + n[2i+1] c   per head, c/s = cos/sin[token, i]
Backward: un-rotate dy (the rotation is orthogonal: the transpose uses -s), then the RMSNorm
gradient dx = rstd * (g - xhat * mean(g * xhat)) with g = dn * weight, xhat = x * rstd, and the
weight gradient sum_rows(dn * xhat), reduced without atomics (one fp32 partial row per program).
All math in fp32; storage bf16 / fp16 / fp32; rotation optional (cross-attention is norm only).

This is where the DiT's rotary embedding is applied (not in the attention kernel): see
`kernels.flash_attention` for the reasoning.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import check_last_dim_contiguous, interpreting, program_budget

# Mode the @triton.jit decorators below were applied in (see kernels._common.interpreting).
INTERPRETED: bool = interpreting()


@triton.jit
def _norm_rope_fwd_kernel(
    X, W, COS, SIN, Y,
    n_rows, seq_len, blocks_per_prog, stride_x, stride_y, stride_c, eps,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    ROTATE: tl.constexpr,
):
    # One tile = BLOCK_R token rows x all heads x head_dim; each program walks a contiguous chunk of
    # row tiles (persistent launch), so the weight is loaded once per program.
    pid = tl.program_id(0)
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_r = tl.arange(0, BLOCK_R)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_c = (offs_h[:, None] * HEAD_DIM + offs_d[None, :])[None, :, :]  # [1, BLOCK_H, HEAD_DIM]
    head_ok = (offs_h < HEADS)[None, :, None]
    w = tl.load(W + offs_c, mask=head_ok, other=0.0).to(tl.float32)
    offs_pair = tl.arange(0, HALF)
    inv_dim = 1.0 / (HEADS * HEAD_DIM)
    for i in range(blocks_per_prog):
        rows = (pid * blocks_per_prog + i) * BLOCK_R + offs_r
        row_ok = rows < n_rows
        mask = head_ok & row_ok[:, None, None]
        rows64 = rows.to(tl.int64)[:, None, None]
        x = tl.load(X + rows64 * stride_x + offs_c, mask=mask, other=0.0).to(tl.float32)
        # Reductions go through one flat axis: each tl.sum is a call the interpreter pays dearly for.
        sq = tl.sum(tl.reshape(x * x, (BLOCK_R, BLOCK_H * HEAD_DIM)), axis=1)
        rstd = tl.rsqrt(sq * inv_dim + eps)[:, None, None]
        n = x * rstd * w
        if ROTATE:
            pos = (rows % seq_len)[:, None]  # rows are [batch, token]; the table is per token
            c = tl.load(COS + pos * stride_c + offs_pair[None, :], mask=row_ok[:, None], other=1.0)[:, None, :]
            s = tl.load(SIN + pos * stride_c + offs_pair[None, :], mask=row_ok[:, None], other=0.0)[:, None, :]
            even, odd = tl.split(tl.reshape(n, (BLOCK_R, BLOCK_H, HALF, 2)))
            # join + reshape re-interleaves the pairs (tl.interleave is the same, via a slower call)
            n = tl.reshape(tl.join(even * c - odd * s, even * s + odd * c), (BLOCK_R, BLOCK_H, HEAD_DIM))
        tl.store(Y + rows64 * stride_y + offs_c, n.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_bwd_kernel(
    X, W, COS, SIN, DY, DX, DW_PARTIAL,
    n_rows, seq_len, blocks_per_prog, stride_x, stride_dy, stride_dx, stride_c, eps,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    ROTATE: tl.constexpr,
):
    pid = tl.program_id(0)
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_r = tl.arange(0, BLOCK_R)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_c = (offs_h[:, None] * HEAD_DIM + offs_d[None, :])[None, :, :]
    head_ok = (offs_h < HEADS)[None, :, None]
    w = tl.load(W + offs_c, mask=head_ok, other=0.0).to(tl.float32)
    offs_pair = tl.arange(0, HALF)
    inv_dim = 1.0 / (HEADS * HEAD_DIM)
    dw = tl.zeros([BLOCK_R, BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for i in range(blocks_per_prog):
        rows = (pid * blocks_per_prog + i) * BLOCK_R + offs_r
        row_ok = rows < n_rows
        mask = head_ok & row_ok[:, None, None]
        rows64 = rows.to(tl.int64)[:, None, None]
        x = tl.load(X + rows64 * stride_x + offs_c, mask=mask, other=0.0).to(tl.float32)
        sq = tl.sum(tl.reshape(x * x, (BLOCK_R, BLOCK_H * HEAD_DIM)), axis=1)
        rstd = tl.rsqrt(sq * inv_dim + eps)[:, None, None]
        xhat = x * rstd
        dn = tl.load(DY + rows64 * stride_dy + offs_c, mask=mask, other=0.0).to(tl.float32)
        if ROTATE:
            pos = (rows % seq_len)[:, None]
            c = tl.load(COS + pos * stride_c + offs_pair[None, :], mask=row_ok[:, None], other=1.0)[:, None, :]
            s = tl.load(SIN + pos * stride_c + offs_pair[None, :], mask=row_ok[:, None], other=0.0)[:, None, :]
            even, odd = tl.split(tl.reshape(dn, (BLOCK_R, BLOCK_H, HALF, 2)))
            # transpose of the rotation = rotation by -angle
            dn = tl.reshape(tl.join(even * c + odd * s, odd * c - even * s), (BLOCK_R, BLOCK_H, HEAD_DIM))
        dw += dn * xhat  # masked rows load zeros and add nothing
        g = dn * w
        proj = tl.sum(tl.reshape(g * xhat, (BLOCK_R, BLOCK_H * HEAD_DIM)), axis=1) * inv_dim
        dx = rstd * (g - xhat * proj[:, None, None])
        tl.store(DX + rows64 * stride_dx + offs_c, dx.to(DX.dtype.element_ty), mask=mask)
    # One fp32 partial per program, summed on the host: deterministic, no atomics.
    dw_rows = tl.sum(dw, axis=0)[None, :, :]
    tl.store(DW_PARTIAL + pid.to(tl.int64) * (HEADS * HEAD_DIM) + offs_c, dw_rows, mask=head_ok)


def _launch_shape(n_rows: int, heads: int, head_dim: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(programs, row tiles per program, BLOCK_H, BLOCK_R, num_warps) for a persistent launch."""
    block_h = triton.next_power_of_2(heads)
    row_elems = block_h * head_dim
    # GPU: ~4K elements per tile keeps it in registers (~16-32 fp32 values per thread); the
    # interpreter runs numpy on whole tiles, so larger tiles mean fewer Python-level steps.
    budget = 4096 if device.type == "cuda" else 32768
    block_r = min(max(1, budget // row_elems), triton.next_power_of_2(n_rows))
    n_tiles = triton.cdiv(n_rows, block_r)
    programs = max(1, min(n_tiles, program_budget(device)))
    tiles_per_prog = triton.cdiv(n_tiles, programs)
    num_warps = max(1, min(16, block_r * row_elems // 1024))
    return triton.cdiv(n_tiles, tiles_per_prog), tiles_per_prog, block_h, block_r, num_warps


def _check(x: torch.Tensor, weight: torch.Tensor, heads: int, cos: torch.Tensor | None) -> int:
    dim = x.shape[-1]
    if dim % heads:
        raise ValueError(f"dim {dim} is not divisible by heads {heads}")
    if weight.shape != (dim,):
        raise ValueError(f"weight must have shape ({dim},), got {tuple(weight.shape)}")
    head_dim = dim // heads
    if cos is not None and cos.shape != (x.shape[-2], head_dim // 2):
        raise ValueError(f"cos/sin must have shape ({x.shape[-2]}, {head_dim // 2}), got {tuple(cos.shape)}")
    return head_dim


def _table(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    # The rotation table is fp32 by contract; a missing one is a 1-element dummy the kernel never reads.
    if t is None:
        return torch.empty(1, device=x.device, dtype=torch.float32)
    return t.to(device=x.device, dtype=torch.float32).contiguous()


def norm_rope_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    heads: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., L, dim], optional rotation; returns [..., L, heads, head_dim]."""
    head_dim = _check(x, weight, heads, cos)
    seq_len, dim = x.shape[-2], x.shape[-1]
    x2 = check_last_dim_contiguous(x.reshape(-1, dim))
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    n_rows = x2.shape[0]
    if n_rows:
        programs, tiles_per_prog, block_h, block_r, num_warps = _launch_shape(n_rows, heads, head_dim, x.device)
        _norm_rope_fwd_kernel[(programs,)](
            x2, weight.contiguous(), _table(cos, x), _table(sin, x), y,
            n_rows, seq_len, tiles_per_prog, x2.stride(0), y.stride(0), head_dim // 2, eps,
            HEADS=heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_R=block_r, ROTATE=cos is not None,
            num_warps=num_warps,
        )
    return y.view(*x.shape[:-1], heads, head_dim)


def norm_rope_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    heads: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx like x, dweight like weight) of `norm_rope_forward` given dy [..., L, heads, head_dim]."""
    head_dim = _check(x, weight, heads, cos)
    seq_len, dim = x.shape[-2], x.shape[-1]
    x2 = check_last_dim_contiguous(x.reshape(-1, dim))
    dy2 = check_last_dim_contiguous(dy.reshape(-1, dim))
    dx = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    n_rows = x2.shape[0]
    if not n_rows:
        return dx.view(x.shape), torch.zeros_like(weight)
    programs, tiles_per_prog, block_h, block_r, num_warps = _launch_shape(n_rows, heads, head_dim, x.device)
    partial = torch.empty(programs, dim, device=x.device, dtype=torch.float32)
    _norm_rope_bwd_kernel[(programs,)](
        x2, weight.contiguous(), _table(cos, x), _table(sin, x), dy2, dx, partial,
        n_rows, seq_len, tiles_per_prog, x2.stride(0), dy2.stride(0), dx.stride(0), head_dim // 2, eps,
        HEADS=heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_R=block_r, ROTATE=cos is not None,
        num_warps=num_warps,
    )
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)


class NormRopeFunction(torch.autograd.Function):
    """Autograd wrapper: gradients for x and weight; the rotation table is a constant."""

    @staticmethod
    def forward(ctx, x, weight, eps, heads, cos, sin):  # type: ignore[override]
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.eps, ctx.heads = eps, heads
        return norm_rope_forward(x, weight, eps, heads, cos, sin)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, cos, sin = ctx.saved_tensors
        dx, dw = norm_rope_backward(dy, x, weight, ctx.eps, ctx.heads, cos, sin)
        return dx, dw, None, None, None, None


def fused_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    heads: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable fused RMSNorm (+ RoPE when cos/sin are given): [B, L, dim] -> [B, L, heads, head_dim]."""
    if (cos is None) != (sin is None):
        raise ValueError("pass both cos and sin, or neither")
    return NormRopeFunction.apply(x, weight, eps, heads, cos, sin)
