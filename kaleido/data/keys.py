"""Stable identity: which shard a source video belongs to, and the per-sample draws that never depend on the others.

Every whole-dataset step is a map over shards keyed by the SOURCE VIDEO, never by a position in a sorted list:

- `shard_of(source, shards)` = sha256(source path) mod `shards`. A source's clips, captions, curation results,
  training samples, tar and latent shard all live in the shard of its source, so adding or removing a source
  redoes exactly its own shard in every stage and leaves every other shard byte-identical.
- Work shards (`data.shards`: ingest, caption, curate) nest in dataset shards (`data.dataset_shards`: pairing,
  tars, latent shards): dataset shard g holds the work shards b with b mod dataset_shards = g, because
  h mod G = (h mod B) mod G whenever G divides B (checked in the params schema).
- `unit(seed, *parts)` is a uniform draw in [0, 1) from sha256 of its parts: the per-sample decisions (type rank,
  cross-pair rank, donor, texture) use it with the sample's own id, so they do not move when others are added.
"""

from __future__ import annotations

import hashlib

SHARD_DIGITS = 5  # shard-NNNNN: up to 100,000 shards


def key_hash(key: str) -> int:
    """The 256-bit integer of sha256(key): the source path's identity, independent of any seed."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest(), "big")


def shard_of(key: str, shards: int) -> int:
    """The shard (0 .. shards-1) of a source video, from its root-relative path."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    return key_hash(key) % shards


def shard_name(index: int) -> str:
    """The folder name of shard `index` ("shard-00042"): a shard's name is its key."""
    return f"shard-{index:0{SHARD_DIGITS}d}"


def stable_hash(*parts: int | str) -> int:
    """A 64-bit integer from sha256 of the parts (ints and strings; stable across processes, runs and machines)."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def unit(*parts: int | str) -> float:
    """A uniform draw in [0, 1) from the parts (53 bits of `stable_hash`)."""
    return (stable_hash(*parts) >> 11) / float(1 << 53)
