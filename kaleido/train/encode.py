"""`kaleido encode`: VAE latents and text embeddings of the training set, computed ONCE.

Training never runs the VAE or the text encoder: they are frozen, and at 480p the VAE costs more
than a DiT step. Per sample of the webdataset shards (kaleido.data.writer):
- the clip: a window of 4k+1 frames (at most train.frames, start drawn from a hash of seed and key
  so a re-run picks the same one), resized to cover the bucket's (height, width) and centre-cropped,
  where the bucket is the train.buckets size nearest to the clip's aspect ratio; encoded by WanVAE;
- each reference: fit and WHITE-padded to the same size and encoded alone as one latent frame (as the
  shipped Kaleido does, and as generation does);
- the caption: umT5 embeddings of its real tokens only (zero-padded to model.text_len at batch time).
The empty prompt's embedding is stored too: text dropout swaps it in for the caption.
One cache shard per source tar; a shard whose marker carries the same hash (tar content + settings +
models) is skipped on a re-run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kaleido.config import Params
from kaleido.train.latents import (
    INDEX_NAME,
    NULL_CONTEXT_NAME,
    CachedSample,
    bucket_name,
    tensor_names,
    write_index,
)
from kaleido.train.plan import stage_dataset, stage_latents

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from kaleido.data.writer import TrainingExample
    from kaleido.model.text_encoder import TextEncoder
    from kaleido.model.vae import WanVAE

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CAPTION_BATCH = 16
# Bumped when the pixel preprocessing changes, so that caches made by the old one are re-encoded.
# 2: the shipped truncating fit/cover arithmetic and bicubic video resize (was: rounding, bilinear).
PREPROCESSING_VERSION = 2


@dataclass
class EncodeReport:
    latents: Path
    encoded_shards: list[str] = field(default_factory=list)
    skipped_shards: list[str] = field(default_factory=list)
    removed_shards: list[str] = field(default_factory=list)
    samples: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, int] = field(default_factory=dict)
    truncated_captions: dict[str, int] = field(default_factory=dict)  # sample key -> caption tokens (> text_len)
    splits: dict[str, int] = field(default_factory=dict)  # "train" / "val" -> samples
    text_len: int = 512

    def summary(self) -> str:
        rejected = sum(self.rejected.values())
        lines = [
            f"encode: {self.samples} samples in {len(self.buckets)} buckets -> {self.latents} "
            f"({len(self.encoded_shards)} shards encoded, {len(self.skipped_shards)} up to date, "
            f"{len(self.removed_shards)} stale removed, {rejected} samples rejected; "
            f"{self.splits.get('train', 0)} train + {self.splits.get('val', 0)} validation)"
        ]
        lines += [f"  bucket {name}: {count}" for name, count in sorted(self.buckets.items())]
        lines += [f"  rejected ({reason}): {count}" for reason, count in sorted(self.rejected.items())]
        if self.truncated_captions:
            longest = max(self.truncated_captions.items(), key=lambda item: item[1])
            lines.append(
                f"warning: {len(self.truncated_captions)} captions are longer than the text encoder's "
                f"{self.text_len} tokens (model.text_len) and were truncated; the longest, {longest[0]}, has "
                f"{longest[1]} tokens. Shorten them (data.caption.max_new_tokens) to train on every word"
            )
        return "\n".join(lines)


def select_frames(total: int, max_frames: int, seed: int, key: str) -> tuple[int, int]:
    """(start, count): count = the largest 4k+1 <= min(total, max_frames); start fixed by (seed, key)."""
    count = (min(total, max_frames) - 1) // 4 * 4 + 1
    span = total - count + 1
    start = zlib.crc32(f"{seed}:{key}".encode()) % span
    return start, count


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The training size whose aspect ratio is nearest (in log space, so 2:1 and 1:2 are equally far from 1:1)."""
    aspect = math.log(height / width)
    return min(buckets, key=lambda size: (abs(math.log(size[0] / size[1]) - aspect), -size[0] * size[1]))


