"""The Triton kernels (fused RMSNorm+RoPE, flash attention) against float64 references, on CPU under
the Triton interpreter, and the whole tiny DiT with the `triton` backend against the `reference` one.

Triton 3.8 reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when the kernel module
is imported, and its interpreter also consults it at launch: so it is set here before the kernel
modules are imported and left set for the session (nothing else in the suite uses Triton). A kernel
module some earlier import built for the GPU is re-imported in interpreter mode.

Tolerances: first-order forward error bounds in fp32 (Higham, "Accuracy and Stability of Numerical
Algorithms", ch. 3). A sum or dot product of n terms computed in fp32, in any order, is off by at
most gamma_n * sum|terms|, gamma_n ~ n*u, u = 2^-24 (fp32 unit roundoff); a single operation (exp2,
rsqrt, a product, the final division) adds at most a few u relative. Each bound below propagates
these through the kernel's formulas using float64 magnitudes of the true intermediate terms, so it
grows with head_dim and with the sequence lengths; `C_OPS` u covers the few single roundings.
Low-precision storage adds one rounding of the output: at most eps(dtype) * |value| (a full ulp:
the interpreter converts fp32 to bf16 by truncation, a GPU rounds to nearest, half of that).
"""

from __future__ import annotations

import importlib
import math
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

import kernels.flash_attention
import kernels.norm_rope

for _module in (kernels.flash_attention, kernels.norm_rope):
    if not _module.INTERPRETED:
        importlib.reload(_module)

from kaleido.model.dit import KaleidoDiT, dit_config  # noqa: E402
from kaleido.model.rope import ROPE_VARIANTS, reference_positions, rope_table  # noqa: E402
from kernels.backend import TRITON_BACKEND, attention, norm_rope, unavailable_reason  # noqa: E402
from kernels.flash_attention import flash_attention  # noqa: E402
from kernels.norm_rope import fused_norm_rope  # noqa: E402
from kernels.reference import attention_reference, norm_rope_reference  # noqa: E402

