"""kaleido.vision on tiny random-weight models saved in the real formats and loaded from disk (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kaleido.vision import Detection, box_pixels, clip_box, to_rgb_array
from kaleido.vision.faces import FaceModelUnavailable, InsightFaceDetector, frontal_score_from_keypoints
from kaleido.vision.flux import processing_size
from kaleido.vision.grounding import build_prompt, normalise_terms

H, W = 64, 96


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    from kaleido.data.synthetic import SubjectSpec, make_clip

    return make_clip([SubjectSpec("cat", start=(30, 10), end=(30, 10))], frames=1).frames[0]


def _check_box(box: tuple[float, float, float, float]) -> None:
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H


# ---- helpers ----------------------------------------------------------------------------------


def test_prompt_and_term_normalisation() -> None:
    assert normalise_terms(["Cat", "coffee  cup", "cat", "", "a.b"]) == ["cat", "coffee cup", "a b"]
    prompt, spans = build_prompt(["cat", "coffee cup"])
    assert prompt == "cat. coffee cup."
    assert [prompt[a:b] for a, b in spans] == ["cat", "coffee cup"]


def test_box_helpers_and_image_conversion() -> None:
    assert clip_box((-5, 2, 120, 70), H, W) == (0.0, 2.0, 96.0, 64.0)
    assert box_pixels((10.2, 5.0, 10.4, 5.0), H, W) == (10, 5, 11, 6)  # at least one pixel
    grey = np.zeros((4, 5), dtype=np.float32) + 0.5
    assert to_rgb_array(grey).shape == (4, 5, 3) and to_rgb_array(grey)[0, 0, 0] == 128


# ---- Grounding DINO ---------------------------------------------------------------------------


def test_grounding_dino_loads_and_detects(tiny_vision: dict[str, Path], image: np.ndarray) -> None:
    from kaleido.vision.grounding import GroundingDino

    detector = GroundingDino.from_pretrained(tiny_vision["grounding_dino"], box_threshold=0.0, text_threshold=0.0)
    detections = detector.detect(image, ["Cat", "coffee cup"])
    assert detections and all(isinstance(d, Detection) for d in detections)
    for d in detections:
        _check_box(d.box)
        assert 0.0 <= d.score <= 1.0
        assert d.label in {"cat", "coffee cup"}
    assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)
    # thresholds apply: nothing scores above 1, and no terms means no work
    strict = GroundingDino(detector.model, detector.processor, box_threshold=1.0, text_threshold=0.0)
    assert strict.detect(image, ["cat"]) == []
    assert detector.detect(image, []) == []


def test_grounding_dino_missing_folder_is_explained(tmp_path: Path) -> None:
    from kaleido.vision.grounding import GroundingDino

    with pytest.raises(FileNotFoundError, match=r"data\.models\.grounding_dino"):
        GroundingDino.from_pretrained(tmp_path)


# ---- SAM ----------------------------------------------------------------------------------------


def test_sam_tiny_checkpoint_segments_boxes(tiny_vision: dict[str, Path], image: np.ndarray) -> None:
    from kaleido.vision.segmentation import SamSegmenter

    segmenter = SamSegmenter.from_checkpoint(tiny_vision["sam"], sam_type="tiny")
    masks = segmenter.segment(image, [(30.0, 10.0, 58.0, 38.0), (0.0, 0.0, 20.0, 20.0)])
    assert masks.shape == (2, H, W) and masks.dtype == bool
    assert segmenter.last_scores.shape == (2,)
    assert segmenter.segment(image, []).shape == (0, H, W)


def test_sam_errors_name_the_knob(tmp_path: Path) -> None:
    import torch

    from kaleido.vision.segmentation import SamSegmenter

    with pytest.raises(FileNotFoundError, match=r"data\.models\.sam"):
        SamSegmenter.from_checkpoint(tmp_path / "missing.pth", "tiny")
    bad = tmp_path / "bad.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="sam_type"):
        SamSegmenter.from_checkpoint(bad, "tiny")


# ---- CLIP ---------------------------------------------------------------------------------------


def test_clip_embeddings_and_scores(tiny_vision: dict[str, Path], image: np.ndarray) -> None:
    from kaleido.vision.clip import ClipScorer

    scorer = ClipScorer.from_pretrained(tiny_vision["clip"])
    embeddings = scorer.image_embeddings([image, image[::-1]])
    assert embeddings.shape == (2, scorer.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    score = scorer.category_score(image, "cat")
    assert -1.0 <= score <= 1.0
    assert scorer.image_similarity(image, image) == pytest.approx(1.0, abs=1e-5)
    assert scorer.similarity_matrix([image], [image, image[::-1]]).shape == (1, 2)
    texts = scorer.text_embeddings(["a photo of a cat", "a photo of a cat"])
    np.testing.assert_allclose(texts[0], texts[1])


def test_clip_missing_paths_are_explained(tmp_path: Path) -> None:
    from kaleido.vision.clip import ClipScorer

    with pytest.raises(FileNotFoundError, match=r"open_clip_config\.json"):
        ClipScorer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data\.models\.clip"):
        ClipScorer.from_pretrained(tmp_path / "nope.bin")


# ---- faces --------------------------------------------------------------------------------------


def test_frontal_score_from_keypoints() -> None:
    frontal = np.array([[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]])
    assert frontal_score_from_keypoints(frontal, 0.9) == pytest.approx(0.9)
    half_turned = frontal.copy()
    half_turned[2, 0] = 60  # nose halfway to the right eye
    assert frontal_score_from_keypoints(half_turned, 1.0) == pytest.approx(0.5)
    profile = frontal.copy()
    profile[2, 0] = 72
    assert frontal_score_from_keypoints(profile, 1.0) == 0.0


def test_insightface_absent_gives_clear_error(tmp_path: Path) -> None:
    try:
        import insightface  # noqa: F401

        match = "model pack not found"  # installed here: the empty folder is the problem
    except ImportError:
        match = "pip install insightface"
    with pytest.raises(FaceModelUnavailable, match=match) as info:
        InsightFaceDetector(tmp_path)
    assert "data.models.face: null" in str(info.value)


# ---- FLUX ---------------------------------------------------------------------------------------


def test_processing_size() -> None:
    assert processing_size(480, 832, 16, 1024) == (480, 832)
    assert processing_size(1080, 1920, 16, 1024) == (576, 1024)
    assert processing_size(10, 10, 16, 1024) == (16, 16)


def test_flux_fill_repaints_only_the_mask(tiny_vision: dict[str, Path], image: np.ndarray) -> None:
    from kaleido.vision.flux import FluxInpainter

    inpainter = FluxInpainter.from_pretrained(tiny_vision["flux_fill"], device="cpu", dtype="float32", steps=2)
    mask = np.zeros((H, W), dtype=bool)
    mask[8:40, 20:70] = True
    out = inpainter.inpaint(image, mask, "a quiet beach", seed=3)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~mask], image[~mask])
    assert (out[mask] != image[mask]).any()
    np.testing.assert_array_equal(inpainter.inpaint(image, mask, "a quiet beach", seed=3), out)  # seeded
    np.testing.assert_array_equal(inpainter.inpaint(image, np.zeros_like(mask), "x"), image)


def test_flux_redux_varies_through_the_base_pipeline(tiny_vision: dict[str, Path], image: np.ndarray) -> None:
    from kaleido.vision.flux import FluxRedux

    redux = FluxRedux.from_pretrained(
        tiny_vision["flux_redux"], tiny_vision["flux_base"], device="cpu", dtype="float32", steps=2, size=64
    )
    assert redux.text_dims == (32, 32)  # tiny widths: zero text embeddings of the base's width
    out = redux.vary(image, seed=1)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_flux_missing_folder_is_explained(tmp_path: Path) -> None:
    from kaleido.vision.flux import FluxInpainter

    with pytest.raises(FileNotFoundError, match=r"data\.models\.flux_fill"):
        FluxInpainter.from_pretrained(tmp_path)


# ---- tiny builder -------------------------------------------------------------------------------


def test_tiny_builder_is_deterministic_and_resumable(tmp_path: Path, tiny_vision: dict[str, Path]) -> None:
    from kaleido.vision.tiny import MARKER, build_tiny_vision_models, tiny_vision_settings

    first = build_tiny_vision_models(tmp_path / "a", seed=0, parts=["clip"])
    second = build_tiny_vision_models(tmp_path / "b", seed=0, parts=["clip"])
    weights = "open_clip_model.safetensors"
    assert (first["clip"] / weights).read_bytes() == (second["clip"] / weights).read_bytes()
    assert (first["clip"] / weights).read_bytes() == (tiny_vision["clip"] / weights).read_bytes()
    stamp = (first["clip"] / weights).stat().st_mtime_ns
    build_tiny_vision_models(tmp_path / "a", seed=0, parts=["clip"])  # complete: not rebuilt
    assert (first["clip"] / weights).stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "a" / MARKER).read_text())["parts"] == ["clip"]
    with pytest.raises(ValueError, match="unknown tiny vision parts"):
        build_tiny_vision_models(tmp_path / "a", parts=["dino"])
    settings = tiny_vision_settings(tiny_vision)
    assert settings["sam_type"] == "tiny" and settings["clip"] == str(tiny_vision["clip"])
