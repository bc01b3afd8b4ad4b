"""Benchmark the fused Triton path against the Wan-style and PyTorch SDPA paths.

    python -m kernels.bench [--seqlens 4096 16384 32760 75600] [--heads 12 40] [--json PATH]
    python -m kernels.bench --smoke [--json PATH]     # tiny shape, CPU, Triton interpreter

Paths, all with batch 1, head_dim 128, bf16 storage:
  (a) fused:  Triton RMSNorm+RoPE kernel for Q and K, then Triton flash attention.
  (b) wan:    RMSNorm in torch, RoPE in float64 complex math as Wan2.1 does it, then torch SDPA.
  (c) sdpa_*: RMSNorm + fp32 RoPE in torch, then torch SDPA pinned to one backend (flash, cuDNN).
Measured: attention forward, attention backward, end to end forward (norm + RoPE + attention of
Q and K) and end to end forward + backward. TFLOP/s count attention FLOPs only: forward
4*B*H*N^2*D, backward 2.5x that (the norm/RoPE work is negligible next to it). Ratios are speedups of
(a) over each other path (> 1: the fused path is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

EPS = 1e-6
HEAD_DIM = 128
DEFAULT_SEQLENS = (4096, 16384, 32760, 75600)
DEFAULT_HEADS = (12, 40)
# Latent grids (frames, height, width) of the real resolutions, for realistic rotary tables.
KNOWN_GRIDS = {32760: (21, 30, 52), 75600: (21, 45, 80), 16384: (16, 32, 32), 4096: (4, 32, 32)}


def _grid(n: int) -> tuple[int, int, int]:
    return KNOWN_GRIDS.get(n, (1, 1, n))


def _attention_flops(batch: int, heads: int, n: int, head_dim: int, kind: str) -> float:
    forward = 4.0 * batch * heads * n * n * head_dim
    return {"fwd": forward, "bwd": 2.5 * forward, "e2e_fwd": forward, "e2e_fwd_bwd": 3.5 * forward}[kind]


def _wan_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Wan2.1 WanRMSNorm: statistics in fp32, back to the input dtype, then the weight.
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + EPS)).type_as(x) * weight


def _wan_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    # Wan2.1 rope_apply: interleaved pairs as complex128 times the complex128 table, result in fp32.
    pairs = torch.view_as_complex(x.to(torch.float64).unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(-2).float()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _paths(heads: int, dtype: torch.dtype, smoke: bool) -> dict[str, dict[str, Any]]:
    """name -> {"attention": fn(q, k, v), "e2e": fn(xq, xk, v, wq, wk, tables), "sdpa_backend": ...}."""
    from torch.nn.attention import SDPBackend

    from kaleido.model.attention import rms_norm
    from kaleido.model.rope import apply_rope
    from kernels.flash_attention import flash_attention
    from kernels.norm_rope import fused_norm_rope

    def fused_e2e(xq, xk, v, wq, wk, t):
        q = fused_norm_rope(xq, wq, EPS, heads, t["cos"], t["sin"])
        k = fused_norm_rope(xk, wk, EPS, heads, t["cos"], t["sin"])
        return flash_attention(q, k, v)

    def wan_e2e(xq, xk, v, wq, wk, t):
        q = _wan_rope(_wan_rms_norm(xq, wq).unflatten(-1, (heads, -1)), t["freqs"])
        k = _wan_rope(_wan_rms_norm(xk, wk).unflatten(-1, (heads, -1)), t["freqs"])
        return _sdpa(q.to(dtype), k.to(dtype), v)

    def torch_e2e(xq, xk, v, wq, wk, t):
        q = apply_rope(rms_norm(xq, wq, EPS).unflatten(-1, (heads, -1)), t["cos"], t["sin"])
        k = apply_rope(rms_norm(xk, wk, EPS).unflatten(-1, (heads, -1)), t["cos"], t["sin"])
        return _sdpa(q, k, v)

    paths: dict[str, dict[str, Any]] = {
        "fused": {"attention": flash_attention, "e2e": fused_e2e, "sdpa_backend": None},
        # Wan runs flash-attn; torch's default SDPA dispatch picks its flash / cuDNN kernels.
        "wan": {"attention": _sdpa, "e2e": wan_e2e, "sdpa_backend": None},
        "sdpa_flash": {"attention": _sdpa, "e2e": torch_e2e, "sdpa_backend": SDPBackend.FLASH_ATTENTION},
        "sdpa_cudnn": {"attention": _sdpa, "e2e": torch_e2e, "sdpa_backend": SDPBackend.CUDNN_ATTENTION},
    }
    if smoke:
        paths["sdpa_math"] = {"attention": _sdpa, "e2e": torch_e2e, "sdpa_backend": SDPBackend.MATH}
    return paths


def _timer(smoke: bool, rep: int) -> Callable[..., float]:
    if smoke:
        # No GPU: one untimed and one timed call (the interpreter only proves the code path runs).
        def wall_ms(fn: Callable[[], Any], grad_to_none: list[torch.Tensor] | None = None) -> float:
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        return wall_ms

    import triton.testing

    def gpu_ms(fn: Callable[[], Any], grad_to_none: list[torch.Tensor] | None = None) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none)

    return gpu_ms


def _measure(path: dict[str, Any], inputs: dict[str, Any], timer: Callable[..., float]) -> dict[str, float]:
    from torch.nn.attention import sdpa_kernel

    q, k, v, dout = inputs["q"], inputs["k"], inputs["v"], inputs["dout"]
    xq, xk, ve, wq, wk, tables = inputs["xq"], inputs["xk"], inputs["ve"], inputs["wq"], inputs["wk"], inputs["tables"]
    attention, e2e = path["attention"], path["e2e"]

    def run() -> dict[str, float]:
        times: dict[str, float] = {}
        with torch.no_grad():
            times["fwd"] = timer(lambda: attention(q, k, v))
        out = attention(q, k, v)
        times["bwd"] = timer(lambda: out.backward(dout, retain_graph=True), grad_to_none=[q, k, v])
        with torch.no_grad():
            times["e2e_fwd"] = timer(lambda: e2e(xq, xk, ve, wq, wk, tables))

        def fwd_bwd() -> None:
            e2e(xq, xk, ve, wq, wk, tables).backward(dout)

        times["e2e_fwd_bwd"] = timer(fwd_bwd, grad_to_none=[xq, xk, ve, wq, wk])
        return times

    if path["sdpa_backend"] is None:
        return run()
    with sdpa_kernel([path["sdpa_backend"]]):
        return run()


def _inputs(n: int, heads: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    from kaleido.model.rope import reference_positions, rope_table

    gen = torch.Generator(device=device).manual_seed(0)
    dim = heads * HEAD_DIM

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_()

    positions = reference_positions(_grid(n), []).to(device)
    cos, sin = rope_table(positions, HEAD_DIM)
    cos64, sin64 = rope_table(positions, HEAD_DIM, dtype=torch.float64)
    return {
        "q": randn(1, n, heads, HEAD_DIM), "k": randn(1, n, heads, HEAD_DIM), "v": randn(1, n, heads, HEAD_DIM),
        "dout": torch.randn(1, n, heads, HEAD_DIM, generator=gen, device=device).to(dtype),
        "xq": randn(1, n, dim), "xk": randn(1, n, dim), "ve": randn(1, n, heads, HEAD_DIM),
        "wq": (1 + randn(dim, scale=0.1)).detach().requires_grad_(),
        "wk": (1 + randn(dim, scale=0.1)).detach().requires_grad_(),
        "tables": {"cos": cos, "sin": sin, "freqs": torch.complex(cos64, sin64)},
    }


def run_benchmark(
    seqlens: tuple[int, ...], heads_list: tuple[int, ...], dtype: torch.dtype, device: torch.device, smoke: bool,
    rep_for: Callable[[int], int] = lambda n: 100 if n <= 16384 else 1000,
) -> list[dict[str, Any]]:
    """One record per (seq, heads, path): ms and TFLOP/s per measurement, plus speedups of `fused`."""
    records: list[dict[str, Any]] = []
    for n in seqlens:
        for heads in heads_list:
            inputs = _inputs(n, heads, dtype, device)
            timer = _timer(smoke, rep_for(n))
            paths = _paths(heads, dtype, smoke)
            results: dict[str, dict[str, Any]] = {}
            # Sanity before timing: the fused path must compute what Wan's path computes.
            with torch.no_grad():
                args = (inputs["xq"], inputs["xk"], inputs["ve"], inputs["wq"], inputs["wk"], inputs["tables"])
                max_diff = (paths["fused"]["e2e"](*args).float() - paths["wan"]["e2e"](*args).float()).abs().max()
            for name, path in paths.items():
                record: dict[str, Any] = {"seq": n, "heads": heads, "head_dim": HEAD_DIM, "batch": 1,
                                          "dtype": str(dtype).removeprefix("torch."), "path": name}
                try:
                    times = _measure(path, inputs, timer)
                except (RuntimeError, torch.OutOfMemoryError) as exc:  # backend missing here, or OOM
                    record["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    records.append(record)
                    print(f"seq {n:>6} heads {heads:>2} {name:<11} unavailable: {record['error']}")
                    continue
                for kind, ms in times.items():
                    record[f"{kind}_ms"] = ms
                    record[f"{kind}_tflops"] = _attention_flops(1, heads, n, HEAD_DIM, kind) / (ms * 1e-3) / 1e12
                if name == "fused":
                    record["e2e_max_abs_diff_vs_wan"] = max_diff.item()
                results[name] = record
                records.append(record)
            fused = results.get("fused")
            for name, record in results.items():
                if fused is None or name == "fused":
                    continue
                for kind in ("fwd", "bwd", "e2e_fwd", "e2e_fwd_bwd"):
                    fused[f"speedup_{kind}_vs_{name}"] = record[f"{kind}_ms"] / fused[f"{kind}_ms"]
            for record in results.values():
                print(_format(record))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records


def _format(record: dict[str, Any]) -> str:
    parts = [f"seq {record['seq']:>6} heads {record['heads']:>2} {record['path']:<11}"]
    for kind in ("fwd", "bwd", "e2e_fwd", "e2e_fwd_bwd"):
        parts.append(f"{kind} {record[f'{kind}_ms']:9.3f} ms {record[f'{kind}_tflops']:7.1f} TF/s")
    speedups = [f"{key.removeprefix('speedup_')}={value:.2f}x" for key, value in record.items()
                if key.startswith("speedup_")]
    line = " | ".join(parts)
    return line + ("\n    fused speedup: " + " ".join(speedups) if speedups else "")


def _single_thread_blas() -> None:
    # The interpreter runs tl.dot as many tiny numpy matmuls; a multi-threaded BLAS on a busy
    # machine makes each one ~100x slower than a single thread does.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1, user_api="blas")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=list(DEFAULT_SEQLENS))
    parser.add_argument("--heads", type=int, nargs="+", default=list(DEFAULT_HEADS))
    parser.add_argument("--json", type=Path, default=None, help="write the records here as JSON")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape on CPU under the Triton interpreter: checks the code path, times nothing real")
    args = parser.parse_args(argv)

    if args.smoke:
        # Triton 3.8 decides interpreter vs compiled when the kernel modules are imported (below).
        os.environ["TRITON_INTERPRET"] = "1"
        seqlens, heads_list = (80,), (2,)
        dtype, device = torch.float32, torch.device("cpu")  # bf16 tl.dot is wrong under the interpreter
        _single_thread_blas()
    else:
        if not torch.cuda.is_available():
            print("kernels.bench: no CUDA GPU is visible, and the benchmark times GPU kernels. Run it on a GPU "
                  "machine, or use --smoke to check the code path on CPU.", file=sys.stderr)
            return 2
        seqlens, heads_list = tuple(args.seqlens), tuple(args.heads)
        dtype, device = torch.bfloat16, torch.device("cuda")

    records = run_benchmark(seqlens, heads_list, dtype, device, smoke=args.smoke)
    if args.json is not None:
        meta = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
            "torch": torch.__version__,
            "smoke": args.smoke,
            "flops": "attention only: fwd 4*B*H*N^2*D, bwd 2.5x, fwd+bwd 3.5x",
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "records": records}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
