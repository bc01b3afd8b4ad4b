"""The curation stage (`kaleido curate`): `curate_clip` per clip over the work shards, then pairing per dataset shard.

Two phases, each a map over shards (kaleido.data.shards.run_shards):
1. curate (work shards): ground, segment, filter, crop and segment references and the plate's frame + mask
   (kaleido.data.curate.curate_clip) with the Grounding DINO, SAM, CLIP and face models;
2. pair (dataset shards): types, cross-pair flags and donors (kaleido.data.pairing.pair_samples), then FLUX only
   for what the samples use (kaleido.data.generated): the clips' frames come from their ingest shards.
On Ray (`data.ray_address`) each phase starts its models' actor pools first (kaleido.data.pools: curate the
grounding, segmentation, CLIP and face pools; pair the FLUX pools) and tears them down when its shards are done; the
shard tasks call the models through them. Locally each worker process loads its own models
(kaleido.data.models.local_model).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from kaleido.config.schema import Params
from kaleido.data import shard_store
from kaleido.data.keys import shard_name, shard_of
from kaleido.data.models import CURATE_KEYS, FLUX_KEYS, configured, pools_installed, shard_model
from kaleido.data.paths import DataLayout, PathOutsideRoot, resolve_inside, safe_name
from kaleido.data.pipeline import (
    StageReport,
    _checked_input,
    _stage,
    _write_rejections,
    clip_shards,
    data_root,
    load_clip_manifest,
    shard_inputs,
)
from kaleido.data.plan import launch_devices
from kaleido.data.records import ClipRecord, Instance, Rejection, TrainingSample, write_jsonl
from kaleido.data.shards import ShardContext, ShardSpec, StageResult, merge_jsonl, run_shards, seal_manifests
from kaleido.platform.files import write_json_atomic

_CURATION_MODELS: dict[str, Any] = {}


def _curation_models(curate: Any, params: Params) -> Any:
    """The shard's CurationModels: proxies of the stage's Ray pools when they are installed, else
    `curate.load_curation_models(params.data, params)` once per worker process and model config."""
    if pools_installed():
        face = shard_model("face", params) if configured("face", params) else None
        return curate.CurationModels(shard_model("grounding_dino", params), shard_model("sam", params),
                                     shard_model("clip", params), face, curate.curation_notes(params.data))
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
      load_curation_models(cfg: DataConfig, params: Params) -> models        once per worker process (locally)
      curate_clip(clip, frames [T, H, W, 3] uint8, clip.subjects, models, cfg: DataConfig,
                  out_dir, rel_dir=...) -> CurationResult                    once per clip
    Files go to <shard>/clips/<clip id>/. An exception from curate_clip (it is meant to return Rejections instead)
    rejects that clip only, except a gone model pool (ModelUnavailable), which fails the shard.
    Writes results.jsonl (CurationResult JSON per clip), instances.jsonl, rejections.jsonl.
    """
    from importlib import import_module

    from kaleido.data.models import ModelUnavailable
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
            result = curate.curate_clip(clip, frames, clip.subjects, models, params.data, out_dir, rel_dir=rel_dir)
        except ModelUnavailable:
            raise
        except Exception as exc:  # one clip's failure must not stop the run
            rejections.append(Rejection("curate", clip_id, "curation_error", f"{exc.__class__.__name__}: {exc}"))
            continue
        # paths are root-relative and every reader resolves them against its own data root: no absolute path of this
        # machine in the shard (its bytes are the same whichever node, staging folder or executor wrote it)
        result.written_to = ""
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
    """Shard fn (one per dataset shard): `kaleido.data.curate.pair_samples` over the results of its work shards,
    with the FLUX generators (kaleido.data.generated) for the samples that need them.

    Cross pairs take their donors among the clips of this dataset shard (other source videos of the same split),
    so a dataset shard is paired on its own and a new source re-pairs only its own dataset shard.
    Items: the curate shard names; payload: their content hashes (a changed curate shard redoes this pairing) and
    the split of each source (decided over the whole data: `validation_sources`); inputs: the curate shards, and
    the ingest shards of their clips when inpaint references are enabled (their frames are decoded).
    Writes samples.jsonl (TrainingSample rows), rejections.jsonl (failed FLUX calls), pairing.json (realised mix,
    ratios, FLUX calls).
    """
    from importlib import import_module

    from kaleido.data.generated import ClipFrames
    from kaleido.data.references import CurationResult

    curate = import_module("kaleido.data.curate")
    results = []
    for name in ctx.spec.items:
        text = shard_store.read_part(ctx.root / "curate" / name, "results.jsonl") or ""
        results += [CurationResult.from_json(json.loads(line)) for line in text.splitlines() if line.strip()]
    stats: dict[str, Any] = {}
    rejections: list[Rejection] = []
    samples = curate.pair_samples(
        results,
        ctx.params.data,
        ctx.params.data.seed,
        flux=curate.load_flux_models(ctx.params),
        frames=ClipFrames(ctx.root),
        data_root=ctx.root,
        out_dir=ctx.work_dir / "pairs",
        rel_dir=f"{ctx.final_rel}/pairs",
        stats=stats,
        splits=ctx.spec.payload["splits"],
        rejections=rejections,
    )
    persist_pixels(ctx.work_dir, ctx.final_rel, [], samples)
    write_jsonl(ctx.work_dir / "samples.jsonl", samples)
    write_jsonl(ctx.work_dir / "rejections.jsonl", rejections)
    (ctx.work_dir / "pairing.json").write_text(json.dumps(stats, indent=1, sort_keys=True, default=str) + "\n")
    return {"samples": len(samples), "cross_pairs": sum(1 for sample in samples if sample.cross_pair),
            "val_samples": sum(1 for sample in samples if sample.split == "val"),
            "sample_types": stats.get("sample_types", {}),
            "procedural": stats.get("cross_source", {}).get("procedural", 0),
            "mix_shortfall": stats.get("mix_shortfall", 0),
            "flux_calls": stats.get("flux_calls", {}), "flux_failures": stats.get("flux_failures", {})}


