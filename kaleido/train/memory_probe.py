"""Measure the peak memory of real DeepSpeed training steps on CPU, to check kaleido.train.memory's estimate.

`python -m kaleido.train.memory_probe --arch mid --frames 9 --height 256 --width 256 [--lora-rank 16]
[--no-checkpointing]` prints one JSON line: the estimate's rows and the measured peak.

Measured: the peak of the bytes held by tensors (PyTorch's CPU allocator: the allocation and free records of
`torch.profiler.profile(profile_memory=True)`, summed in time order) over building the model, a one-rank
DeepSpeed ZeRO-2 engine in fp32 (the CPU training path) and two optimizer steps. Tensor bytes, not the
process's resident size: glibc keeps freed memory and the interpreter's imports would swamp a model this size.
Each step ends with a garbage collection: a tensor held by a reference cycle would otherwise live until a
collection whose timing varies from run to run (one run in a few measured 50% more).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from typing import Any

from kaleido.config.schema import LORA_ATTENTION_TARGETS


def _peak_tensor_bytes(prof: Any) -> int:
    """The largest total of live CPU tensor bytes: the running sum of the profiler's allocation (+) and free (-)
    records in time order, counted from the first record (tensors allocated before profiling are not in it)."""
    events = prof.profiler.kineto_results.events()
    records = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def probe(arch: str, frames: int, height: int, width: int, references: int, text_len: int, lora_rank: int,
          checkpointing: bool, steps: int = 2, bucket: int = 20_000_000) -> dict:
    """Estimate and measure one configuration in THIS process (run it in a fresh one: see main)."""
    import deepspeed
    import torch

    from kaleido.model.dit import KaleidoDiT, dit_config
    from kaleido.model.lora import add_lora
    from kaleido.train.memory import TrainingShape, estimate

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 200))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    cfg = dit_config(arch)
    latent_frames, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    latents = torch.randn(1, cfg.in_dim, latent_frames, h, w)
    refs = torch.randn(1, references, cfg.in_dim, h, w) if references else None
    context = torch.randn(1, text_len, cfg.text_dim)
    timestep = torch.tensor([500.0])
    zero = {"stage": 2, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
              "zero_optimization": zero, "zero_allow_untested_optimizer": True, "bf16": {"enabled": False},
              "steps_per_print": 10**9}  # fmt: skip
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = KaleidoDiT(cfg)
        if lora_rank:
            add_lora(model, lora_rank, float(lora_rank), LORA_ATTENTION_TARGETS)
        model.gradient_checkpointing = checkpointing
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            loss = (engine(latents, timestep, context, refs) - latents).pow(2).mean()
            engine.backward(loss)
            engine.step()
            seconds.append(time.perf_counter() - start)
            gc.collect()  # tensors held by reference cycles go now, not at an arbitrary later collection
    measured = _peak_tensor_bytes(prof)
    shape = TrainingShape(cfg, frames, height, width, references, text_len, precision="fp32", zero_stage=2,
                          checkpointing=checkpointing, lora_rank=lora_rank, reduce_bucket=bucket,
                          lora_targets=LORA_ATTENTION_TARGETS if lora_rank else ())
    found = estimate(shape)
    return {"arch": arch, "tokens": shape.tokens, "lora_rank": lora_rank, "checkpointing": checkpointing,
            "estimate": found.rows, "estimate_total": found.total, "measured_peak": measured,
            "step_seconds": seconds[-1],  # the last step (steady state; slowed by the profiler)
            "ratio": found.total / measured}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mid")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--references", type=int, default=3)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--no-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    result = probe(args.arch, args.frames, args.height, args.width, args.references, args.text_len,
                   args.lora_rank, not args.no_checkpointing)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
