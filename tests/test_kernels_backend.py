"""The `triton` backend's wiring around the kernels: the CPU fallback and its one-line warning, the
Hugging Face `kernels` name clash, side-effect-free `import kernels`, and the benchmark script.

Everything that depends on TRITON_INTERPRET being unset runs in a subprocess with a clean
environment (tests/test_kernels.py sets it for the whole session)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(code_or_args: str | list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    clean.update(OPENBLAS_NUM_THREADS="1", **env)  # interpreter matmuls: see tests/test_kernels.py
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=REPO, env=clean, capture_output=True, text=True,
                          timeout=timeout, check=False)


FALLBACK = """
import json, warnings, torch
from kaleido.config.schema import load_params
from kaleido.model.dit import KaleidoDiT, dit_config
params = load_params("params.yaml", overrides={"model.attention_backend": "triton"})
cfg = dit_config(params.model.arch)
torch.manual_seed(0)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")  # our own once-guard must be what limits it to one
    model = KaleidoDiT(cfg, attention_backend=params.model.attention_backend)
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 16, 2, 4, 6, generator=gen), torch.tensor([500.0]),
            torch.randn(1, 5, cfg.text_dim, generator=gen), torch.randn(1, 1, 16, 4, 6, generator=gen))
    out = model(*args)
    out.square().mean().backward()
    out_again = model(*args)
model.set_attention_backend("sdpa")
expected = model(*args)
print(json.dumps({
    "backend": params.model.attention_backend,
    "messages": [str(w.message) for w in caught if "triton" in str(w.message)],
    "max_diff_vs_sdpa": (out - expected).abs().max().item(),
}))
"""


def test_cpu_without_interpreter_falls_back_with_one_line_warning():
    result = _run(FALLBACK)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == "triton"
    assert len(report["messages"]) == 1, report["messages"]  # once, over 2 forwards + 1 backward
    message = report["messages"][0]
    assert "\n" not in message and "TRITON_INTERPRET" in message and "CPU" in message
    assert report["max_diff_vs_sdpa"] == 0.0  # the fallback is exactly the sdpa backend's math


NO_TRITON = """
import json, sys, warnings
sys.modules["triton"] = None  # as if triton were not installed: `import triton` raises ImportError
import torch
from kaleido.model.attention import get_attention_backend
backend = get_attention_backend("triton")
q = torch.randn(1, 4, 2, 32)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = backend.attention(backend.norm_rope(q.flatten(2), torch.ones(64), 1e-6, 2), q, q)
print(json.dumps({"name": backend.name, "messages": [str(w.message) for w in caught], "shape": list(out.shape)}))
"""


def test_missing_triton_still_registers_the_backend_and_falls_back():
    result = _run(NO_TRITON)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["name"] == "triton" and report["shape"] == [1, 4, 2, 32]
    assert len(report["messages"]) == 1 and "triton is not usable" in report["messages"][0]


def test_hugging_face_kernels_probes_stay_false():
    # Our top-level `kernels` package is importable (the name Hugging Face's kernel hub also uses):
    # transformers and diffusers must not mistake it for theirs.
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    assert spec is not None and Path(spec.origin).resolve().parent == REPO / "kernels"

    from diffusers.utils.import_utils import is_kernels_available as diffusers_probe
    from transformers.utils.import_utils import is_kernels_available

    assert is_kernels_available() is False
    assert diffusers_probe() is False


def test_import_kernels_has_no_side_effects():
    result = _run("import sys, kernels; print(sorted(m for m in sys.modules "
                  "if m.split('.')[0] in ('kernels', 'torch', 'triton', 'kaleido')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['kernels']"


def test_bench_without_gpu_exits_with_a_clear_message():
    result = _run(["-m", "kernels.bench"], CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2
    assert "no CUDA GPU" in result.stderr and "--smoke" in result.stderr


def test_bench_smoke_runs_every_path_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = _run(["-m", "kernels.bench", "--smoke", "--json", str(out)], CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["smoke"] is True
    records = {r["path"]: r for r in data["records"]}
    assert {"fused", "wan", "sdpa_flash", "sdpa_cudnn"} <= set(records)
    fused = records["fused"]
    for kind in ("fwd", "bwd", "e2e_fwd", "e2e_fwd_bwd"):
        assert fused[f"{kind}_ms"] > 0 and fused[f"{kind}_tflops"] > 0
        assert f"speedup_{kind}_vs_wan" in fused
    # fp32 on CPU: the fused path and Wan's float64-RoPE path agree to fp32 rounding
    assert fused["e2e_max_abs_diff_vs_wan"] < 1e-4
    assert "error" in records["sdpa_cudnn"]  # no cuDNN on CPU: reported, not fatal


GPU_CHECK = """
import json, os, torch
from kaleido.model.attention import reference_norm_rope, sdpa_attention
from kaleido.model.rope import reference_positions, rope_table
from kernels.flash_attention import flash_attention
from kernels.norm_rope import fused_norm_rope
from kernels.reference import attention_reference, norm_rope_reference
device, dtype = os.environ["CHECK_DEVICE"], getattr(torch, os.environ["CHECK_DTYPE"])
shapes = json.loads(os.environ["CHECK_SHAPES"])
gen = torch.Generator(device=device).manual_seed(0)
def randn(*shape):
    return torch.randn(*shape, generator=gen, device=device).to(dtype).requires_grad_()
