"""The curation stages over shards: ingest -> caption (+ subjects) -> curate -> write dataset -> stats.

Each `run_*` reads the previous stage's merged manifest (or a user-supplied one; every path in it
must stay inside the data root), splits the work into shards (shards.run_shards: parallel local
processes or Ray, resumable, deterministic), then merges the shard outputs, in shard order, into
<root>/manifests/. A stage with failed shards raises StageFailed after the other shards finished
and merges nothing; running it again redoes only the failed shards.

Curation plugs in `kaleido.data.curate`: `curate_clip` per clip over clip shards (`curate_shard`),
then `pair_samples` once over all results (`pair_shard`: cross pairs need other clips and sources).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kaleido.config.schema import Params
from kaleido.data.paths import (
    DataLayout,
    PathOutsideRoot,
    check_inside,
    output_folder,
    remove_inside,
    resolve_inside,
    safe_name,
)
from kaleido.data.plan import launch_devices
from kaleido.data.records import (
    ClipRecord,
    Instance,
    Rejection,
    TrainingSample,
    read_jsonl,
    write_jsonl,
)
from kaleido.data.shards import (
    ShardContext,
    ShardSpec,
    StageResult,
    check_manifest,
    make_shards,
    merge_jsonl,
    open_manifests,
    run_shards,
    seal_manifests,
)
from kaleido.data.writer import DATASET_INDEX
from kaleido.platform.files import exclusive_output, write_json_atomic


@dataclass
class StageReport:
    """What a stage did: the shard outcomes, what it wrote, how many items it rejected."""

    stage: str
    result: StageResult | None
    outputs: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        shards = ""
        if self.result is not None:
            shards = (
                f"{len(self.result.done)} shards run, {len(self.result.skipped)} already done, "
                f"{len(self.result.failed)} failed; "
            )
        counts = ", ".join(f"{key} {value}" for key, value in self.counts.items())
        return f"{self.stage}: {shards}{counts}"


def data_root(params: Params) -> Path:
    root = params.resolve(params.data.root)
    assert root is not None
    return root


@contextmanager
def _stage(
    params: Params, stages: Sequence[str], force: bool, manifests: Sequence[Path]
) -> Iterator[tuple[Path, DataLayout, Callable[[], None]]]:
    """Run a stage: hold the locks of its folders (the first names the command) and yield (root, layout, begin).

    The stage checks its inputs first, then calls `begin()`, which clears its folders on --force and removes its
    merged manifests (and their seals), so a run killed midway never leaves the previous run's manifests behind
    as if they were this run's, while a run refused over its inputs changes nothing.
    """
    root = data_root(params)
    root.mkdir(parents=True, exist_ok=True)
    layout = DataLayout(root)
    output_folder(root, "manifests")  # merged manifests are written there: refused when it is a link
    output_folder(root, "manifests/rejections")
    with ExitStack() as locks:
        folders = [output_folder(root, stage) for stage in stages]
        for folder in folders:
            locks.enter_context(exclusive_output(folder, f"kaleido {stages[0]}"))

        def begin() -> None:
            if force:
                for folder in folders:
                    remove_inside(root, folder)
            folders[0].mkdir(parents=True, exist_ok=True)
            open_manifests(root, folders[0], manifests)

        yield root, layout, begin


def _checked_input(root: Path, layout: DataLayout, manifest: str | Path | None, default: Path, stage: str) -> Path:
    """The input manifest: a user's own file (inside the root) as given, or the previous stage's merged manifest,
    refused unless that stage sealed it (see shards.check_manifest)."""
    if manifest is not None:
        return resolve_inside(root, manifest)
    check_manifest(root, layout.stage_dir(stage), default, _COMMANDS[stage])
    return default


_COMMANDS = {"ingest": "kaleido ingest", "caption": "kaleido caption", "pair": "kaleido curate",
             "curate": "kaleido curate", "dataset": "kaleido write-dataset"}


def load_clip_manifest(root: Path, path: Path, stage: str) -> tuple[list[ClipRecord], list[Rejection]]:
    """ClipRecords from a manifest; rows with bad fields or paths outside the root become Rejections."""
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found; run the previous stage first")
    records: list[ClipRecord] = []
    rejections: list[Rejection] = []
    seen: set[str] = set()
    for number, row in enumerate(read_jsonl(path), 1):
        item = str(row.get("clip_id") or f"{path.name}:{number}")
        try:
            record = ClipRecord.from_json(row)
        except (TypeError, KeyError, ValueError) as exc:
            rejections.append(Rejection(stage, item, "bad_record", f"line {number}: {exc}"))
            continue
        checked = check_inside(root, record.path, stage, item)
        if isinstance(checked, Rejection):
            rejections.append(checked)
            continue
        if not checked.is_file():
            rejections.append(Rejection(stage, item, "missing_file", f"clip {record.path} not found"))
            continue
        source = check_inside(root, record.source, stage, item)
        if isinstance(source, Rejection):
            rejections.append(source)
            continue
        if record.clip_id in seen:
            rejections.append(Rejection(stage, item, "duplicate_clip", "the clip id appears twice in the manifest"))
            continue
        seen.add(record.clip_id)
        records.append(record)
    return records, rejections


def _write_rejections(layout: DataLayout, stage: str, shard_dirs: list[Path], extra: list[Rejection]) -> int:
    return merge_jsonl(shard_dirs, "rejections.jsonl", layout.rejections(stage), [r.to_json() for r in extra])


def _merge_and_seal(
    root: Path, layout: DataLayout, stage: str, result: StageResult, part: str, manifest: Path,
    rejections: list[Rejection],
) -> tuple[list[Path], int, int]:
    """A one-manifest stage's end: fail on failed shards, merge `part` of every shard into `manifest` and the
    rejections, seal both. Returns (shard folders, manifest rows, rejected rows)."""
    result.raise_for_failures()
    dirs = result.shard_dirs()
    rows = merge_jsonl(dirs, part, manifest)
    rejected = _write_rejections(layout, stage, dirs, rejections)
    seal_manifests(root, layout.stage_dir(stage), {manifest: dirs, layout.rejections(stage): dirs})
    return dirs, rows, rejected


# ---------------------------------------------------------------------------------------------
# ingest


def ingest_shard(ctx: ShardContext) -> dict[str, Any]:
    """Shard fn: ingest the shard's source videos (root-relative paths) into clips/ + clips.jsonl."""
    from kaleido.data.ingest import ingest_source
    from kaleido.data.shots import make_detector

    cfg = ctx.params.data.ingest
    detector = make_detector(cfg)
    clips_dir = ctx.work_dir / "clips"
    clips_dir.mkdir()
    records: list[ClipRecord] = []
    rejections: list[Rejection] = []
    seconds = 0.0
    for relative in ctx.spec.items:
        got, rejected, duration = ingest_source(ctx.root, relative, cfg, detector, clips_dir, f"{ctx.final_rel}/clips")
        records += got
        rejections += rejected
        seconds += duration
    write_jsonl(ctx.work_dir / "clips.jsonl", records)
    write_jsonl(ctx.work_dir / "rejections.jsonl", rejections)
    return {"sources": len(ctx.spec.items), "clips": len(records), "rejected": len(rejections), "video_s": seconds}


