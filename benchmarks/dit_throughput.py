"""DiT forward+backward throughput (tokens/s): ours vs diffusers' WanTransformer3DModel, same config and weights.

    .venv/bin/python benchmarks/dit_throughput.py [--configs tiny mid] [--backend sdpa] [--threads 2] [--json out.json]

Prints one row per config: video tokens per step, median step time and tokens/s of each implementation,
and the ratio ours/diffusers (goal: >= 1.0 with the sdpa backend). On CPU the threads are fixed
(torch.set_num_threads) so runs are comparable; on a GPU it uses bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from kaleido.model.dit import KaleidoDiT, dit_config
from kaleido.model.reference_impl import diffusers_twin

# (frames, height, width) of the latent video per config: the tiny one is the embedded default's size,
# the mid one a 17-frame 256x256 clip (5 x 32 x 32 latents -> 1280 tokens).
SHAPES = {"tiny": (3, 8, 12), "mid": (5, 32, 32), "1.3B": (21, 60, 104)}
# Step times of the tiny config are ~20 ms and noisy: take the median of many.
DEFAULT_REPEATS = {"tiny": 41, "mid": 7, "1.3B": 5}


def _step(model: torch.nn.Module, call, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        out = call(model)
    out.float().square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(config: str, backend: str, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    cfg = dit_config(config)
    ours = KaleidoDiT(cfg, attention_backend=backend).to(device)
    theirs = diffusers_twin(ours)
    frames, height, width = SHAPES[config]
    latents = torch.randn(1, cfg.in_dim, frames, height, width, device=device)
    timestep = torch.tensor([500.0], device=device)
    context = torch.randn(1, 512, cfg.text_dim, device=device)
    tokens = frames * (height // 2) * (width // 2)
    calls = {
        "ours": (ours, lambda m: m(latents, timestep, context)),
        "diffusers": (theirs, lambda m: m(latents, timestep, context, return_dict=False)[0]),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for model, call in calls.values():
        _step(model, call, device)  # warm-up
    # interleave the two so drift in machine load hits both alike
    for _ in range(repeats):
        for name, (model, call) in calls.items():
            times[name].append(_step(model, call, device))
    row = {"config": config, "backend": backend, "device": device, "tokens": tokens, "repeats": repeats}
    for name, samples in times.items():
        median = statistics.median(samples)
        row[f"{name}_s"] = median
        row[f"{name}_tokens_per_s"] = tokens / median
    row["ratio"] = row["ours_tokens_per_s"] / row["diffusers_tokens_per_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=sorted(SHAPES))
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--repeats", type=int, default=None, help="default: per config (tiny 41, mid 7)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'cpu'} x{args.threads}"
    print(f"device: {name}; torch {torch.__version__}; backend {args.backend}; fwd+bwd, batch 1, text 512")
    header = ("config", "tokens", "ours ms", "diffusers ms", "ours tok/s", "diff tok/s", "ratio")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (6, 7, 9, 13, 11, 11, 6), strict=True)))
    rows = []
    for config in args.configs:
        row = measure(config, args.backend, args.repeats or DEFAULT_REPEATS[config], device)
        rows.append(row)
        print(
            f"{config:>6} {row['tokens']:>7} {row['ours_s'] * 1e3:>9.1f} {row['diffusers_s'] * 1e3:>13.1f} "
            f"{row['ours_tokens_per_s']:>11.0f} {row['diffusers_tokens_per_s']:>11.0f} {row['ratio']:>6.2f}"
        )
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
