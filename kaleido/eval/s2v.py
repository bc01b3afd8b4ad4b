"""The paper's two subject-to-video metrics: S2V Consistency and S2V Decoupling.

Paper (section 4): "Subjects are detected and segmented using Grounding Dino and Segment Anything;
CLIP features are extracted, and for each frame the maximum similarity with reference images is
computed and averaged" (consistency), and "the subject regions are masked out in both reference images
and video frames; CLIP features are extracted from the backgrounds, and the score is 1 - similarity"
(decoupling). Choices the paper leaves open, made here:
- Each reference is grounded with its own subject term and its top detection segmented; the subject
  region (box crop, pixels outside the mask painted white, Kaleido's reference padding colour) is what
  frames are compared to. A reference where nothing is found is used whole (and unmasked for decoupling).
- In a frame, every reference term is grounded; the top `detections_per_term` boxes per term are
  segmented. Frame consistency = max over (region, reference) of max(0, cosine); a frame where no
  subject is found scores 0 (the subject is absent, so nothing of it is preserved).
- Decoupling per frame = 1 - max over references of max(0, cosine(frame background, reference
  background)); backgrounds have the subject masks painted mid-grey. Both metrics lie in [0, 1]; the
  max(0, .) clamp is VBench's convention for its consistency metrics.
The detector, segmenter and embedder are interfaces: tests plug in oracles and fixed extractors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from kaleido.vision import Box, Detector, ImageLike, Segmenter, box_pixels, to_rgb_array

SUBJECT_FILL = 255  # white, as Kaleido pads its references
BACKGROUND_FILL = 128  # neutral grey where a subject was
# Grounding terms for a reference when the eval case names no subject.
CATEGORY_TERMS = {"human": "person", "animal": "animal", "cartoon": "cartoon character", "object": "object"}


@runtime_checkable
class ImageEmbedder(Protocol):
    def image_embeddings(self, images: Sequence[ImageLike]) -> np.ndarray:
        """L2-normalised embeddings [N, D] (kaleido.vision.clip.ClipScorer implements this)."""
        ...


@dataclass
class Regions:
    boxes: list[Box]
    masks: np.ndarray  # [N, H, W] bool
    labels: list[str]


@dataclass
class S2VResult:
    consistency: float
    decoupling: float
    frames: list[int]  # indices of the scored frames
    frame_consistency: list[float]
    frame_decoupling: list[float]
    detection_rate: float  # fraction of scored frames where some subject was found
    references_found: list[bool] = field(default_factory=list)

    def details(self) -> dict[str, object]:
        return {
            "frames": self.frames,
            "frame_consistency": [round(v, 6) for v in self.frame_consistency],
            "frame_decoupling": [round(v, 6) for v in self.frame_decoupling],
            "detection_rate": self.detection_rate,
            "references_found": self.references_found,
        }


def subject_image(image: np.ndarray, box: Sequence[float], mask: np.ndarray) -> np.ndarray:
    """The box crop with the pixels outside the mask painted white; an empty mask keeps the whole box."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = box_pixels(box, height, width)
    crop = image[y0:y1, x0:x1].copy()
    inside = mask[y0:y1, x0:x1]
    if inside.any():
        crop[~inside] = SUBJECT_FILL
    return crop


