"""The curation stages over shards: ingest -> caption (+ subjects) -> curate -> write dataset -> stats.

Each `run_*` reads the previous stage's merged manifest (or a user-supplied one; every path in it
must stay inside the data root), splits the work into shards (shards.run_shards: parallel local
processes or Ray, resumable, deterministic), then merges the shard outputs, in shard order, into
<root>/manifests/. A stage with failed shards raises StageFailed after the other shards finished
and merges nothing; running it again redoes only the failed shards.

Shards are keyed by the source video (kaleido.data.keys): ingest, caption and curate run over `data.shards` work
shards (a source's shard is sha256(its path) mod shards), pairing and write-dataset over `data.dataset_shards`
dataset shards that hold whole work shards. A new source video redoes its own work shard and dataset shard in
every stage; every other shard is skipped and stays byte-identical.

Curation lives in kaleido.data.curation_stage: `curate_clip` per clip over the work shards (`curate_shard`), then
`pair_samples` and the FLUX references the samples use per dataset shard (`pair_shard`: cross pairs take their
donors inside the dataset shard). On Ray, the model stages call their models through per-model actor pools
(kaleido.data.pools); locally each worker loads its own.

An `s3://` data root is worked in a local staging folder (shard_store.local_root); finished shards, merged
manifests and seals are uploaded as they finish, inputs are fetched as the shards that read them start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kaleido.config.schema import Params
from kaleido.data import shard_store
from kaleido.data.paths import (
    DataLayout,
    check_inside,
    output_folder,
    remove_inside,
    resolve_inside,
)
from kaleido.data.plan import launch_devices
from kaleido.data.records import (
    ClipRecord,
    Rejection,
    TrainingSample,
    read_jsonl,
    write_jsonl,
)
from kaleido.data.shards import (
    SEALS,
    ShardContext,
    ShardSpec,
    StageResult,
    check_manifest,
    keyed_shards,
    merge_jsonl,
    open_manifests,
    run_shards,
    seal_manifests,
)
from kaleido.data.writer import DATASET_INDEX
from kaleido.platform.files import exclusive_output, write_json_atomic
from kaleido.platform.integrity import cached_sha256


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
    """The local folder the stages work in (data.root, or the staging folder of an s3:// data root)."""
    return shard_store.local_root(params)


def shard_inputs(paths: Iterable[str | None]) -> list[str]:
    """The upstream shard folders (`<stage>/shard-NNNNN`) that root-relative file paths point into."""
    found = set()
    for path in paths:
        parts = (path or "").split("/")
        if len(parts) > 2 and parts[1].startswith("shard-"):
            found.add(f"{parts[0]}/{parts[1]}")
    return sorted(found)


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
    if not root.is_dir():  # a mistyped data.root: refused before anything (a lock file included) is written
        raise FileNotFoundError(
            f"data.root {root} is not a folder; point data.root at the folder holding your sources (raw/...) or "
            "write the sample media there with `kaleido sample-data`"
        )
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
        shard_store.fetch_file(root, str(manifest))  # an s3:// root: the user's file is in the bucket
        return resolve_inside(root, manifest)
    relative = default.relative_to(root).as_posix()
    shard_store.download_stage_files(root, [relative, f"{stage}/{SEALS}"])  # s3:// root: what the stage left
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
        # a clip inside a finished upstream shard whose working folder is not here (restored from its pack, or
        # fetched from object storage, when a shard that reads it runs) counts as present
        if not checked.is_file() and not shard_store.shard_has_file(root, record.path):
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
        shard_store.fetch_file(ctx.root, relative)  # an s3:// root: the source video comes down first
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
        remote = shard_store.remote_for(root)
        if remote is None:
            sources, rejections = discover_sources(root, params.data.ingest.sources)
            # size and content sha256 in the shard spec: a replaced source redoes its shard; a checkout or copy
            # that only changes mtimes does not (hashes cached by stat, so an unchanged tree costs no read)
            stamps: dict[str, Any] = {}
            for relative in sources:
                path = root / relative
                stamps[relative] = [path.stat().st_size, cached_sha256(path)]
        else:
            sources, rejections, stamps = discover_remote_sources(remote, params.data.ingest.sources)
        begin()
        specs = keyed_shards(sources, lambda source: source, params.data.shards, stamps)
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


def discover_remote_sources(remote: Any, patterns: Sequence[str]) -> tuple[list[str], list[Rejection], dict[str, Any]]:
    """`ingest.discover_sources` for an s3:// data root: the objects matching the globs, with (size, ETag) stamps
    (a replaced object redoes its shard)."""
    from kaleido.data.ingest import STAGE

    found: dict[str, Any] = {}
    rejections: list[Rejection] = []
    for pattern in patterns:
        if pattern.startswith("/") or ".." in Path(pattern).parts:
            rejections.append(Rejection(STAGE, pattern, "path_outside_root",
                                        f"source glob {pattern!r} must be relative to data.root"))
            continue
        for key, info in remote.glob(pattern).items():
            if info.get("type", "file") == "file":
                relative = key[len(remote.path) + 1 :]
                found[relative] = [int(info.get("size") or 0), str(info.get("ETag") or info.get("LastModified"))]
    return sorted(found), rejections, found


def clip_shards(
    clips: Sequence[ClipRecord], shards: int, payload: dict[str, Any], fetch_clips: bool
) -> list[ShardSpec]:
    """Work shards over clips, keyed by their SOURCE video (a source's clips share its shard in every stage);
    fetch_clips: the shard reads the clip files, so their ingest shards are its inputs."""
    source = {clip.clip_id: clip.source for clip in clips}
    path = {clip.clip_id: clip.path for clip in clips}
    specs = keyed_shards(list(source), source.__getitem__, shards, payload)
    if not fetch_clips:
        return specs
    return [replace(spec, inputs=tuple(shard_inputs(path[item] for item in spec.items))) for spec in specs]


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
            shard_store.fetch_file(root, str(cfg.sidecar))  # an s3:// root: the sidecar is in the bucket
            sidecar, bad_rows = load_sidecar(root, cfg.sidecar)
            if sidecar is None:  # the file itself is unusable: every clip would go uncaptioned, with exit 0
                unreadable = bad_rows[0].reason == "bad_sidecar"  # else missing, outside the root, a bad path
                fix = (f"fix {cfg.sidecar} (.jsonl: one JSON object per line)" if unreadable
                       else "fix the path (relative to data.root)")
                raise ValueError(f"data.caption.sidecar: {bad_rows[0].detail}; {fix}")
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
        specs = clip_shards(clips, params.data.shards, payload, fetch_clips=cfg.captioner == "vlm")
        result = run_shards(
            "caption", specs, caption_shard, params, fingerprint=fingerprint, progress=progress, unit="clip",
            gpus=gpus, models=["vlm"] if cfg.captioner == "vlm" else [],  # Ray: the VLM's pool
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
# curation: kaleido.data.curation_stage (curate per work shard, pair per dataset shard)


def run_curation(
    params: Params, *, manifest: str | Path | None = None, progress: bool = True, force: bool = False
) -> StageReport:
    """Curate every captioned clip (per work shard), then pair the results into samples (per dataset shard): see
    kaleido.data.curation_stage.run_curation."""
    from kaleido.data.curation_stage import run_curation as run

    return run(params, manifest=manifest, progress=progress, force=force)


# ---------------------------------------------------------------------------------------------
# training set


def _check_paired_over(root: Path, layout: DataLayout, dataset_shards: int) -> None:
    """Refuse a write-dataset whose data.dataset_shards differs from the one pairing used: the mix, cross pairs and
    donors were decided per dataset shard, so the tars must be cut the same way (ValueError naming the fix)."""
    pairing = layout.stage_dir("pair") / "pairing.json"
    shard_store.download_stage_files(root, [pairing.relative_to(root).as_posix()])
    import json

    try:
        summary = json.loads(pairing.read_text())
    except (OSError, ValueError):
        return  # no pairing summary (a --manifest of the user's own): nothing to compare
    # a summary from before `dataset_shards_with_samples` counted shards, not the setting: nothing to compare
    paired_over = summary.get("dataset_shards") if "dataset_shards_with_samples" in summary else None
    if paired_over and int(paired_over) != dataset_shards:
        raise ValueError(
            f"data.dataset_shards={dataset_shards}, but `kaleido curate` paired the samples over {paired_over} dataset "
            f"shards ({pairing}): the mix, cross pairs and donors are decided per dataset shard; set "
            f"data.dataset_shards: {paired_over}, or run `kaleido curate` with {dataset_shards} first"
        )


def run_write_dataset(
    params: Params, *, manifest: str | Path | None = None, progress: bool = True, force: bool = False
) -> StageReport:
    """Pack samples.jsonl into webdataset tar shards under <root>/dataset (see writer.py)."""
    from kaleido.data.writer import sample_key, write_dataset_shard

    layout = DataLayout(data_root(params))
    outputs = [layout.dataset_manifest, layout.rejections("write"), layout.dataset / DATASET_INDEX]
    with _stage(params, ["dataset"], force, outputs) as (root, layout, begin):
        path = _checked_input(root, layout, manifest, layout.samples_manifest, "curate")
        if manifest is None:
            _check_paired_over(root, layout, params.data.dataset_shards)
        clips = {}
        shard_store.download_stage_files(root, [layout.captions_manifest.relative_to(root).as_posix()])
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
        # one tar per dataset shard, keyed by the sample's source video like every other stage: a new source
        # rewrites only its own tar
        source_of = {sample_id: _sample_source(entry, clips) for sample_id, entry in payload.items()}
        specs = keyed_shards(list(payload), source_of.__getitem__, params.data.dataset_shards, payload)
        specs = [replace(spec, inputs=tuple(shard_inputs(
            path for item in spec.items for path in _sample_files(payload[item]["sample"])))) for spec in specs]
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
            marker = shard_store.shard_marker(folder) or {}
            for name in sorted(n for n in marker.get("files", {}) if n.endswith(".tar")):
                shards.append(
                    {
                        "path": f"{folder.relative_to(root).as_posix()}/{name}",
                        "samples": int(outcome.summary.get("samples", 0)),
                        "content_hash": outcome.content_hash,
                        "sha256": marker["files"][name],  # the seal every reader checks the tar against
                        "size": int(marker["sizes"][name]),
                    }
                )
        index = {"format": "webdataset", "samples": sum(s["samples"] for s in shards), "shards": shards}
        index_path = layout.dataset / DATASET_INDEX
        write_json_atomic(index_path, index)  # last: its presence says the dataset is complete (writer.dataset_tars)
        merged = {layout.dataset_manifest: dirs, layout.rejections("write"): dirs}
        seal_manifests(root, layout.stage_dir("dataset"), merged)
        shard_store.upload_stage_files(root, [index_path])  # object storage: the index after every tar
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


def _sample_source(entry: dict[str, Any], clips: dict[str, dict[str, Any]]) -> str:
    """The source video a sample row came from (its provenance, else its clip's record, else its own id)."""
    sample = entry["sample"]
    source = (sample.get("provenance") or {}).get("source") or (clips.get(sample.get("clip_id")) or {}).get("source")
    return str(source or sample["sample_id"])


def _sample_files(sample: dict[str, Any]) -> list[str]:
    files = [sample.get("clip_path")]
    for reference in sample.get("references", []):
        files += [reference.get("image_path"), reference.get("mask_path")]
    return [str(path) for path in files if path]


def run_stats(params: Params) -> StageReport:
    """Write <root>/stats/{stats.json, categories.png, rejections.png}."""
    from kaleido.data.stats import write_stats

    root = data_root(params)
    layout = DataLayout(root)
    remote = shard_store.remote_for(root)
    if remote is not None:  # an s3:// root: the merged manifests come down, the report goes up
        shard_store.download_stage_files(root, sorted(remote.listing("manifests")))
    with exclusive_output(output_folder(root, "stats"), "kaleido data-stats"):
        stats = write_stats(root, layout.stats)
    shard_store.upload_stage_files(root, sorted(layout.stats.glob("*")))
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

