"""Non-causal flash attention in Triton: forward with online softmax, backward without atomics.

Layouts follow the DiT: q [B, Lq, H, D], k and v [B, Lk, H, D] (any strides with a unit last
stride), output [B, Lq, H, D]; Lq and Lk are arbitrary and may differ (cross-attention to text).
Storage bf16 / fp16 (fp32 accepted: the interpreter tests use it); tl.dot takes the storage dtype
and accumulates in fp32; softmax statistics are fp32.

Forward: for each BLOCK_M query tile, stream K/V tiles, keep a running max m and sum l in base 2
(log2(e) is folded into the softmax scale so every exponential is one exp2), and save the
logsumexp lse = m + log2(l) per query row. Only the last, partial K tile is masked.
Backward: a preprocessing pass delta = rowsum(dO * O); one kernel per K/V tile that streams the
query tiles and accumulates dK and dV; one kernel per query tile that streams K/V and accumulates
dQ. Each output tile is owned by one program, so there are no atomics and results are deterministic.

Where RoPE is applied: in the fused RMSNorm pass (`kernels.norm_rope`), not here. Wan's qk-norm
normalises over the FULL dim (all heads), so Q and K must be read and written once by a norm pass
anyway; rotating them there adds a few FLOPs per element to a memory-bound kernel and no traffic.
Rotating inside attention would instead (a) re-read cos/sin for every K tile in the inner loop,
i.e. ceil(Lq / BLOCK_M) times per K row (~590 times at 75,600 tokens), adding loads and ALU work
to the loop that must stay tensor-core bound, and (b) force the backward to un-rotate dQ/dK
itself. Rotating Q only in the prologue would still leave K to a pre-pass. So attention stays a
plain kernel on pre-rotated Q/K, and the norm pass's backward un-rotates the gradients.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._common import check_last_dim_contiguous, interpreting

# Mode the @triton.jit decorators below were applied in (see kernels._common.interpreting).
INTERPRETED: bool = interpreting()
LOG2E = 1.4426950408889634

# Block shape the interpreter runs with: one config (no benchmarking: there is no GPU to time on)
# and tiles of 64 so that the tests' odd lengths (77, 300) exercise both full and partial tiles.
INTERPRETER_BLOCK = 64


def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Forward: large query tiles amortise the Q load and
# the softmax bookkeeping; for head_dim 128 the 128x128 tile with 2-3 stages is the usual winner on
# H100, the others cover head_dim 64 and register / shared-memory pressure.
_FWD_CONFIGS = _configs([
    (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
    (64, 128, 4, 3),
])
# dK/dV: a program owns BLOCK_N keys and streams BLOCK_M queries (two accumulators of BLOCK_N x D).
_DKDV_CONFIGS = _configs([(32, 128, 4, 3), (64, 128, 8, 2), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)])
# dQ: a program owns BLOCK_M queries and streams BLOCK_N keys (one accumulator).
_DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)])


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK}, num_warps=4)]
    head_dim = kwargs["HEAD_DIM"]
    # Keep tiles that fit a 128-wide head; for small heads the wide tiles waste registers less.
    kept = [c for c in configs if head_dim <= 64 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]
    return kept or configs[:1]


def _bucket(n: int) -> int:
    # Autotune key: lengths rounded up to a power of two, so 32,760 and 32,768 share one tuning.
    return triton.next_power_of_2(max(n, 16))


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, Lk, qk_scale,
    stride_kl, stride_vl, offs_n, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One K/V tile of the online softmax; MASK_N only for the last, partial tile."""
    if MASK_N:
        valid = (start_n + offs_n) < Lk
        kt = tl.load(k_ptrs + start_n * stride_kl, mask=valid[None, :], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vl, mask=valid[:, None], other=0.0)
    else:
        kt = tl.load(k_ptrs + start_n * stride_kl)
        v = tl.load(v_ptrs + start_n * stride_vl)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # base-2 logits
    if MASK_N:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.autotune(configs=_FWD_CONFIGS, key=["Q_BUCKET", "K_BUCKET", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE,
    qk_scale, Lq, Lk, H,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_ob, stride_ol, stride_oh,
    Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    # K is read transposed ([D, BLOCK_N]) so the score tile is a plain q @ kt.
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kl + offs_d[:, None]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, Lk, qk_scale,
                                  stride_kl, stride_vl, offs_n, False, DOT_PRECISION)
    if n_full < Lk:
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n_full, Lk, qk_scale,
                                  stride_kl, stride_vl, offs_n, True, DOT_PRECISION)
    out = acc / l_i[:, None]
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(
    OUT, DO, DELTA, Lq, H,
    stride_ob, stride_ol, stride_oh, stride_dob, stride_dol, stride_doh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O): the softmax-backward correction term, one fp32 per query row."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, start_m, Lq, qk_scale,
    stride_ql, stride_dol, offs_m, MASK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One query tile's contribution to this program's dK, dV (transposed: rows are keys)."""
    if MASK_M:
        valid = (start_m + offs_m) < Lq
        qt = tl.load(q_ptrs + start_m * stride_ql, mask=valid[None, :], other=0.0)
        do = tl.load(do_ptrs + start_m * stride_dol, mask=valid[:, None], other=0.0)
        # lse = +inf on missing rows makes their probabilities exactly 0: no other mask needed.
        lse = tl.load(lse_ptrs + start_m, mask=valid, other=float("inf"))
        delta = tl.load(delta_ptrs + start_m, mask=valid, other=0.0)
    else:
        qt = tl.load(q_ptrs + start_m * stride_ql)
        do = tl.load(do_ptrs + start_m * stride_dol)
        lse = tl.load(lse_ptrs + start_m)
        delta = tl.load(delta_ptrs + start_m)
    pt = tl.math.exp2(tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale - lse[None, :])  # [N, M]
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=["Q_BUCKET", "K_BUCKET", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    qk_scale, sm_scale, Lq, Lk, H,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_dob, stride_dol, stride_doh,
    stride_dkb, stride_dkl, stride_dkh, stride_dvb, stride_dvl, stride_dvh,
    Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < Lk
    # Missing key rows load as zeros; their dK/dV rows are computed but never stored.
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[None, :] * stride_ql + offs_d[:, None]  # [D, M]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :]
    lse_ptrs = LSE + bh.to(tl.int64) * Lq + offs_m
    delta_ptrs = DELTA + bh.to(tl.int64) * Lq + offs_m
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    m_full = (Lq // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, start_m, Lq, qk_scale,
                            stride_ql, stride_dol, offs_m, False, DOT_PRECISION)
    if m_full < Lq:
        dk, dv = _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, m_full, Lq, qk_scale,
                            stride_ql, stride_dol, offs_m, True, DOT_PRECISION)
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkl + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvl + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _dq_tile(
    dq, q, do, lse, delta, k_ptrs, v_ptrs, start_n, Lk, qk_scale,
    stride_kl, stride_vl, offs_n, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One K/V tile's contribution to this program's dQ."""
    if MASK_N:
        valid = (start_n + offs_n) < Lk
        kt = tl.load(k_ptrs + start_n * stride_kl, mask=valid[None, :], other=0.0)
        vt = tl.load(v_ptrs + start_n * stride_vl, mask=valid[None, :], other=0.0)
    else:
        kt = tl.load(k_ptrs + start_n * stride_kl)
        vt = tl.load(v_ptrs + start_n * stride_vl)
    p = tl.math.exp2(tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale - lse[:, None])  # [M, N]
    if MASK_N:
        # Missing keys load as zeros, so their logit is 0 and exp2(-lse) need not be small.
        p = tl.where(valid[None, :], p, 0.0)
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)


