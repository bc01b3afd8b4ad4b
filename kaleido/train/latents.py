"""The latent cache: what `kaleido encode` writes once and every training step reads.

Layout of a cache folder:
  index.json                 every sample: key, shard, bucket (frames, height, width, num_refs), text tokens
  null_context.safetensors   `null_context` [tokens, text_dim]: the empty prompt (text dropout / CFG)
  <shard>.safetensors        per sample `<key>/video` [16, F, h, w], `<key>/refs` [n, 16, h, w],
                             `<key>/text` [tokens, text_dim] (real tokens only; zero-padded at batch time)
  <shard>.json               that shard's sample entries (the index is rebuilt from these)
  <shard>.done               marker: the hash of the source tar + encode settings that produced the shard
One cache shard per source tar shard, so a re-run only encodes tars that are new or changed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

INDEX_NAME = "index.json"
NULL_CONTEXT_NAME = "null_context.safetensors"
CACHE_FORMAT = "kaleido-latents"
CACHE_VERSION = 1

BucketKey = tuple[int, int, int, int]  # (pixel frames, height, width, number of references)


class CacheError(FileNotFoundError):
    """The latent cache is missing or unusable; the message names the folder and the command that fixes it."""


@dataclass(frozen=True)
class CachedSample:
    key: str
    shard: str
    bucket: BucketKey
    text_tokens: int
    split: str = "train"  # "train" or "val" (held out by source video in curation)

    @property
    def num_refs(self) -> int:
        return self.bucket[3]

    def to_json(self) -> dict[str, Any]:
        frames, height, width, refs = self.bucket
        return {
            "key": self.key,
            "shard": self.shard,
            "bucket": {"frames": frames, "height": height, "width": width, "num_refs": refs},
            "text_tokens": self.text_tokens,
            "split": self.split,
        }

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> CachedSample:
        bucket = row["bucket"]
        key = (int(bucket["frames"]), int(bucket["height"]), int(bucket["width"]), int(bucket["num_refs"]))
        return cls(row["key"], row["shard"], key, int(row["text_tokens"]), str(row.get("split", "train")))


def bucket_name(bucket: BucketKey) -> str:
    frames, height, width, refs = bucket
    return f"{frames}x{height}x{width}+{refs}ref"


def tensor_names(key: str) -> tuple[str, str, str]:
    return f"{key}/video", f"{key}/refs", f"{key}/text"


def write_index(folder: Path, samples: Iterable[CachedSample], meta: dict[str, Any]) -> Path:
    """index.json, written atomically (a reader never sees half an index)."""
    rows = [sample.to_json() for sample in samples]
    buckets: dict[str, int] = {}
    for row in rows:
        name = bucket_name(CachedSample.from_json(row).bucket)
        buckets[name] = buckets.get(name, 0) + 1
    data = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **meta, "buckets": buckets, "samples": rows}
    path = folder / INDEX_NAME
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    partial.replace(path)
    return path


def read_index(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / INDEX_NAME
    if not path.is_file():
        raise CacheError(
            f"latent cache {folder}: no {INDEX_NAME}; run `kaleido encode` first (train.latents in params.yaml)"
        )
    data = json.loads(path.read_text())
    if data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
        raise CacheError(
            f"latent cache {folder}: format {data.get('format')!r} v{data.get('version')}, expected "
            f"{CACHE_FORMAT!r} v{CACHE_VERSION}; re-run `kaleido encode --force`"
        )
    return data


class LatentCache:
    """Random access to the cached samples of one folder (shards opened lazily, memory-mapped)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self.samples = [CachedSample.from_json(row) for row in self.index["samples"]]
        self.text_dim = int(self.index["text_dim"])
        self.z_dim = int(self.index["z_dim"])
        missing = sorted({s.shard for s in self.samples if not (self.folder / f"{s.shard}.safetensors").is_file()})
        if missing:
            raise CacheError(
                f"latent cache {self.folder}: shard files missing for {', '.join(missing[:5])}; "
                "re-run `kaleido encode`"
            )
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def buckets(self) -> list[BucketKey]:
        return [sample.bucket for sample in self.samples]

    def split_indices(self, split: str) -> list[int]:
        """Indices of the samples of one split ("train" or "val"), in cache order."""
        return [index for index, sample in enumerate(self.samples) if sample.split == split]

    def _handle(self, shard: str) -> Any:
        from safetensors import safe_open

        if shard not in self._handles:
            path = self.folder / f"{shard}.safetensors"
            check_cache_file(path)
            self._handles[shard] = safe_open(str(path), framework="pt")
        return self._handles[shard]

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """{"video": [16, F, h, w], "refs": [n, 16, h, w], "text": [tokens, text_dim]} of sample `index`."""
        sample = self.samples[index]
        handle = self._handle(sample.shard)
        video, refs, text = tensor_names(sample.key)
        return {"video": handle.get_tensor(video), "refs": handle.get_tensor(refs), "text": handle.get_tensor(text)}

    def null_context(self) -> torch.Tensor:
        from safetensors.torch import load_file

        path = self.folder / NULL_CONTEXT_NAME
        if not path.is_file():
            raise CacheError(f"latent cache {self.folder}: {NULL_CONTEXT_NAME} missing; re-run `kaleido encode`")
        check_cache_file(path)
        return load_file(str(path))["null_context"]


def check_cache_file(path: Path) -> None:
    """A cache file's safetensors header against its size; CacheError naming the file (safetensors' own error on a
    truncated file names none)."""
    from kaleido.model.checkpoint import CheckpointError, safetensors_header

    try:
        safetensors_header(path)
    except CheckpointError as exc:
        raise CacheError(f"{exc}".replace("download or export it again", "re-run `kaleido encode --force`")) from None