def run_ingest(params: Params, *, progress: bool = True, force: bool = False) -> StageReport:
    """Discover sources under data.root (data.ingest.sources), cut them into clips, write clips.jsonl."""
    from kaleido.data.ingest import discover_sources

    layout = DataLayout(data_root(params))
    outputs = [layout.clips_manifest, layout.rejections("ingest")]
    with _stage(params, ["ingest"], force, outputs) as (root, layout, begin):
        sources, rejections = discover_sources(root, params.data.ingest.sources)
        begin()
        # size and mtime in the shard spec: a replaced source file redoes its shard
        stamps = {}
        for relative in sources:
            info = (root / relative).stat()
            stamps[relative] = [info.st_size, info.st_mtime_ns]
        specs = make_shards(sources, params.data.shard_size, stamps)
        fingerprint = {"ingest": params.data.ingest.model_dump(mode="json")}
        result = run_shards(
            "ingest", specs, ingest_shard, params, fingerprint=fingerprint, progress=progress, unit="video"
        )
        _, clips, rejected = _merge_and_seal(root, layout, "ingest", result, "clips.jsonl", layout.clips_manifest,
                                             rejections)
        seconds = sum(float(o.summary.get("video_s", 0.0)) for o in result.outcomes)
        return StageReport(
            "ingest",
            result,
            {"clips": layout.clips_manifest, "rejections": layout.rejections("ingest")},
            {"sources": len(sources), "clips": clips, "rejected": rejected, "video_seconds": round(seconds)},
        )