def resize_cover(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, height, width] in [-1, 1], as the shipped training loader does it.

    `zai-org/Kaleido` data_video.py `resize_for_rectangle_crop(..., reshape_mode="center")`: torchvision's
    bicubic resize of the uint8 frames (antialiased, rounded back to uint8) to `cover_size`, the centred
    crop, then (x - 127.5) / 127.5.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    from kaleido.model.media import centre_crop_box, cover_size

    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [T, 3, H, W] uint8
    src_h, src_w = video.shape[-2:]
    new_w, new_h = cover_size(src_w, src_h, width, height)
    if (new_h, new_w) != (src_h, src_w):
        video = resize(video, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    left, top = centre_crop_box(new_w, new_h, width, height)
    video = video[:, :, top : top + height, left : left + width].float()
    return ((video - 127.5) / 127.5).permute(1, 0, 2, 3).contiguous()


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_fingerprint(path: Path) -> dict[str, Any]:
    """Name, size and mtime of the files of a model folder: cheap, and changes when the weights do."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    root = path if path.is_dir() else path.parent
    return {p.relative_to(root).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def _model_path(params: Params, key: str) -> Path:
    value = getattr(params.model, key)
    path = params.resolve(value)
    if path is None:
        raise FileNotFoundError(f"model.{key} is not set in params.yaml; point it at a local folder")
    if not path.exists():
        raise FileNotFoundError(f"model.{key}: {path} does not exist (`kaleido init-tiny` writes the tiny assets)")
    return path


def encode_settings(params: Params, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Everything that changes a cached tensor; its hash is part of every shard marker."""
    from kaleido.model.generate import vae_dtype

    train, model = params.train, params.model
    text_path = _model_path(params, "text_encoder")
    tokenizer = _model_path(params, "tokenizer") if model.tokenizer is not None else text_path
    # The dataset's location is not part of it: a moved dataset with its cache stays up to date.
    return {
        "frames": train.frames,
        "buckets": [list(size) for size in train.buckets],
        "cache_dtype": train.cache_dtype,
        "vae_dtype": str(vae_dtype(params.model.vae_dtype, device)),  # resolved: GPU and CPU caches never mix
        "preprocessing": PREPROCESSING_VERSION,
        "text_len": model.text_len,
        "max_references": model.max_references,
        "seed": train.seed,
        "vae": _folder_fingerprint(_model_path(params, "vae")),
        "text_encoder": _folder_fingerprint(text_path),
        "tokenizer": _folder_fingerprint(tokenizer),
    }


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class _Encoders:
    """VAE + text encoder, loaded only when some shard needs encoding."""

    def __init__(self, params: Params, device: torch.device):
        from kaleido.model.generate import DTYPES, vae_dtype
        from kaleido.model.text_encoder import TextEncoder
        from kaleido.model.vae import WanVAE

        text_path = _model_path(params, "text_encoder")
        tokenizer = _model_path(params, "tokenizer") if params.model.tokenizer is not None else text_path
        # The same VAE dtype as generation (model.vae_dtype): its latents are the targets the DiT learns.
        self.vae: WanVAE = WanVAE.from_pretrained(
            _model_path(params, "vae"), device=device, dtype=vae_dtype(params.model.vae_dtype, device)
        )
        self.text: TextEncoder = TextEncoder.from_pretrained(
            text_path, tokenizer, device=device, dtype=DTYPES[params.model.dtype]
        )
        self.text_len = params.model.text_len

    def captions(self, captions: list[str]) -> list[torch.Tensor]:
        """Each caption's real-token embeddings [n_i, d] (n_i includes </s>)."""
        out = []
        for start in range(0, len(captions), CAPTION_BATCH):
            chunk = captions[start : start + CAPTION_BATCH]
            hidden = self.text.encode(chunk, self.text_len)
            # the same tokenizer call TextEncoder.encode makes (after its whitespace cleaning)
            tokens = self.text.tokenizer(
                [" ".join(c.split()) for c in chunk], padding="max_length", max_length=self.text_len,
                truncation=True, add_special_tokens=True, return_tensors="pt",
            )
            lengths = tokens["attention_mask"].sum(dim=1).tolist()
            out += [hidden[i, : int(n)].float().cpu() for i, n in enumerate(lengths)]
        return out


def _prepare_sample(example: TrainingExample, params: Params) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Pixels of the clip window [3, frames, height, width] and of each white-padded reference [3, height, width]."""
    from PIL import Image

    from kaleido.model.media import reference_pixels

    train = params.train
    frames = example.frames()
    start, count = select_frames(frames.shape[0], train.frames, train.seed, example.key)
    height, width = nearest_bucket(frames.shape[1], frames.shape[2], list(train.buckets))
    video = resize_cover(frames[start : start + count], height, width)
    refs = [
        reference_pixels(Image.fromarray(np.asarray(ref, dtype=np.uint8)), height, width)
        for ref in example.references
    ]
    return video, refs


def _encode_grouped(vae: WanVAE, items: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """VAE-encode [3, T, H, W] items, batching equal shapes (each item is still encoded on its own: the
    VAE mixes nothing across the batch)."""
    out: list[torch.Tensor | None] = [None] * len(items)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, item in enumerate(items):
        by_shape.setdefault(tuple(item.shape), []).append(index)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch):
            chunk = indices[start : start + batch]
            latents = vae.encode_video(torch.stack([items[i] for i in chunk])).cpu()
            for i, latent in zip(chunk, latents, strict=True):
                out[i] = latent
    return [latent for latent in out if latent is not None]


def _encode_shard(
    tar: Path, name: str, out: Path, encoders: _Encoders, params: Params, progress: bool
) -> tuple[list[CachedSample], dict[str, int]]:
    from safetensors.torch import save_file

    from kaleido.data.writer import iter_training_samples
    from kaleido.platform.progress import track

    dtype = CACHE_DTYPES[params.train.cache_dtype]
    rejected: dict[str, int] = {}
    kept, videos, refs = [], [], []
    examples = list(iter_training_samples(tar))
    for example in track(examples, f"encode {name}: decode", unit="sample", enabled=progress):
        if len(example.references) > params.model.max_references:
            rejected["too_many_references"] = rejected.get("too_many_references", 0) + 1
            continue
        try:
            video, ref_pixels = _prepare_sample(example, params)
        except ValueError:  # an undecodable clip: the writer checked the files, not the video stream
            rejected["undecodable_clip"] = rejected.get("undecodable_clip", 0) + 1
            continue
        kept.append(example)
        videos.append(video)
        refs.append(ref_pixels)
    batch = params.train.encode_batch
    video_latents = _encode_grouped(encoders.vae, videos, batch)
    # references: one latent frame each (T = 1), encoded alone as the shipped Kaleido does
    flat_refs = [pixels[:, None] for sample_refs in refs for pixels in sample_refs]
    ref_latents = _encode_grouped(encoders.vae, flat_refs, batch)
    texts = encoders.captions([example.caption for example in kept]) if kept else []
    truncated = {}
    for example in kept:
        truncation = encoders.text.truncation(example.caption, encoders.text_len)
        if truncation is not None:
            truncated[example.key] = truncation.tokens
    tensors: dict[str, torch.Tensor] = {}
    entries: list[CachedSample] = []
    cursor = 0
    for example, video, latent, sample_refs, text in zip(kept, videos, video_latents, refs, texts, strict=True):
        n = len(sample_refs)
        ref_stack = (
            torch.stack([r[:, 0] for r in ref_latents[cursor : cursor + n]])
            if n
            else latent.new_zeros(0, latent.shape[0], *latent.shape[-2:])
        )
        cursor += n
        video_name, refs_name, text_name = tensor_names(example.key)
        tensors[video_name] = latent.to(dtype).contiguous()
        tensors[refs_name] = ref_stack.to(dtype).contiguous()
        tensors[text_name] = text.to(dtype).contiguous()
        _, frames, height, width = video.shape
        entries.append(CachedSample(example.key, name, (frames, height, width, n), int(text.shape[0]), example.split))
    partial = out / f"{name}.safetensors.partial"
    save_file(tensors, str(partial))
    partial.replace(out / f"{name}.safetensors")
    (out / f"{name}.json").write_text(
        json.dumps({"samples": [e.to_json() for e in entries], "rejected": rejected,
                    "truncated_captions": truncated}, indent=1) + "\n"
    )
    return entries, rejected


def latent_shard_name(relative: str) -> str:
    """Cache shard name of a dataset tar: its path under the dataset folder, '/' -> '__', without .tar
    ("shard-00042/train-00042.tar" -> "shard-00042__train-00042"): keyed by the same stable shard key."""
    return relative.removesuffix(".tar").replace("/", "__")


def rank_share(names: list[str], rank: int, world: int) -> list[str]:
    """The cache shards rank `rank` of `world` encodes: every world-th of the sorted names (disjoint, together all)."""
    if not 0 <= rank < world:
        raise ValueError(f"encode rank {rank} outside [0, {world})")
    return sorted(names)[rank::world]


def encode_output(params: Params, stage: str) -> tuple[Path, Any]:
    """(local folder the cache is written in, its storage.Remote or None) for train.<stage>.latents; an s3:// cache
    is written in its staging folder and every finished shard uploaded (marker last)."""
    from kaleido.data.shard_store import bind_remote, remote_for
    from kaleido.platform.storage import endpoint_url, is_remote, staging_folder

    location = stage_latents(params, stage)
    if is_remote(location):
        staging = params.resolve(params.train.latents_staging) if params.train.latents_staging else None
        out = staging or staging_folder(str(location), params)
        bind_remote(out, str(location), endpoint_url(params))
        return out, remote_for(out)
    return Path(location), None


def run_encode(
    params: Params,
    stage: str = "pretrain",
    *,
    force: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    rank: int = 0,
    world: int = 1,
    finalize: bool = True,
) -> EncodeReport:
    """Encode the stage's dataset into its latent cache (train.latents); finished shards are skipped.

    One cache shard per dataset tar, named by the tar's stable shard key, so a dataset that gained a source
    re-encodes only that source's tar. Every tar is checked against its seal in the dataset index (size + sha256)
    before it is read. rank / world: encode only this rank's share (`rank_share`); `finalize` (one process, after
    every rank finished) writes the empty prompt's embedding and the index. An s3:// dataset is read through the
    staging folder, an s3:// cache is uploaded shard by shard (`encode_output`).
    """
    from kaleido.data.writer import dataset_entries

    dataset = stage_dataset(params, stage)
    out, remote = encode_output(params, stage)
    entries = {latent_shard_name(entry.relative): entry for entry in dataset_entries(dataset, params)}
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = encode_settings(params, device)
    settings_hash = _digest(settings)
    device = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    report = EncodeReport(latents=out, text_len=params.model.text_len)
    encoders: _Encoders | None = None
    names = sorted(entries)
    mine = rank_share(names, rank, world)
    from kaleido.platform.progress import Progress

    shards = Progress(f"encode (rank {rank}/{world})", len(mine), "shard", enabled=progress)
    for name in mine:
        entry = entries[name]
        marker = out / f"{name}.done"
        tar_hash = entry.sha256 or _hash_file(entry.verified())
        shard_hash = _digest([settings_hash, tar_hash])
        if not force and _shard_done(out, name, shard_hash, remote):
            report.skipped_shards.append(name)
            shards.update(1, skipped=True)
            continue
        marker.unlink(missing_ok=True)  # an interrupted shard must not look finished
        if remote is not None:
            remote.remove([f"{name}.done"] if remote.exists(f"{name}.done") else [])
        tar = entry.verified()  # downloaded when remote; its size and sha256 checked against the dataset index
        encoders = encoders or _Encoders(params, device)
        entries_out, _ = _encode_shard(tar, name, out, encoders, params, progress)
        files = {f"{name}{suffix}": _file_seal(out / f"{name}{suffix}") for suffix in (".safetensors", ".json")}
        marker.write_text(json.dumps({"hash": shard_hash, "source": entry.relative, "samples": len(entries_out),
                                      "files": files}, sort_keys=True) + "\n")
        if remote is not None:
            remote.upload_files(out, "", [*files, marker.name], last=[marker.name], progress=progress)
            if params.train.latents_staging:  # write-through: the tensors live in the bucket, the markers here
                (out / f"{name}.safetensors").unlink()
        report.encoded_shards.append(name)
        shards.update(1, samples=len(entries_out))
    shards.close()
    if not finalize:
        return report
    return finalize_encode(params, out, remote, names, settings_hash, device, report, force=force, dataset=dataset)


def _file_seal(path: Path) -> dict[str, Any]:
    return {"sha256": _hash_file(path), "size": path.stat().st_size}


def _seals_problem(out: Path, files: dict[str, dict[str, Any]], marker: Path) -> str | None:
    from kaleido.platform.integrity import seal_problem

    hashes = {file: seal["sha256"] for file, seal in files.items()}
    sizes = {file: seal["size"] for file, seal in files.items()}
    return seal_problem(out, hashes, sizes, marker.stat().st_mtime_ns)


def _null_context_damaged(out: Path, marker: Path) -> bool:
    """The empty prompt's embedding changed after it was sealed (the previous index's seal; none: trusted)."""
    try:
        seal = json.loads((out / INDEX_NAME).read_text()).get("null_context")
    except (OSError, ValueError):
        return False
    if not isinstance(seal, dict) or "sha256" not in seal:
        return False
    problem = _seals_problem(out, {NULL_CONTEXT_NAME: seal}, marker)
    if problem is not None:
        log.warning("latent cache %s: %s: encoding the empty prompt again", out, problem)
    return problem is not None


def _shard_done(out: Path, name: str, shard_hash: str, remote: Any) -> bool:
    """Whether cache shard `name` was encoded from these bytes with these settings (its .done marker says so and
    its files are intact: sizes, and sha256 where changed after the marker, `integrity.seal_problem`; for an
    s3:// cache, the uploaded marker)."""
    marker = out / f"{name}.done"
    record: dict[str, Any] | None = None
    if marker.is_file():
        try:
            record = json.loads(marker.read_text())
        except ValueError:
            record = None
    # markers from before seals list no files: their shard and its .json being there is enough (as it was)
    files = record.get("files") if record is not None else None
    if record is not None and record.get("hash") == shard_hash:
        problem = _seals_problem(out, files, marker) if files else (
            None if (out / f"{name}.safetensors").is_file() and (out / f"{name}.json").is_file() else "missing")
        if problem is None:
            return True
        if remote is None and files:
            log.warning("latent cache %s: %s: encoding that shard again", out, problem)
    if remote is None:
        return False
    data = remote.read_bytes(f"{name}.done")
    if data is None or json.loads(data).get("hash") != shard_hash:
        return False
    listing = remote.listing("")
    files = json.loads(data).get("files", {})
    if any(listing.get(file) != seal["size"] for file, seal in files.items()):
        return False
    remote.download(f"{name}.json", out / f"{name}.json")  # the index is built from it; tensors stay remote
    marker.write_bytes(data)
    return True


def finalize_encode(
    params: Params, out: Path, remote: Any, names: list[str], settings_hash: str, device: torch.device,
    report: EncodeReport, *, force: bool = False, dataset: Any = None,
) -> EncodeReport:
    """After every rank: the empty prompt's embedding, stale shards removed, and the index (the cache's seal: every
    shard with its sha256 and size), written last and uploaded last."""
    missing = [name for name in names if not (out / f"{name}.done").is_file() or not (out / f"{name}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"latent cache {out}: shards not encoded yet: {', '.join(missing[:5])}; run "
                                "`kaleido encode` again (finished shards are kept)")
    null_marker = out / (NULL_CONTEXT_NAME + ".done")
    if remote is not None and not force and not null_marker.is_file() and remote.exists(null_marker.name):
        remote.download(null_marker.name, null_marker)  # encoded elsewhere: fetched, not recomputed
        remote.download(NULL_CONTEXT_NAME, out / NULL_CONTEXT_NAME)
    if force or not (out / NULL_CONTEXT_NAME).is_file() or not null_marker.is_file() or \
            null_marker.read_text().strip() != settings_hash or _null_context_damaged(out, null_marker):
        from safetensors.torch import save_file

        encoders = _Encoders(params, device)
        null = encoders.captions([""])[0].to(CACHE_DTYPES[params.train.cache_dtype]).contiguous()
        save_file({"null_context": null}, str(out / NULL_CONTEXT_NAME))
        null_marker.write_text(settings_hash + "\n")

    for stale in sorted(out.glob("*.done")):  # shards of tars that no longer exist
        name = stale.name[: -len(".done")]
        if name == NULL_CONTEXT_NAME or name in names:
            continue
        for suffix in (".done", ".safetensors", ".json"):
            (out / f"{name}{suffix}").unlink(missing_ok=True)
        if remote is not None:
            remote.remove([f"{name}{s}" for s in (".done", ".safetensors", ".json") if remote.exists(f"{name}{s}")])
        report.removed_shards.append(name)

    samples: list[CachedSample] = []
    seen: set[str] = set()
    seals: dict[str, Any] = {}
    for name in names:
        shard = json.loads((out / f"{name}.json").read_text())
        seals[name] = json.loads((out / f"{name}.done").read_text()).get("files", {}).get(f"{name}.safetensors")
        for reason, count in shard.get("rejected", {}).items():
            report.rejected[reason] = report.rejected.get(reason, 0) + count
        report.truncated_captions.update(shard.get("truncated_captions", {}))
        for row in shard["samples"]:
            sample = CachedSample.from_json(row)
            if sample.key in seen:  # the writer keeps keys unique per dataset; guard against merged folders
                report.rejected["duplicate_key"] = report.rejected.get("duplicate_key", 0) + 1
                continue
            seen.add(sample.key)
            samples.append(sample)
    text_dim, z_dim = _dims(out, names, remote)
    splits = {split: sum(1 for sample in samples if sample.split == split) for split in ("train", "val")}
    meta = {"dataset": str(dataset), "settings_hash": settings_hash, "text_dim": text_dim, "z_dim": z_dim,
            "splits": splits, "shards": seals, "null_context": _file_seal(out / NULL_CONTEXT_NAME)}
    write_index(out, samples, meta)
    if remote is not None:
        remote.upload_files(out, "", [NULL_CONTEXT_NAME, null_marker.name, "index.json"], last=["index.json"])
    report.samples = len(samples)
    for sample in samples:
        name = bucket_name(sample.bucket)
        report.buckets[name] = report.buckets.get(name, 0) + 1
        report.splits[sample.split] = report.splits.get(sample.split, 0) + 1
    return report


def _dims(out: Path, names: list[str], remote: Any = None) -> tuple[int, int]:
    """(text_dim, z_dim) read back from the cache (the empty prompt; any video latent)."""
    from safetensors import safe_open

    with safe_open(str(out / NULL_CONTEXT_NAME), framework="pt") as handle:
        text_dim = int(handle.get_slice("null_context").get_shape()[-1])
    z_dim = 16
    for name in names:
        if not (out / f"{name}.safetensors").is_file():
            continue  # an s3:// cache's shard not on this machine
        with safe_open(str(out / f"{name}.safetensors"), framework="pt") as handle:
            videos = [k for k in handle.keys() if k.endswith("/video")]  # noqa: SIM118 (safe_open has no __iter__)
            if videos:
                z_dim = int(handle.get_slice(videos[0]).get_shape()[0])
                break
    return text_dim, z_dim