def pair_specs(results: StageResult, sources: dict[str, str], data: Any,
               clips: list[ClipRecord] | None = None) -> list[ShardSpec]:
    """One pairing spec per non-empty dataset shard: the curate shards it holds (b mod dataset_shards = g), their
    content hashes and the split of each of its sources. `sources`: {source: "train" | "val"}. `clips`: the
    curated clips; with FLUX fill enabled the ingest shards of a group's clips are its inputs too (inpaint
    references are painted on the clip's own frames, decoded in the pair stage)."""
    groups: dict[int, dict[str, str | None]] = {}
    for outcome in results.outcomes:
        work = int(outcome.name.removeprefix("shard-"))
        groups.setdefault(work % data.dataset_shards, {})[outcome.name] = outcome.content_hash
    by_group: dict[int, dict[str, str]] = {}
    for source, split in sources.items():
        by_group.setdefault(shard_of(source, data.dataset_shards), {})[source] = split
    clip_paths: dict[int, list[str]] = {}
    if data.models.flux_fill is not None:
        for clip in clips or []:
            clip_paths.setdefault(shard_of(clip.source, data.dataset_shards), []).append(clip.path)
    specs = []
    for group in sorted(groups):
        names = dict(sorted(groups[group].items()))
        payload = {"curate_shards": names, "splits": dict(sorted(by_group.get(group, {}).items()))}
        inputs = tuple(f"curate/{name}" for name in names) + tuple(shard_inputs(clip_paths.get(group, [])))
        specs.append(ShardSpec(group, tuple(names), payload, inputs))
    assert all(spec.name == shard_name(spec.shard_id) for spec in specs)
    return specs