# ---------------------------------------------------------------------------------------------
# caption + subjects


def run_caption(
    params: Params, *, manifest: str | Path | None = None, progress: bool = True, force: bool = False
) -> StageReport:
    """Caption every clip (sidecar file or local VLM), match the taxonomy, write captions.jsonl."""
    from kaleido.data.caption import caption_shard, load_sidecar

    layout = DataLayout(data_root(params))
    outputs = [layout.captions_manifest, layout.rejections("caption")]
    with _stage(params, ["caption"], force, outputs) as (root, layout, begin):
        cfg = params.data.caption
        source = _checked_input(root, layout, manifest, layout.clips_manifest, "ingest")
        clips, rejections = load_clip_manifest(root, source, "caption")
        payload: dict[str, dict[str, Any]] = {clip.clip_id: {"record": clip.to_json()} for clip in clips}
        fingerprint: dict[str, Any] = {"caption": cfg.model_dump(mode="json")}
        if cfg.captioner == "sidecar":
            if cfg.sidecar is None:
                raise ValueError("data.caption.captioner is 'sidecar' but data.caption.sidecar is not set")
            sidecar, bad_rows = load_sidecar(root, cfg.sidecar)
            if sidecar is None:  # the file itself is unusable: every clip would go uncaptioned, with exit 0
                raise ValueError(f"data.caption.sidecar: {bad_rows[0].detail}; fix the path (relative to data.root)")
            rejections += bad_rows
            for clip in clips:
                entry = payload[clip.clip_id]
                entry["caption"] = sidecar.lookup(clip)
                entry["source"] = sidecar.source
        taxonomy = params.resolve(cfg.taxonomy)
        if taxonomy is not None:  # the terms are part of the result: a changed taxonomy redoes the stage
            fingerprint["taxonomy_text"] = taxonomy.read_text(encoding="utf-8")
        gpus = launch_devices(params, "kaleido caption") if cfg.captioner == "vlm" else ()
        begin()
        specs = make_shards([clip.clip_id for clip in clips], params.data.shard_size, payload)
        result = run_shards(
            "caption", specs, caption_shard, params, fingerprint=fingerprint, progress=progress, unit="clip",
            gpus=gpus,
        )
        _, captioned, rejected = _merge_and_seal(root, layout, "caption", result, "clips.jsonl",
                                                 layout.captions_manifest, rejections)
        with_subjects = sum(1 for row in read_jsonl(layout.captions_manifest) if row.get("subjects"))
        return StageReport(
            "caption",
            result,
            {"captions": layout.captions_manifest, "rejections": layout.rejections("caption")},
            {"clips": len(clips), "captioned": captioned, "with_subjects": with_subjects, "rejected": rejected},
        )


# ---------------------------------------------------------------------------------------------
# curation: per-clip grounding/segmentation/filters/references (kaleido.data.curate.curate_clip) over
# clip shards, then pairing into training samples (kaleido.data.curate.pair_samples) over all clips

_CURATION_MODELS: dict[str, Any] = {}


def _curation_models(curate: Any, params: Params) -> Any:
    """`curate.load_curation_models(params.data, params)` once per worker process and model config."""
    key = json.dumps(params.data.models.model_dump(mode="json"), sort_keys=True)
    if key not in _CURATION_MODELS:
        _CURATION_MODELS.clear()  # one model set in memory at a time
        _CURATION_MODELS[key] = curate.load_curation_models(params.data, params)
    return _CURATION_MODELS[key]


def _save_png(array: Any, path: Path, mask: bool = False) -> None:
    from PIL import Image

    data = np.asarray(array)
    if mask:
        threshold = 0 if data.dtype == bool or data.max() <= 1 else 127
        data = np.where(data > threshold, 255, 0).astype(np.uint8)
    elif data.dtype != np.uint8:
        data = np.clip(data, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data).save(path, format="PNG")


