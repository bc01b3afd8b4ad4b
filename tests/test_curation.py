"""Curation on synthetic clips with ground truth: filters, IoU dedup, references, exact mix and cross-pairing."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kaleido.config.schema import DataConfig
from kaleido.data.curate import CurationModels, curate_clip, load_curation_models, sample_frame_indices
from kaleido.data.filters import box_iou, iou_filter, laplacian_variance, mean_luma
from kaleido.data.generated import FluxBuilder, FluxModels
from kaleido.data.keys import unit
from kaleido.data.pairing import (
    PROCEDURAL,
    apportion,
    assign_cross_pairs,
    assign_types,
    cross_source_summary,
    effective_mix,
    pair_samples,
)
from kaleido.data.records import Instance, TrainingSample
from kaleido.data.references import CurationResult, composite, load_image, load_mask
from kaleido.data.split import validation_sources, validation_summary
from kaleido.data.synthetic import (
    FixedScorer,
    MirrorVariator,
    OracleDetector,
    OracleSegmenter,
    SubjectSpec,
    SyntheticClip,
    TextureInpainter,
    make_clip,
)
from kaleido.vision import Detection

CAT = SubjectSpec("cat", size=(28, 28), start=(10, 10), end=(20, 14))
CUP = SubjectSpec("cup", size=(24, 28), start=(60, 30), end=(52, 26), score=0.8)
ASTRONAUT = SubjectSpec("astronaut", size=(32, 26), start=(40, 4), end=(44, 8), score=0.95)
DISABLED = {"inpaint": "data.models.flux_fill is null", "redux": "data.models.flux_redux is null"}


def oracle_models(*clips: SyntheticClip, **kw) -> CurationModels:
    return CurationModels(
        detector=kw.pop("detector", OracleDetector(clips)),
        segmenter=kw.pop("segmenter", OracleSegmenter(clips)),
        clip=kw.pop("clip", FixedScorer()),
        **kw,
    )


def flux_models(fill: bool = True, redux: bool = True) -> FluxModels:
    """The counting FLUX stand-ins of kaleido.data.synthetic (`.calls` on each)."""
    return FluxModels(TextureInpainter() if fill else None, MirrorVariator() if redux else None)


def curate(clip: SyntheticClip, models: CurationModels, tmp_path: Path, cfg: DataConfig | None = None,
           clip_id: str = "clip-a", source: str = "raw/a.mp4") -> CurationResult:
    record = clip.record(clip_id, source=source)
    return curate_clip(record, clip.frames, clip.matches, models, cfg or DataConfig(), tmp_path / "refs")


def frames_of(*clips: tuple[str, SyntheticClip]):
    """A FrameSource over synthetic clips by clip id (what the pair stage decodes from the clip files)."""
    by_id = dict(clips)
    return lambda result, index: by_id[result.clip.clip_id].frames[index]


def reasons(result: CurationResult) -> Counter[str]:
    return Counter(r.reason for r in result.rejections)


class FakeFaces:
    """A FaceDetector test double: a fixed answer, and a record of what it was asked."""

    def __init__(self, score: float | None) -> None:
        self.score, self.calls = score, 0

    def frontal_face_score(self, image: np.ndarray) -> float | None:
        self.calls += 1
        return self.score


class Boom:
    """Raises from every model method it is asked for."""

    name = "boom"

    def __getattr__(self, attribute: str):
        def fail(*args, **kwargs):
            raise RuntimeError(f"{attribute} exploded")

        return fail


# ---- synthetic ground truth and oracles -------------------------------------------------------


def test_synthetic_clip_ground_truth_and_oracles(tmp_path: Path) -> None:
    clip = make_clip([CAT, CUP], frames=6, seed=3)
    assert clip.frames.shape == (6, 64, 96, 3) and clip.frames.dtype == np.uint8
    cat, cup = clip.subjects
    np.testing.assert_array_equal(cat.boxes[0], [10, 10, 38, 38])
    np.testing.assert_array_equal(cat.boxes[-1], [20, 14, 48, 42])
    assert cat.masks[0].sum() == pytest.approx(np.pi / 4 * 28 * 28, rel=0.05)  # an inscribed ellipse
    assert clip.caption[clip.matches[1].start : clip.matches[1].end] == "coffee cup"
    detections = OracleDetector([clip]).detect(clip.frames[2], ["cat", "coffee cup", "dog"])
    assert [(d.label, d.box) for d in detections] == [("cat", tuple(cat.boxes[2])), ("coffee cup", tuple(cup.boxes[2]))]
    masks = OracleSegmenter([clip]).segment(clip.frames[2], [d.box for d in detections])
    np.testing.assert_array_equal(masks[0], cat.masks[2])
    np.testing.assert_array_equal(masks[1], cup.masks[2])
    assert OracleDetector([clip]).detect(np.zeros((64, 96, 3), np.uint8), ["cat"]) == []  # unknown frame
    from kaleido.model.media import read_video

    path = clip.write(tmp_path / "clip.mp4")
    assert read_video(path).shape == clip.frames.shape


def test_frame_sampling() -> None:
    assert sample_frame_indices(9, 3) == [2, 4, 6]
    assert sample_frame_indices(2, 3) == [0, 1]
    assert sample_frame_indices(100, 1) == [50]


# ---- filters --------------------------------------------------------------------------------------


def test_measurements() -> None:
    assert mean_luma(np.full((4, 4, 3), 100, np.uint8)) == pytest.approx(100.0)
    assert laplacian_variance(np.full((8, 8, 3), 50, np.uint8)) == 0.0
    assert box_iou((10, 10, 50, 50), (20, 10, 60, 50)) == pytest.approx(1200 / 2000)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0


def test_subject_too_small_and_too_large(tmp_path: Path) -> None:
    small = make_clip([SubjectSpec("cat", size=(8, 8), start=(10, 10), end=(12, 10))], seed=1)
    result = curate(small, oracle_models(small), tmp_path)
    assert not result.ok and reasons(result)["too_small"] == 3 and reasons(result)["no_subjects"] == 1
    detail = next(r.detail for r in result.rejections if r.reason == "too_small")
    area = small.subjects[0].masks[2].sum() / (64 * 96)  # frame 2 is the first sampled one: 52 px
    assert detail == f"mask covers {area:.4f} of the frame, below data.filters.min_area=0.0312"
    big = make_clip([SubjectSpec("cup", size=(64, 96), start=(0, 0), end=(0, 0), shape="rect")], seed=1)
    result = curate(big, oracle_models(big), tmp_path)
    assert reasons(result)["too_large"] == 3 and "max_area=0.8000" in result.rejections[0].detail


def test_dark_and_blurred_frames_are_rejected(tmp_path: Path) -> None:
    dark = make_clip([CAT], brightness=0.12, seed=2)
    result = curate(dark, oracle_models(dark), tmp_path)
    assert reasons(result)["too_dark"] == 3 and "min_brightness=30.0" in result.rejections[0].detail
    blurred = make_clip([CAT], blur_sigma=2.5, seed=2)
    result = curate(blurred, oracle_models(blurred), tmp_path)
    assert reasons(result)["blurry"] == 3 and "min_sharpness=50.0" in result.rejections[0].detail
    sharp = make_clip([CAT], seed=2)
    result = curate(sharp, oracle_models(sharp), tmp_path)
    assert result.ok and not result.rejections
    assert result.instances[0].metrics["sharpness"] > 50 and 30 < result.instances[0].metrics["brightness"] < 225


def test_overlapping_instances_deduplicated_by_iou(tmp_path: Path) -> None:
    # amodal boxes A = (10, 10, 50, 50), B = (20, 10, 60, 50): IoU = 30*40 / (1600 + 1600 - 1200) = 0.6
    a = SubjectSpec("cat", size=(40, 40), start=(10, 10), end=(10, 10), shape="rect", score=0.9)
    b = SubjectSpec("cup", size=(40, 40), start=(20, 10), end=(20, 10), shape="rect", score=0.8)
    clip = make_clip([a, b], seed=4)
    cfg = DataConfig.model_validate({"filters": {"max_iou": 0.5}})
    result = curate(clip, oracle_models(clip), tmp_path, cfg)
    overlaps = [r for r in result.rejections if r.reason == "overlap"]
    assert len(overlaps) == 3 and all("/coffee_cup#0" in r.item for r in overlaps)  # the lower score goes
    assert "IoU 0.600" in overlaps[0].detail and "max_iou=0.5" in overlaps[0].detail
    assert [s.instance.category for s in result.subjects] == ["cat"]
    cfg = DataConfig.model_validate({"filters": {"max_iou": 0.7}})
    result = curate(clip, oracle_models(clip), tmp_path, cfg)
    assert not reasons(result)["overlap"] and len(result.subjects) == 2


def test_iou_filter_is_greedy_by_score() -> None:
    def inst(name: str, box: tuple[float, float, float, float], score: float, frame: int = 0) -> Instance:
        return Instance("c", frame, name, "object", box, score, instance_id=name)

    # b overlaps a (IoU 0.6) and c (IoU 0.6); a and c do not overlap: a kept, b dropped, c kept
    a, b, c = inst("a", (0, 0, 40, 40), 0.9), inst("b", (10, 0, 50, 40), 0.8), inst("c", (20, 0, 60, 40), 0.7)
    kept, rejections = iou_filter([c, b, a], DataConfig().filters.model_copy(update={"max_iou": 0.5}))
    assert [i.instance_id for i in kept] == ["c", "a"] and [r.item for r in rejections] == ["b"]
    other_frame = inst("d", (10, 0, 50, 40), 0.8, frame=1)
    kept, _ = iou_filter([a, other_frame], DataConfig().filters.model_copy(update={"max_iou": 0.5}))
    assert len(kept) == 2  # only instances of the same frame compete


def test_clip_category_check(tmp_path: Path) -> None:
    clip = make_clip([CAT, CUP], seed=5)
    result = curate(clip, oracle_models(clip, clip=FixedScorer({"cat": 0.1}, default=0.3)), tmp_path)
    assert reasons(result)["clip_mismatch"] == 3
    assert "CLIP similarity 0.100 to 'a photo of a cat'" in result.rejections[0].detail
    assert [s.instance.category for s in result.subjects] == ["cup"]
    assert result.subjects[0].instance.metrics["clip_score"] == pytest.approx(0.3)


# ---- faces ------------------------------------------------------------------------------------------


def test_face_check_skipped_with_a_note_without_a_face_model(tmp_path: Path) -> None:
    clip = make_clip([ASTRONAUT, CAT], seed=6)
    result = curate(clip, oracle_models(clip), tmp_path)
    assert {s.instance.category for s in result.subjects} == {"astronaut", "cat"}
    assert result.stats["face_check"].startswith("skipped") and result.stats["face_check_skipped"] == 3
    assert any("without a face check" in note for note in result.notes)
    astronaut = next(s.instance for s in result.subjects if s.instance.group == "human")
    assert astronaut.metrics["face_checked"] == 0.0


@pytest.mark.parametrize(
    ("score", "reason"), [(None, "no_face"), (0.3, "face_not_frontal"), (0.9, None)]
)
def test_face_detector_through_the_interface(tmp_path: Path, score: float | None, reason: str | None) -> None:
    clip = make_clip([ASTRONAUT, CAT], seed=6)
    faces = FakeFaces(score)
    result = curate(clip, oracle_models(clip, face=faces), tmp_path)
    assert faces.calls == 3  # humans only: one astronaut per sampled frame, the cat is not asked about
    categories = {s.instance.category for s in result.subjects}
    if reason is None:
        assert categories == {"astronaut", "cat"} and not result.rejections
        human = next(s.instance for s in result.subjects if s.instance.group == "human")
        assert human.metrics["face_score"] == 0.9 and result.stats["face_check"] == "on"
    else:
        assert categories == {"cat"} and reasons(result)[reason] == 3


# ---- failures become rejections ------------------------------------------------------------------


def test_failing_models_become_rejections(tmp_path: Path) -> None:
    clip = make_clip([CAT, CUP], seed=7)
    result = curate(clip, oracle_models(clip, detector=Boom()), tmp_path)
    assert not result.ok and reasons(result)["model_error"] == 3
    first = result.rejections[0]
    assert first.stage == "ground" and "boom raised RuntimeError: detect exploded" in first.detail

    result = curate(clip, oracle_models(clip, segmenter=Boom()), tmp_path)
    assert reasons(result)["model_error"] == 3 and not result.ok

    result = curate(clip, oracle_models(clip, clip=Boom()), tmp_path)
    assert {r.stage for r in result.rejections if r.reason == "model_error"} == {"filter"}

    class NanDetector:
        def detect(self, image, terms):
            return [Detection((float("nan"), 0.0, 10.0, 10.0), 0.9, "cat")]

    class FullMasks:
        def segment(self, image, boxes):
            return np.ones((len(boxes), *image.shape[:2]), dtype=bool)

    # a NaN box gets past the models and breaks the crop: the clip is rejected, the run goes on
    result = curate(clip, oracle_models(clip, detector=NanDetector(), segmenter=FullMasks()), tmp_path)
    assert reasons(result)["curation_error"] == 1 and not result.ok

    result = curate_clip(clip.record("x"), clip.frames[..., :2], clip.matches, oracle_models(clip), DataConfig(),
                         tmp_path)
    assert reasons(result)["bad_frames"] == 1


def test_background_terms_are_not_grounded(tmp_path: Path) -> None:
    from kaleido.data.records import SubjectMatch

    clip = make_clip([CAT], seed=8)
    matches = [*clip.matches, SubjectMatch("beach", "beach", "background", 0, 5)]
    result = curate_clip(clip.record("c"), clip.frames, matches, oracle_models(clip), DataConfig(), tmp_path)
    assert reasons(result)["background_term"] == 1 and result.ok


# ---- references -----------------------------------------------------------------------------------


def test_reference_variants_on_disk(tmp_path: Path) -> None:
    clip = make_clip([CAT], seed=9)
    result = curate(clip, oracle_models(clip), tmp_path)
    (subject,) = result.subjects
    inst = subject.instance
    t = inst.frame_index
    truth = clip.subjects[0]
    assert inst.box == tuple(truth.boxes[t]) and subject.bounds == tuple(int(v) for v in truth.boxes[t])
    x0, y0, x1, y1 = subject.bounds
    crop = load_image(result.resolve(subject.references["crop"]))
    np.testing.assert_array_equal(crop, clip.frames[t, y0:y1, x0:x1])
    mask = load_mask(result.resolve(subject.masks["segment"]))
    np.testing.assert_array_equal(mask, truth.masks[t, y0:y1, x0:x1])
    segment = load_image(result.resolve(subject.references["segment"]))
    assert (segment[~mask] == 255).all() and (segment[mask] == crop[mask]).all()
    assert set(subject.references) == {"crop", "segment"}  # FLUX builds the rest at pairing, when a sample uses it
    full_mask = load_mask(result.resolve(inst.mask_path))
    np.testing.assert_array_equal(full_mask, truth.masks[t])
    # the plate: the middle sampled frame as it is and the union mask of the subjects kept on it
    p = sample_frame_indices(len(clip.frames), 3)[1]
    assert result.plate.endswith(f"plate_{p:04d}.png") and p != t
    np.testing.assert_array_equal(load_image(result.resolve(result.plate)), clip.frames[p])
    np.testing.assert_array_equal(load_mask(result.resolve(result.plate_mask)), truth.masks[p])
    assert result.enabled_types == ["crop", "segment"]  # DataConfig(): flux_fill / flux_redux null
    # JSON round trip (what a shard writes for the pairing step)
    again = CurationResult.from_json(json.loads(json.dumps(result.to_json())))
    assert again.to_json() == result.to_json()

    # what the pair stage generates for this clip: an inpaint reference (the subject kept, the rest repainted), a
    # redux variation (the stand-in mirrors the segment reference), a plate with the subject painted out
    flux = flux_models()
    builder = FluxBuilder(flux, DataConfig(), 0, None, frames_of(("clip-a", clip)))
    (inpaint,) = builder.inpaint(result, "clip-a")
    assert (inpaint[mask] == crop[mask]).all() and (inpaint[~mask] != crop[~mask]).any()
    (redux,) = builder.redux(result, "clip-a")
    np.testing.assert_array_equal(redux, segment[:, ::-1])
    plate, how = builder.plate(result)
    painted = truth.masks[p]
    assert how == "inpainted" and (plate[painted] != clip.frames[p][painted]).all(axis=-1).mean() > 0.9
    assert builder.plate(result)[0] is plate  # once per donor clip
    assert dict(builder.calls) == {"inpaint": 1, "redux": 1, "plate": 1}
    assert (flux.fill.calls, flux.redux.calls) == (2, 1)  # Fill: the reference and the plate
    # the draws are stable hashes of (seed, sample id, subject): the same call gives the same pixels
    again = FluxBuilder(flux_models(), DataConfig(), 0, None, frames_of(("clip-a", clip)))
    np.testing.assert_array_equal(again.inpaint(result, "clip-a")[0], inpaint)
    assert not np.array_equal(FluxBuilder(flux_models(), DataConfig(), 1, None, frames_of(("clip-a", clip)))
                              .inpaint(result, "clip-a")[0], inpaint)


def test_composite_keeps_subject_pixels() -> None:
    crop = np.full((4, 4, 3), 10, np.uint8)
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    plate = np.full((8, 8, 3), 200, np.uint8)
    out = composite(crop, mask, plate, (2, 2, 6, 6), (8, 8))
    assert (out[mask] == 10).all() and (out[~mask] == 200).all()


# ---- mix and cross-pairing ------------------------------------------------------------------------


def test_apportionment_is_exact() -> None:
    mix = {"crop": 1, "segment": 5, "inpaint": 3, "redux": 1}
    assert apportion(100, mix) == {"crop": 10, "segment": 50, "inpaint": 30, "redux": 10}
    assert apportion(7, mix) == {"crop": 1, "segment": 3, "inpaint": 2, "redux": 1}
    assert sum(apportion(13, {"a": 0.3, "b": 0.7}).values()) == 13
    assert effective_mix(mix, ["crop", "segment"]) == {"crop": 1 / 6, "segment": 5 / 6}
    assert apportion(100, effective_mix(mix, ["crop", "segment"])) == {"crop": 17, "segment": 83}
    flags = assign_cross_pairs([unit(0, "cross", i) for i in range(100)], 0.4)
    assert sum(flags) == 40 and flags != assign_cross_pairs([unit(1, "cross", i) for i in range(100)], 0.4)
    with pytest.raises(ValueError, match="no weight"):
        effective_mix({"crop": 0, "segment": 0, "inpaint": 1, "redux": 0}, ["crop", "segment"])


def test_assign_types_respects_availability() -> None:
    full = {"crop", "segment", "inpaint", "redux"}
    available = [full] * 90 + [{"crop", "segment", "redux"}] * 10  # ten samples lost their inpaint reference
    weights = {"crop": 0.1, "segment": 0.5, "inpaint": 0.3, "redux": 0.1}
    types, shortfall = assign_types(available, weights, [unit(0, "type", i) for i in range(100)])
    assert shortfall == 0 and Counter(types) == {"crop": 10, "segment": 50, "inpaint": 30, "redux": 10}
    assert all(t != "inpaint" for t in types[90:])


@pytest.fixture(scope="module")
def curated_batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[CurationResult], Path]:
    """100 one-subject clips: 50 from source A, 40 from B, 10 from C; one rocket per source, cat/cup/astronaut
    for the others (so a cross-paired rocket has no same-category clip in its source: it is composited)."""
    root = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(11)
    clips, records = [], []
    for i in range(100):
        source = "raw/a.mp4" if i < 50 else "raw/b.mp4" if i < 90 else "raw/c.mp4"
        name = "rocket" if i in (0, 50, 90) else ["cat", "cup", "astronaut"][i % 3]
        x, y = rng.integers(0, 60), rng.integers(0, 30)
        spec = SubjectSpec(name, size=(28, 28), start=(float(x), float(y)), end=(float(x) + 4, float(y) + 2))
        clips.append(make_clip([spec], frames=3, seed=i))
        records.append(clips[-1].record(f"clip-{i:03d}", source=source))
    models = oracle_models(*clips)
    cfg = DataConfig.model_validate({"grounding": {"frames_per_clip": 1}})
    results = [
        curate_clip(record, clip.frames, clip.matches, models, cfg, root / "refs", rel_dir="refs")
        for record, clip in zip(records, clips, strict=True)
    ]
    assert all(r.ok for r in results)
    FRAMES.update({record.clip_id: clip for record, clip in zip(records, clips, strict=True)})
    return results, root


FRAMES: dict[str, SyntheticClip] = {}  # the batch's clips by id: what the pair stage would decode


def batch_frames(result: CurationResult, index: int) -> np.ndarray:
    return FRAMES[result.clip.clip_id].frames[index]


def test_mix_and_cross_pair_ratio_exact_over_100(curated_batch: tuple[list[CurationResult], Path]) -> None:
    results, root = curated_batch
    stats: dict = {}
    samples = pair_samples(results, DataConfig(), 0, flux=flux_models(), frames=batch_frames, data_root=root,
                           stats=stats)
    assert len(samples) == 100 and all(isinstance(s, TrainingSample) for s in samples)
    assert Counter(s.sample_type for s in samples) == {"crop": 10, "segment": 50, "inpaint": 30, "redux": 10}
    assert sum(s.cross_pair for s in samples) == 40 and stats["cross_pairs"] == 40
    assert stats["sample_mix"] == {"crop": 0.1, "segment": 0.5, "inpaint": 0.3, "redux": 0.1}
    assert stats["mix_shortfall"] == 0 and stats["disabled_types"] == {}
    # deterministic, and independent of the order the shard finished its clips in
    again = pair_samples(list(reversed(results)), DataConfig(), 0, flux=flux_models(), frames=batch_frames,
                         data_root=root)
    assert [s.to_json() for s in again] == [s.to_json() for s in samples]
    same = [np.array_equal(a.image, b.image) for s, t in zip(samples, again, strict=True)
            for a, b in zip(s.references, t.references, strict=True) if a.image is not None]
    assert len(same) > 50 and all(same)  # the composites and the generated references, pixel for pixel
    for ratio, expected in ((0.0, 0), (0.2, 20), (1.0, 100)):
        cfg = DataConfig.model_validate({"references": {"cross_pair_ratio": ratio}})
        samples = pair_samples(results, cfg, 3, flux=flux_models(), frames=batch_frames, data_root=root)
        assert sum(s.cross_pair for s in samples) == expected


def test_flux_runs_only_for_what_the_samples_use(curated_batch: tuple[list[CurationResult], Path]) -> None:
    """100 samples at 1:5:3:1, 40 % cross-paired: FLUX Redux once per subject of the 10 redux samples, FLUX Fill once
    per subject of the NON-cross inpaint samples plus once per distinct donor clip a cross pair draws. Before the two
    phases every subject got both (100 + 100) and every clip a plate (100)."""
    results, root = curated_batch
    flux = flux_models()
    stats: dict = {}
    samples = pair_samples(results, DataConfig(), 0, flux=flux, frames=batch_frames, data_root=root, stats=stats)
    redux = [s for s in samples if s.sample_type == "redux"]
    inpaint_own = [s for s in samples if s.sample_type == "inpaint" and not s.cross_pair]
    donors = {info["background_clip_id"] for s in samples for info in s.provenance["references"]
              if info["kind"] == "other_source"}
    assert len(redux) == 10 and flux.redux.calls == sum(len(s.references) for s in redux) == 10
    assert flux.fill.calls == sum(len(s.references) for s in inpaint_own) + len(donors)
    assert stats["flux_calls"] == {"inpaint": len(inpaint_own), "plate": len(donors), "redux": 10}
    assert 0 < len(inpaint_own) < 30 and 0 < len(donors) < 36  # 36 cross-paired non-redux subjects draw donors
    assert flux.fill.calls + flux.redux.calls < 100  # was 300
    # every drawn donor's plate is the painted one, each painted once
    assert {info.get("plate") for s in samples for info in s.provenance["references"]
            if info["kind"] == "other_source"} == {"inpainted"}
    # the generated references are the samples' own: an inpaint reference keeps its subject's pixels
    for sample in inpaint_own:
        reference = sample.references[0]
        mask = reference.mask > 127
        own = next(r for r in results if r.clip.clip_id == sample.clip_id).subjects[0]
        np.testing.assert_array_equal(reference.image[mask], load_image(root / own.references["crop"])[mask])
    # no FLUX model: nothing generated, the mix renormalised over crop and segment
    assert pair_samples(results, DataConfig(), 0, data_root=root, stats=stats) and stats["flux_calls"] == {
        "inpaint": 0, "plate": 0, "redux": 0}


def test_a_failing_flux_call_falls_back_to_segment_and_is_counted(
    curated_batch: tuple[list[CurationResult], Path], caplog
) -> None:
    results, root = curated_batch
    flux = FluxModels(fill=Boom(), redux=MirrorVariator())
    stats: dict = {}
    rejections: list = []
    with caplog.at_level("WARNING"):
        samples = pair_samples(results, DataConfig(), 0, flux=flux, frames=batch_frames, data_root=root, stats=stats,
                               rejections=rejections)
    drawn = pair_samples(results, DataConfig(), 0, flux=flux_models(), frames=batch_frames, data_root=root)
    own_inpaint = {s.sample_id for s in drawn if s.sample_type == "inpaint" and not s.cross_pair}
    types = {s.sample_id: s.sample_type for s in samples}
    assert {sample_id for sample_id in own_inpaint if types[sample_id] == "segment"} == own_inpaint
    assert stats["mix_shortfall"] == len(own_inpaint) and stats["flux_failures"]["inpaint"] == len(own_inpaint)
    assert Counter(types.values())["segment"] == 50 + len(own_inpaint)
    # the plates stay raw frames, counted; the rejections name the model and the error
    assert stats["flux_failures"]["plate"] == stats["flux_calls"]["plate"] > 0
    assert len(rejections) == len(own_inpaint) + stats["flux_failures"]["plate"]
    assert all(r.stage == "references" and "boom raised RuntimeError: inpaint exploded" in r.detail
               for r in rejections)
    assert "sample-type mix missed by" in caplog.text and "background plate(s) kept their subjects" in caplog.text


def test_mix_renormalised_when_inpaint_and_redux_disabled(curated_batch: tuple[list[CurationResult], Path]) -> None:
    results, root = curated_batch
    stats: dict = {}
    samples = pair_samples(results, DataConfig(), 0, data_root=root, stats=stats)
    assert Counter(s.sample_type for s in samples) == {"crop": 17, "segment": 83}
    assert stats["sample_mix"] == pytest.approx({"crop": 1 / 6, "segment": 5 / 6})
    assert stats["disabled_types"] == DISABLED


def test_validation_split_holds_out_whole_sources_and_pairs_within_its_split(
    curated_batch: tuple[list[CurationResult], Path],
) -> None:
    """Sources a (50 clips), b (40), c (10); share 0.2 of 100 samples: whole source videos are held out, never
    a part of one, and a cross-paired reference takes its background from a source of its OWN split (a
    validation video's pixels never reach training)."""
    results, root = curated_batch
    counts = Counter(r.clip.source for r in results)
    held = validation_sources(counts, 0.2, seed=0)
    # expected by hand: the per-source draws sha256("0:raw/<x>.mp4")[:16] / 2^64 are a 0.685, b 0.573, c 0.264;
    # none is below 0.2, so the small-data rule holds out the lowest draw, c
    assert held == {"raw/c.mp4"}
    assert validation_sources(counts, 0.6, seed=0) == {"raw/b.mp4", "raw/c.mp4"}  # draws below 0.6
    assert validation_sources(counts, 0.9, seed=0) == {"raw/b.mp4", "raw/c.mp4"}  # never every source
    assert validation_sources(counts, 0.0, seed=0) == set() and validation_sources({"raw/a.mp4": 9}, 0.5, 0) == set()
    assert validation_sources({"raw/a.mp4": 9, "raw/b.mp4": 9}, 0.01, 0) in ({"raw/a.mp4"}, {"raw/b.mp4"})

    cfg = DataConfig.model_validate({"references": {"cross_pair_ratio": 1.0}, "validation": {"share": 0.2}})
    samples = pair_samples(results, cfg, 3, flux=flux_models(), frames=batch_frames, data_root=root)
    split_of_source = {s.provenance["source"]: s.split for s in samples}
    assert {s.provenance["source"] for s in samples if s.split == "val"} == {"raw/c.mp4"}
    assert all(split_of_source[s.provenance["source"]] == s.split for s in samples)  # whole sources
    for sample in samples:
        for info in sample.provenance["references"]:
            if info["kind"] == "other_source":
                assert split_of_source[info["background_source"]] == sample.split
    val = [s for s in samples if s.split == "val"]
    # c is the only validation source: its cross pairs cannot take a training video's background
    assert val and all(info["kind"] in (PROCEDURAL, "redux_variation")
                       for s in val for info in s.provenance["references"])
    assert validation_summary(samples, 0.2) == {"target_share": 0.2, "train_samples": 90, "val_samples": 10,
                                                "share": 0.1, "train_sources": 2, "val_sources": ["raw/c.mp4"]}


def test_cross_pair_references_come_from_elsewhere(
    curated_batch: tuple[list[CurationResult], Path], tmp_path: Path
) -> None:
    results, root = curated_batch
    # the shard folder moved after curation (as the shard runner renames it): read through data_root
    moved = tmp_path / "root"
    shutil.copytree(root, moved)
    by_id = {r.clip.clip_id: r for r in results}
    # no validation split here: a held-out source pairs only inside its own split (tested with the split)
    no_split = {"validation": {"share": 0.0}}
    all_cross = DataConfig.model_validate({"references": {"cross_pair_ratio": 1.0}, **no_split})
    samples = pair_samples(results, all_cross, 5, flux=flux_models(), frames=batch_frames, data_root=moved,
                           out_dir=moved / "pairs", rel_dir="pairs")
    samples += pair_samples(results, DataConfig.model_validate(no_split), 5, flux=flux_models(),
                            frames=batch_frames, data_root=moved)
    kinds = Counter()
    for sample in samples:
        for reference, info in zip(sample.references, sample.provenance["references"], strict=True):
            kinds[info["kind"]] += 1
            own = by_id[sample.clip_id]
            assert info["subject_source"] == own.clip.source and info["subject_clip_id"] == sample.clip_id
            assert reference.source_clip_id == sample.clip_id  # the subject itself always comes from its clip
            if not sample.cross_pair:
                assert info["kind"] == "own" and info["background_source"] == own.clip.source
            elif info["kind"] == "other_source":
                background = by_id[info["background_clip_id"]]
                # paper A.1: a background from a DIFFERENT raw source video, not another shot of the same one
                assert background.clip.source != own.clip.source == sample.provenance["source"]
                assert info["background_source"] == background.clip.source
                if reference.image_path is None:  # handed back in memory
                    image, mask = reference.image, reference.mask > 127
                else:
                    assert reference.image_path.startswith("pairs/")
                    image, mask = load_image(moved / reference.image_path), load_mask(moved / reference.mask_path)
                crop = load_image(moved / own.subjects[0].references["crop"])
                np.testing.assert_array_equal(image[mask], crop[mask])  # the subject, on another background
            else:
                assert info["kind"] == "redux_variation" and sample.sample_type == "redux"
            assert reference.sample_type == sample.sample_type
            assert reference.image_path is None or (moved / reference.image_path).is_file()
    # 100 + 40 cross-paired references: every background from another source video (or a redux variation)
    assert kinds["own"] == 60 and kinds["other_source"] + kinds["redux_variation"] == 140 and kinds[PROCEDURAL] == 0
    assert cross_source_summary(samples[:100]) == {"references": 100, "other_source": 90, "generated": 10,
                                                   "procedural": 0, "share": 0.9, "shortfall": 0}
    # in-memory composites when no output folder is given (the dataset writer stores them)
    samples = pair_samples(results, all_cross, 5, flux=flux_models(), frames=batch_frames, data_root=moved)
    composites = [r for s in samples for r in s.references if r.image_path is None]
    assert composites and all(r.image is not None and r.image.dtype == np.uint8 for r in composites)


def test_single_source_cross_pairs_are_procedural_and_counted(tmp_path: Path, caplog) -> None:
    """One raw video cut into three shots: another shot of it is NOT an unrelated source. The backgrounds are
    procedural, and the stats and the log say that the data lacked other sources."""
    clips = [make_clip([SubjectSpec(name)], frames=3, seed=20 + i) for i, name in enumerate(["cat", "cup", "cat"])]
    models = oracle_models(*clips)
    results = [curate(c, models, tmp_path, clip_id=f"s-{i}", source="raw/one.mp4") for i, c in enumerate(clips)]
    cfg = DataConfig.model_validate({"references": {"cross_pair_ratio": 1.0}})
    stats: dict = {}
    with caplog.at_level("WARNING"):
        samples = pair_samples(results, cfg, 0, stats=stats)
    kinds = {s.clip_id: s.provenance["references"][0] for s in samples}
    expected = {"instance_id": "s-1/f0/coffee_cup#0", "kind": "procedural", "subject_clip_id": "s-1",
                "subject_source": "raw/one.mp4", "background_clip_id": "procedural", "background_source": "procedural"}
    assert kinds["s-1"] == expected and {k["kind"] for k in kinds.values()} == {"procedural"}
    assert stats["cross_source"] == {"references": 3, "other_source": 0, "generated": 0, "procedural": 3,
                                     "share": 0.0, "shortfall": 3}
    assert "3 cross-paired reference(s) got a procedural background" in caplog.text


# ---- real models end to end -----------------------------------------------------------------------


@pytest.mark.slow
def test_curate_clip_with_tiny_real_models(tiny_vision: dict[str, Path], tmp_path: Path) -> None:
    from kaleido.data.models import build_model
    from kaleido.vision.tiny import tiny_vision_settings

    cfg = DataConfig.model_validate(
        {
            "models": {**tiny_vision_settings(tiny_vision), "device": "cpu"},
            "grounding": {"frames_per_clip": 1, "box_threshold": 0.0, "text_threshold": 0.0},
            # random weights: open every filter so instances reach the reference builders
            "filters": {"min_area": 0.0, "max_area": 1.0, "clip_min_score": -1.0, "min_sharpness": 0.0,
                        "min_brightness": 0.0, "max_brightness": 255.0},
            "references": {"max_references": 1, "inpaint_steps": 2, "redux_steps": 2, "redux_size": 32},
        }
    )
    models = load_curation_models(cfg)
    assert models.face is None and not hasattr(models, "fill")  # FLUX is the pair stage's
    clip = make_clip([CAT, CUP], frames=3, seed=12)
    result = curate_clip(clip.record("real"), clip.frames, clip.matches, models, cfg, tmp_path / "refs")
    assert not [r for r in result.rejections if r.reason in ("model_error", "curation_error")]
    assert result.ok and set(result.subjects[0].references) == {"crop", "segment"}
    assert result.enabled_types == ["crop", "segment", "inpaint", "redux"]
    x0, y0, x1, y1 = result.subjects[0].instance.box
    assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 64 and result.plate_mask
    flux = FluxModels(build_model("flux_fill", cfg), build_model("flux_redux", cfg))
    builder = FluxBuilder(flux, cfg, 0, None, frames_of(("real", clip)))
    (inpaint,) = builder.inpaint(result, "real")
    assert inpaint.shape == load_image(result.resolve(result.subjects[0].references["crop"])).shape
    (redux,) = builder.redux(result, "real")
    assert redux.shape == (32, 32, 3)
    plate, how = builder.plate(result)
    assert how == "inpainted" and plate.shape == (64, 96, 3) and not builder.failures


def test_load_curation_models_explains_missing_models(tmp_path: Path) -> None:
    from kaleido.config.schema import validate_params

    with pytest.raises(ValueError, match=r"data\.models\.grounding_dino is null"):
        load_curation_models(DataConfig())
    params = validate_params({"data": {"models": {"grounding_dino": "models/gd"}}}, base_dir=tmp_path)
    # a relative path resolves against the folder of params.yaml
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "models" / "gd"))):
        load_curation_models(params.data, params)
    with pytest.raises(ValueError, match="flux_base is null"):
        DataConfig.model_validate({"models": {"flux_redux": "x"}})