def run_curation(
    params: Params, *, manifest: str | Path | None = None, progress: bool = True, force: bool = False
) -> StageReport:
    """Curate every captioned clip with subject candidates (per work shard), then pair the results into samples
    (per dataset shard)."""
    from kaleido.data.split import validation_sources

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
        specs = clip_shards(usable, data.shards, payload, fetch_clips=True)
        result = run_shards(
            "curate", specs, curate_shard, params, fingerprint=fingerprint, progress=progress, unit="clip",
            gpus=gpus, models=[key for key in CURATE_KEYS if configured(key, params)],
        )
        result.raise_for_failures()
        dirs = result.shard_dirs()
        # the split is decided per source video over the whole data; changing data.validation redoes the pairing
        held = validation_sources({clip.source for clip in usable}, data.validation.share, data.seed)
        splits = {clip.source: "val" if clip.source in held else "train" for clip in usable}
        pair_fingerprint = {**fingerprint, "validation": data.validation.model_dump(mode="json"),
                            "dataset_shards": data.dataset_shards}
        paired = run_shards(
            "pair", pair_specs(result, splits, data, usable), pair_shard, params, fingerprint=pair_fingerprint,
            progress=progress, unit="shard", gpus=gpus, models=[key for key in FLUX_KEYS if configured(key, params)],
        )
        paired.raise_for_failures()
        instances = merge_jsonl(dirs, "instances.jsonl", layout.instances_manifest)
        samples = merge_jsonl(paired.shard_dirs(), "samples.jsonl", layout.samples_manifest)
        rejected = _write_rejections(layout, "curate", [*dirs, *paired.shard_dirs()], rejections)
        merged = {layout.instances_manifest: dirs, layout.rejections("curate"): [*dirs, *paired.shard_dirs()],
                  layout.samples_manifest: paired.shard_dirs()}
        pairing = write_pairing_summary(root, paired, layout.stage_dir("pair") / "pairing.json", data)
        seal_manifests(root, layout.stage_dir("curate"), merged)
        return StageReport(
            "curate",
            result,
            {
                "instances": layout.instances_manifest,
                "samples": layout.samples_manifest,
                "pairing": layout.stage_dir("pair") / "pairing.json",
                "rejections": layout.rejections("curate"),
            },
            {
                "clips": len(usable),
                "instances": instances,
                "samples": samples,
                "cross_pairs": int(pairing["cross_pairs"]),
                "val_samples": int(pairing["val_samples"]),
                "rejected": rejected,
            },
        )


def write_pairing_summary(root: Path, paired: StageResult, path: Path, data: Any) -> dict[str, Any]:
    """The realised mix over every dataset shard (each exact; the total within one per shard of exact) and the FLUX
    calls made, written to <root>/pair/pairing.json (uploaded for an s3:// root)."""
    types: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for outcome in paired.outcomes:
        types.update(outcome.summary.get("sample_types", {}))
        calls.update(outcome.summary.get("flux_calls", {}))
        failures.update(outcome.summary.get("flux_failures", {}))
        for key in ("samples", "cross_pairs", "val_samples", "procedural", "mix_shortfall"):
            totals[key] += int(outcome.summary.get(key, 0))
    summary = {
        **{key: totals[key] for key in ("samples", "cross_pairs", "val_samples", "procedural", "mix_shortfall")},
        "sample_types": dict(sorted(types.items())),
        "flux_calls": dict(sorted(calls.items())),
        "flux_failures": dict(sorted(failures.items())),
        "dataset_shards": data.dataset_shards,  # what pairing was decided over: write-dataset must use the same
        "dataset_shards_with_samples": len(paired.outcomes),
        "bound": "each dataset shard exact (largest remainder); the total within one sample per shard of exact",
        "sample_mix": data.references.sample_mix.model_dump(),
        "cross_pair_ratio": data.references.cross_pair_ratio,
    }
    write_json_atomic(path, summary)
    shard_store.upload_stage_files(root, [path])
    return summary
