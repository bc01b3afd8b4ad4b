"""The training loader at scale: each data-parallel rank reads only its own shards, every rank takes the same
number of steps, read-ahead runs in a background thread without moving the resumable sampler state, and an s3://
cache is downloaded shard by shard: a rank fetches its share, nothing else."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter

import pytest

from kaleido.train.data import BucketBatchSampler, Prefetcher, ShardedBatchSampler, assign_shards, rank_shares
from kaleido.train.latents import CachedSample

BUCKETS = [(5, 32, 48, 1), (5, 48, 32, 1)]


def _samples(sizes: dict[str, int], val_every: int = 7) -> list[CachedSample]:
    out = []
    for shard, size in sizes.items():
        for i in range(size):
            split = "val" if (len(out) % val_every) == 0 else "train"
            out.append(CachedSample(f"{shard}-{i}", shard, BUCKETS[i % 2], 12, split))
    return out


def test_shards_are_dealt_balanced_and_every_rank_reads_only_its_own() -> None:
    sizes = {"shard-00000": 40, "shard-00001": 12, "shard-00002": 30, "shard-00003": 18, "shard-00004": 25,
             "shard-00005": 20}
    shares = assign_shards(sizes, 3)
    assert sorted(s for share in shares for s in share) == sorted(sizes)  # disjoint, together all
    loads = [sum(sizes[s] for s in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes.values()) // 2 and shares == assign_shards(dict(sizes), 3)
    samples = _samples(sizes)
    groups = rank_shares(samples, 3)
    samplers = [ShardedBatchSampler(groups, micro_batch=2, dp_rank=r, seed=5) for r in range(3)]
    steps = {s.per_rank_batches() for s in samplers}
    assert len(steps) == 1 and steps.pop() > 0  # every rank takes as many steps (the smallest share's count)
    count = samplers[0].per_rank_batches()
    owner = {shard: rank for rank, share in enumerate(shares) for shard in share}
    for rank, sampler in enumerate(samplers):
        for epoch in range(3):
            batches = sampler.rank_batches(epoch)
            assert len(batches) == count
            for batch in batches:
                assert len({samples[i].bucket for i in batch}) == 1  # one bucket per micro-batch
                assert all(owner[samples[i].shard] == rank and samples[i].split == "train" for i in batch)
        assert sampler.rank_batches(0) != sampler.rank_batches(1)  # reshuffled every epoch
    # fewer shards than ranks: the shared shards are dealt sample by sample (the global shuffle)
    assert rank_shares(_samples({"shard-00000": 30}), 2) is None


class _SlowCache:
    """A LatentCache stand-in: `load` takes 20 ms and records the thread that called it."""

    def __init__(self, samples: list[CachedSample]) -> None:
        self.samples = samples
        self.calls: list[tuple[int, str]] = []
        self.fail_at: int | None = None

    def load(self, index: int) -> dict:
        if index == self.fail_at:
            raise OSError(f"shard of sample {index} is unreadable")
        time.sleep(0.02)
        self.calls.append((index, threading.current_thread().name))
        return {"index": index}


def test_read_ahead_runs_in_a_background_thread_and_keeps_the_resumable_state() -> None:
    samples = _samples({"shard-00000": 16, "shard-00001": 16})
    reference = BucketBatchSampler([s.bucket for s in samples], 2, 0, 1, seed=3)
    expected = iter(reference)
    cache = _SlowCache(samples)
    sampler = BucketBatchSampler([s.bucket for s in samples], 2, 0, 1, seed=3)
    loader = Prefetcher(cache, sampler, ahead=3)
    try:
        time.sleep(0.5)  # nothing taken yet: the thread has loaded ahead, the sampler has not moved
        assert len(cache.calls) >= 6 and all(name == "kaleido-prefetch" for _, name in cache.calls)
        assert sampler.state_dict()["cursor"] == 0 and sampler.epoch == 0
        taken = []
        for _ in range(20):  # across an epoch boundary
            indices, items = loader.next()
            assert [item["index"] for item in items] == indices
            taken.append(indices)
        assert taken == [next(expected) for _ in range(20)]
        state = sampler.state_dict()
    finally:
        loader.close()
    resumed = BucketBatchSampler([s.bucket for s in samples], 2, 0, 1, seed=3)
    resumed.load_state_dict(state)
    again = Prefetcher(_SlowCache(samples), resumed)
    try:
        assert again.next()[0] == next(expected)  # a checkpoint's state resumes at the next micro-batch
    finally:
        again.close()
    failing = _SlowCache(samples)
    failing.fail_at = next(iter(BucketBatchSampler([s.bucket for s in samples], 2, 0, 1, seed=3)))[0]
    broken = Prefetcher(failing, BucketBatchSampler([s.bucket for s in samples], 2, 0, 1, seed=3))
    with pytest.raises(OSError, match="unreadable"):
        broken.next()
    broken.close()


def test_a_rank_downloads_only_its_shards_of_an_s3_cache(s3_server, monkeypatch, tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    from kaleido.platform.storage import Remote
    from kaleido.train.data import training_sampler
    from kaleido.train.latents import NULL_CONTEXT_NAME, LatentCache, write_index

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    local = tmp_path / "written"
    local.mkdir()
    samples, seals = [], {}
    for s in range(4):
        shard = f"shard-{s:05d}__train-{s:05d}"
        tensors = {}
        for i in range(4):
            key = f"k{s}{i}"
            tensors |= {f"{key}/video": torch.full((16, 2, 4, 6), float(s)), f"{key}/refs": torch.zeros(1, 16, 4, 6),
                        f"{key}/text": torch.ones(3, 8)}
            samples.append(CachedSample(key, shard, BUCKETS[0], 3))
        save_file(tensors, str(local / f"{shard}.safetensors"))
        data = (local / f"{shard}.safetensors").read_bytes()
        seals[shard] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    save_file({"null_context": torch.zeros(1, 8)}, str(local / NULL_CONTEXT_NAME))
    write_index(local, samples, {"dataset": "d", "text_dim": 8, "z_dim": 16, "shards": seals})
    remote = Remote("s3://kaleido-stream/latents")
    remote.ensure_bucket()
    for path in sorted(local.iterdir()):
        remote.upload(path, path.name)

    from conftest import make_data_params

    params = make_data_params(tmp_path / "d", {"platform.staging": str(tmp_path / "staging")})
    cache = LatentCache("s3://kaleido-stream/latents", params)
    sampler = training_sampler(cache, micro_batch=2, dp_rank=1, dp_size=2, seed=0)
    loader = Prefetcher(cache, sampler)
    try:
        seen = Counter(cache.samples[i].shard for _ in range(8) for i in loader.next()[0])
    finally:
        loader.close()
    fetched = sorted(p.name for p in cache.folder.glob("*.safetensors"))
    assert fetched == sorted(f"{shard}.safetensors" for shard in seen) and len(fetched) == 2  # half the shards
