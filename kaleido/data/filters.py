"""Instance filters (paper section 3.2 step 4): size, CLIP category, IoU overlap, brightness, blur, face.

Each filter measures one thing, stores it in `instance.metrics`, and returns a `Rejection` (stage
"filter", item = the instance id, a machine `reason` and a human `detail` naming the measurement
and the `data.filters` threshold) or None when the instance passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from kaleido.config.schema import FilterConfig
from kaleido.data.records import Instance, Rejection
from kaleido.vision import Box, CategoryScorer, FaceDetector, ImageLike, to_rgb_array

STAGE = "filter"
# Machine reasons (Rejection.reason) of this stage.
TOO_SMALL, TOO_LARGE = "too_small", "too_large"
TOO_DARK, TOO_BRIGHT, BLURRY = "too_dark", "too_bright", "blurry"
CLIP_MISMATCH, OVERLAP = "clip_mismatch", "overlap"
NO_FACE, FACE_NOT_FRONTAL = "no_face", "face_not_frontal"
MODEL_ERROR = "model_error"


def _reject(instance: Instance, reason: str, detail: str) -> Rejection:
    return Rejection(stage=STAGE, item=instance.instance_id or instance.clip_id, reason=reason, detail=detail)


# ---- measurements -------------------------------------------------------------------------------


def mean_luma(image: ImageLike) -> float:
    """Mean BT.601 luma (0..255)."""
    rgb = to_rgb_array(image).astype(np.float64)
    return float((rgb @ np.array([0.299, 0.587, 0.114])).mean())


def laplacian_variance(image: ImageLike) -> float:
    """Variance of the 3x3 Laplacian of the grey image: low for blurred (or flat) images."""
    grey = cv2.cvtColor(to_rgb_array(image), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# ---- filters ------------------------------------------------------------------------------------


def size_filter(instance: Instance, mask: np.ndarray, cfg: FilterConfig) -> Rejection | None:
    """Mask area as a fraction of the frame must lie in [min_area, max_area]."""
    area = float(np.asarray(mask, dtype=bool).mean())
    instance.mask_area = area
    instance.metrics["area"] = area
    if area < cfg.min_area:
        return _reject(
            instance, TOO_SMALL, f"mask covers {area:.4f} of the frame, below data.filters.min_area={cfg.min_area:.4f}"
        )
    if area > cfg.max_area:
        return _reject(
            instance, TOO_LARGE, f"mask covers {area:.4f} of the frame, above data.filters.max_area={cfg.max_area:.4f}"
        )
    return None


def brightness_filter(instance: Instance, crop: ImageLike, cfg: FilterConfig) -> Rejection | None:
    """Mean luma of the subject crop must lie in [min_brightness, max_brightness]."""
    luma = mean_luma(crop)
    instance.metrics["brightness"] = luma
    if luma < cfg.min_brightness:
        return _reject(
            instance,
            TOO_DARK,
            f"mean luma {luma:.1f} of the crop, below data.filters.min_brightness={cfg.min_brightness}",
        )
    if luma > cfg.max_brightness:
        return _reject(
            instance,
            TOO_BRIGHT,
            f"mean luma {luma:.1f} of the crop, above data.filters.max_brightness={cfg.max_brightness}",
        )
    return None


def blur_filter(instance: Instance, crop: ImageLike, cfg: FilterConfig) -> Rejection | None:
    """Variance of the Laplacian of the subject crop must reach min_sharpness."""
    sharpness = laplacian_variance(crop)
    instance.metrics["sharpness"] = sharpness
    if sharpness < cfg.min_sharpness:
        return _reject(
            instance,
            BLURRY,
            f"variance of the Laplacian {sharpness:.1f} of the crop, "
            f"below data.filters.min_sharpness={cfg.min_sharpness}",
        )
    return None


def clip_filter(instance: Instance, crop: ImageLike, scorer: CategoryScorer, cfg: FilterConfig) -> Rejection | None:
    """CLIP cosine(crop, 'a photo of a {category}') must reach clip_min_score."""
    score = float(scorer.category_score(crop, instance.category))
    instance.metrics["clip_score"] = score
    if score < cfg.clip_min_score:
        return _reject(
            instance,
            CLIP_MISMATCH,
            f"CLIP similarity {score:.3f} to 'a photo of a {instance.category}', "
            f"below data.filters.clip_min_score={cfg.clip_min_score}",
        )
    return None


def face_filter(
    instance: Instance, crop: ImageLike, detector: FaceDetector | None, cfg: FilterConfig
) -> Rejection | None:
    """Humans only: a frontal face with score >= face_min_score. Without a detector the check is skipped.

    A skipped check is recorded (`metrics["face_checked"] = 0`) so stats can count it; it is not a pass.
    """
    if instance.group != "human":
        return None
    if detector is None:
        instance.metrics["face_checked"] = 0.0
        return None
    score = detector.frontal_face_score(crop)
    instance.metrics["face_checked"] = 1.0
    if score is None:
        return _reject(instance, NO_FACE, "no face found in the crop of a human subject")
    instance.metrics["face_score"] = float(score)
    if score < cfg.face_min_score:
        return _reject(
            instance,
            FACE_NOT_FRONTAL,
            f"frontal-face score {score:.3f}, below data.filters.face_min_score={cfg.face_min_score}",
        )
    return None


def iou_filter(instances: Sequence[Instance], cfg: FilterConfig) -> tuple[list[Instance], list[Rejection]]:
    """Drop the lower-scoring instance of every pair (on the same frame) whose box IoU exceeds max_iou.

    Greedy in score order (ties: input order), as non-maximum suppression: an instance is dropped
    when it overlaps one that is already kept. Returns (kept in input order, rejections).
    """
    order = sorted(range(len(instances)), key=lambda i: (-instances[i].score, i))
    kept: list[int] = []
    rejections: list[Rejection] = []
    for index in order:
        candidate = instances[index]
        for winner_index in kept:
            winner = instances[winner_index]
            if winner.frame_index != candidate.frame_index or winner.clip_id != candidate.clip_id:
                continue
            iou = box_iou(candidate.box, winner.box)
            if iou > cfg.max_iou:
                candidate.metrics["max_iou"] = iou
                rejections.append(
                    _reject(
                        candidate,
                        OVERLAP,
                        f"box IoU {iou:.3f} with {winner.instance_id or winner.category} "
                        f"(score {winner.score:.3f} >= {candidate.score:.3f}), "
                        f"above data.filters.max_iou={cfg.max_iou}",
                    )
                )
                break
        else:
            kept.append(index)
    return [instances[i] for i in sorted(kept)], rejections
