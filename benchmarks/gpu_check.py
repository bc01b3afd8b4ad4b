"""The first thing to run when a GPU machine is lent: every GPU-only check and figure, as one table.

    .venv/bin/python benchmarks/gpu_check.py [--out artifacts/gpu-check]     # or: make gpu-check
    .venv/bin/python benchmarks/gpu_check.py --smoke                          # tiny sizes on CPU (a test runs it)

Steps (each a subprocess with its own time limit, ~6 minutes in all on one H100/H200):
  1. the GPU-only kernel tests (compiled Triton kernels in bf16 against float64 references);
  2. `python -m kernels.bench` at 4,096 / 16,384 / 32,760 tokens, 12 heads (1.3B), head_dim 128;
  3. one 1.3B training step at 480x832x81 + 3 references in bf16, `sdpa` and `triton` backends
     (benchmarks/train_throughput.py: tokens/s, MFU, peak memory);
  4. one 1.3B 480x832x81 generation with 4 steps and 3 references (benchmarks/generate_throughput.py: s/step,
     peak memory).
With --smoke every step runs at tiny size on CPU (the kernel benchmark under the Triton interpreter; the GPU test
is reported as skipped), so the script cannot rot. Raw JSON of every step goes to --out; the table goes to stdout.
Record the figures in docs/benchmarks.md with the machine, date and commit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    json_file: str | None = None


def plan(smoke: bool, out: Path) -> list[Step]:
    py = sys.executable
    if smoke:
        return [
            Step("kernels: GPU-only tests", [], 0),
            Step("kernels.bench (interpreter)",
                 [py, "-m", "kernels.bench", "--smoke", "--json", str(out / "kernels.json")], 600, "kernels.json"),
            Step("train step tiny", [py, "benchmarks/train_throughput.py", "--configs", "tiny", "--backends", "sdpa",
                                     "--steps", "1", "--json", str(out / "train.json")], 600, "train.json"),
            Step("generate tiny", [py, "benchmarks/generate_throughput.py", "--smoke", "--json",
                                   str(out / "generate.json")], 600, "generate.json"),
        ]
    return [
        Step("kernels: GPU-only tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "gpu",
                                         "tests/test_kernels_backend.py"], 120),
        Step("kernels.bench", [py, "-m", "kernels.bench", "--seqlens", "4096", "16384", "32760", "--heads", "12",
                               "--json", str(out / "kernels.json")], 150, "kernels.json"),
        Step("train step 1.3B 480p", [py, "benchmarks/train_throughput.py", "--configs", "1.3B", "--backends", "sdpa",
                                      "triton", "--steps", "3", "--json", str(out / "train.json")], 240, "train.json"),
        Step("generate 1.3B 480p", [py, "benchmarks/generate_throughput.py", "--config", "1.3B", "--steps", "4",
                                    "--json", str(out / "generate.json")], 180, "generate.json"),
    ]


def _figures(step: Step, data: object) -> list[str]:
    """One short line per measurement of a step's JSON."""
    if step.json_file == "kernels.json":
        rows = []
        for r in data["records"]:
            if "error" in r:
                rows.append(f"seq {r['seq']} {r['path']}: unavailable ({r['error'][:60]})")
            else:
                rows.append(f"seq {r['seq']} heads {r['heads']} {r['path']}: fwd {r['fwd_tflops']:.1f} TF/s, "
                            f"bwd {r['bwd_tflops']:.1f} TF/s, e2e fwd+bwd {r['e2e_fwd_bwd_ms']:.2f} ms")
        return rows
    if step.json_file == "train.json":
        return [f"{r['config']} {r['backend']}: {r['tokens_per_s']:.0f} tokens/s, step {r['step_s']:.3f} s, "
                f"MFU {r['mfu']:.1%}, peak {r['peak_memory_gb']:.1f} GB" if "mfu" in r else
                f"{r['config']} {r['backend']}: {r['tokens_per_s']:.0f} tokens/s, step {r['step_s']:.3f} s, "
                f"peak {r['peak_memory_gb']:.2f} GB" for r in data]
    if step.json_file == "generate.json":
        return [f"{data['config']} {data['frames']}x{data['height']}x{data['width']} + {data['references']} refs, "
                f"{data['dtype']}: {data['step_s']:.3f} s/step (CFG), decode {data['decode_s']:.2f} s, "
                f"peak {data['peak_memory_gb']:.2f} GB"]
    return []


def run(smoke: bool, out: Path) -> tuple[list[tuple[str, str, float, list[str]]], bool]:
    """Run every step; (rows of (name, status, seconds, figures), all passed)."""
    out.mkdir(parents=True, exist_ok=True)
    rows, ok = [], True
    for step in plan(smoke, out):
        if not step.command:
            rows.append((step.name, "skipped (no GPU)", 0.0, []))
            continue
        start = time.perf_counter()
        try:
            done = subprocess.run(step.command, cwd=ROOT, capture_output=True, text=True, timeout=step.timeout_s)
            status = "ok" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
            log = done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            status, log = f"FAILED (over {step.timeout_s} s)", f"{exc.stdout or ''}{exc.stderr or ''}"
        seconds = time.perf_counter() - start
        (out / f"{step.name.split(':')[0].replace(' ', '_')}.log").write_text(str(log))
        figures: list[str] = []
        if status == "ok" and step.json_file:
            try:
                figures = _figures(step, json.loads((out / step.json_file).read_text()))
            except (OSError, KeyError, ValueError, TypeError) as exc:
                status = f"FAILED (no figures: {exc})"
        if status != "ok":
            ok = False
            figures = [line for line in str(log).strip().splitlines()[-3:]]
        rows.append((step.name, status, seconds, figures))
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks every step's code path")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "gpu-check")
    args = parser.parse_args(argv)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU is visible; run it on a GPU machine, or use --smoke on CPU", file=sys.stderr)
            return 2
    rows, ok = run(args.smoke, args.out)
    print("step | status | seconds | figures")
    for name, status, seconds, figures in rows:
        print(f"{name} | {status} | {seconds:.0f} | {figures[0] if figures else ''}")
        for line in figures[1:]:
            print(f" | | | {line}")
    print(f"raw JSON and logs: {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
