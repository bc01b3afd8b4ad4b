"""The latent cache: what `kaleido encode` writes once and every training step reads.

Layout of a cache folder:
  index.json                 every sample: key, shard, bucket (frames, height, width, num_refs), text tokens
  null_context.safetensors   `null_context` [tokens, text_dim]: the empty prompt (text dropout / CFG)
  <shard>.safetensors        per sample `<key>/video` [16, F, h, w], `<key>/refs` [n, 16, h, w],
                             `<key>/text` [tokens, text_dim] (real tokens only; zero-padded at batch time)
  <shard>.json               that shard's sample entries (the index is rebuilt from these)
  <shard>.done               marker: the hash of the source tar + encode settings that produced the shard, and
                             the sha256 and size of the shard's files
One cache shard per source tar shard (named by its stable shard key), so a re-run only encodes tars that are new
or changed. The index is the cache's seal: it records every shard's sha256 and size, and every reader checks a
shard against it before using it (kaleido.platform.integrity: once per file, the verdict cached).
A cache may live in object storage (train.latents: s3://bucket/prefix): the reader downloads the index, then each
shard when first needed (the streaming loader asks ahead) into the staging folder, and checks it the same way.
"""

from __future__ import annotations

import json
import sys
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


def read_index(folder: str | Path, params: Any = None) -> dict[str, Any]:
    """The cache's index.json (an s3:// cache: downloaded into its staging folder first)."""
    from kaleido.platform.storage import is_remote

    if is_remote(folder):
        folder = _fetch_index(str(folder), params)
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


def _fetch_index(uri: str, params: Any = None) -> Path:
    """Download an s3:// cache's index into its staging folder (always: the remote index is the truth)."""
    from kaleido.platform.storage import Remote, staging_folder

    folder = staging_folder(uri, params)
    data = Remote(uri).read_bytes(INDEX_NAME)
    if data is None:
        raise CacheError(f"latent cache {uri}: no {INDEX_NAME}; run `kaleido encode` first (train.latents)")
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (INDEX_NAME + ".partial")
    partial.write_bytes(data)
    partial.replace(folder / INDEX_NAME)
    return folder


SHARD_FIX = "re-run `kaleido encode` (it re-encodes what changed), or restore the cache"


class LatentCache:
    """Random access to the cached samples of one folder or s3:// prefix (shards checked against the index's seal
    when first opened, then memory-mapped; remote shards downloaded into the staging folder first).

    `ensure_shard` is thread-safe: the streaming loader's background thread fetches and checks the next shards
    while the step runs.
    """

    def __init__(self, folder: str | Path, params: Any = None):
        import threading

        from kaleido.platform.storage import Remote, is_remote

        self.location = str(folder)
        self.remote = Remote(self.location) if is_remote(folder) else None
        self.folder = _fetch_index(self.location, params) if self.remote is not None else Path(folder)
        self.index = read_index(self.folder)
        self.samples = [CachedSample.from_json(row) for row in self.index["samples"]]
        self.text_dim = int(self.index["text_dim"])
        self.z_dim = int(self.index["z_dim"])
        self.seals: dict[str, Any] = dict(self.index.get("shards") or {})  # caches from before seals: {}
        if self.remote is None:
            missing = sorted({s.shard for s in self.samples if not (self.folder / f"{s.shard}.safetensors").is_file()})
        else:
            listing = self.remote.listing("")
            missing = sorted({s.shard for s in self.samples if f"{s.shard}.safetensors" not in listing})
        if missing:
            raise CacheError(
                f"latent cache {self.location}: shard files missing for {', '.join(missing[:5])}; "
                "re-run `kaleido encode`"
            )
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def buckets(self) -> list[BucketKey]:
        return [sample.bucket for sample in self.samples]

    @property
    def shards(self) -> list[str]:
        """The cache's shard names, sorted."""
        return sorted({sample.shard for sample in self.samples})

    def split_indices(self, split: str) -> list[int]:
        """Indices of the samples of one split ("train" or "val"), in cache order."""
        return [index for index, sample in enumerate(self.samples) if sample.split == split]

    def ensure_file(self, name: str, seal: dict[str, Any] | None, what: str) -> Path:
        """A cache file on this machine (downloaded from an s3:// cache when missing or of another size), checked
        against its seal (size + sha256, verdict cached) and its safetensors header. CacheError / IntegrityError
        name the file and the fix."""
        import threading

        from kaleido.platform.integrity import verify_file

        with self._lock:
            lock = self._fetching.setdefault(name, threading.Lock())
        with lock:  # one download per file, whichever thread asks first
            path = self.folder / name
            if self.remote is not None and (not path.is_file() or (seal and path.stat().st_size != seal["size"])):
                size = f" ({seal['size'] / 2**20:,.0f} MB)" if seal else ""
                print(f"fetching {self.remote.url(name)}{size} into {self.folder}", file=sys.stderr, flush=True)
                self.remote.download(name, path)
            if not path.is_file():
                raise CacheError(f"latent cache {self.location}: {name} is missing; {SHARD_FIX}")
            if seal:
                verify_file(path, sha256=seal["sha256"], size=seal["size"], what=what, fix=SHARD_FIX)
            check_cache_file(path)
            return path

    def ensure_shard(self, shard: str) -> Path:
        return self.ensure_file(f"{shard}.safetensors", self.seals.get(shard), "latent shard")

    def _handle(self, shard: str) -> Any:
        from safetensors import safe_open

        with self._lock:
            handle = self._handles.get(shard)
        if handle is None:
            path = self.ensure_shard(shard)
            handle = safe_open(str(path), framework="pt")
            with self._lock:
                handle = self._handles.setdefault(shard, handle)
        return handle

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """{"video": [16, F, h, w], "refs": [n, 16, h, w], "text": [tokens, text_dim]} of sample `index`."""
        sample = self.samples[index]
        handle = self._handle(sample.shard)
        video, refs, text = tensor_names(sample.key)
        return {"video": handle.get_tensor(video), "refs": handle.get_tensor(refs), "text": handle.get_tensor(text)}

    def null_context(self) -> torch.Tensor:
        from safetensors.torch import load_file

        if self.remote is None and not (self.folder / NULL_CONTEXT_NAME).is_file():
            raise CacheError(f"latent cache {self.location}: {NULL_CONTEXT_NAME} missing; re-run `kaleido encode`")
        path = self.ensure_file(NULL_CONTEXT_NAME, self.index.get("null_context"), "latent cache file")
        return load_file(str(path))["null_context"]


def check_cache_file(path: Path) -> None:
    """A cache file's safetensors header against its size; CacheError naming the file (safetensors' own error on a
    truncated file names none)."""
    from kaleido.model.checkpoint import CheckpointError, safetensors_header

    try:
        safetensors_header(path)
    except CheckpointError as exc:
        raise CacheError(f"{exc}".replace("download or export it again", "re-run `kaleido encode --force`")) from None