def persist_pixels(work_dir: Path, final_rel: str, instances: list[Instance], samples: list[TrainingSample]) -> None:
    """Write in-memory masks / reference images (records' `mask` / `image` arrays) as PNG under
    `work_dir` and point the records at `<final_rel>/...`; the arrays are dropped."""
    for instance in instances:
        if getattr(instance, "mask", None) is not None:
            name = f"masks/{safe_name(instance.instance_id or instance.clip_id, 150)}.png"
            _save_png(instance.mask, work_dir / name, mask=True)
            instance.mask_path, instance.mask = f"{final_rel}/{name}", None
    for sample in samples:
        key = safe_name(sample.sample_id, 150)
        for index, reference in enumerate(sample.references):
            if reference.image is not None:
                name = f"refs/{key}-r{index}.png"
                _save_png(reference.image, work_dir / name)
                reference.image_path, reference.image = f"{final_rel}/{name}", None
            if reference.mask is not None:
                name = f"refs/{key}-r{index}-mask.png"
                _save_png(reference.mask, work_dir / name, mask=True)
                reference.mask_path, reference.mask = f"{final_rel}/{name}", None


def curate_shard(ctx: ShardContext) -> dict[str, Any]:
    """Shard fn: `kaleido.data.curate.curate_clip` on every clip of the shard (payload: ClipRecord JSON).

    Calls, with the other stage's signatures (the module is imported here, in the worker):
      load_curation_models(cfg: DataConfig, params: Params) -> models        once per worker process
      curate_clip(clip, frames [T, H, W, 3] uint8, clip.subjects, models, cfg: DataConfig,
                  rng, out_dir, rel_dir=...) -> CurationResult               once per clip
    `rng` depends on data.seed and the clip id only; files go to <shard>/clips/<clip id>/. An
    exception from curate_clip (it is meant to return Rejections instead) rejects that clip only.
    Writes results.jsonl (CurationResult JSON per clip), instances.jsonl, rejections.jsonl.
    """
    from importlib import import_module

    from kaleido.model.media import read_video

    curate = import_module("kaleido.data.curate")
    params = ctx.params
    models = _curation_models(curate, params)
    out_dir, rel_dir = ctx.work_dir / "clips", f"{ctx.final_rel}/clips"
    results: list[Any] = []
    instances: list[Instance] = []
    rejections: list[Any] = []
    for clip_id in ctx.spec.items:
        clip = ClipRecord.from_json(ctx.spec.payload[clip_id])
        try:
            frames = read_video(resolve_inside(ctx.root, clip.path))
        except (ValueError, OSError, PathOutsideRoot) as exc:
            rejections.append(Rejection("curate", clip_id, "unreadable_clip", str(exc)))
            continue
        try:
            result = curate.curate_clip(
                clip, frames, clip.subjects, models, params.data, ctx.rng(clip_id), out_dir, rel_dir=rel_dir
            )
        except Exception as exc:  # one clip's failure must not stop the run
            rejections.append(Rejection("curate", clip_id, "curation_error", f"{exc.__class__.__name__}: {exc}"))
            continue
        result.written_to = str(ctx.root / rel_dir)  # where the files are once the shard folder is renamed
        persist_pixels(ctx.work_dir, ctx.final_rel, result.instances, [])
        results.append(result)
        instances += result.instances
        rejections += result.rejections
    write_jsonl(ctx.work_dir / "results.jsonl", [result.to_json() for result in results])
    write_jsonl(ctx.work_dir / "instances.jsonl", instances)
    write_jsonl(ctx.work_dir / "rejections.jsonl", rejections)
    subjects = sum(len(result.subjects) for result in results)
    return {"clips": len(ctx.spec.items), "curated": len(results), "subjects": subjects, "instances": len(instances)}


