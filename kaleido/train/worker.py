"""The training worker: `python -m kaleido.train.worker --params PATH --stage pretrain|sft [--resume]`.

Started once per rank by torchrun (the local launcher, or each pod of the Kubernetes Job). It checks
the plan again (a pod started by hand gets the same clear message), joins the process group, builds
the DeepSpeed engine and trains. Exit codes: 0 done, 2 bad parameters, 1 any other failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from kaleido.train.plan import STAGES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kaleido.train.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: $KALEIDO_PARAMS or nearest)")
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the stage's latest checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (rank 0 draws it by default)")
    return parser.parse_args(argv)


@record  # torchrun prints a failed rank's traceback in its summary
def main(argv: list[str] | None = None) -> int:
    from kaleido.config import ParamsError, load_params
    from kaleido.train.latents import LatentCache
    from kaleido.train.plan import plan_training

    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        params = load_params(args.params)
        # only rank 0 talks to the tracking server
        plan = plan_training(params, args.stage, world, resume=args.resume, check_tracking=rank == 0)
        LatentCache(plan.latents).null_context()  # a broken cache fails here, before a model is loaded
    except ParamsError as exc:
        print(f"error: rank {rank}: {exc}", file=sys.stderr, flush=True)
        return 2

    from kaleido.train.engine import build_engine, init_distributed, load_model
    from kaleido.train.sequence_parallel import UlyssesSequenceParallel
    from kaleido.train.trainer import Trainer

    ctx = init_distributed(plan.sequence_parallel)
    if ctx.is_main:
        print(plan.describe(), flush=True)
    model = load_model(params, args.stage, ctx.device)
    if plan.sequence_parallel > 1:
        UlyssesSequenceParallel(ctx.sp_group).attach(model)
    engine, _ = build_engine(model, params, plan, ctx)
    trainer = Trainer(params, plan, ctx, engine, resume=args.resume)
    result = trainer.train(progress=not args.no_progress)
    if ctx.is_main:
        final = result.losses[-1] if result.losses else float("nan")
        what = f"LoRA adapter (rank {plan.lora_rank})" if plan.lora_rank else "Wan weights"
        print(f"{args.stage}: {plan.steps} steps, final loss {final:.4f}; {what} at {result.export}", flush=True)
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