@triton.autotune(configs=_DQ_CONFIGS, key=["Q_BUCKET", "K_BUCKET", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    qk_scale, sm_scale, Lq, Lk, H,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_dob, stride_dol, stride_doh,
    stride_dqb, stride_dql, stride_dqh,
    Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kl + offs_d[:, None]  # [D, N]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[None, :] * stride_vl + offs_d[:, None]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, start_n, Lk, qk_scale,
                      stride_kl, stride_vl, offs_n, False, DOT_PRECISION)
    if n_full < Lk:
        dq = _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, n_full, Lk, qk_scale,
                      stride_kl, stride_vl, offs_n, True, DOT_PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dql + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, L, H, D]")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 storage exists for parity tests: keep its products exact rather than TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Lq, H, D], lse [B, H, Lq] fp32 in base 2 of the scaled logits)."""
    _check(q, k, v)
    q, k, v = (check_last_dim_contiguous(t) for t in (q, k, v))
    batch, lq, heads, head_dim = q.shape
    lk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads, lq, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    if lk == 0:
        raise ValueError("attention over an empty key sequence is undefined")
    grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)
    _fwd_kernel[grid](
        q, k, v, out, lse,
        scale * LOG2E, lq, lk, heads,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        _bucket(lq), _bucket(lk),
        HEAD_DIM=head_dim, DOT_PRECISION=_dot_precision(q.dtype),
    )
    return out, lse


def flash_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `flash_attention_forward` given dout, from the saved output and logsumexp."""
    q, k, v, out, do = (check_last_dim_contiguous(t) for t in (q, k, v, out, do))
    do = do.to(q.dtype)
    batch, lq, heads, head_dim = q.shape
    lk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    pre_block = INTERPRETER_BLOCK if INTERPRETED else 128
    _bwd_preprocess_kernel[(triton.cdiv(lq, pre_block), batch * heads)](
        out, do, delta, lq, heads, *_strides(out), *_strides(do),
        HEAD_DIM=head_dim, BLOCK_M=pre_block,
    )
    common = dict(HEAD_DIM=head_dim, DOT_PRECISION=_dot_precision(q.dtype))
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), batch * heads)](
        q, k, v, do, lse, delta, dk, dv,
        scale * LOG2E, scale, lq, lk, heads,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        _bucket(lq), _bucket(lk), **common,
    )
    _bwd_dq_kernel[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)](
        q, k, v, do, lse, delta, dq,
        scale * LOG2E, scale, lq, lk, heads,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        _bucket(lq), _bucket(lk), **common,
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, the output and the logsumexp; backward recomputes P per tile."""

    @staticmethod
    def forward(ctx, q, k, v, softmax_scale):  # type: ignore[override]
        out, lse = flash_attention_forward(q, k, v, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.softmax_scale = softmax_scale
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse, ctx.softmax_scale)
        return dq, dk, dv, None


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None
) -> torch.Tensor:
    """Differentiable softmax(q k^T * scale) v; [B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D].

    The scale defaults to 1/sqrt(D).
    """
    return FlashAttentionFunction.apply(q, k, v, softmax_scale)
