"""Data curation commands: `kaleido ingest | caption | subjects | curate | write-dataset | data-stats`.

All read the `data:` section of params.yaml; paths are under `data.root`. Every stage is resumable:
finished shards are skipped on a re-run (`--force` redoes the whole stage).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from kaleido.cli.app import ParamsOption, app, fail, read_params

ForceOption = Annotated[bool, typer.Option("--force", help="redo every shard of this stage, not only unfinished ones")]
ManifestOption = Annotated[
    Path | None, typer.Option("--manifest", help="input manifest (JSONL) inside data.root instead of the stage default")
]
QuietOption = Annotated[bool, typer.Option("--quiet", help="no progress bars")]


def _run(stage: Callable[..., Any], params: Path | None, overrides: dict[str, Any], **kwargs: Any) -> None:
    from kaleido.data.shards import StageFailed
    from kaleido.platform.storage import StorageError

    loaded = read_params(params)
    for key, value in overrides.items():
        if value is not None:
            section, _, leaf = key.rpartition(".")
            try:  # sections validate on assignment: a bad option value fails like a bad params.yaml
                setattr(loaded.data if not section else getattr(loaded.data, section), leaf, value)
            except ValueError as exc:
                fail(f"data.{key} = {value!r}: {exc}")
    from kaleido.data.ray_jobs import RayJobFailed, main_argv, should_submit, submit_and_follow

    if should_submit(loaded):  # data.ray_submit: this command runs as a Ray job on the cluster, its log here
        try:
            submit_and_follow(loaded, main_argv())
        except (RayJobFailed, ConnectionError) as exc:
            fail(str(exc))
        return
    try:
        report = stage(loaded, **kwargs)
    except StageFailed as exc:
        fail(str(exc), code=2 if exc.result.disk_full else 1)
    except (FileNotFoundError, ValueError, StorageError) as exc:  # IntegrityError is a ValueError
        fail(str(exc))
    typer.echo(report.summary())
    for name, path in report.outputs.items():
        typer.echo(f"  {name}: {path}")


@app.command("ingest")
def ingest(
    params: ParamsOption = None,
    workers: Annotated[int | None, typer.Option(help="parallel shard workers (default: data.workers)")] = None,
    detector: Annotated[
        str | None, typer.Option("--detector", help="pyscenedetect | transnetv2 (default: data.ingest.shot_detector)")
    ] = None,
    force: ForceOption = False,
    quiet: QuietOption = False,
) -> None:
    """Find source videos (data.ingest.sources), cut them at shot boundaries into normalised clips."""
    from kaleido.data.pipeline import run_ingest

    _run(
        run_ingest,
        params,
        {"workers": workers, "ingest.shot_detector": detector},
        progress=not quiet,
        force=force,
    )


@app.command("caption")
def caption(
    params: ParamsOption = None,
    manifest: ManifestOption = None,
    captioner: Annotated[str | None, typer.Option(help="sidecar | vlm (default: data.caption.captioner)")] = None,
    sidecar: Annotated[
        Path | None, typer.Option(help="captions file (JSONL/JSON/CSV) in data.root (default: data.caption.sidecar)")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="parallel shard workers (default: data.workers)")] = None,
    force: ForceOption = False,
    quiet: QuietOption = False,
) -> None:
    """Caption every clip (sidecar file or local VLM) and match subject candidates from the taxonomy."""
    from kaleido.data.pipeline import run_caption

    _run(
        run_caption,
        params,
        {"caption.captioner": captioner, "caption.sidecar": sidecar, "workers": workers},
        manifest=manifest,
        progress=not quiet,
        force=force,
    )


@app.command("subjects")
def subjects(
    text: Annotated[str, typer.Argument(help="a caption to match against the taxonomy")],
    params: ParamsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the matches as JSON")] = False,
) -> None:
    """Show the subject candidates (category, group) the taxonomy finds in a caption."""
    from kaleido.data.taxonomy import load_taxonomy

    loaded = read_params(params)
    path = loaded.resolve(loaded.data.caption.taxonomy)
    try:
        taxonomy = load_taxonomy(str(path) if path else None)
    except (OSError, ValueError) as exc:
        fail(f"taxonomy: {exc}")
    matches = taxonomy.match(text)
    if as_json:
        typer.echo(json.dumps([m.to_json() for m in matches], indent=2))
        return
    if not matches:
        typer.echo("no subject candidates")
    for match in matches:
        typer.echo(f"{match.term!r:28} -> {match.category} ({match.group})")


@app.command("curate")
def curate(
    params: ParamsOption = None,
    manifest: ManifestOption = None,
    workers: Annotated[int | None, typer.Option(help="parallel shard workers (default: data.workers)")] = None,
    force: ForceOption = False,
    quiet: QuietOption = False,
    plan: Annotated[bool, typer.Option("--plan", help="print the curation plan (GPU memory per model, actors per "
                                       "GPU, throughput, GPU-hours) and whether it fits; runs nothing")] = False,
    # --plan's numbers are range-checked in _plan_workload (one `error:` line each, NaN and infinity included)
    gpus: Annotated[int | None, typer.Option(help="--plan: GPUs to plan for (default: data.cluster.gpus)")] = None,
    gpu_memory_gb: Annotated[float | None, typer.Option(help="--plan: one GPU's memory (default: "
                                                        "data.cluster.gpu_memory_gb)")] = None,
    clips: Annotated[int | None, typer.Option(help="--plan: clips entering curation (default: the paper's 2M)")] = None,
    source_hours: Annotated[float | None, typer.Option(help="--plan: hours of source video instead of --clips")] = None,
    clip_seconds: Annotated[float | None, typer.Option(help="--plan: mean clip length for --source-hours "
                                                       "(default: the middle of data.ingest's clip bounds)")] = None,
    subjects_per_clip: Annotated[float, typer.Option(help="--plan: kept subjects per kept clip, 1 to "
                                                     "data.references.max_references (assumption)")] = 2.0,
    yield_share: Annotated[float, typer.Option(help="--plan: share of clips that keep a subject, 0 to 1 "
                                               "(assumption)")] = 0.8,
    as_json: Annotated[bool, typer.Option("--json", help="--plan: print the plan as JSON")] = False,
) -> None:
    """Ground, segment, filter and build reference images for every captioned clip (over shards).

    Every launch first checks the curation plan against the GPUs it gets (`--plan` prints it)."""
    if plan:
        _print_curation_plan(params, gpus, gpu_memory_gb, clips, source_hours, clip_seconds, subjects_per_clip,
                             yield_share, as_json)
        return
    from kaleido.data.pipeline import run_curation

    _run(run_curation, params, {"workers": workers}, manifest=manifest, progress=not quiet, force=force)


def _print_curation_plan(params: Path | None, gpus: int | None, gpu_memory_gb: float | None, clips: int | None,
                         source_hours: float | None, clip_seconds: float | None, subjects_per_clip: float,
                         yield_share: float, as_json: bool) -> None:
    from kaleido.data.plan import (
        MAX_GPU_MEMORY_GB,
        MAX_GPUS,
        MIN_GPU_MEMORY_GB,
        CurationPlanError,
        describe,
        plan_curation,
    )

    loaded = read_params(params)
    if gpus is not None:
        _check_option("--gpus", gpus, 0, MAX_GPUS)
    if gpu_memory_gb is not None:
        _check_option("--gpu-memory-gb", gpu_memory_gb, MIN_GPU_MEMORY_GB, MAX_GPU_MEMORY_GB)
    work = _plan_workload(loaded, clips, source_hours, clip_seconds, subjects_per_clip, yield_share)
    try:
        found = plan_curation(loaded, gpus=gpus, gpu_memory_gb=gpu_memory_gb, workload=work, gpus_from="--gpus",
                              memory_from="--gpu-memory-gb")
    except CurationPlanError as exc:
        fail(str(exc))
    typer.echo(json.dumps(found.to_dict(), indent=1) if as_json else describe(found))
    if not found.fits:
        raise typer.Exit(1)


def _check_option(option: str, value: float, low: float, high: float, why: str = "") -> None:
    """Refuse a --plan number outside [low, high] (NaN and the infinities too) in one line naming the option."""
    from kaleido.data.plan import in_range, range_text

    if not in_range(value, low, high):
        fail(f"{option} {value!r}: {range_text(low, high)}{why}")


def _plan_workload(loaded: Any, clips: int | None, source_hours: float | None, clip_seconds: float | None,
                   subjects_per_clip: float, yield_share: float) -> Any:
    """The Workload of `--plan`'s options, every number checked (None is "unset", never a falsy 0)."""
    from kaleido.data.plan import MAX_CLIPS, Workload, measured_cpu_seconds

    if clips is not None and source_hours is not None:
        fail("give --clips or --source-hours, not both")
    if clip_seconds is not None and source_hours is None:
        fail("--clip-seconds is the mean clip length for --source-hours: give --source-hours too")
    if clips is not None:
        _check_option("--clips", clips, 1, MAX_CLIPS, " (clips entering curation)")
    if source_hours is not None:
        ingest = loaded.data.ingest
        low, high = ingest.clip_min_seconds, ingest.clip_max_seconds
        if clip_seconds is not None:  # ingest cuts clips within these bounds: a mean outside them cannot happen
            _check_option("--clip-seconds", clip_seconds, low, high, " (data.ingest.clip_min_seconds to "
                          "clip_max_seconds)")
        length = clip_seconds if clip_seconds is not None else (low + high) / 2
        _check_option("--source-hours", source_hours, length / 3600, MAX_CLIPS * length / 3600,
                      f" (hours of source video: at least one {length:g} s clip, at most {MAX_CLIPS:,} clips)")
        clips = max(1, round(source_hours * 3600 / length))
    _check_option("--subjects-per-clip", subjects_per_clip, 1, loaded.data.references.max_references,
                  " (a kept clip keeps at least one subject and at most data.references.max_references)")
    _check_option("--yield-share", yield_share, 0, 1, " (a share of the clips)")
    return Workload(clips=clips if clips is not None else Workload.clips, subjects_per_clip=subjects_per_clip,
                    yield_share=yield_share, cpu_seconds_per_clip=measured_cpu_seconds())


@app.command("write-dataset")
def write_dataset(
    params: ParamsOption = None,
    manifest: ManifestOption = None,
    force: ForceOption = False,
    quiet: QuietOption = False,
) -> None:
    """Pack the curated samples into webdataset tar shards under <data.root>/dataset."""
    from kaleido.data.pipeline import run_write_dataset

    _run(run_write_dataset, params, {}, manifest=manifest, progress=not quiet, force=force)


@app.command("data-stats")
def data_stats(params: ParamsOption = None) -> None:
    """Category histogram (paper figure 7) and rejection counts: stats.json + PNG plots."""
    from kaleido.data.pipeline import run_stats

    _run(run_stats, params, {})