def pair_shard(ctx: ShardContext) -> dict[str, Any]:
    """Shard fn (one shard): `kaleido.data.curate.pair_samples` over the results of every curate shard.

    Pairing looks across clips (cross pairs: the subject on a background plate of a clip from another
    source video), so it sees all results at once. Items: the curate shard names;
    payload: their content hashes (a changed curate shard redoes the pairing).
    Writes samples.jsonl (TrainingSample rows), pairing.json (realised mix and ratios).
    """
    from importlib import import_module

    curate = import_module("kaleido.data.curate")
    from kaleido.data.references import CurationResult

    results = [
        CurationResult.from_json(row)
        for name in ctx.spec.items
        for row in read_jsonl(ctx.root / "curate" / name / "results.jsonl")
    ]
    stats: dict[str, Any] = {}
    samples = curate.pair_samples(
        results,
        ctx.params.data,
        ctx.rng(),
        data_root=ctx.root,
        out_dir=ctx.work_dir / "pairs",
        rel_dir=f"{ctx.final_rel}/pairs",
        stats=stats,
    )
    persist_pixels(ctx.work_dir, ctx.final_rel, [], samples)
    write_jsonl(ctx.work_dir / "samples.jsonl", samples)
    (ctx.work_dir / "pairing.json").write_text(json.dumps(stats, indent=1, sort_keys=True, default=str) + "\n")
    return {"samples": len(samples), "cross_pairs": sum(1 for sample in samples if sample.cross_pair),
            "val_samples": sum(1 for sample in samples if sample.split == "val")}


def run_curation(
    params: Params, *, manifest: str | Path | None = None, progress: bool = True, force: bool = False
) -> StageReport:
    """Curate every captioned clip with subject candidates, then pair the results into samples."""
    layout = DataLayout(data_root(params))
    outputs = [layout.instances_manifest, layout.samples_manifest, layout.rejections("curate")]
    with _stage(params, ["curate", "pair"], force, outputs) as (root, layout, begin):
        source = _checked_input(root, layout, manifest, layout.captions_manifest, "caption")
        clips, rejections = load_clip_manifest(root, source, "curate")
        usable = [clip for clip in clips if clip.caption and clip.subjects]
        payload = {clip.clip_id: clip.to_json() for clip in usable}
        data = params.data
        fingerprint = {
            "seed": data.seed,
            "models": data.models.model_dump(mode="json"),
            "grounding": data.grounding.model_dump(mode="json"),
            "filters": data.filters.model_dump(mode="json"),
            "references": data.references.model_dump(mode="json"),
        }
        gpus = launch_devices(params, "kaleido curate")  # refused here when the plan does not fit its GPUs
        begin()
        specs = make_shards([clip.clip_id for clip in usable], data.shard_size, payload)
        result = run_shards(
            "curate", specs, curate_shard, params, fingerprint=fingerprint, progress=progress, unit="clip",
            gpus=gpus,
        )
        result.raise_for_failures()
        dirs = result.shard_dirs()
        done = {o.name: o.content_hash for o in result.outcomes}
        pair_spec = ShardSpec(0, tuple(done), done)
        # the split is decided when pairing: changing data.validation redoes the pairing, not the curation
        pair_fingerprint = {**fingerprint, "validation": data.validation.model_dump(mode="json")}
        paired = run_shards(
            "pair", [pair_spec], pair_shard, params, fingerprint=pair_fingerprint, progress=progress, unit="shard"
        )
        paired.raise_for_failures()
        instances = merge_jsonl(dirs, "instances.jsonl", layout.instances_manifest)
        samples = merge_jsonl(paired.shard_dirs(), "samples.jsonl", layout.samples_manifest)
        rejected = _write_rejections(layout, "curate", dirs, rejections)
        summary = paired.outcomes[0].summary
        merged = {layout.instances_manifest: dirs, layout.rejections("curate"): dirs,
                  layout.samples_manifest: paired.shard_dirs()}
        seal_manifests(root, layout.stage_dir("curate"), merged)
        return StageReport(
            "curate",
            result,
            {
                "instances": layout.instances_manifest,
                "samples": layout.samples_manifest,
                "pairing": layout.stage_dir("pair") / pair_spec.name / "pairing.json",
                "rejections": layout.rejections("curate"),
            },
            {
                "clips": len(usable),
                "instances": instances,
                "samples": samples,
                "cross_pairs": int(summary.get("cross_pairs", 0)),
                "val_samples": int(summary.get("val_samples", 0)),
                "rejected": rejected,
            },
        )