U = 2.0**-24  # fp32 unit roundoff
C_OPS = 8  # single roundings per output element along the longest path (exp2, rsqrt, scale, divide, ...)
EPS = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _single_thread_blas():
    """The interpreter runs tl.dot as small numpy matmuls; on a busy 2-core machine a multi-threaded
    BLAS makes each ~100x slower (measured 15 ms vs 0.02 ms for 64x64x128), so pin it to one thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _assert_within(name: str, actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    err = (actual.double() - expected).abs()
    worst = (err - bound).max().item()
    ratio = (err / bound.clamp_min(1e-300)).max().item()
    assert worst <= 0, f"{name}: error exceeds its bound by {worst:.3g} (max error/bound {ratio:.3g})"


def _storage_rounding(dtype: torch.dtype, expected: torch.Tensor) -> torch.Tensor:
    return torch.finfo(dtype).eps * expected.abs() if dtype != torch.float32 else torch.zeros_like(expected)


# ----------------------------------------------------------------------------------------------
# Fused RMSNorm + RoPE


def _rotate_abs(a_even: torch.Tensor, a_odd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """|rotation| bound: (|a_e||c| + |a_o||s|, |a_e||s| + |a_o||c|), interleaved."""
    c, s = cos.abs(), sin.abs()
    return torch.stack([a_even * c + a_odd * s, a_even * s + a_odd * c], dim=-1).flatten(-2)


def _norm_rope_abs(x, w, heads, cos, sin):
    """Magnitudes of the norm+RoPE terms (float64): |y| terms, and a map from a nonnegative output
    gradient (or gradient error) e to the magnitudes of the dx and dweight terms it produces:
    dn = |R|^T e, g = dn |w|, dx ~ rstd (g + |xhat| mean(g |xhat|)), dweight ~ sum_rows dn |xhat|.
    Applied to an error e, this is also the first-order bound of how e propagates into dx, dweight."""
    x, w = x.detach().double(), w.detach().double()
    dim = x.shape[-1]
    head_dim = dim // heads
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)[..., None]  # [B, L, 1, 1]
    xhat = (x.unflatten(-1, (heads, head_dim)) * rstd).abs()
    w_abs = w.abs().view(heads, head_dim)
    c = s = None
    if cos is not None:
        c, s = cos.double()[None, :, None, :], sin.double()[None, :, None, :]

    def rotate(a):  # |R| a; |R|^T has the same form
        return a if c is None else _rotate_abs(a[..., 0::2], a[..., 1::2], c, s)

    def backward(e):
        dn = rotate(e.detach().double())
        g = dn * w_abs
        proj = (g * xhat).flatten(-2).mean(-1)[..., None, None]
        return (rstd * (g + xhat * proj)).flatten(-2), (dn * xhat).sum((0, 1)).flatten()

    return rotate(xhat * w_abs), backward


def _norm_rope_bounds(x, w, dy, heads, cos, sin):
    """Elementwise error bounds for y, dx and dweight (see the module docstring).

    mean(x^2) sums `dim` positive terms: relative error dim*u, so rstd and n = x*rstd*w carry
    (dim/2 + C_OPS) u relative; the rotation adds 2u on |rotated| terms. Backward: proj = mean(g*xhat)
    is another dim-term sum, dx = rstd*(g - xhat*proj) inherits (dim + C_OPS) u on |g| + |xhat||proj|
    terms; dweight sums B*L rows of dn*xhat: (rows + dim + C_OPS) u on sum|dn*xhat|.
    """
    dim = x.shape[-1]
    rows = x.shape[0] * x.shape[1]
    y_mag, backward = _norm_rope_abs(x, w, heads, cos, sin)
    dx_mag, dw_mag = backward(dy.abs())
    return (dim / 2 + C_OPS) * U * y_mag, (dim + C_OPS) * U * dx_mag, (rows + dim + C_OPS) * U * dw_mag


def _positions(variant: str, video_grid=(3, 4, 5), ref_grids=((1, 3, 5), (1, 1, 2))) -> torch.Tensor:
    """References + video positions (60 + 15 + 2 = 77 tokens by default: an odd length)."""
    return reference_positions(video_grid, list(ref_grids), variant)


def _check_norm_rope(x, w, heads, cos, sin, dtype=torch.float32):
    x, w = _leaf(x.to(dtype)), _leaf(w.to(dtype))
    y = fused_norm_rope(x, w, EPS, heads, cos, sin)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = _leaf(x.double()), _leaf(w.double())
    y64 = norm_rope_reference(x64, w64, EPS, heads, cos, sin)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    y_b, dx_b, dw_b = _norm_rope_bounds(x, w, dy, heads, cos, sin)
    assert y.dtype == dx.dtype == dtype and y.shape == (*x.shape[:-1], heads, x.shape[-1] // heads)
    _assert_within("y", y, y64, y_b + _storage_rounding(dtype, y64))
    _assert_within("dx", dx, dx64, dx_b + _storage_rounding(dtype, dx64))
    _assert_within("dweight", dw, dw64, dw_b + _storage_rounding(dtype, dw64))


@pytest.mark.parametrize("variant", ROPE_VARIANTS)
def test_norm_rope_every_rrope_variant(variant):
    heads, head_dim = 3, 64
    cos, sin = rope_table(_positions(variant), head_dim)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, cos.shape[0], heads * head_dim, generator=gen) * 3
    w = 1 + 0.3 * torch.randn(heads * head_dim, generator=gen)
    _check_norm_rope(x, w, heads, cos, sin)


@pytest.mark.parametrize(
    ("batch", "heads", "head_dim", "rotate", "dtype"),
    [
        (1, 12, 128, True, torch.float32),  # 1.3B-like heads, head_dim 128, 300 tokens
        (2, 5, 64, False, torch.float32),  # cross-attention: norm only, non-power-of-two heads
        (1, 2, 32, True, torch.float16),
        (1, 2, 32, True, torch.bfloat16),
        (2, 3, 16, False, torch.bfloat16),
    ],
)
def test_norm_rope_shapes_and_dtypes(batch, heads, head_dim, rotate, dtype):
    cos, sin = rope_table(_positions("shift_wh", video_grid=(4, 7, 10), ref_grids=((1, 4, 5),)), head_dim)
    seq = cos.shape[0]  # 280 + 20 = 300
    gen = torch.Generator().manual_seed(head_dim)
    x = torch.randn(batch, seq, heads * head_dim, generator=gen)
    w = torch.randn(heads * head_dim, generator=gen)
    _check_norm_rope(x, w, heads, cos if rotate else None, sin if rotate else None, dtype)


def test_norm_rope_rejects_bad_shapes():
    x, w = torch.randn(1, 5, 64), torch.ones(64)
    with pytest.raises(ValueError, match="divisible"):
        fused_norm_rope(x, w, EPS, 3)
    with pytest.raises(ValueError, match="cos/sin"):
        fused_norm_rope(x, w, EPS, 2, torch.ones(4, 16), torch.zeros(4, 16))
    with pytest.raises(ValueError, match="both"):
        fused_norm_rope(x, w, EPS, 2, torch.ones(5, 16))


# ----------------------------------------------------------------------------------------------
# Flash attention


def _attention_bounds(q, k, v, dout, scale, q_err=None, k_err=None):
    """Elementwise first-order error bounds for out, dq, dk, dv (float64 magnitudes).

    Scores: a D-term dot, |ds_ij| <= (D + C_OPS) u scale sum_d |q_id k_jd| (plus
    scale (q_err |k| + |q| k_err) when q and k themselves carry errors); a score error perturbs
    p_ij by at most p_ij * (|ds_ij| + max_j |ds_ij|) <= 2 p_ij sigma_i (sigma_i = max_j |ds_ij|; the
    logsumexp carries the same error). out = P V sums Lk terms: |dout_i| <= (2 sigma_i + (Lk + C_OPS) u) (P|V|)_i.
    dV = P^T dO sums Lq terms; dP = dO V^T and delta = rowsum(dO O) are D-term dots; dS = P (dP - delta);
    dQ = scale dS K (Lk terms), dK = scale dS^T Q (Lq terms). With fp16/bf16 storage the kernel also
    rounds P and dS to that dtype before their tl.dot: eps(dtype) relative on those terms.
    Returns (out, dq, dk, dv) bounds, and dq/dk propagate q_err/k_err through dS.
    """
    u_op = torch.finfo(q.dtype).eps if q.dtype != torch.float32 else 0.0
    q, k, v, dout = (t.detach().double().transpose(1, 2) for t in (q, k, v, dout))  # [B, H, L, D]
    lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    out = p @ v
    score_err = (d + C_OPS) * U * scale * (q.abs() @ k.abs().transpose(-1, -2))
    if q_err is not None:
        q_err, k_err = (t.detach().double().transpose(1, 2) for t in (q_err, k_err))
        score_err = score_err + scale * (q_err @ k.abs().transpose(-1, -2) + q.abs() @ k_err.transpose(-1, -2))
    sigma = score_err.amax(-1, keepdim=True)
    p_err = 2 * p * sigma
    out_b = (2 * sigma + (lk + C_OPS) * U + u_op) * (p @ v.abs())
    dp = dout @ v.transpose(-1, -2)
    delta = (dout * out).sum(-1, keepdim=True)
    dp_err = (d + C_OPS) * U * (dout.abs() @ v.abs().transpose(-1, -2))
    delta_err = (d + C_OPS) * U * (dout.abs() * out.abs()).sum(-1, keepdim=True) + (dout.abs() * out_b).sum(
        -1, keepdim=True
    )
    ds = p * (dp - delta)
    ds_err = p_err * (dp - delta).abs() + p * (dp_err + delta_err) + C_OPS * U * ds.abs()
    dv_b = p_err.transpose(-1, -2) @ dout.abs() + ((lq + C_OPS) * U + u_op) * (p.transpose(-1, -2) @ dout.abs())
    dq_b = scale * (ds_err @ k.abs() + ((lk + C_OPS) * U + u_op) * (ds.abs() @ k.abs()))
    dk_b = scale * (ds_err.transpose(-1, -2) @ q.abs()
                    + ((lq + C_OPS) * U + u_op) * (ds.abs().transpose(-1, -2) @ q.abs()))
    if q_err is not None:  # dQ = scale dS K uses the erroneous K (and dK the erroneous Q)
        dq_b = dq_b + scale * (ds.abs() @ k_err)
        dk_b = dk_b + scale * (ds.abs().transpose(-1, -2) @ q_err)
    return tuple(t.transpose(1, 2) for t in (out_b, dq_b, dk_b, dv_b))


def _check_attention(q, k, v, softmax_scale=None, seed=0):
    q, k, v = (_leaf(t) for t in (q, k, v))
    dtype = q.dtype
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(q.shape[-1])
    out = flash_attention(q, k, v, softmax_scale)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_inputs = [_leaf(t.double()) for t in (q, k, v)]
    out64 = attention_reference(*ref_inputs, softmax_scale=softmax_scale)
    grads64 = torch.autograd.grad(out64, ref_inputs, dout.double())
    bounds = _attention_bounds(q, k, v, dout, scale)
    assert out.shape == q.shape and out.dtype == dtype
    for name, got, want, bound in zip(("out", "dq", "dk", "dv"), (out, *grads), (out64, *grads64), bounds,
                                      strict=True):
        _assert_within(name, got, want, bound + _storage_rounding(dtype, want))


def _qkv(batch, lq, lk, heads, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, lq, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, lk, heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, lk, heads, head_dim, generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize(
    ("batch", "lq", "lk", "heads", "head_dim"),
    [
        (1, 77, 77, 2, 64),  # odd length: one full 64-tile + a 13-row tail
        (1, 300, 300, 2, 128),
        (2, 130, 77, 3, 128),  # Lq != Lk (cross-attention to a 77-token text)
        (1, 45, 300, 4, 64),  # Lk > Lq, many key tiles
        (2, 5, 3, 2, 32),  # shorter than one tile in both directions
        (1, 64, 128, 1, 16),  # exact multiples of the tile: no tail at all
    ],
)
def test_flash_attention_matches_float64(batch, lq, lk, heads, head_dim):
    _check_attention(*_qkv(batch, lq, lk, heads, head_dim))


def test_flash_attention_fp16_storage():
    # bf16 tl.dot is wrong under the interpreter (it has no bf16 matmul); fp16 runs through numpy.
    _check_attention(*_qkv(1, 100, 70, 2, 64, dtype=torch.float16))


def test_flash_attention_custom_scale_and_strided_inputs():
    qkv = torch.randn(1, 50, 3, 2, 64, generator=torch.Generator().manual_seed(3))  # fused-projection layout
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    _check_attention(q, k, v, softmax_scale=0.3)


def test_flash_attention_rejects_mismatched_inputs():
    q = torch.randn(1, 4, 2, 32)
    with pytest.raises(ValueError, match="incompatible"):
        flash_attention(q, torch.randn(1, 4, 3, 32), torch.randn(1, 4, 3, 32))
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, q.half(), q.half())


# ----------------------------------------------------------------------------------------------
# Fused path: norm + RoPE for q and k, then attention, with every R-RoPE table


@pytest.mark.parametrize("variant", ROPE_VARIANTS)
def test_fused_path_every_rrope_variant(variant):
    heads, head_dim = 2, 64
    cos, sin = rope_table(_positions(variant), head_dim)
    gen = torch.Generator().manual_seed(7)
    seq = cos.shape[0]
    xq, xk = (_leaf(torch.randn(1, seq, heads * head_dim, generator=gen)) for _ in range(2))
    v = _leaf(torch.randn(1, seq, heads, head_dim, generator=gen))
    wq, wk = (_leaf(1 + 0.2 * torch.randn(heads * head_dim, generator=gen)) for _ in range(2))
    out = attention(norm_rope(xq, wq, EPS, heads, cos, sin), norm_rope(xk, wk, EPS, heads, cos, sin), v)
    leaves = (xq, xk, v, wq, wk)
    dout = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, leaves, dout)

    ref_leaves = [_leaf(t.double()) for t in leaves]
    rxq, rxk, rv, rwq, rwk = ref_leaves
    q64 = norm_rope_reference(rxq, rwq, EPS, heads, cos, sin)
    k64 = norm_rope_reference(rxk, rwk, EPS, heads, cos, sin)
    out64 = attention_reference(q64, k64, rv)
    grads64 = torch.autograd.grad(out64, [*ref_leaves, q64, k64], dout.double())
    dq64, dk64 = grads64[-2:]

    # Composite first-order bound: the norm pass's q/k errors enter the attention bound as input
    # errors; the attention's dq/dk errors then propagate through the norm backward (same |J|^T map
    # as its own rounding terms), which adds its own rounding on the exact dq/dk.
    dim, rows = heads * head_dim, seq
    q_mag, q_back = _norm_rope_abs(xq, wq, heads, cos, sin)
    k_mag, k_back = _norm_rope_abs(xk, wk, heads, cos, sin)
    q_err, k_err = ((dim / 2 + C_OPS) * U * m for m in (q_mag, k_mag))
    out_b, dq_b, dk_b, dv_b = _attention_bounds(q64, k64, rv, dout, 1 / math.sqrt(head_dim), q_err, k_err)
    bounds = {"out": out_b, "dv": dv_b}
    for name, back, exact, err in (("q", q_back, dq64, dq_b), ("k", k_back, dk64, dk_b)):
        dx_own, dw_own = back(exact.abs())
        dx_in, dw_in = back(err)
        bounds[f"dx{name}"] = (dim + C_OPS) * U * dx_own + dx_in
        bounds[f"dw{name}"] = (rows + dim + C_OPS) * U * dw_own + dw_in
    _assert_within("out", out, out64, bounds["out"])
    for name, got, want in zip(("dxq", "dxk", "dv", "dwq", "dwk"), grads, grads64, strict=False):
        _assert_within(name, got, want, bounds[name])


# ----------------------------------------------------------------------------------------------
# Backend wiring and the whole DiT


def test_backend_is_registered_and_runs_the_kernels_here(monkeypatch):
    from kaleido.model.attention import get_attention_backend

    assert get_attention_backend("triton") is TRITON_BACKEND
    q = torch.randn(1, 8, 2, 32)
    assert unavailable_reason((q,), 32) is None  # CPU + interpreter: the kernels run
    assert "head_dim" in unavailable_reason((q,), 48)
    assert "dtype" in unavailable_reason((q.double(),), 32)
    # Interpreter-built kernels cannot launch once the variable is gone (Triton checks it again).
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "changed" in unavailable_reason((q,), 32)


def _dit_inputs(cfg, gen):
    latents = torch.randn(1, cfg.in_dim, 3, 6, 10, generator=gen)  # 3*3*5 = 45 video tokens
    references = torch.randn(1, 2, cfg.in_dim, 6, 10, generator=gen)  # + 2*15 reference tokens = 75
    context = torch.randn(1, 7, cfg.text_dim, generator=gen)  # cross-attention Lk = 7
    timestep = torch.tensor([437.0])
    target = torch.randn(1, cfg.out_dim, 3, 6, 10, generator=gen)
    return latents, timestep, context, references, target


def _train_step(model, inputs, lr):
    latents, timestep, context, references, target = inputs
    model.zero_grad()
    out = model(latents, timestep, context, references)
    loss = (out - target).pow(2).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad  # plain SGD: the update is linear in the gradient (Adam's first step is sign-like)
    return out.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of a sum of n fp32 terms in ANY order."""
    return n * U / (1 - n * U)


