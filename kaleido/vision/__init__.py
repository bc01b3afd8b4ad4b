"""Reusable vision model wrappers: grounding, segmentation, CLIP, faces, FLUX fill / redux.

Used by data curation (paper section 3) and by the S2V metrics (grounding + segmentation + CLIP).
Every wrapper loads from LOCAL paths only and imports its heavy library lazily, so importing this
package is cheap. The protocols below are what the curation code depends on; tests and synthetic
data plug in oracles through the same interfaces.

Images are RGB uint8 numpy arrays [H, W, 3] (or PIL images); boxes are (x0, y0, x1, y1) pixel-edge
coordinates (a box covering columns 10..49 is x0=10, x1=50); masks are bool arrays [H, W].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]
ImageLike = np.ndarray | Image.Image


@dataclass(frozen=True)
class Detection:
    """A grounded box: `label` is the input term it belongs to, `score` in [0, 1]."""

    box: Box
    score: float
    label: str


@runtime_checkable
class Detector(Protocol):
    def detect(self, image: ImageLike, terms: Sequence[str]) -> list[Detection]: ...


@runtime_checkable
class Segmenter(Protocol):
    def segment(self, image: ImageLike, boxes: Sequence[Box]) -> np.ndarray:
        """Bool masks [N, H, W], one per box."""
        ...


@runtime_checkable
class CategoryScorer(Protocol):
    def category_score(self, image: ImageLike, category: str) -> float:
        """Cosine similarity between the image and "a photo of a {category}"."""
        ...


@runtime_checkable
class FaceDetector(Protocol):
    def frontal_face_score(self, image: ImageLike) -> float | None:
        """Confidence in [0, 1] that the image shows a frontal face; None when no face is found."""
        ...


@runtime_checkable
class Inpainter(Protocol):
    def inpaint(self, image: ImageLike, mask: np.ndarray, prompt: str, seed: int = 0) -> np.ndarray:
        """Repaint the pixels where `mask` is True; returns RGB uint8 of the input's size."""
        ...


@runtime_checkable
class Variator(Protocol):
    def vary(self, image: ImageLike, seed: int = 0) -> np.ndarray:
        """A new image of the same subject (another pose / motion), RGB uint8."""
        ...


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """RGB uint8 [H, W, 3] from a PIL image or an array (grey, RGBA and float [0, 1] accepted)."""
    if isinstance(image, Image.Image):
        from kaleido.model.media import to_rgb  # orientation, bit depth and alpha as media.load_image

        return np.asarray(to_rgb(image, Path(getattr(image, "filename", "") or "<image>")))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {tuple(array.shape)}")
    return np.ascontiguousarray(array[:, :, :3])


def to_pil(image: ImageLike) -> Image.Image:
    return Image.fromarray(to_rgb_array(image))


def resolve_device(device: str | None) -> str:
    """'auto' / None -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def clip_box(box: Sequence[float], height: int, width: int) -> Box:
    """The box clamped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def box_pixels(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Integer pixel slice bounds (x0, y0, x1, y1) covering the box, at least one pixel, inside the image."""
    x0, y0, x1, y1 = clip_box(box, height, width)
    ix0, iy0 = int(np.floor(x0)), int(np.floor(y0))
    ix1, iy1 = int(np.ceil(x1)), int(np.ceil(y1))
    ix0, iy0 = min(ix0, width - 1), min(iy0, height - 1)
    return ix0, iy0, max(ix1, ix0 + 1), max(iy1, iy0 + 1)


def describe(obj: Any) -> str:
    """A short name for logs and Rejection details."""
    return getattr(obj, "name", None) or type(obj).__name__


__all__ = [
    "Box",
    "CategoryScorer",
    "Detection",
    "Detector",
    "FaceDetector",
    "ImageLike",
    "Inpainter",
    "Segmenter",
    "Variator",
    "box_pixels",
    "clip_box",
    "describe",
    "resolve_device",
    "to_pil",
    "to_rgb_array",
]
