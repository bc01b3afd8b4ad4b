"""Training loader throughput at the prod latent shapes, from local disk and from an S3-protocol server, against what
a 14B step on 8 GPUs consumes.

    nice -n 10 .venv/bin/python benchmarks/loader_throughput.py [--shards 4] [--per-shard 16] [--json out.json]

A latent cache in `kaleido encode`'s format at the shipped sizes: per sample the video latent [16, 21, 60, 104]
(480x832, 81 frames), 3 reference latents [3, 16, 60, 104] and 128 real caption tokens of umT5 [128, 4096], all
bf16 (~5.8 MB a sample). One data-parallel rank of two reads its shards through the trainer's path (the sharded
sampler, the read-ahead thread, `collate` into one micro-batch of 1): first from the local folder (page cache
warm: the figure is the loader's own cost), then from a moto S3 server on 127.0.0.1 with an empty staging folder
(every shard downloaded and checked against its seal first).

What a 14B step consumes, on paper: tokens per sample N = 21x30x52 video + 3x30x52 reference = 37,440; FLOPs per
sample = 3 x (2 x 14e9 x N) for the linear layers + 3.5 x (4 x N^2 x 5120 x 40 layers) for attention (backward 2.5x
forward), + one forward again with activation checkpointing; 8 H100 at 989 TFLOP/s dense bf16 at 40 % MFU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _provenance import provenance

VIDEO, REFS, TOKENS, TEXT_DIM = (16, 21, 60, 104), 3, 128, 4096


def consumption(gpus: int = 8, mfu: float = 0.4, peak: float = 989e12) -> dict[str, float]:
    """Samples per second a 14B Wan DiT step on `gpus` GPUs consumes at the prod shapes (see the docstring)."""
    video_tokens = 21 * 30 * 52
    tokens = video_tokens + 3 * 30 * 52
    linear = 3 * 2 * 14e9 * tokens
    attention = 3.5 * 4 * tokens**2 * 5120 * 40
    recompute = (2 * 14e9 * tokens) + 4 * tokens**2 * 5120 * 40
    flops = linear + attention + recompute
    rate = gpus * peak * mfu / flops
    return {"tokens": tokens, "tflop_per_sample": round(flops / 1e12, 1), "samples_per_s": round(rate, 3)}


def write_cache(folder: Path, shards: int, per_shard: int) -> int:
    import torch
    from safetensors.torch import save_file

    from kaleido.train.latents import NULL_CONTEXT_NAME, CachedSample, write_index

    folder.mkdir(parents=True)
    samples, seals = [], {}
    generator = torch.Generator().manual_seed(0)
    for s in range(shards):
        name = f"shard-{s:05d}__train-{s:05d}"
        tensors = {}
        for i in range(per_shard):
            key = f"s{s:03d}-{i:04d}"
            tensors[f"{key}/video"] = torch.randn(*VIDEO, generator=generator).to(torch.bfloat16)
            tensors[f"{key}/refs"] = torch.randn(REFS, VIDEO[0], *VIDEO[2:], generator=generator).to(torch.bfloat16)
            tensors[f"{key}/text"] = torch.randn(TOKENS, TEXT_DIM, generator=generator).to(torch.bfloat16)
            samples.append(CachedSample(key, name, (81, 480, 832, REFS), TOKENS))
        path = folder / f"{name}.safetensors"
        save_file(tensors, str(path))
        seals[name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size}
    save_file({"null_context": torch.zeros(1, TEXT_DIM, dtype=torch.bfloat16)}, str(folder / NULL_CONTEXT_NAME))
    write_index(folder, samples, {"dataset": "synthetic", "text_dim": TEXT_DIM, "z_dim": 16, "shards": seals})
    return sum(p.stat().st_size for p in folder.iterdir())


def read_rank(location: str, params: Any, steps: int) -> dict[str, float]:
    import torch

    from kaleido.train.data import Prefetcher, collate, training_sampler
    from kaleido.train.latents import LatentCache

    start = time.perf_counter()
    cache = LatentCache(location, params)
    sampler = training_sampler(cache, micro_batch=1, dp_rank=0, dp_size=2, seed=0)
    loader = Prefetcher(cache, sampler, ahead=4)
    null = cache.null_context()
    first = None
    try:
        for step in range(steps):
            indices, items = loader.next()
            collate(cache, indices, null, 512, (1, 2, 2), torch.bfloat16, "cpu", items)
            if step == 0:
                first = time.perf_counter() - start
        wall = time.perf_counter() - start
    finally:
        loader.close()
    shards = sorted({cache.samples[i].shard for g in sampler.groups.values() for i in g})
    return {"samples": steps, "wall_s": round(wall, 2), "samples_per_s": round(steps / wall, 1),
            "first_batch_s": round(first or 0.0, 2), "rank_shards": len(shards), "cache_shards": len(cache.shards)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    from kaleido.config.schema import validate_params
    from kaleido.platform.storage import Remote

    results: dict[str, Any] = {
        **provenance(),
        "consumption_14B_8xH100": consumption(),
    }
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        with tempfile.TemporaryDirectory(prefix="kaleido-loader-") as tmp:
            work = Path(tmp)
            size = write_cache(work / "latents", args.shards, args.per_shard)
            results["cache_mb"] = round(size / 2**20, 1)
            results["sample_mb"] = round(size / 2**20 / (args.shards * args.per_shard), 2)
            params = validate_params({"platform": {"staging": str(work / "staging")}}, base_dir=work)
            steps = args.shards * args.per_shard // 2  # one epoch of rank 0's share
            results["local"] = read_rank(str(work / "latents"), params, steps)
            remote = Remote("s3://kaleido-bench/latents")
            remote.ensure_bucket()
            for path in sorted((work / "latents").iterdir()):
                remote.upload(path, path.name)
            results["s3"] = read_rank("s3://kaleido-bench/latents", params, steps)
    finally:
        server.stop()
    need = results["consumption_14B_8xH100"]["samples_per_s"]
    for where in ("local", "s3"):
        row = results[where]
        print(f"{where:5s}: {row['samples_per_s']:7.1f} samples/s for one rank ({row['rank_shards']} of "
              f"{row['cache_shards']} shards read; first micro-batch after {row['first_batch_s']} s) = "
              f"{row['samples_per_s'] / need:,.0f}x what a 14B step on 8 GPUs consumes ({need} samples/s)", flush=True)
    print(json.dumps(results["consumption_14B_8xH100"]), f"{results['sample_mb']} MB per sample")
    print(f"{results['machine']}; {results['date']}; commit {results['commit']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
