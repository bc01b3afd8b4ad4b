"""The training set: sharded webdataset tar files, and the reader training uses.

Why webdataset tar:
- streaming reads: a tar is read front to back, one large sequential read per shard, from local
  disk or object storage (webdataset opens `s3://`, `gs://`, `http(s)://` and `pipe:` URLs), with
  no random access into millions of small files;
- it is a plain POSIX tar: `tar tvf` lists it, any language reads it, nothing proprietary;
- shards are ordinary files: DVC versions and caches them (one output folder per stage), rsync and
  object stores move them;
- `webdataset.WebDataset` is an IterableDataset: it feeds a PyTorch DataLoader with workers and
  splits shards across nodes and workers, which is how a DeepSpeed launcher feeds each rank.

One sample = the members sharing a key (the sample id):
  <key>.mp4        the target clip (H.264)
  <key>.txt        the caption
  <key>.ref<i>.png reference image i (RGB)          i = 0 .. N-1
  <key>.mask<i>.png its subject mask (L, 0/255), when the sample has one
  <key>.json       sample type, cross-pair flag, per-reference category/group/box, provenance
Tar members carry fixed owner, mode and mtime, so the same samples give byte-identical shards.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from kaleido.data.paths import PathOutsideRoot, resolve_inside, safe_name
from kaleido.data.records import SAMPLE_TYPES, Rejection, TrainingSample

STAGE = "write"


class SampleError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def sample_key(sample_id: str) -> str:
    """The webdataset key: no dots (webdataset splits member names at the first dot)."""
    return safe_name(sample_id, limit=120)


def _inside_file(root: Path, value: str | None, what: str) -> Path:
    if not value:
        raise SampleError("missing_file", f"{what}: no path")
    try:
        path = resolve_inside(root, value)
    except PathOutsideRoot as exc:
        raise SampleError(exc.reason, f"{what}: {exc}") from None
    if not path.is_file():
        raise SampleError("missing_file", f"{what} {value} not found under the data root")
    return path


def _png_bytes(path: Path, mode: str, what: str) -> bytes:
    """The image as PNG bytes in `mode` ("RGB" or "L"); a plain PNG already in that mode is copied as is.

    RGB goes through the project's one image loader (media.load_image: orientation, bit depth, alpha, profile).
    """
    from kaleido.model.media import ImageError, load_image

    try:
        with Image.open(path) as image:
            image.load()
            plain = not (image.info.get("exif") or image.info.get("icc_profile") or "transparency" in image.info)
            if image.format == "PNG" and image.mode == mode and plain:
                return path.read_bytes()
            converted = load_image(path, what) if mode == "RGB" else image.convert(mode)
    except ImageError as exc:
        raise SampleError("bad_image", str(exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise SampleError("bad_image", f"{what} {path.name} is not a readable image ({exc})") from None
    if mode == "L":  # masks are binary
        converted = converted.point(lambda value: 255 if value >= 128 else 0)
    buffer = io.BytesIO()
    converted.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_members(
    sample: TrainingSample, root: Path, clip: dict[str, Any] | None = None, max_references: int | None = None
) -> dict[str, Any]:
    """The webdataset dict for one sample (bytes per extension); SampleError when it is not valid."""
    if sample.sample_type not in SAMPLE_TYPES:
        raise SampleError("bad_sample_type", f"sample_type {sample.sample_type!r}; allowed: {', '.join(SAMPLE_TYPES)}")
    if not sample.caption or not sample.caption.strip():
        raise SampleError("empty_caption", "the sample has no caption")
    if not sample.references:
        raise SampleError("no_references", "the sample has no reference image")
    if max_references is not None and len(sample.references) > max_references:
        raise SampleError(
            "too_many_references", f"{len(sample.references)} references > max_references {max_references}"
        )
    members: dict[str, Any] = {
        "__key__": sample_key(sample.sample_id),
        "mp4": _inside_file(root, sample.clip_path, "clip").read_bytes(),
        "txt": sample.caption.strip().encode("utf-8"),
    }
    references = []
    for index, reference in enumerate(sample.references):
        image = _inside_file(root, reference.image_path, f"reference {index}")
        members[f"ref{index}.png"] = _png_bytes(image, "RGB", f"reference {index}")
        if reference.mask_path:
            mask = _inside_file(root, reference.mask_path, f"mask {index}")
            members[f"mask{index}.png"] = _png_bytes(mask, "L", f"mask {index}")
        row = reference.to_json()
        row["has_mask"] = bool(reference.mask_path)
        references.append(row)
    provenance = dict(sample.provenance)
    if clip is not None:
        provenance.setdefault("clip", clip)
    meta = {
        "sample_id": sample.sample_id,
        "clip_id": sample.clip_id,
        "caption": sample.caption,
        "sample_type": sample.sample_type,
        "cross_pair": bool(sample.cross_pair),
        "split": sample.split,
        "num_references": len(references),
        "references": references,
        "provenance": provenance,
    }
    members["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return members


def write_tar(
    samples: Iterable[tuple[TrainingSample, dict[str, Any] | None]],
    root: Path,
    tar_path: Path,
    max_references: int | None = None,
) -> tuple[list[dict[str, Any]], list[Rejection]]:
    """Write valid samples to one tar; invalid ones become Rejections.

    Returns (the JSON metadata of each written sample, rejections)."""
    import webdataset as wds

    tar_path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    rejections: list[Rejection] = []
    metas: list[dict[str, Any]] = []
    with tar_path.open("wb") as handle:
        writer = wds.TarWriter(handle, user="kaleido", group="kaleido", mode=0o644, mtime=0, encoder=False)
        try:
            for sample, clip in samples:
                try:
                    members = sample_members(sample, root, clip, max_references)
                except SampleError as exc:
                    rejections.append(Rejection(STAGE, sample.sample_id, exc.reason, exc.detail))
                    continue
                writer.write(members)
                metas.append(json.loads(members["json"]))
                written += 1
        finally:
            writer.close()
    if written == 0:
        tar_path.unlink()  # no empty shards for the loader to trip on
    return metas, rejections


def write_dataset_shard(ctx: Any) -> dict[str, Any]:
    """Shard fn (shards.run_shards). Payload per sample id: {"sample": TrainingSample JSON, "clip": ClipRecord JSON}."""
    from kaleido.data.records import write_jsonl

    pairs = []
    for sample_id in ctx.spec.items:
        entry = ctx.spec.payload[sample_id]
        pairs.append((TrainingSample.from_json(entry["sample"]), entry.get("clip")))
    tar_path = ctx.work_dir / f"train-{ctx.spec.shard_id:05d}.tar"
    max_refs = ctx.params.data.references.max_references
    metas, rejections = write_tar(pairs, ctx.root, tar_path, max_refs)
    write_jsonl(ctx.work_dir / "written.jsonl", metas)
    write_jsonl(ctx.work_dir / "rejections.jsonl", rejections)
    cross = sum(1 for meta in metas if meta["cross_pair"])
    return {"samples": len(metas), "rejected": len(rejections), "cross_pair": cross}


# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class TrainingExample:
    """One sample as read back from the tar shards."""

    key: str
    clip: bytes  # the mp4 file
    caption: str
    references: list[np.ndarray]  # uint8 [H, W, 3]
    masks: list[np.ndarray | None]  # uint8 [H, W] (0/255) or None, aligned with references
    meta: dict[str, Any] = field(default_factory=dict)
    url: str = ""

    @property
    def sample_type(self) -> str:
        return self.meta["sample_type"]

    @property
    def cross_pair(self) -> bool:
        return bool(self.meta["cross_pair"])

    @property
    def split(self) -> str:
        """"train" or "val" (held out by source video); datasets written before the split are all "train"."""
        return str(self.meta.get("split", "train"))

    @property
    def provenance(self) -> dict[str, Any]:
        return self.meta.get("provenance", {})

    def frames(self) -> np.ndarray:
        """Decode the clip: uint8 [T, H, W, 3]."""
        return decode_mp4_bytes(self.clip)


def decode_mp4_bytes(data: bytes) -> np.ndarray:
    import av

    from kaleido.model.media import frame_to_rgb

    with av.open(io.BytesIO(data)) as container:
        frames = [frame_to_rgb(frame) for frame in container.decode(video=0)]
    if not frames:
        raise ValueError("the clip has no decodable frames")
    return np.stack(frames)


DATASET_INDEX = "index.json"  # written last by `kaleido write-dataset`: the dataset folder is complete
TAR_FIX = "run `kaleido write-dataset` again, or restore the data version (`dvc pull` / `dvc checkout`)"


@dataclass(frozen=True)
class DatasetTar:
    """One tar of a dataset: where it is (or will be) on this machine, and its seal from the dataset index."""

    path: Path  # local path
    relative: str  # path under the dataset folder (the latent shard's name derives from it)
    sha256: str | None = None  # None: a folder without an index (plain tars given by hand)
    size: int | None = None
    remote: str | None = None  # s3:// URI of the tar when the dataset lives in object storage

    def verified(self) -> Path:
        """The local tar, downloaded when the dataset is remote, checked against its seal (size + sha256; the
        verdict is cached per file, kaleido.platform.integrity). IntegrityError names the tar and the fix."""
        from kaleido.platform.integrity import verify_file

        if self.remote is not None and (not self.path.is_file() or self.path.stat().st_size != self.size):
            from kaleido.platform.storage import Remote

            parent, name = self.remote.rsplit("/", 1)
            Remote(parent).download(name, self.path)
        if self.sha256 is not None:
            verify_file(self.path, sha256=self.sha256, size=self.size, what="dataset tar", fix=TAR_FIX)
        return self.path


def _read_index(folder: Path) -> dict[str, Any]:
    index = folder / DATASET_INDEX
    if not index.is_file():
        raise FileNotFoundError(
            f"dataset {folder} has no {DATASET_INDEX}: `kaleido write-dataset` started and did not finish; run it again"
        )
    return json.loads(index.read_text())


def dataset_entries(path: str | Path, params: Any = None) -> list[DatasetTar]:
    """The tars of a dataset with their seals: a folder written by `kaleido write-dataset` (its index.json names
    every tar with its sha256 and size), an `s3://` prefix holding one (the index is read, the tars are downloaded
    into the staging folder when `DatasetTar.verified` is called), or plain tars (a folder, a glob, one file:
    nothing to check them against). Sorted by relative path."""
    from kaleido.platform.storage import Remote, is_remote, staging_folder

    if is_remote(path):
        uri = str(path).rstrip("/")
        data = Remote(uri).read_bytes(DATASET_INDEX)
        if data is None:
            raise FileNotFoundError(f"dataset {uri} has no {DATASET_INDEX}; run `kaleido write-dataset` first")
        local = staging_folder(uri, params)
        rows = json.loads(data)["shards"]
        return sorted(
            (DatasetTar(local / _under(row["path"]), _under(row["path"]), row.get("sha256"), row.get("size"),
                        f"{uri}/{_under(row['path'])}") for row in rows),
            key=lambda entry: entry.relative,
        )
    text = os.fspath(path)
    folder = Path(text)
    if os.path.isdir(text) and any(folder.glob("shard-*")):
        rows = _read_index(folder)["shards"]
        entries = [DatasetTar(folder / _under(row["path"]), _under(row["path"]), row.get("sha256"), row.get("size"))
                   for row in rows]
        found = glob.glob(os.path.join(text, "**", "*.tar"), recursive=True)
        named = {entry.relative for entry in entries}
        present = {Path(tar).relative_to(folder).as_posix() for tar in found}
        if named != present:
            missing, extra = sorted(named - present), sorted(present - named)
            raise FileNotFoundError(
                f"dataset {folder} does not match its {DATASET_INDEX} (missing {missing[:3]}, unlisted "
                f"{extra[:3]}); run `kaleido write-dataset` again"
            )
        return sorted(entries, key=lambda entry: entry.relative)
    tars = _plain_tars(text)
    base = folder if os.path.isdir(text) else None
    return [DatasetTar(Path(tar), Path(tar).relative_to(base).as_posix() if base else Path(tar).name) for tar in tars]


def _under(index_path: str) -> str:
    """An index row's path ("dataset/shard-00000/train-00000.tar") relative to the dataset folder."""
    return Path(*Path(index_path).parts[1:]).as_posix()


