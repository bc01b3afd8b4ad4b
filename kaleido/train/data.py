"""Micro-batches from the latent cache: one bucket per micro-batch, deterministic, resumable.

A micro-batch stacks samples of ONE bucket key (frames, height, width, number of references), so
every tensor in it has one shape and no sample is padded or cropped. The order of an epoch is a pure
function of (seed, epoch): shuffle inside each bucket, cut into micro-batches (an incomplete tail is
left for a later epoch's shuffle), shuffle the micro-batches, deal them round-robin to the
data-parallel ranks (the count is cut to a multiple of the rank count so every rank takes as many
steps). The position (epoch, cursor) is the whole sampler state, so a resumed run reads exactly the
micro-batches the interrupted one would have read.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kaleido.model.flow_matching import FlowMatchingBatch
from kaleido.train.latents import BucketKey, CachedSample, LatentCache


def _group(buckets: Sequence[BucketKey]) -> dict[BucketKey, list[int]]:
    groups: dict[BucketKey, list[int]] = defaultdict(list)
    for index, key in enumerate(buckets):
        groups[key].append(index)
    return groups


def micro_batches_per_epoch(buckets: Sequence[BucketKey], micro_batch: int) -> int:
    """Full single-bucket micro-batches one epoch yields (before the cut to a multiple of the rank count)."""
    return sum(len(members) // micro_batch for members in _group(buckets).values())


def shuffled_micro_batches(groups: dict[Any, list[int]], micro_batch: int, rng: random.Random) -> list[list[int]]:
    """Micro-batches of `micro_batch` sample indices, each from one bucket (shape), shuffled within the buckets and
    then across them by `rng`; a bucket's remainder that fills no micro-batch is left out of this epoch."""
    batches: list[list[int]] = []
    for key in sorted(groups):
        members = list(groups[key])
        rng.shuffle(members)
        usable = len(members) - len(members) % micro_batch
        batches += [members[i : i + micro_batch] for i in range(0, usable, micro_batch)]
    rng.shuffle(batches)
    return batches

class BucketBatchSampler:
    """Yields lists of sample indices, one bucket each, for one data-parallel rank."""

    def __init__(
        self,
        buckets: Sequence[BucketKey],
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        indices: Sequence[int] | None = None,
    ):
        """buckets[i] is the bucket of sample indices[i] (default: of sample i); batches hold those indices."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside [0, {dp_size})")
        if indices is not None and len(indices) != len(buckets):
            raise ValueError(f"{len(indices)} indices for {len(buckets)} buckets")
        names = list(indices) if indices is not None else list(range(len(buckets)))
        self.groups = {key: [names[i] for i in members] for key, members in _group(buckets).items()}
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.epoch = 0
        self.cursor = 0  # micro-batches of the current epoch this rank has consumed
        if self.per_rank_batches() == 0:
            raise ValueError(
                f"{len(buckets)} samples make {micro_batches_per_epoch(buckets, micro_batch)} full micro-batches of "
                f"{micro_batch} per epoch, fewer than the {dp_size} data-parallel ranks"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's micro-batches of `epoch`, in order, before dealing (a pure function of seed and epoch)."""
        batches = shuffled_micro_batches(self.groups, self.micro_batch, random.Random(f"{self.seed}:{epoch}"))
        return batches[: len(batches) - len(batches) % self.dp_size]

    def rank_batches(self, epoch: int) -> list[list[int]]:
        return self.epoch_batches(epoch)[self.dp_rank :: self.dp_size]

    def per_rank_batches(self) -> int:
        total = sum(len(members) // self.micro_batch for members in self.groups.values())
        return total // self.dp_size

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            batches = self.rank_batches(self.epoch)
            while self.cursor < len(batches):
                batch = batches[self.cursor]
                self.cursor += 1
                yield batch
            self.epoch += 1
            self.cursor = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "dp_rank": self.dp_rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed or int(state["dp_rank"]) != self.dp_rank:
            raise ValueError(
                f"sampler state is for seed {state['seed']} / data-parallel rank {state['dp_rank']}, "
                f"this run has seed {self.seed} / rank {self.dp_rank}"
            )
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])