report = []
for b, lq, lk, h, d in shapes:
    q, k, v = randn(b, lq, h, d), randn(b, lk, h, d), randn(b, lk, h, d)
    out = flash_attention(q, k, v)
    dout = torch.randn(out.shape, generator=gen, device=device).to(dtype)
    ours = (out, *torch.autograd.grad(out, (q, k, v), dout))
    low_out = sdpa_attention(q, k, v)  # torch's own kernels at the same storage precision
    low = (low_out, *torch.autograd.grad(low_out, (q, k, v), dout))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out = attention_reference(*ref_in)
    ref = (ref_out, *torch.autograd.grad(ref_out, ref_in, dout.double()))
    for name, a, lo, r in zip(("out", "dq", "dk", "dv"), ours, low, ref):
        report.append([f"attention {name} {(b, lq, lk, h, d)}", (a.double() - r).abs().max().item(),
                       (lo.double() - r).abs().max().item(), r.abs().max().item()])
    cos, sin = rope_table(reference_positions((1, 1, lq), []).to(device), d)
    x, w = randn(b, lq, h * d), randn(h * d)
    y = fused_norm_rope(x, w, 1e-6, h, cos, sin)
    y_low = reference_norm_rope(x, w, 1e-6, h, cos, sin)
    y_ref = norm_rope_reference(x, w, 1e-6, h, cos, sin)
    report.append([f"norm_rope {(b, lq, h, d)}", (y.double() - y_ref).abs().max().item(),
                   (y_low.double() - y_ref).abs().max().item(), y_ref.abs().max().item()])
print(json.dumps(report))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a CUDA GPU")
def test_compiled_kernels_on_gpu_in_bf16():
    # FlashAttention-3's rule: our bf16 error against float64 is at most twice that of torch's own
    # bf16 path (SDPA; the reference RMSNorm+RoPE) plus a bf16-ulp-sized noise floor.
    shapes = [[1, 1000, 1000, 4, 128], [2, 333, 77, 3, 64], [1, 4133, 4133, 2, 128]]
    result = _run(GPU_CHECK, CHECK_DEVICE="cuda", CHECK_DTYPE="bfloat16", CHECK_SHAPES=json.dumps(shapes))
    assert result.returncode == 0, result.stderr
    for name, err, low_err, magnitude in json.loads(result.stdout.strip().splitlines()[-1]):
        assert err <= 2 * low_err + torch.finfo(torch.bfloat16).eps / 2 * magnitude, (name, err, low_err)
