"""How the data stages grow with the data: CPU seconds per clip per stage at several N, the growth exponents, what
adding one source redoes, and pairing from 2k to 16k clips.

    nice -n 10 .venv/bin/python benchmarks/curation_scale.py [--sources 4 8 16 32] [--pairing 2000 4000 8000 16000]
                                                             [--json out.json] [--write-costs]

Stages: ingest (PyAV decode, PySceneDetect, resample, H.264 encode), caption (sidecar), curate (per clip: decode,
ground, segment, filters, references; the detector and segmenter are the stand-ins of kaleido.data.synthetic, so
this measures the pipeline around the models, whose cost per clip is a constant: benchmarks/data_throughput.py),
pair (per dataset shard) and write-dataset, in one process (`data.workers 1`: CPU seconds of this process are the
stages' whole cost). Sources are synthetic 4.5 s videos of three shots each (three clips per source), the shape
the issue's measurement used. The growth exponent is the slope of log(CPU s) over log(N) by least squares
(1.0 = linear).

Add one source: the data of the largest N again with one more source whose name sorts FIRST; the shards each
stage ran, and how many existing samples changed (type, cross-pair flag, split or donor).

Pairing: `pair_samples` on synthetic curation results (two subjects per clip, 40 % cross-paired: every composite
is built) in ONE call at each size (the worst case: all clips in one dataset shard), and the same 16k clips over
8 dataset shards as the stage runs them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from _provenance import provenance

from kaleido.data.synthetic import STAND_IN_STAGES

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "caption", "curate", "write")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


def _params(root: Path, overrides: dict[str, Any]) -> Any:
    from kaleido.config.schema import set_dotted, validate_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["root"] = str(root)
    for dotted, value in overrides.items():
        set_dotted(raw, dotted, value)
    return validate_params(raw, base_dir=root.parent)


OVERRIDES: dict[str, Any] = {**STAND_IN_STAGES, "data.shards": 64, "data.dataset_shards": 16}


def _run_stages(params: Any) -> dict[str, Any]:
    from kaleido.data.pipeline import run_caption, run_curation, run_ingest, run_write_dataset

    out: dict[str, Any] = {}
    for stage, run in zip(STAGES, (run_ingest, run_caption, run_curation, run_write_dataset), strict=True):
        start = _cpu()
        report = run(params, progress=False)
        out[stage] = {"cpu_s": _cpu() - start, "report": report}
    return out


def _names(count: int, offset: int = 0) -> list[str]:
    return [f"raw/src-{offset + i:06d}.mp4" for i in range(count)]


SHOT_FRAMES = 24  # frames per shot of the synthetic sources (1.5 s at 16 fps); --prod-clips: 136 (8.5 s)
# --prod-clips: clips at the prod overlay's size and the middle of the paper's 2-15 s, for the planner's CPU costs
PROD_CLIPS = {"data.ingest.height": 480, "data.ingest.width": 832, "data.ingest.clip_max_seconds": 15.0}


def bench_stages(work: Path, sizes: list[int]) -> list[dict[str, Any]]:
    from kaleido.data.synthetic import write_sources

    rows = []
    for n in sizes:
        root = work / f"n{n}" / "data"
        write_sources(root, _names(n), shots=3, frames_per_shot=SHOT_FRAMES)
        result = _run_stages(_params(root, OVERRIDES))
        clips = result["ingest"]["report"].counts["clips"]
        row = {"sources": n, "clips": clips, "samples": result["write"]["report"].counts["samples"]}
        for stage in STAGES:
            row[f"{stage}_cpu_s"] = round(result[stage]["cpu_s"], 3)
            row[f"{stage}_ms_per_clip"] = round(1000 * result[stage]["cpu_s"] / max(clips, 1), 2)
        rows.append(row)
        print(f"N={n:4d} sources, {clips:5d} clips: " + ", ".join(
            f"{stage} {row[f'{stage}_ms_per_clip']:7.1f} ms/clip" for stage in STAGES), flush=True)
    return rows


COSTS = REPO / "kaleido" / "data" / "cpu_costs.json"


def write_costs(results: dict[str, Any]) -> None:
    """kaleido/data/cpu_costs.json: CPU s per clip of each stage at the largest N (one core, the models stand-ins:
    the pipeline around the models), with the machine, date, commit and command that measured them."""
    largest = max(results["stages"], key=lambda row: row["clips"])
    costs = {
        "what": "CPU seconds per clip of each data stage on one core, the curation models replaced by stand-ins (the "
                "work around the models: decode, shot detection, resample and encode, filters, references, pairing "
                "and its composites, the tar writer); read by kaleido.data.plan.measured_cpu_seconds",
        "machine": results["machine"], "date": results["date"], "commit": results["commit"],
        "command": results["command"], "sources": largest["sources"], "clips": largest["clips"],
        "clip": {"height": OVERRIDES.get("data.ingest.height", 64), "width": OVERRIDES.get("data.ingest.width", 96),
                 "frames": SHOT_FRAMES, "fps": 16, "source_size": "144x96 synthetic (upscaled by ingest)"},
        "stages": {stage: {"cpu_s_per_clip": round(largest[f"{stage}_ms_per_clip"] / 1000, 5)} for stage in STAGES},
        "exponents": results["exponents"],
    }
    COSTS.write_text(json.dumps(costs, indent=1) + "\n")
    print(f"wrote {COSTS.relative_to(REPO)}: " + ", ".join(
        f"{stage} {row['cpu_s_per_clip']:.3f} s" for stage, row in costs["stages"].items()) + " per clip", flush=True)


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) over log(x)."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(lx, ly, 1)[0])


def bench_add_one(work: Path, n: int) -> dict[str, Any]:
    from kaleido.data.synthetic import write_sources

    base = work / f"n{n}"
    copy = work / f"n{n}-plus-one"
    shutil.copytree(base, copy)
    root = copy / "data"
    samples_before = {json.loads(line)["sample_id"]: json.loads(line)
                      for line in (root / "manifests" / "samples.jsonl").read_text().splitlines()}
    tars_before = {p.relative_to(root).as_posix(): p.read_bytes() for p in (root / "dataset").rglob("*.tar")}
    added = "raw/0000-first.mp4"  # sorts before every other source
    write_sources(root, [added], shots=3, frames_per_shot=SHOT_FRAMES)
    result = _run_stages(_params(root, OVERRIDES))
    samples_after = {json.loads(line)["sample_id"]: json.loads(line)
                     for line in (root / "manifests" / "samples.jsonl").read_text().splitlines()}
    tars_after = {p.relative_to(root).as_posix(): p.read_bytes() for p in (root / "dataset").rglob("*.tar")}
    changed = [key for key, row in samples_before.items() if samples_after.get(key) != row]
    decisions = [key for key in changed if any(samples_before[key][f] != samples_after[key][f]
                                               for f in ("sample_type", "cross_pair", "split"))]
    row = {"sources": n, "added": added, "existing_samples": len(samples_before),
           "existing_samples_changed": len(changed), "changed_type_flag_or_split": len(decisions),
           "tars": len(tars_before), "existing_tars_rewritten": sum(1 for k, v in tars_before.items()
                                                                   if tars_after.get(k) != v)}
    for stage in STAGES:
        outcome = result[stage]["report"].result
        row[f"{stage}_redone"] = f"{len(outcome.done)} of {len(outcome.outcomes)}"
    print(f"add one source to N={n}: " + ", ".join(f"{stage} {row[f'{stage}_redone']} shards" for stage in STAGES)
          + f"; {row['existing_samples_changed']} of {row['existing_samples']} existing samples changed "
          f"({row['changed_type_flag_or_split']} in type / cross flag / split), {row['existing_tars_rewritten']} of "
          f"{row['tars']} tars rewritten (its own)", flush=True)
    return row


def _pairing_inputs(work: Path, clips: int) -> list[Any]:
    """Synthetic curation results: two subjects per clip, ~30 clips per source, image files shared from a pool of 64
    (pairing reads them by path, so its cost per reference is what a real run pays)."""
    from PIL import Image

    from kaleido.data.records import ClipRecord, Instance
    from kaleido.data.references import CuratedSubject, CurationResult

    pool = work / "pool"
    if not pool.is_dir():
        pool.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(64):  # 40x40 subject crops and masks, 64x96 background plates
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(pool / f"img{i}.png")
            Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(pool / f"plate{i}.png")
            mask = np.zeros((40, 40), np.uint8)
            mask[4:36, 2 + i % 6 : 34 + i % 6] = 255
            Image.fromarray(mask).save(pool / f"mask{i}.png")
    results = []
    for c in range(clips):
        source = f"raw/src-{c // 30:06d}.mp4"
        clip = ClipRecord(f"src{c // 30:06d}-{c:07d}", source, 0, 24, 0.0, 1.5, 16.0, 16.0, 96, 64, 24, 1.5,
                          f"ingest/x/{c}.mp4", "a cat and a dog")
        subjects = []
        for k, category in enumerate(("cat", "dog")):
            image, mask = f"pool/img{(c + k) % 64}.png", f"pool/mask{(c + k) % 64}.png"
            instance = Instance(clip.clip_id, category, "animal", 0, (10.0, 10.0, 50.0, 50.0), 0.9,
                                instance_id=f"{clip.clip_id}/{category}")
            subjects.append(CuratedSubject(instance, {"crop": image, "segment": image}, {"crop": mask, "segment": mask},
                                           (10 + 40 * k, 10, 50 + 40 * k, 50), (64, 96)))
        results.append(CurationResult(clip=clip, subjects=subjects, plate=f"pool/plate{c % 64}.png",
                                      enabled_types=["crop", "segment"]))
    return results


def bench_pairing(work: Path, sizes: list[int], shards: int = 8) -> dict[str, Any]:
    from kaleido.config.schema import DataConfig
    from kaleido.data.keys import shard_of
    from kaleido.data.pairing import pair_samples

    cfg = DataConfig()
    rows = []
    for n in sizes:
        results = _pairing_inputs(work, n)
        start = time.process_time()
        samples = pair_samples(results, cfg, 0, data_root=work)
        seconds = time.process_time() - start
        rows.append({"clips": n, "cpu_s": round(seconds, 3), "ms_per_clip": round(1000 * seconds / n, 3),
                     "cross_pairs": sum(s.cross_pair for s in samples)})
        print(f"pairing {n:6d} clips in one shard: {seconds:7.2f} CPU s, {1000 * seconds / n:6.3f} ms per clip",
              flush=True)
    largest = _pairing_inputs(work, sizes[-1])
    groups: dict[int, list[Any]] = {}
    for result in largest:
        groups.setdefault(shard_of(result.clip.source, shards), []).append(result)
    start = time.process_time()
    for members in groups.values():
        pair_samples(members, cfg, 0, data_root=work)
    sharded = time.process_time() - start
    ratio = rows[-1]["cpu_s"] / rows[0]["cpu_s"]
    print(f"pairing {sizes[-1]} clips over {len(groups)} dataset shards: {sharded:.2f} CPU s; "
          f"{sizes[-1] // sizes[0]}x the clips cost {ratio:.1f}x the CPU (exponent "
          f"{exponent([r['clips'] for r in rows], [r['cpu_s'] for r in rows]):.2f})", flush=True)
    return {"rows": rows, "sharded": {"clips": sizes[-1], "shards": len(groups), "cpu_s": round(sharded, 3)},
            "ratio_largest_to_smallest": round(ratio, 2),
            "exponent": round(exponent([r["clips"] for r in rows], [r["cpu_s"] for r in rows]), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--pairing", type=int, nargs="+", default=[2000, 4000, 8000, 16000])
    parser.add_argument("--skip-stages", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--prod-clips", action="store_true",
                        help="clips of 480x832 and 8.5 s (136 frames at 16 fps) instead of 96x64 and 1.5 s: the CPU "
                        "costs the planner should use (slower: run with --sources 4 8)")
    parser.add_argument("--write-costs", action="store_true",
                        help=f"write the CPU s per clip of each stage at the largest N to {COSTS.relative_to(REPO)} "
                        "(what `kaleido curate --plan` reads: kaleido.data.plan.measured_cpu_seconds)")
    args = parser.parse_args()
    global SHOT_FRAMES
    if args.prod_clips:
        SHOT_FRAMES = 136
        OVERRIDES.update(PROD_CLIPS)

    import torch

    torch.set_num_threads(1)
    results: dict[str, Any] = provenance()
    with tempfile.TemporaryDirectory(prefix="kaleido-scale-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("KALEIDO_CACHE", str(work / "cache"))
        if not args.skip_stages:
            rows = bench_stages(work, sorted(args.sources))
            results["stages"] = rows
            results["exponents"] = {
                stage: round(exponent([r["clips"] for r in rows], [max(r[f"{stage}_cpu_s"], 1e-6) for r in rows]), 3)
                for stage in STAGES
            }
            print("growth exponents (CPU s over clips): " + ", ".join(
                f"{stage} {value:.2f}" for stage, value in results["exponents"].items()), flush=True)
            results["add_one_source"] = bench_add_one(work, max(args.sources))
            if args.write_costs:
                write_costs(results)
        results["pairing"] = bench_pairing(work, sorted(args.pairing))
    print(f"{results['machine']}; {results['date']}; commit {results['commit']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if math.isnan(results["pairing"]["exponent"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
