"""Metric names, the formulas that need no model, aggregation and the bootstrap.

Every score is "higher is better". The VBench formulas (REFERENCE.md section 4) live here as pure
numpy functions so the known-answer tests check them without any backbone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MetricInfo:
    key: str
    title: str
    group: str  # "video quality" | "text alignment" | "subject-to-video"
    description: str


_METRICS = (
    MetricInfo(
        "subject_consistency", "Subject consistency", "video quality",
        "DINO features per frame; mean over i>=1 of (cos(f_i-1, f_i)^+ + cos(f_0, f_i)^+) / 2 (VBench)",
    ),
    MetricInfo(
        "background_consistency", "Background consistency", "video quality",
        "the subject-consistency formula on CLIP image features (VBench)",
    ),
    MetricInfo(
        "motion_smoothness", "Motion smoothness", "video quality",
        "odd frames interpolated from even ones; (255 - mean |pred - real|) / 255 (VBench)",
    ),
    MetricInfo(
        "aesthetic_quality", "Aesthetic quality", "video quality",
        "LAION aesthetic head on CLIP ViT-L/14 image embeddings, / 10, mean over frames (VBench)",
    ),
    MetricInfo(
        "imaging_quality", "Imaging quality", "video quality",
        "MUSIQ (SPAQ) per frame, long side at most 512, mean / 100 (VBench)",
    ),
    MetricInfo(
        "viclip_score", "ViCLIP score", "text alignment",
        "cosine(ViCLIP video embedding of 8 frames, prompt embedding) (VBench overall consistency)",
    ),
    MetricInfo(
        "clip_text_score", "CLIP image-text score", "text alignment",
        "mean over frames of cosine(CLIP image, CLIP prompt): the fallback when no ViCLIP weights are "
        "given; NOT the paper's ViCLIP score and not comparable to it",
    ),
    MetricInfo(
        "s2v_consistency", "S2V consistency", "subject-to-video",
        "subjects grounded + segmented in each frame; max CLIP similarity to the reference subjects, "
        "mean over frames (a frame without a detected subject scores 0)",
    ),
    MetricInfo(
        "s2v_decoupling", "S2V decoupling", "subject-to-video",
        "subjects masked out of references and frames; 1 - max CLIP similarity of the backgrounds, "
        "mean over frames",
    ),
)
METRICS: dict[str, MetricInfo] = {info.key: info for info in _METRICS}
VIDEO_QUALITY = ("subject_consistency", "background_consistency", "motion_smoothness", "aesthetic_quality",
                 "imaging_quality")
TEXT_METRICS = ("viclip_score", "clip_text_score")
S2V_METRICS = ("s2v_consistency", "s2v_decoupling")
# What `eval.metrics` may list: "text_alignment" becomes viclip_score or clip_text_score.
METRIC_CHOICES = (*VIDEO_QUALITY, "text_alignment", *S2V_METRICS)


def normalise_rows(features: np.ndarray) -> np.ndarray:
    """L2-normalised rows (float64); all-zero rows stay zero instead of dividing by zero."""
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.where(norms > 0, norms, 1.0)


def temporal_consistency(features: np.ndarray) -> float:
    """VBench subject/background consistency of one video from per-frame features [T, D].

    For i >= 1: (max(0, cos(f_{i-1}, f_i)) + max(0, cos(f_0, f_i))) / 2, summed and divided by T - 1.
    A single frame has no pair: 1.0 (VBench's background-consistency convention).
    """
    features = normalise_rows(features)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"expected per-frame features [T, D] with T >= 1, got shape {features.shape}")
    count = features.shape[0]
    if count == 1:
        return 1.0
    previous = np.sum(features[:-1] * features[1:], axis=1)
    first = features[1:] @ features[0]
    per_frame = (np.maximum(previous, 0.0) + np.maximum(first, 0.0)) / 2.0
    return float(per_frame.sum() / (count - 1))


def interpolation_error_score(real_odd: Sequence[np.ndarray], predicted_odd: Sequence[np.ndarray]) -> float:
    """VBench motion smoothness from the real odd frames and their interpolations (uint8 each).

    (255 - mean over frames of mean |pred - real|) / 255; only the odd frames that lie between two
    even frames are compared, as VBench does.
    """
    if len(predicted_odd) == 0:
        raise ValueError("motion smoothness needs at least 3 frames (one odd frame between two even ones)")
    errors = [
        float(np.mean(np.abs(np.asarray(pred, dtype=np.int16) - np.asarray(real, dtype=np.int16))))
        for real, pred in zip(real_odd, predicted_odd, strict=False)
    ]
    return (255.0 - float(np.mean(errors))) / 255.0


def finite_mean(values: Iterable[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(kept)) if kept else None


def aggregate(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """{"overall": {metric: mean}, "per_category": {category: {metric: mean}}, "counts": {...}} over cases."""
    keys = [key for key in METRICS if any(key in case["metrics"] for case in cases)]
    overall = {key: finite_mean(case["metrics"].get(key) for case in cases) for key in keys}
    categories: dict[str, list[Mapping[str, Any]]] = {}
    for case in cases:
        categories.setdefault(case["category"], []).append(case)
    per_category = {
        category: {key: finite_mean(case["metrics"].get(key) for case in members) for key in keys}
        for category, members in sorted(categories.items())
    }
    counts = {"cases": len(cases), **{category: len(members) for category, members in sorted(categories.items())}}
    return {"overall": overall, "per_category": per_category, "counts": counts}


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int


def bootstrap_mean(values: Sequence[float], confidence: float = 0.95, samples: int = 2000, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean (two-sided, `confidence` level), seeded.

    With one value every resample is that value, so the interval is the point: a single case
    decides on its own score.
    """
    data = np.asarray([float(v) for v in values], dtype=np.float64)
    if data.size == 0:
        raise ValueError("bootstrap of an empty sample")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}: must lie strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, data.size, size=(int(samples), data.size))
    means = data[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(data.mean()), float(low), float(high), int(data.size))