def background_image(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The image with every subject mask painted grey."""
    out = image.copy()
    if len(masks):
        out[np.any(masks, axis=0)] = BACKGROUND_FILL
    return out


def sample_indices(num_frames: int, max_frames: int | None) -> list[int]:
    """All frames, or `max_frames` spread evenly from the first to the last."""
    if max_frames is None or max_frames >= num_frames:
        return list(range(num_frames))
    return sorted({round(float(v)) for v in np.linspace(0, num_frames - 1, max(1, max_frames))})


class S2VScorer:
    """S2V Consistency and Decoupling from a detector, a segmenter and an image embedder."""

    def __init__(
        self,
        detector: Detector,
        segmenter: Segmenter,
        embedder: ImageEmbedder,
        detections_per_term: int = 1,
        max_frames: int | None = None,
    ) -> None:
        if detections_per_term < 1:
            raise ValueError(f"detections_per_term={detections_per_term}: must be at least 1")
        self.detector = detector
        self.segmenter = segmenter
        self.embedder = embedder
        self.detections_per_term = int(detections_per_term)
        self.max_frames = max_frames
        # reference subject / background crops by (image content, term): eval sets reuse references
        self._reference_cache: dict[tuple[bytes, str], tuple[np.ndarray, np.ndarray, bool]] = {}

    def find(self, image: np.ndarray, terms: Sequence[str]) -> Regions:
        """Top detections per term (highest score first), each with its segmentation mask."""
        kept: list = []
        per_label: dict[str, int] = {}
        for detection in sorted(self.detector.detect(image, list(terms)), key=lambda d: -d.score):
            if per_label.get(detection.label, 0) < self.detections_per_term:
                per_label[detection.label] = per_label.get(detection.label, 0) + 1
                kept.append(detection)
        boxes = [d.box for d in kept]
        masks = (
            np.asarray(self.segmenter.segment(image, boxes), dtype=bool)
            if boxes
            else np.zeros((0, *image.shape[:2]), dtype=bool)
        )
        return Regions(boxes, masks, [d.label for d in kept])

    def reference_regions(self, image: np.ndarray, term: str) -> tuple[np.ndarray, np.ndarray, bool]:
        """(subject crop, background, found) of a reference; the whole image for both when nothing is found."""
        key = (hashlib.blake2b(image.tobytes() + str(image.shape).encode(), digest_size=16).digest(), term)
        if key not in self._reference_cache:
            regions = self.find(image, [term])
            if regions.boxes:
                entry = (subject_image(image, regions.boxes[0], regions.masks[0]),
                         background_image(image, regions.masks[:1]), True)
            else:
                entry = (image, image, False)
            self._reference_cache[key] = entry
        return self._reference_cache[key]

    def score(
        self,
        frames: np.ndarray,
        references: Sequence[ImageLike],
        reference_terms: Sequence[str],
    ) -> S2VResult:
        """Both metrics for one video; `reference_terms[i]` names the subject of `references[i]`."""
        if len(references) == 0:
            raise ValueError("S2V metrics need at least one reference image")
        if len(reference_terms) != len(references):
            raise ValueError(f"{len(references)} references but {len(reference_terms)} subject terms")
        frames = np.asarray(frames)
        refs = [to_rgb_array(image) for image in references]

        ref_subjects, ref_backgrounds, found = [], [], []
        for image, term in zip(refs, reference_terms, strict=True):
            subject, background, ok = self.reference_regions(image, term)
            ref_subjects.append(subject)
            ref_backgrounds.append(background)
            found.append(ok)

        terms = list(dict.fromkeys(reference_terms))
        indices = sample_indices(len(frames), self.max_frames)
        frame_subjects: list[list[np.ndarray]] = []
        frame_backgrounds: list[np.ndarray] = []
        for index in indices:
            frame = to_rgb_array(frames[index])
            regions = self.find(frame, terms)
            frame_subjects.append([subject_image(frame, b, m) for b, m in zip(regions.boxes, regions.masks,
                                                                               strict=True)])
            frame_backgrounds.append(background_image(frame, regions.masks))

        flat = [crop for crops in frame_subjects for crop in crops]
        subject_vecs = self.embedder.image_embeddings([*ref_subjects, *flat])
        ref_subject_vecs, region_vecs = subject_vecs[: len(refs)], subject_vecs[len(refs) :]
        background_vecs = self.embedder.image_embeddings([*ref_backgrounds, *frame_backgrounds])
        ref_background_vecs, frame_background_vecs = background_vecs[: len(refs)], background_vecs[len(refs) :]

        consistency, decoupling, cursor = [], [], 0
        for position, crops in enumerate(frame_subjects):
            if crops:
                sims = region_vecs[cursor : cursor + len(crops)] @ ref_subject_vecs.T
                consistency.append(float(np.clip(sims.max(), 0.0, 1.0)))
            else:
                consistency.append(0.0)
            cursor += len(crops)
            background_sim = float(np.clip((ref_background_vecs @ frame_background_vecs[position]).max(), 0.0, 1.0))
            decoupling.append(1.0 - background_sim)
        return S2VResult(
            consistency=float(np.mean(consistency)),
            decoupling=float(np.mean(decoupling)),
            frames=indices,
            frame_consistency=consistency,
            frame_decoupling=decoupling,
            detection_rate=float(np.mean([bool(crops) for crops in frame_subjects])),
            references_found=found,
        )