def _plain_tars(text: str) -> list[str]:
    if os.path.isdir(text):
        found = glob.glob(os.path.join(text, "**", "*.tar"), recursive=True)
    elif any(char in text for char in "*?["):
        found = glob.glob(text, recursive=True)
    else:
        found = [text] if os.path.isfile(text) else []
    if not found:
        raise FileNotFoundError(f"no .tar shards at {text}")
    return sorted(found)


def dataset_tars(path: str | Path) -> list[str]:
    """Tar shards at `path`: one .tar, a folder (searched recursively) or a glob; sorted, each CHECKED.

    A folder written by `kaleido write-dataset` (it has shard-* folders) must hold the index that
    stage writes last, and exactly the tars the index names: a killed or racing write-dataset, or a
    tar removed since, is refused (FileNotFoundError naming the folder and the fix) instead of
    training on part of the data; and every tar must have the size and sha256 its index records (its
    shard's seal): a tar changed since (a corrupted copy, a bad `dvc pull`) raises IntegrityError naming it.
    """
    return [str(entry.verified()) for entry in dataset_entries(path)]


def _decode_png(data: bytes, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert(mode))


def iter_training_samples(path: str | Path, decode_images: bool = True) -> Iterator[TrainingExample]:
    """Every sample of the shards at `path`, in shard order (webdataset under the hood).

    For training, wrap `webdataset.WebDataset(dataset_tars(path), shardshuffle=...)` in a
    DataLoader directly; this reader is the reference for what a sample holds.
    """
    import webdataset as wds

    dataset = wds.WebDataset(dataset_tars(path), shardshuffle=False, empty_check=False, nodesplitter=None)
    for raw in dataset:
        meta = json.loads(raw["json"])
        count = int(meta.get("num_references", len(meta.get("references", []))))
        references: list[Any] = []
        masks: list[Any] = []
        for index in range(count):
            image = raw[f"ref{index}.png"]
            mask = raw.get(f"mask{index}.png")
            references.append(_decode_png(image, "RGB") if decode_images else image)
            masks.append(None if mask is None else (_decode_png(mask, "L") if decode_images else mask))
        yield TrainingExample(
            key=raw["__key__"],
            clip=raw["mp4"],
            caption=raw["txt"].decode("utf-8"),
            references=references,
            masks=masks,
            meta=meta,
            url=raw.get("__url__", ""),
        )