def assign_shards(shard_sizes: dict[str, int], dp_size: int) -> list[list[str]]:
    """Shards per data-parallel rank, balanced by samples: largest shard first to the least-loaded rank (ties: the
    lower rank; shards in name order among equals). Deterministic from the index, so every rank computes every
    rank's share without talking to the others."""
    loads = [0] * dp_size
    shares: list[list[str]] = [[] for _ in range(dp_size)]
    for shard in sorted(shard_sizes, key=lambda name: (-shard_sizes[name], name)):
        rank = min(range(dp_size), key=lambda r: (loads[r], r))
        shares[rank].append(shard)
        loads[rank] += shard_sizes[shard]
    return [sorted(share) for share in shares]


class ShardedBatchSampler(BucketBatchSampler):
    """Each data-parallel rank draws micro-batches from ITS OWN shards only (`assign_shards`), so a rank reads a
    1/dp_size share of the cache (from local disk or object storage) instead of all of it.

    Per epoch a rank shuffles its samples inside each bucket, cuts micro-batches and shuffles them (seeded by seed,
    epoch and rank); every rank takes the same number of steps: the smallest rank's count (each rank computes it
    from the index). The state (epoch, cursor) is the whole sampler state, as for BucketBatchSampler.
    """

    def __init__(self, shares: list[dict[BucketKey, list[int]]], micro_batch: int, dp_rank: int, seed: int = 0):
        self.share_groups = shares
        self.groups = shares[dp_rank]
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = len(shares)
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        if self.per_rank_batches() == 0:
            counts = [sum(len(m) for m in share.values()) for share in shares]
            raise ValueError(
                f"the ranks' shards hold {counts} training samples: some rank makes no full micro-batch of "
                f"{micro_batch} (one bucket per micro-batch); add data or lower train.micro_batch / the world size"
            )

    def per_rank_batches(self) -> int:
        return min(sum(len(m) // self.micro_batch for m in share.values()) for share in self.share_groups)

    def rank_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}:{self.dp_rank}")
        return shuffled_micro_batches(self.groups, self.micro_batch, rng)[: self.per_rank_batches()]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of `epoch` (each rank has its own)."""
        return self.rank_batches(epoch)


def training_sampler(
    cache: LatentCache, micro_batch: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0
) -> BucketBatchSampler:
    """The sampler over the cache's TRAIN split only: held-out (val) samples are never trained on.

    With at least as many shards as data-parallel ranks, each rank reads only its own shards
    (ShardedBatchSampler); with fewer, every rank needs the shared shards anyway and the global shuffle dealt
    round-robin (BucketBatchSampler) is used.
    """
    indices = cache.split_indices("train")
    shares = rank_shares(cache.samples, dp_size)
    if shares is not None:
        return ShardedBatchSampler(shares, micro_batch, dp_rank, seed)
    return BucketBatchSampler([cache.samples[i].bucket for i in indices], micro_batch, dp_rank, dp_size, seed,
                              indices=indices)


def rank_shares(samples: Sequence[CachedSample], dp_size: int) -> list[dict[BucketKey, list[int]]] | None:
    """Per rank, its training samples by bucket (indices into `samples`, the cache's samples) when the cache has at
    least dp_size shards holding training samples, else None."""
    indices = [i for i, sample in enumerate(samples) if sample.split == "train"]
    sizes: dict[str, int] = defaultdict(int)
    for i in indices:
        sizes[samples[i].shard] += 1
    if len(sizes) < dp_size or dp_size < 2:
        return None
    owner = {shard: rank for rank, share in enumerate(assign_shards(dict(sizes), dp_size)) for shard in share}
    shares: list[dict[BucketKey, list[int]]] = [defaultdict(list) for _ in range(dp_size)]
    for i in indices:
        sample = samples[i]
        shares[owner[sample.shard]][sample.bucket].append(i)
    return [dict(share) for share in shares]


def steps_per_epoch(samples: Sequence[CachedSample], micro_batch: int, dp_size: int) -> int:
    """Micro-batches every rank takes per epoch (what the plan checks before a launch)."""
    shares = rank_shares(samples, dp_size)
    if shares is not None:
        return min(sum(len(m) // micro_batch for m in share.values()) for share in shares)
    train = [sample.bucket for sample in samples if sample.split == "train"]
    return micro_batches_per_epoch(train, micro_batch) // dp_size


class Prefetcher:
    """Read-ahead for one rank: a background thread loads the tensors of the next `ahead` micro-batches (fetching
    and checking their shards first: LatentCache.ensure_shard) while the current step runs.

    The sampler's state advances only when the training loop TAKES a micro-batch (`next`), so a checkpoint's
    sampler state is exactly what was trained on; the thread works from its own copy of the position.
    """

    def __init__(self, cache: LatentCache, sampler: BucketBatchSampler, ahead: int = 4) -> None:
        import queue
        import threading

        self.cache = cache
        self.sampler = sampler
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, ahead))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(sampler.epoch, sampler.cursor), daemon=True,
                                       name="kaleido-prefetch")
        self.thread.start()

    def _run(self, epoch: int, cursor: int) -> None:
        try:
            while not self.stop.is_set():
                batches = self.sampler.rank_batches(epoch)
                while cursor < len(batches) and not self.stop.is_set():
                    indices = batches[cursor]
                    cursor += 1
                    items = [self.cache.load(i) for i in indices]
                    self._put((epoch, cursor, indices, items))
                epoch, cursor = epoch + 1, 0
        except BaseException as exc:  # handed to the training loop, which raises it
            self._put(exc)

    def _put(self, value: Any) -> None:
        import queue

        while not self.stop.is_set():
            try:
                self.queue.put(value, timeout=0.2)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[list[int], list[dict[str, torch.Tensor]]]:
        """The next micro-batch (sample indices, loaded tensors); advances the sampler's state."""
        value = self.queue.get()
        if isinstance(value, BaseException):
            raise value
        epoch, cursor, indices, items = value
        self.sampler.epoch, self.sampler.cursor = epoch, cursor
        return indices, items

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


@dataclass
class MicroBatch:
    batch: FlowMatchingBatch
    keys: list[str]
    bucket: BucketKey
    tokens: int  # transformer tokens per sample (references + video), for throughput


def pad_text(text: torch.Tensor, text_len: int) -> torch.Tensor:
    """Real-token embeddings [n, d] -> [text_len, d], zeros after them (Wan's `context`; longer ones are cut)."""
    out = text.new_zeros(text_len, text.shape[-1])
    n = min(text.shape[0], text_len)
    out[:n] = text[:n]
    return out


def sample_tokens(video: torch.Tensor, refs: torch.Tensor, patch: tuple[int, int, int]) -> int:
    pt, ph, pw = patch
    _, frames, height, width = video.shape
    per_ref = (height // ph) * (width // pw)
    return (frames // pt) * per_ref + refs.shape[0] * per_ref


def collate(
    cache: LatentCache,
    indices: list[int],
    null_context: torch.Tensor,
    text_len: int,
    patch: tuple[int, int, int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    items: list[dict[str, torch.Tensor]] | None = None,
) -> MicroBatch:
    """Stack one bucket's samples into the loss's batch (text zero-padded to text_len); `items`: the samples'
    tensors when already loaded (Prefetcher), else they are loaded here."""
    items = items if items is not None else [cache.load(i) for i in indices]
    buckets = {cache.samples[i].bucket for i in indices}
    if len(buckets) != 1:
        raise ValueError(f"a micro-batch mixes buckets {sorted(buckets)}")
    video = torch.stack([item["video"] for item in items]).to(device=device, dtype=dtype)
    refs = torch.stack([item["refs"] for item in items]).to(device=device, dtype=dtype)
    context = torch.stack([pad_text(item["text"], text_len) for item in items]).to(device=device, dtype=dtype)
    batch = FlowMatchingBatch(
        latents=video,
        context=context,
        null_context=pad_text(null_context, text_len).to(device=device, dtype=dtype),
        reference_latents=refs if refs.shape[1] > 0 else None,
    )
    return MicroBatch(
        batch=batch,
        keys=[cache.samples[i].key for i in indices],
        bucket=buckets.pop(),
        tokens=sample_tokens(items[0]["video"], items[0]["refs"], patch),
    )