def _record_terms(model: torch.nn.Module) -> tuple[dict[str, tuple[torch.Tensor, int]], list]:
    """Hooks on the float64 reference that record, per parameter, the magnitude of the terms its gradient sums and
    how many there are: a Linear's weight gradient is sum_t dy_t x_t^T over the n tokens t (terms |dy|^T |x|), its
    bias gradient sum_t dy_t (terms sum |dy|); an affine LayerNorm's weight sums dy_t * xhat_t, its bias dy_t. The
    forward output's last reduction (head.head: in_features products and the bias) is recorded as "output"."""
    terms: dict[str, tuple[torch.Tensor, int]] = {}
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.LayerNorm) and getattr(module, "weight", None) is not None:

            def forward(mod, args, out, name=name):
                seen[name] = args[0].detach().abs().reshape(-1, args[0].shape[-1])
                if name == "head.head":
                    terms["output"] = (seen[name] @ mod.weight.detach().abs().T + mod.bias.detach().abs(),
                                       mod.in_features + 1)
                if isinstance(mod, torch.nn.LayerNorm):  # the normalised input, from the output
                    seen[name] = ((out.detach() - mod.bias.detach()) / mod.weight.detach()).abs().reshape(
                        seen[name].shape)

            def backward(mod, grad_in, grad_out, name=name):
                dy = grad_out[0].detach().abs().reshape(-1, grad_out[0].shape[-1])
                x = seen[name]
                terms[f"{name}.weight"] = ((dy.T @ x) if isinstance(mod, torch.nn.Linear) else (dy * x).sum(0),
                                           dy.shape[0])
                if mod.bias is not None:
                    terms[f"{name}.bias"] = (dy.sum(0), dy.shape[0])

            hooks += [module.register_forward_hook(forward), module.register_full_backward_hook(backward)]
    return terms, hooks


