"""One rank of `kaleido encode` across processes: `torchrun ... -m kaleido.train.encode_worker --params P --stage S`.

The launcher is the trainer's (kaleido.train.launch_local locally, an Indexed Job of torchrun pods on Kubernetes:
kaleido.train.launch_kubernetes with module=this). Rank r of W encodes every W-th latent shard of the sorted list
(`encode.rank_share`: disjoint, together all), on its own GPU (cuda:LOCAL_RANK) when there is one; a shard whose
marker matches is skipped, so a re-run resumes. After a barrier, rank 0 writes the empty prompt's embedding and
the index (`encode.finalize_encode`). The cache is byte-for-byte the one a single process writes: each shard is
encoded on its own, with the same settings, whichever rank takes it.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

from torch.distributed.elastic.multiprocessing.errors import record

OPERATOR_EXIT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kaleido.train.encode_worker")
    parser.add_argument("--params", required=True)
    parser.add_argument("--stage", default="pretrain")
    parser.add_argument("--resume", action="store_true", help="accepted for the launcher; encode always resumes")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


@record
def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.distributed as dist

    from kaleido.config import ParamsError, load_params
    from kaleido.platform.integrity import IntegrityError
    from kaleido.platform.storage import StorageError
    from kaleido.train.encode import encode_output, encode_settings, finalize_encode, run_encode
    from kaleido.train.plan import stage_dataset

    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dist.init_process_group("gloo", timeout=timedelta(hours=12))  # a barrier only: gloo on CPU and GPU nodes
    try:
        params = load_params(args.params)
        report = run_encode(params, args.stage, progress=not args.no_progress, device=device, rank=rank,
                            world=world, finalize=False)
        print(f"encode rank {rank}/{world}: {len(report.encoded_shards)} shards encoded, "
              f"{len(report.skipped_shards)} up to date", flush=True)
        shares: list[object] = [None] * world
        dist.all_gather_object(shares, (report.encoded_shards, report.skipped_shards))  # also the barrier
        if rank == 0:
            report.encoded_shards = sorted(name for encoded, _ in shares for name in encoded)  # type: ignore[misc]
            report.skipped_shards = sorted(name for _, skipped in shares for name in skipped)  # type: ignore[misc]
            from kaleido.data.writer import dataset_entries
            from kaleido.train.encode import _digest, latent_shard_name

            out, remote = encode_output(params, args.stage)
            names = sorted(latent_shard_name(e.relative) for e in dataset_entries(stage_dataset(params, args.stage),
                                                                                   params))
            settings_hash = _digest(encode_settings(params, device))
            final = finalize_encode(params, out, remote, names, settings_hash, torch.device(device), report,
                                    dataset=stage_dataset(params, args.stage))
            print(final.summary(), flush=True)
        dist.barrier()
    except (ParamsError, FileNotFoundError, IntegrityError, StorageError) as exc:
        print(f"error: rank {rank}: {exc}", file=sys.stderr, flush=True)
        return OPERATOR_EXIT
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
