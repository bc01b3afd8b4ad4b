"""Training memory per rank: the planner's table at the shipped sizes, and its estimate next to the peak tensor
memory real DeepSpeed steps measure on CPU (kaleido.train.memory_probe), with LoRA vs full step time.

    .venv/bin/python benchmarks/train_memory.py --table      # 1.3B / 14B at 480x832, 81 frames, 3 references
    .venv/bin/python benchmarks/train_memory.py --measure    # tiny and mid on this CPU (a few minutes)

The table assumes 8 GPUs, micro batch 1, bf16 with fp32 master weights, activation checkpointing and DeepSpeed's
default reduce bucket (5e8 values). GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from kaleido.config.schema import LORA_ATTENTION_TARGETS

PROBES = [
    ["--arch", "tiny", "--frames", "21", "--height", "512", "--width", "512"],
    ["--arch", "tiny", "--frames", "21", "--height", "512", "--width", "512", "--no-checkpointing"],
    ["--arch", "mid"],
    ["--arch", "mid", "--no-checkpointing"],
    ["--arch", "mid", "--lora-rank", "16"],
    ["--arch", "mid", "--lora-rank", "16", "--no-checkpointing"],
]


def table() -> None:
    from kaleido.model.dit import dit_config
    from kaleido.train.memory import TrainingShape, estimate

    print("| model | training | ZeRO | optimizer offload | SP 1 | SP 2 | SP 4 | SP 8 |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in ("1.3B", "14B"):
        for lora in (0, 16):
            for zero in (2, 3):
                for offload in (False, True):
                    cells = []
                    for sp in (1, 2, 4, 8):
                        if dit_config(arch).num_heads % sp:
                            cells.append(f"n/a ({dit_config(arch).num_heads} heads)")
                            continue
                        shape = TrainingShape(dit_config(arch), 81, 480, 832, 3, 512, world_size=8,
                                              sequence_parallel=sp, zero_stage=zero, offload_optimizer=offload,
                                              lora_rank=lora, lora_targets=LORA_ATTENTION_TARGETS if lora else ())
                        cells.append(f"{estimate(shape).total_gb:.1f}")
                    kind = f"LoRA r{lora} (attention)" if lora else "full"
                    print(f"| {arch} | {kind} | {zero} | {'yes' if offload else 'no'} | " + " | ".join(cells) + " |")


def measure() -> None:
    print("| config | tokens | training | checkpointing | estimate GB | measured GB | estimate / measured | "
          "step s |")
    print("|---|---|---|---|---|---|---|---|")
    for args in PROBES:
        done = subprocess.run([sys.executable, "-m", "kaleido.train.memory_probe", *args], capture_output=True,
                              text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        kind = f"LoRA r{r['lora_rank']}" if r["lora_rank"] else "full"
        print(f"| {r['arch']} | {r['tokens']} | {kind} | {'yes' if r['checkpointing'] else 'no'} | "
              f"{r['estimate_total'] / 1e9:.3f} | {r['measured_peak'] / 1e9:.3f} | {r['ratio']:.2f} | "
              f"{r['step_seconds']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--measure", action="store_true")
    args = parser.parse_args()
    if args.table or not args.measure:
        table()
    if args.measure:
        measure()


if __name__ == "__main__":
    main()