def _fa3_rule(name, got, ref32, ref64, noise):
    """FlashAttention-3's acceptance rule, normwise: |got - ref64| <= 2 |ref32 - ref64| + noise (their tests:
    hopper/test_flash_attn.py). ref32 is the plain PyTorch reference in fp32: the error any fp32 implementation of
    the same network has. FA3's own noise term is two roundings of the value at magnitude >= 0.3 (`ref + 0.3 - 0.3 -
    ref`); here the noise is what a reduction in another summation order may add: gamma_n times the sum of the
    magnitudes of the n terms it adds up (_record_terms), which a result near zero (the key bias's gradient, zero up
    to rounding by softmax's shift invariance) does not bound."""
    ref64 = ref64.double()
    err = (got.double() - ref64).abs().max().item()
    budget = 2 * (ref32.double() - ref64).abs().max().item() + noise
    assert err <= budget, f"{name}: {err:.3g} > {budget:.3g}"


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the first layer's input needs no gradient
@pytest.mark.parametrize("variant", ["shift_wh", "time_staggered_neg"])
def test_dit_triton_backend_equals_reference(variant):
    cfg = dit_config("tiny")
    torch.manual_seed(0)
    base = KaleidoDiT(cfg, attention_backend="reference", rope_variant=variant)
    with torch.no_grad():
        for p in base.parameters():  # no zero-init term can hide a wrong gradient
            p.add_(0.05 * torch.randn_like(p))
    state = base.state_dict()
    inputs = _dit_inputs(cfg, torch.Generator().manual_seed(1))
    runs = {}
    lr = 0.1
    for key, backend, dtype in [("triton", "triton", torch.float32), ("ref32", "reference", torch.float32),
                                ("ref64", "reference", torch.float64)]:
        model = KaleidoDiT(cfg, attention_backend=backend, rope_variant=variant).to(dtype)
        model.load_state_dict(state)
        assert model.backend.name == backend
        terms, hooks = _record_terms(model) if key == "ref64" else ({}, [])
        runs[key] = _train_step(model, [t.to(dtype) for t in inputs], lr=lr)
        for hook in hooks:
            hook.remove()
    (out_t, grads_t, new_t), (out_32, grads_32, new_32), (out_64, grads_64, new_64) = (
        runs["triton"], runs["ref32"], runs["ref64"]
    )
    tokens = 3 * 3 * 5 + 2 * 3 * 5  # the longest sequence (_dit_inputs): 45 video + 30 reference tokens

    def noise(name: str, exact: torch.Tensor) -> float:
        # a gradient with no recorded terms (norm weights inside the fused kernels, modulation, the patch
        # embedding) sums over the tokens too; no cancellation known there: its own magnitude bounds the terms
        magnitude, n = terms.get(name, (exact.abs(), tokens))
        return gamma(n) * magnitude.max().item() + C_OPS * U * exact.abs().max().item()

    assert {name for name in grads_64 if name in terms} >= {"blocks.0.cross_attn.k.bias", "head.head.weight"}
    _fa3_rule("output", out_t, out_32, out_64, noise("output", out_64))
    for name in grads_64:
        grad_noise = noise(name, grads_64[name])
        _fa3_rule(f"grad {name}", grads_t[name], grads_32[name], grads_64[name], grad_noise)
        _fa3_rule(f"updated {name}", new_t[name], new_32[name], new_64[name],
                  lr * grad_noise + C_OPS * U * new_64[name].abs().max().item())