# ---------------------------------------------------------------------------------------------
# training set


def run_write_dataset(
    params: Params, *, manifest: str | Path | None = None, progress: bool = True, force: bool = False
) -> StageReport:
    """Pack samples.jsonl into webdataset tar shards under <root>/dataset (see writer.py)."""
    from kaleido.data.writer import sample_key, write_dataset_shard

    layout = DataLayout(data_root(params))
    outputs = [layout.dataset_manifest, layout.rejections("write"), layout.dataset / DATASET_INDEX]
    with _stage(params, ["dataset"], force, outputs) as (root, layout, begin):
        path = _checked_input(root, layout, manifest, layout.samples_manifest, "curate")
        clips = {}
        if layout.captions_manifest.is_file():  # clip metadata only (fps, source); the samples carry their captions
            clips = {row["clip_id"]: row for row in read_jsonl(layout.captions_manifest)}
        rejections: list[Rejection] = []
        payload: dict[str, dict[str, Any]] = {}
        keys: set[str] = set()
        for number, row in enumerate(read_jsonl(path), 1):
            try:
                sample = TrainingSample.from_json(row)
            except (TypeError, KeyError, ValueError) as exc:
                item = str(row.get("sample_id", f"line {number}"))
                rejections.append(Rejection("write", item, "bad_record", str(exc)))
                continue
            key = sample_key(sample.sample_id)
            if key in keys:
                rejections.append(
                    Rejection("write", sample.sample_id, "duplicate_sample", f"webdataset key {key} is already used")
                )
                continue
            keys.add(key)
            clip = clips.get(sample.clip_id)
            if clip is not None:
                clip = {k: v for k, v in clip.items() if k not in ("caption", "subjects")}
            payload[sample.sample_id] = {"sample": sample.to_json(), "clip": clip}
        begin()
        specs = make_shards(list(payload), params.data.samples_per_tar, payload)
        fingerprint = {"max_references": params.data.references.max_references}
        result = run_shards(
            "dataset", specs, write_dataset_shard, params, fingerprint=fingerprint, progress=progress, unit="sample"
        )
        result.raise_for_failures()
        dirs = result.shard_dirs()
        rejected = _write_rejections(layout, "write", dirs, rejections)
        merge_jsonl(dirs, "written.jsonl", layout.dataset_manifest)
        shards = []
        for outcome, folder in zip((o for o in result.outcomes if o.status != "failed"), dirs, strict=True):
            for tar in sorted(folder.glob("*.tar")):
                shards.append(
                    {
                        "path": tar.relative_to(root).as_posix(),
                        "samples": int(outcome.summary.get("samples", 0)),
                        "content_hash": outcome.content_hash,
                    }
                )
        index = {"format": "webdataset", "samples": sum(s["samples"] for s in shards), "shards": shards}
        index_path = layout.dataset / DATASET_INDEX
        write_json_atomic(index_path, index)  # last: its presence says the dataset is complete (writer.dataset_tars)
        merged = {layout.dataset_manifest: dirs, layout.rejections("write"): dirs}
        seal_manifests(root, layout.stage_dir("dataset"), merged)
        return StageReport(
            "write-dataset",
            result,
            {
                "dataset": layout.dataset,
                "index": index_path,
                "manifest": layout.dataset_manifest,
                "rejections": layout.rejections("write"),
            },
            {"samples": index["samples"], "tars": len(shards), "rejected": rejected},
        )


def run_stats(params: Params) -> StageReport:
    """Write <root>/stats/{stats.json, categories.png, rejections.png}."""
    from kaleido.data.stats import write_stats

    root = data_root(params)
    layout = DataLayout(root)
    with exclusive_output(output_folder(root, "stats"), "kaleido data-stats"):
        stats = write_stats(root, layout.stats)
    return StageReport(
        "data-stats",
        None,
        {
            "json": layout.stats / "stats.json",
            "categories": layout.stats / "categories.png",
            "rejections": layout.stats / "rejections.png",
        },
        {
            "clips": stats["clips"],
            "samples": stats["samples"],
            "categories": len(stats["categories"]),
            "rejected": stats["rejections"]["total"],
        },
    )

