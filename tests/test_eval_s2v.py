"""S2V Consistency / Decoupling: known answers with the ground-truth oracles and a FIXED feature
extractor (colour histograms), then the real Grounding DINO + SAM + CLIP path on tiny random weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from kaleido.data.synthetic import OracleDetector, OracleSegmenter, SubjectSpec, make_clip, sprite
from kaleido.eval.s2v import S2VScorer, background_image, sample_indices, subject_image
from kaleido.vision import Detection, ImageLike, to_rgb_array


class HistogramEmbedder:
    """Deterministic 'features': a normalised 4x4x4 RGB colour histogram (no learned weights)."""

    def image_embeddings(self, images: Sequence[ImageLike]) -> np.ndarray:
        rows = []
        for image in images:
            levels = to_rgb_array(image).astype(np.int64) // 64
            bins = np.bincount((levels[..., 0] * 16 + levels[..., 1] * 4 + levels[..., 2]).ravel(), minlength=64)
            rows.append(bins / np.linalg.norm(bins))
        return np.stack(rows)


class AnySubject(OracleDetector):
    """The oracle's true boxes of EVERY subject, labelled with the first asked term (a detector that
    confuses subjects): isolates the embedding comparison from the grounding."""

    def detect(self, image: ImageLike, terms: Sequence[str]) -> list[Detection]:
        found = self.lookup(image)
        if found is None:
            return []
        clip, t = found
        return [Detection(tuple(float(v) for v in s.boxes[t]), 0.9, terms[0]) for s in clip.subjects
                if s.masks[t].any()]


def _reference(name: str) -> np.ndarray:
    """A subject cut-out on white, as Kaleido references look."""
    pixels, mask = sprite(name, (56, 56))
    return np.where(mask[..., None], pixels, 255).astype(np.uint8)


def _scorer(clips, detector_cls=OracleDetector, **kwargs) -> S2VScorer:
    return S2VScorer(detector_cls(clips), OracleSegmenter(clips), HistogramEmbedder(), **kwargs)


def test_video_with_the_reference_subject_scores_higher() -> None:
    with_cat = make_clip([SubjectSpec("cat", size=(30, 30), start=(10, 10), end=(50, 20))], frames=5)
    with_rocket = make_clip([SubjectSpec("rocket", size=(30, 30), start=(10, 10), end=(50, 20))], frames=5)
    clips = [with_cat, with_rocket]
    reference = _reference("cat")
    # the grounded detector finds no cat in the rocket video: every frame scores 0
    good = _scorer(clips).score(with_cat.frames, [reference], ["cat"])
    bad = _scorer(clips).score(with_rocket.frames, [reference], ["cat"])
    assert good.consistency > 0.5 and bad.consistency == 0.0 and bad.detection_rate == 0.0
    assert good.detection_rate == 1.0 and good.frames == [0, 1, 2, 3, 4]
    # even when the rocket IS grounded as the subject, its region resembles the cat reference less
    confused = _scorer(clips, AnySubject).score(with_rocket.frames, [reference], ["cat"])
    assert 0.0 < confused.consistency < good.consistency


def test_identical_backgrounds_give_zero_decoupling_and_full_consistency() -> None:
    static = make_clip([SubjectSpec("cat", size=(30, 30), start=(20, 10), end=(20, 10))], frames=4, pan=(0.0, 0.0))
    result = _scorer([static]).score(static.frames, [static.frames[0]], ["cat"])
    assert result.decoupling == pytest.approx(0.0, abs=1e-9)
    assert result.consistency == pytest.approx(1.0)
    assert result.references_found == [True]


def test_other_backgrounds_decouple_and_max_frames_subsamples() -> None:
    video = make_clip([SubjectSpec("cat", size=(30, 30))], frames=9, seed=0)
    elsewhere = make_clip([SubjectSpec("cat", size=(30, 30))], frames=1, seed=7)  # another texture
    same_place = _scorer([video, elsewhere]).score(video.frames, [video.frames[0]], ["cat"])
    moved = _scorer([video, elsewhere], max_frames=3).score(video.frames, [elsewhere.frames[0]], ["cat"])
    assert moved.frames == [0, 4, 8]
    assert moved.decoupling > same_place.decoupling + 0.05
    assert 0.0 <= same_place.decoupling < 0.05


def test_multi_subject_frames_take_the_best_match_per_frame() -> None:
    clip = make_clip([SubjectSpec("cat", size=(26, 26), start=(5, 5), end=(5, 5)),
                      SubjectSpec("rocket", size=(26, 26), start=(60, 30), end=(60, 30))], frames=2)
    scorer = _scorer([clip])
    regions = scorer.find(clip.frames[0], ["cat", "rocket"])
    assert sorted(regions.labels) == ["cat", "rocket"] and regions.masks.shape == (2, 64, 96)
    both = scorer.score(clip.frames, [_reference("cat"), _reference("rocket")], ["cat", "rocket"])
    cat_only = scorer.score(clip.frames, [_reference("cat")], ["cat"])
    assert both.consistency >= cat_only.consistency - 1e-9


def test_region_helpers() -> None:
    image = np.zeros((10, 10, 3), np.uint8)
    mask = np.zeros((10, 10), bool)
    mask[2:4, 2:4] = True
    crop = subject_image(image, (1, 1, 5, 5), mask)
    assert crop.shape == (4, 4, 3) and crop[1:3, 1:3].max() == 0 and crop[0, 0, 0] == 255
    assert subject_image(image, (1, 1, 5, 5), np.zeros_like(mask)).max() == 0  # empty mask: the box as is
    assert background_image(image, mask[None])[2, 2, 0] == 128
    assert sample_indices(81, None) == list(range(81)) and sample_indices(81, 1) == [0]
    with pytest.raises(ValueError, match="subject terms"):
        _scorer([]).score(np.zeros((2, 8, 8, 3), np.uint8), [image], [])


def test_real_grounding_dino_sam_clip_path(tiny_vision: dict[str, Path]) -> None:
    """Tiny random Grounding DINO + SAM + CLIP, loaded from disk: scores land in [0, 1], references reused."""
    from kaleido.vision.clip import ClipScorer
    from kaleido.vision.grounding import GroundingDino
    from kaleido.vision.segmentation import SamSegmenter

    detector = GroundingDino.from_pretrained(tiny_vision["grounding_dino"], box_threshold=0.0, text_threshold=0.0)
    scorer = S2VScorer(detector, SamSegmenter.from_checkpoint(tiny_vision["sam"], "tiny"),
                       ClipScorer.from_pretrained(tiny_vision["clip"]), max_frames=1)
    clip = make_clip([SubjectSpec("cat", size=(30, 30))], frames=3)
    reference = _reference("cat")
    result = scorer.score(clip.frames, [np.pad(reference, ((0, 0), (0, 40), (0, 0)))], ["cat"])
    assert result.frames == [0] and result.detection_rate == 1.0 and result.references_found == [True]
    assert 0.0 <= result.consistency <= 1.0 and 0.0 <= result.decoupling <= 1.0
    assert len(scorer._reference_cache) == 1
