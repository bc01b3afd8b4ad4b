"""Training-step throughput through the real training path: DeepSpeed engine (ZeRO-2, client AdamW), activation
checkpointing, the flow-matching loss with references.

    .venv/bin/python benchmarks/train_throughput.py [--configs tiny mid] [--backends sdpa] [--steps N] [--threads 1]
        [--json out.json]

One DeepSpeed rank per measurement, each in a fresh process (so peak memory is that config's own). Prints,
per config and attention backend: transformer tokens per sample (video + references), median step time,
tokens/s, samples/s and peak memory (peak RSS on CPU, peak allocated on a GPU). On a GPU it trains in bf16
and also prints the model FLOPs utilisation (MFU) against the device's dense bf16 peak; the default there
is the 1.3B config at 480p (81 frames, 3 references) with the `sdpa` and `triton` backends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

# (latent frames, latent height, latent width, references) of one training sample per config.
SHAPES = {
    "tiny": (2, 4, 6, 1),  # 5 frames at 32x48, the embedded default's bucket
    "mid": (5, 32, 32, 2),  # 17 frames at 256x256: 1280 video + 512 reference tokens
    "1.3B": (21, 60, 104, 3),  # 81 frames at 480x832: 32,760 video + 4,680 reference tokens
}
TEXT_TOKENS = 40  # real caption tokens; the rest of model.text_len (512) is zero padding
DENSE_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def model_flops(cfg, video_tokens: int, ref_tokens: int, text_len: int) -> float:
    """Training FLOPs of one sample (forward + backward = 3x forward; recomputation not counted, as MFU does)."""
    n = video_tokens + ref_tokens
    d, f = cfg.dim, cfg.ffn_dim
    per_layer = (
        2 * n * 4 * d * d  # self-attention q, k, v, o
        + 2 * n * 2 * d * d + 2 * text_len * 2 * d * d  # cross-attention q, o on tokens; k, v on text
        + 2 * n * 2 * d * f  # FFN
        + 4 * n * n * d  # self-attention scores and values (4·N²·D per head, all heads)
        + 4 * n * text_len * d  # cross-attention scores and values
    )
    return 3.0 * cfg.num_layers * per_layer


def _peak_memory_gb(device: torch.device) -> float:
    import resource

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure_one(config: str, backend: str, steps: int, threads: int) -> dict:
    """One config in this process: a single-rank DeepSpeed engine, `steps` timed optimizer steps."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    torch.set_num_threads(threads)

    from kaleido.config.schema import validate_params
    from kaleido.model.dit import KaleidoDiT, dit_config
    from kaleido.model.flow_matching import FlowMatchingBatch, flow_matching_loss
    from kaleido.train.engine import build_engine, init_distributed
    from kaleido.train.plan import TrainPlan

    ctx = init_distributed(1)
    params = validate_params({"model": {"attention_backend": backend}})  # the schema defaults: shipped values
    cfg = dit_config(config)
    torch.manual_seed(0)
    model = KaleidoDiT(cfg, attention_backend=backend).to(ctx.device)
    model.gradient_checkpointing = True
    plan = TrainPlan(
        stage="pretrain", world_size=1, sequence_parallel=1, data_parallel=1, micro_batch=1, grad_accum=1,
        global_batch=1, steps=steps, lr=1e-5, zero_stage=2, latents="", output="", init="",
    )  # fmt: skip
    engine, _ = build_engine(model, params, plan, ctx)
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    frames, height, width, refs = SHAPES[config]
    gen = torch.Generator().manual_seed(0)
    text_len = params.model.text_len
    context = torch.zeros(1, text_len, cfg.text_dim)
    context[:, :TEXT_TOKENS] = torch.randn(1, TEXT_TOKENS, cfg.text_dim, generator=gen)
    batch = FlowMatchingBatch(
        latents=torch.randn(1, cfg.in_dim, frames, height, width, generator=gen).to(ctx.device, dtype),
        context=context.to(ctx.device, dtype),
        null_context=torch.zeros(text_len, cfg.text_dim).to(ctx.device, dtype),
        reference_latents=torch.randn(1, refs, cfg.in_dim, height, width, generator=gen).to(ctx.device, dtype),
    )
    video_tokens = frames * (height // 2) * (width // 2)
    ref_tokens = refs * (height // 2) * (width // 2)

    def step() -> float:
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = flow_matching_loss(engine, batch, params.flow_matching, gen)
        engine.backward(loss)
        engine.step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(2):  # warm-up: allocator, kernels, optimizer state
        step()
    times = [step() for _ in range(steps)]
    median = statistics.median(times)
    row = {
        "config": config, "backend": backend, "device": str(ctx.device), "threads": threads, "steps": steps,
        "video_tokens": video_tokens, "ref_tokens": ref_tokens, "step_s": median,
        "tokens_per_s": (video_tokens + ref_tokens) / median, "samples_per_s": 1.0 / median,
        "peak_memory_gb": _peak_memory_gb(ctx.device), "parameters": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    if ctx.device.type == "cuda":
        name = torch.cuda.get_device_name(ctx.device)
        peak = next((v for k, v in DENSE_BF16_PEAK_TFLOPS.items() if k in name), None)
        row["gpu"] = name
        if peak:
            row["tflops"] = model_flops(cfg, video_tokens, ref_tokens, text_len) / median / 1e12
            row["mfu"] = row["tflops"] / peak
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--configs", nargs="+", default=["1.3B"] if gpu else ["tiny", "mid"], choices=sorted(SHAPES))
    parser.add_argument("--backends", nargs="+", default=["sdpa", "triton"] if gpu else ["sdpa"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: tiny 20, mid 5, 1.3B 10)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads); 1 on a shared box")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = {"tiny": 20, "mid": 5, "1.3B": 10}
    if args.one:
        config, backend = args.one
        row = measure_one(config, backend, args.steps or defaults[config], args.threads)
        print("RESULT " + json.dumps(row), flush=True)
        return

    rows = []
    for config in args.configs:
        for backend in args.backends:
            command = [sys.executable, __file__, "--one", config, backend, "--threads", str(args.threads)]
            if args.steps:
                command += ["--steps", str(args.steps)]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                print(f"{config}/{backend}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(lines[-1][len("RESULT "):]))
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}")
    print("config | backend | device | tokens (video+refs) | step s | tokens/s | samples/s | peak mem GB | MFU")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        tokens = f"{r['video_tokens']}+{r['ref_tokens']}"
        print(f"{r['config']} | {r['backend']} | {r['device']} | {tokens} | {r['step_s']:.3f} | "
              f"{r['tokens_per_s']:.0f} | {r['samples_per_s']:.3f} | {r['peak_memory_gb']:.2f} | {mfu}")
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
