"""The paper's Tables 2 and 3 in miniature on a CPU: the multi-subject task (kaleido/train/multi_subject.py).

    .venv/bin/python benchmarks/rrope_table.py --out /tmp/rrope [--seeds 0,1,2] [--steps 1200] [--pretrain-steps 0]
        [--variants none,shift_w,shift_h,shift_wh,time_fixed_neg] [--cross-pairing [--silent-background]]
        [--threads 1]            (--variants "" with --cross-pairing: Table 3 alone)

Every variant trains on the same data with the same seeds and noise (through `kaleido train`, DeepSpeed on the CPU,
one torch thread, niced), then generates every held-out sample with its own references and with them reversed.
Prints the table (means over seeds and held-out samples, 95 % bootstrap CIs over the pooled held-out samples),
the per-seed means, and the machine, date and commit; writes <out>/report.json and <out>/table.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _provenance import provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--assets", type=Path, default=None, help="tiny assets folder (built there if missing)")
    parser.add_argument("--variants", default="none,shift_w,shift_h,shift_wh,time_fixed_neg")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--pretrain-steps", type=int, default=0, help="text-to-video steps first (the video prior)")
    parser.add_argument("--train-count", type=int, default=384)
    parser.add_argument("--val-count", type=int, default=48)
    parser.add_argument("--cross-pairing", action="store_true")
    parser.add_argument("--silent-background", action="store_true",
                        help="Table 3 with captions that do not name the background")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from kaleido.model.tiny import build_tiny_assets
    from kaleido.train.multi_subject import TrainSettings, run_table

    assets_dir = build_tiny_assets(args.assets or args.out / "assets", seed=0)
    assets = {key: str(assets_dir / ("transformer" if key == "checkpoint" else key))
              for key in ("checkpoint", "vae", "text_encoder", "tokenizer")}
    report = run_table(
        args.out, assets, tuple(v for v in args.variants.split(",") if v), tuple(int(s) for s in args.seeds.split(",")),
        TrainSettings(steps=args.steps), args.pretrain_steps, args.train_count, args.val_count,
        cross_pairing=args.cross_pairing, threads=args.threads, background_in_caption=not args.silent_background,
    )
    source = provenance()
    print(f"date {source['date']}, commit {source['commit']}, {source['machine']}, load avg {source['load_avg']}")
    print(report.markdown())
    for entry in report.summary():
        seeds = ", ".join(f"{name} {values['per_seed']}" for name, values in entry.items()
                          if isinstance(values, dict))
        print(f"{entry['condition']}: per seed {seeds}")
    print({key: round(value) for key, value in report.seconds.items()})


if __name__ == "__main__":
    main()
