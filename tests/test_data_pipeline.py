"""Shards (parallel, resumable, deterministic; local processes and Ray), the curation plug-in, the
webdataset writer/reader and the stats report."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from kaleido.data.records import (
    ClipRecord,
    ReferenceImage,
    TrainingSample,
    read_jsonl,
    write_jsonl,
)
from kaleido.data.shards import SUCCESS, ShardSpec, StageFailed, run_shards

# ---------------------------------------------------------------------------------------------
# shard functions (module level: they are pickled by name into spawned worker processes)


def write_items(ctx):
    """Writes one seeded file per item; logs each call (pid) so tests can count and place calls."""
    options = ctx.spec.payload
    with open(options["log"], "a") as log:
        log.write(f"{ctx.spec.name} {os.getpid()}\n")
    flag = Path(options["flag"]) if options.get("flag") else None
    if flag is not None and flag.exists() and ctx.spec.shard_id == 1:
        if flag.read_text() == "exit":
            deadline = time.monotonic() + 30
            while not (ctx.root / ctx.stage / "shard-00000" / SUCCESS).exists() and time.monotonic() < deadline:
                time.sleep(0.05)  # die only after shard 0 finished, as a kill mid-run would
            os._exit(3)
        raise RuntimeError("simulated shard failure")
    time.sleep(options.get("sleep", 0))
    for item in ctx.spec.items:
        value = ctx.rng().integers(1 << 30), ctx.rng(item).integers(1 << 30)
        (ctx.work_dir / f"{item}.txt").write_text(f"{item} {value}\n")
    return {"items": len(ctx.spec.items)}


def _specs(tmp_path: Path, flag: Path | None = None, sleep: float = 0.0, count: int = 3) -> list[ShardSpec]:
    options = {"log": str(tmp_path / "calls.log"), "flag": str(flag) if flag else None, "sleep": sleep}
    return [ShardSpec(i, tuple(f"item{i}{k}" for k in range(2)), dict(options)) for i in range(count)]


def _calls(tmp_path: Path) -> list[tuple[str, int]]:
    path = tmp_path / "calls.log"
    if not path.exists():
        return []
    return [(name, int(pid)) for name, pid in (line.split() for line in path.read_text().splitlines())]


def _markers(stage_dir: Path) -> dict[str, tuple[int, str]]:
    result = {}
    for marker in sorted(stage_dir.glob(f"shard-*/{SUCCESS}")):
        result[marker.parent.name] = (marker.stat().st_mtime_ns, json.loads(marker.read_text())["content_hash"])
    return result


# ---------------------------------------------------------------------------------------------
# shards


def test_shards_run_in_parallel_processes_skip_when_done_and_reproduce_output(tmp_path, data_params):
    params = data_params(tmp_path / "data", {"data.workers": 2})
    specs = _specs(tmp_path, sleep=0.5)
    result = run_shards("toy", specs, write_items, params, fingerprint={"seed": 0}, progress=False)
    assert [o.status for o in result.outcomes] == ["done"] * 3
    calls = _calls(tmp_path)
    assert sorted(name for name, _ in calls) == ["shard-00000", "shard-00001", "shard-00002"]
    pids = {pid for _, pid in calls}
    assert os.getpid() not in pids and len(pids) == 2  # two worker processes shared the shards
    stage_dir = tmp_path / "data" / "toy"
    first = _markers(stage_dir)
    assert len(first) == 3 and not list(stage_dir.glob(".*.tmp"))
    marker = json.loads((stage_dir / "shard-00000" / SUCCESS).read_text())
    assert set(marker["files"]) == {"item00.txt", "item01.txt"} and marker["summary"] == {"items": 2}
    assert "time" not in json.dumps(marker)  # nothing run-dependent in the marker

    # re-run: every shard skipped, the fn not called, the markers untouched
    again = run_shards("toy", specs, write_items, params, fingerprint={"seed": 0}, progress=False)
    assert [o.status for o in again.outcomes] == ["skipped"] * 3
    assert len(_calls(tmp_path)) == 3 and _markers(stage_dir) == first

    # a lost shard is redone alone and comes back byte-identical (seeds: data.seed + stage + shard/item)
    for path in (stage_dir / "shard-00001").iterdir():
        path.unlink()
    (stage_dir / "shard-00001").rmdir()
    third = run_shards("toy", specs, write_items, params, fingerprint={"seed": 0}, progress=False)
    assert [o.status for o in third.outcomes] == ["skipped", "done", "skipped"]
    assert [name for name, _ in _calls(tmp_path)][3:] == ["shard-00001"]
    now = _markers(stage_dir)
    assert now["shard-00001"][1] == first["shard-00001"][1]
    assert now["shard-00000"] == first["shard-00000"]

    # a changed spec (fingerprint) redoes the work
    fourth = run_shards("toy", specs[:1], write_items, params, fingerprint={"seed": 1}, progress=False)
    assert [o.status for o in fourth.outcomes] == ["done"]
    assert not (stage_dir / "shard-00002").exists()  # shards no longer in the spec list are dropped


def test_a_failing_shard_is_reported_while_the_others_finish_and_a_rerun_redoes_only_it(tmp_path, data_params):
    params = data_params(tmp_path / "data", {"data.workers": 1})
    flag = tmp_path / "fail"
    flag.write_text("raise")
    specs = _specs(tmp_path, flag=flag)
    result = run_shards("toy", specs, write_items, params, progress=False)
    assert [o.status for o in result.outcomes] == ["done", "failed", "done"]
    assert "simulated shard failure" in result.failed[0].error
    stage_dir = tmp_path / "data" / "toy"
    assert not (stage_dir / "shard-00001").exists() and not list(stage_dir.glob(".*"))
    with pytest.raises(StageFailed, match="1 of 3 shards failed"):
        result.raise_for_failures()
    flag.unlink()
    rerun = run_shards("toy", specs, write_items, params, progress=False)
    assert [o.status for o in rerun.outcomes] == ["skipped", "done", "skipped"]
    assert [name for name, _ in _calls(tmp_path)] == ["shard-00000", "shard-00001", "shard-00002", "shard-00001"]


def test_a_worker_killed_mid_run_loses_only_unfinished_shards(tmp_path, data_params):
    params = data_params(tmp_path / "data", {"data.workers": 2})
    flag = tmp_path / "kill"
    flag.write_text("exit")
    specs = _specs(tmp_path, flag=flag)
    result = run_shards("toy", specs, write_items, params, progress=False)
    statuses = {o.name: o.status for o in result.outcomes}
    assert statuses["shard-00000"] == "done" and statuses["shard-00001"] == "failed"
    assert any("died" in (o.error or "") for o in result.failed)
    stage_dir = tmp_path / "data" / "toy"
    kept = _markers(stage_dir)
    flag.unlink()
    rerun = run_shards("toy", specs, write_items, params, progress=False)
    assert all(o.status in ("done", "skipped") for o in rerun.outcomes)
    assert rerun.outcomes[0].status == "skipped" and _markers(stage_dir)["shard-00000"] == kept["shard-00000"]
    assert len(_markers(stage_dir)) == 3 and not list(stage_dir.glob(".*.tmp"))


# Shards on Ray (a real two-node cluster on loopback, data.ray_address "local" included): tests/test_ray_cluster.py.


# ---------------------------------------------------------------------------------------------
# curation (the real kaleido.data.curate with stub models), training set writer and stats


class BoxDetector:
    """A stand-in Grounding DINO: a fixed box per asked term; fails on dark frames (a model crash)."""

    name = "box_detector"

    def detect(self, image, terms):
        from kaleido.vision import Detection

        image = np.asarray(image)
        if image[:8, :8].mean() < 50:
            raise RuntimeError("detector crashed on this frame")
        return [Detection((4.0 + 46.0 * k, 12.0, 44.0 + 46.0 * k, 44.0), 0.9, term) for k, term in enumerate(terms)]


class BoxSegmenter:
    """A stand-in SAM: the mask is the box."""

    name = "box_segmenter"

    def segment(self, image, boxes):
        height, width = np.asarray(image).shape[:2]
        masks = np.zeros((len(boxes), height, width), dtype=bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
            mask[int(y0) : int(y1), int(x0) : int(x1)] = True
        return masks


def _clip_frames(background: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = np.full((12, 64, 96, 3), background, dtype=np.uint8)
    frames[:, 12:44, 4:44] = rng.integers(0, 256, (12, 32, 40, 3))  # sharp, mid-bright subjects
    frames[:, 12:44, 50:90] = rng.integers(0, 256, (12, 32, 40, 3))
    return frames


@pytest.fixture(scope="module")
def curated(tmp_path_factory, data_params):
    import kaleido.data.curate as curate
    import kaleido.data.curation_stage as stage
    from kaleido.data.pipeline import run_curation
    from kaleido.data.synthetic import FixedScorer
    from kaleido.data.taxonomy import match_subjects
    from kaleido.model.media import write_video

    root = tmp_path_factory.mktemp("curate") / "data"
    clips = {  # clip id: (source, caption, background level)
        "c0": ("raw/a.mp4", "A woman walks her dog in the park", 120),
        "c1": ("raw/a.mp4", "A red car passes a cat", 110),
        "c2": ("raw/b.mp4", "A horse in a field", 130),
        "c3": ("raw/c.mp4", "A boy with a kite", 20),  # dark: the stub detector crashes
        "c4": ("raw/d.mp4", "Blurry motion, nothing nameable", 120),  # no subjects: never curated
    }
    rows = []
    for index, (clip_id, (source, caption, level)) in enumerate(clips.items()):
        write_video(_clip_frames(level, index), root / "clips" / f"{clip_id}.mp4", fps=16)
        clip = ClipRecord(clip_id, source, 0, 19, 0.0, 0.76, 25, 16, 96, 64, 12, 0.75, f"clips/{clip_id}.mp4",
                          caption, "sidecar:test", match_subjects(caption))
        rows.append(clip.to_json())
    escape = dict(rows[0], clip_id="evil", path="../../etc/passwd")
    write_jsonl(root / "user" / "captions.jsonl", [*rows, escape])  # a user's own manifest: passed by --manifest
    write_jsonl(root / "manifests" / "captions.jsonl", rows)  # clip metadata write-dataset copies into the samples
    # sources a (c0, c1) and b (c2) fall in dataset shards 0 and 1 of 2 (sha256 of the path, mod 2)
    params = data_params(root, {"data.workers": 1, "data.dataset_shards": 2, "data.models.flux_fill": None,
                                "data.models.flux_redux": None})
    loads = []

    def load_curation_models(cfg, params_):
        loads.append(cfg)
        return curate.CurationModels(BoxDetector(), BoxSegmenter(), FixedScorer())

    original = curate.load_curation_models
    curate.load_curation_models = load_curation_models
    try:
        report = run_curation(params, manifest="user/captions.jsonl", progress=False)
        samples_before = (root / "manifests" / "samples.jsonl").read_bytes()
        run_curation(params, manifest="user/captions.jsonl", progress=False, force=True)  # same seeds, same samples
        assert (root / "manifests" / "samples.jsonl").read_bytes() == samples_before
    finally:
        curate.load_curation_models = original
        stage._CURATION_MODELS.clear()  # no stub models left for later runs in this process
    return {"root": root, "params": params, "report": report, "loads": loads}


def test_curation_runs_curate_clip_per_clip_and_pairs_across_clips(curated):
    from PIL import Image

    root = curated["root"]
    assert len(curated["loads"]) == 1  # once per process (the forced re-run reused them), not per shard or clip
    instances = list(read_jsonl(root / "manifests" / "instances.jsonl"))
    assert sorted({(i["clip_id"], i["category"]) for i in instances}) == [
        ("c0", "dog"), ("c0", "woman"), ("c1", "car"), ("c1", "cat"), ("c2", "horse"),
    ]
    chosen = [i for i in instances if i["mask_path"]]  # the best instance of each subject keeps its mask
    subjects = sorted({(i["clip_id"], i["category"]) for i in instances})
    assert sorted((i["clip_id"], i["category"]) for i in chosen) == subjects
    for instance in chosen:
        mask = np.asarray(Image.open(root / instance["mask_path"]))
        assert mask.shape == (64, 96) and set(np.unique(mask)) == {0, 255}
    samples = [TrainingSample.from_json(row) for row in read_jsonl(root / "manifests" / "samples.jsonl")]
    assert [s.sample_id for s in samples] == ["c0", "c1", "c2"]
    assert sum(s.cross_pair for s in samples) == 1  # data.references.cross_pair_ratio 0.4 of 3, exactly
    for sample in samples:
        assert sample.sample_type in ("crop", "segment") and sample.caption
        for reference in sample.references:
            assert (root / reference.image_path).is_file() and (root / reference.mask_path).is_file()
    rejections = {(r["stage"], r["item"], r["reason"]) for r in read_jsonl(root / "manifests/rejections/curate.jsonl")}
    assert ("curate", "evil", "path_outside_root") in rejections  # user manifest row pointing outside
    assert any(item.startswith("c3/") and reason == "model_error" for _, item, reason in rejections)
    assert ("ground", "c0/park", "background_term") in rejections
    counts = curated["report"].counts
    assert counts["clips"] == 4 and counts["samples"] == 3 and counts["cross_pairs"] == 1


@pytest.fixture(scope="module")
def written(curated):
    """Adds three broken samples to the curated ones, then writes the webdataset shards (2 per tar)."""
    from kaleido.data.pipeline import run_write_dataset

    root = curated["root"]
    samples = [TrainingSample.from_json(row) for row in read_jsonl(root / "manifests" / "samples.jsonl")]
    escape = TrainingSample("bad-escape", "c0", "clips/c0.mp4", "x", "segment", False,
                            [ReferenceImage("dog", "animal", "c0", image_path="../outside.png")])
    missing = TrainingSample("bad-missing", "c0", "clips/gone.mp4", "x", "segment", False, samples[0].references)
    wrong = TrainingSample("bad-type", "c0", "clips/c0.mp4", "x", "collage", False, samples[0].references)
    write_jsonl(root / "user" / "samples.jsonl", [*samples, escape, missing, wrong])
    report = run_write_dataset(curated["params"], manifest="user/samples.jsonl", progress=False)
    tars = sorted((root / "dataset").rglob("*.tar"))
    digests = [hashlib.sha256(t.read_bytes()).hexdigest() for t in tars]
    run_write_dataset(curated["params"], manifest="user/samples.jsonl", progress=False, force=True)
    assert [hashlib.sha256(t.read_bytes()).hexdigest() for t in sorted((root / "dataset").rglob("*.tar"))] == digests
    return {**curated, "report": report, "tars": tars, "samples": samples}


def test_writer_and_reader_round_trip(written):
    from PIL import Image

    from kaleido.data.writer import iter_training_samples

    root = written["root"]
    assert written["report"].counts == {"samples": 3, "tars": 2, "rejected": 3}
    with tarfile.open(written["tars"][0]) as tar:  # a plain tar: standard tools list it
        names = tar.getnames()
    assert names == ["c0.json", "c0.mask0.png", "c0.mask1.png", "c0.mp4", "c0.ref0.png", "c0.ref1.png", "c0.txt",
                     "c1.json", "c1.mask0.png", "c1.mask1.png", "c1.mp4", "c1.ref0.png", "c1.ref1.png", "c1.txt"]
    examples = list(iter_training_samples(root / "dataset"))
    assert [e.key for e in examples] == ["c0", "c1", "c2"]
    expected = {s.sample_id: s for s in written["samples"]}
    for example in examples:
        sample = expected[example.key]
        assert example.caption == sample.caption and example.sample_type == sample.sample_type
        assert example.cross_pair == sample.cross_pair and len(example.references) == len(sample.references)
        for image, mask, reference in zip(example.references, example.masks, sample.references, strict=True):
            assert np.array_equal(image, np.asarray(Image.open(root / reference.image_path).convert("RGB")))
            assert mask is not None and mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
        assert example.clip == (root / sample.clip_path).read_bytes()
        assert example.frames().shape == (12, 64, 96, 3)
        provenance = example.provenance
        assert provenance["source"] == provenance["clip"]["source"] == sample.provenance["source"]
        assert provenance["clip"]["fps"] == 16 and "references" in provenance
        assert [r["category"] for r in example.meta["references"]] == [r.category for r in sample.references]
    rejected = {r["item"]: r["reason"] for r in read_jsonl(root / "manifests/rejections/write.jsonl")}
    assert rejected == {"bad-escape": "path_outside_root", "bad-missing": "missing_file", "bad-type": "bad_sample_type"}
    index = json.loads((root / "dataset" / "index.json").read_text())
    assert index["samples"] == 3 and [s["samples"] for s in index["shards"]] == [2, 1]


def test_stats_report_counts_categories_and_rejections(written):
    from kaleido.data.pipeline import run_stats

    root = written["root"]
    report = run_stats(written["params"])
    stats = json.loads((root / "stats" / "stats.json").read_text())
    assert stats["samples_source"] == "dataset" and stats["category_source"] == "references"
    assert stats["samples"] == 3 and stats["cross_pair_samples"] == 1 and sum(stats["sample_types"].values()) == 3
    counts = {(row["category"], row["group"]): row["count"] for row in stats["categories"]}
    assert counts == {("woman", "human"): 1, ("dog", "animal"): 1, ("car", "object"): 1, ("cat", "animal"): 1,
                      ("horse", "animal"): 1}
    assert stats["groups"] == {"human": 1, "animal": 3, "object": 1, "cartoon": 0, "background": 0}
    candidates = {row["category"] for row in stats["candidate_categories"]}
    assert {"woman", "dog", "park", "car", "cat", "horse", "field", "boy", "toy"} <= candidates
    by_stage = stats["rejections"]["by_stage"]
    assert by_stage["curate"] == {"path_outside_root": 1}
    assert by_stage["ground"]["background_term"] == 2 and by_stage["ground"]["model_error"] >= 1
    assert by_stage["write"] == {"bad_sample_type": 1, "missing_file": 1, "path_outside_root": 1}
    assert stats["rejections"]["total"] == sum(stats["rejections"]["by_reason"].values())
    for name in ("categories.png", "rejections.png"):
        assert (root / "stats" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.counts["categories"] == len(stats["categories"])


def test_cli_data_commands(written, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from kaleido.cli import app

    runner = CliRunner()
    for command in ("ingest", "caption", "subjects", "curate", "write-dataset", "data-stats"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--params" in result.output, command
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(written["params"].model_dump(mode="json")))
    result = runner.invoke(app, ["data-stats", "--params", str(params_file)])
    assert result.exit_code == 0 and "data-stats:" in result.output and "stats.json" in result.output
    result = runner.invoke(app, ["write-dataset", "--params", str(params_file), "--quiet",
                                 "--manifest", "user/samples.jsonl"])
    assert result.exit_code == 0 and "0 shards run, 2 already done" in result.output  # one per dataset shard
    result = runner.invoke(app, ["subjects", "Two golden retrievers and a teddy bear", "--params", str(params_file)])
    assert result.exit_code == 0 and "dog (animal)" in result.output and "toy (object)" in result.output
    result = runner.invoke(app, ["ingest", "--params", str(params_file), "--detector", "magic"])
    assert result.exit_code == 2 and "shot_detector" in result.output
