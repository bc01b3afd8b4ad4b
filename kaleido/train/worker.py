"""The training worker: `python -m kaleido.train.worker --params PATH --stage pretrain|sft [--resume]`.

Started once per rank by torchrun (the local launcher, or each pod of the Kubernetes Job). It checks
the plan again (a pod started by hand gets the same clear message), joins the process group, builds
the DeepSpeed engine and trains. Exit codes: 0 done; 2 an operator's situation, with one `error:` line (bad
parameters, a truncated weight or cache file, a full disk, the MLflow server gone: the line names the path or
server and the way to resume); 1 any other failure (a traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import record

from kaleido.train.plan import STAGES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kaleido.train.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: $KALEIDO_PARAMS or nearest)")
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the stage's latest checkpoint")
    parser.add_argument("--apply-param-changes", action="store_true",
                        help="with --resume: apply changed lr / steps / cadence from the resumed step on (recorded)")
    parser.add_argument("--no-progress", action="store_true", help="no progress display (rank 0 shows it by default)")
    return parser.parse_args(argv)


OPERATOR_EXIT = 2  # what the launcher recognises: the rank printed one `error:` line saying what to do


def _error(line: str) -> int:
    print(f"error: {line}", file=sys.stderr, flush=True)
    return OPERATOR_EXIT


@record  # torchrun prints a failed rank's traceback in its summary
def main(argv: list[str] | None = None) -> int:
    from kaleido.config import ParamsError, load_params
    from kaleido.model.checkpoint import CheckpointError
    from kaleido.platform.integrity import IntegrityError
    from kaleido.platform.storage import StorageError
    from kaleido.train.latents import CacheError, LatentCache
    from kaleido.train.plan import plan_training

    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        params = load_params(args.params)
        # only rank 0 talks to the tracking server
        plan = plan_training(params, args.stage, world, resume=args.resume, check_tracking=rank == 0,
                             apply_changes=args.apply_param_changes)
        LatentCache(plan.latents, params).null_context()  # a broken cache fails here, before a model is loaded
    except (ParamsError, CacheError, IntegrityError, StorageError) as exc:
        return _error(f"rank {rank}: {exc}")

    from kaleido.cli.app import show_library_warnings
    from kaleido.train.tracking import mlflow_request_limits

    show_library_warnings()  # the trainer's warnings (a skipped checkpoint, an MLflow outage) as `warning:` lines
    try:
        with mlflow_request_limits(params.platform):
            return _train(args, params, plan)
    except CheckpointError as exc:  # a truncated init checkpoint that appeared after the plan's check
        return _error(str(exc))
    except Exception as exc:
        from kaleido.train.trainer import TrackingStopped

        line = _operator_error(exc, args.stage, rank)
        if line is None:
            raise
        if isinstance(exc, TrackingStopped) and rank != 0:
            return OPERATOR_EXIT  # rank 0 prints the stop's message, with the details only it has
        return _error(line)


def _operator_error(exc: BaseException, stage: str, rank: int) -> str | None:
    """The `error:` line of an operator's situation (MLflow gone, disk full, an unwritable path), None for a bug."""
    from kaleido.platform.files import describe_os_error, is_disk_full
    from kaleido.train.tracking import TrackingUnavailable
    from kaleido.train.trainer import CheckpointWriteError, ResumeError, TrackingStopped

    resume = f"`kaleido train --stage {stage} --resume`"
    from kaleido.platform.integrity import IntegrityError
    from kaleido.platform.storage import StorageError

    if isinstance(exc, TrackingStopped | ResumeError | IntegrityError | StorageError):
        return str(exc)  # a cache shard differs from its seal, object storage refused: named, with the fix
    if isinstance(exc, TrackingUnavailable):  # at the start: nothing was trained yet
        return f"{exc}; nothing was trained. Start the server (`kaleido platform up`) and run the command again"
    if isinstance(exc, CheckpointWriteError):
        previous = (f"the previous checkpoint {exc.previous} is intact: {resume} continues from it" if exc.previous
                    else "no earlier checkpoint exists: start again once there is room")
        return f"{describe_os_error(exc)}; {previous}"
    if is_disk_full(exc) or (isinstance(exc, OSError) and exc.filename):
        return f"{describe_os_error(exc)} (rank {rank}); then {resume} continues from the last intact checkpoint"
    return None


def _train(args: argparse.Namespace, params: Any, plan: Any) -> int:
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
    trainer = Trainer(params, plan, ctx, engine, resume=args.resume, apply_changes=args.apply_param_changes)
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
