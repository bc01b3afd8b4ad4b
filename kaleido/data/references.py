"""Reference construction (paper section 3.2 steps 5-6, appendix A.1) and the per-clip curation result.

For a kept subject instance (frame, SAM mask, box) the reference variants are
- crop:    the box crop of the frame,
- segment: the subject on white (SAM mask), same crop,
- inpaint: the frame with everything but the (dilated) subject repainted by FLUX fill, same crop:
           the original background is erased, the subject's own pixels stay,
- redux:   a FLUX redux variation of the segmented subject (new pose / motion), its own size;
and the clip gets a background plate for cross-pair composites: a frame and the union mask of the subjects kept on
it; the pair stage removes them (FLUX fill) when a cross pair draws the clip as its donor, or uses the raw frame
when fill is disabled. curate_clip builds crop and segment; inpaint, redux and the inpainted plates are built at
pairing time for the samples that use them (kaleido.data.generated).

Files are PNG. A `CurationResult` records paths relative to the data root (`rel_dir` prefix) and
remembers where they were written, so cross-pairing can read them before or after the shard
folder is moved into place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from kaleido.data.records import ClipRecord, Instance, Rejection
from kaleido.model.media import centre_crop_box, cover_size
from kaleido.vision import Box, ImageLike, Inpainter, Variator, box_pixels, to_rgb_array

WHITE = 255


# ---- image operations ---------------------------------------------------------------------------


def crop_bounds(box: Box, margin: float, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel bounds (x0, y0, x1, y1) of the box grown by `margin` x its size on each side, inside the frame."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    return box_pixels((x0 - dx, y0 - dy, x1 + dx, y1 + dy), height, width)


def crop_reference(
    frame: ImageLike, mask: np.ndarray, bounds: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(crop of the frame, crop of the mask)."""
    x0, y0, x1, y1 = bounds
    return to_rgb_array(frame)[y0:y1, x0:x1].copy(), np.asarray(mask, dtype=bool)[y0:y1, x0:x1].copy()


def segment_reference(
    frame: ImageLike, mask: np.ndarray, bounds: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(the subject on white, its mask), cropped to `bounds`."""
    crop, crop_mask = crop_reference(frame, mask, bounds)
    return np.where(crop_mask[:, :, None], crop, WHITE).astype(np.uint8), crop_mask


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask grown by `pixels` (elliptical structuring element)."""
    mask = np.asarray(mask, dtype=bool)
    if pixels <= 0:
        return mask.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def inpaint_reference(
    frame: ImageLike,
    mask: np.ndarray,
    bounds: tuple[int, int, int, int],
    inpainter: Inpainter,
    prompt: str,
    seed: int,
    dilation: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The subject kept, the rest of the frame repainted from `prompt`; cropped to `bounds`.

    The subject mask is dilated first so its boundary pixels (the inpainter's context) stay put.
    """
    keep = dilate(mask, dilation)
    painted = inpainter.inpaint(frame, ~keep, prompt, seed=seed)
    return crop_reference(painted, mask, bounds)


def redux_reference(segmented: ImageLike, variator: Variator, seed: int) -> np.ndarray:
    """A new image of the segmented subject (its mask is unknown: the pose changed)."""
    return to_rgb_array(variator.vary(segmented, seed=seed))


def remove_subjects(
    frame: ImageLike, masks: list[np.ndarray], inpainter: Inpainter, prompt: str, seed: int, dilation: int
) -> np.ndarray:
    """The frame with the (dilated) subject masks repainted: a background plate."""
    array = to_rgb_array(frame)
    if not masks:
        return array.copy()
    union = np.any(np.stack([np.asarray(m, dtype=bool) for m in masks]), axis=0)
    return inpainter.inpaint(array, dilate(union, dilation), prompt, seed=seed)


def cover_resize(image: ImageLike, height: int, width: int) -> np.ndarray:
    """Resize keeping the aspect ratio so the image covers (height, width), then centre-crop."""
    array = to_rgb_array(image)
    new_w, new_h = cover_size(array.shape[1], array.shape[0], width, height)
    resized = np.asarray(Image.fromarray(array).resize((new_w, new_h), Image.Resampling.BICUBIC))
    left, top = centre_crop_box(new_w, new_h, width, height)
    return resized[top : top + height, left : left + width].copy()


def composite(
    subject: ImageLike,
    subject_mask: np.ndarray,
    background: ImageLike,
    bounds: tuple[int, int, int, int],
    frame_size: tuple[int, int],
) -> np.ndarray:
    """The subject crop pasted (by its mask) on the background plate's pixels at the same place.

    The plate is first cover-resized to the subject's frame size, so the subject keeps its scale
    relative to the scene; the result has the subject crop's size.
    """
    x0, y0, x1, y1 = bounds
    plate = cover_resize(background, *frame_size)[y0:y1, x0:x1]
    crop = to_rgb_array(subject)
    mask = np.asarray(subject_mask, dtype=bool)
    if plate.shape[:2] != crop.shape[:2] or mask.shape != crop.shape[:2]:
        raise ValueError(f"composite: crop {crop.shape[:2]}, mask {mask.shape} and bounds {bounds} disagree")
    return np.where(mask[:, :, None], crop, plate).astype(np.uint8)


# ---- files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputDir:
    """Write files into `path`; records name them `<rel>/<name>` (rel: relative to the data root)."""

    path: Path
    rel: str

    def record_path(self, name: str) -> str:
        return f"{self.rel}/{name}" if self.rel else name

    def save_image(self, name: str, image: ImageLike) -> str:
        self.path.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_rgb_array(image)).save(self.path / name)
        return self.record_path(name)

    def save_mask(self, name: str, mask: np.ndarray) -> str:
        self.path.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255).save(self.path / name)
        return self.record_path(name)


def load_image(path: Path) -> np.ndarray:
    """An RGB uint8 array through the project's one image loader (media.load_image)."""
    from kaleido.model.media import load_image as load_rgb

    return np.asarray(load_rgb(path, "curation image"))


def load_mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 127


# ---- results ------------------------------------------------------------------------------------


@dataclass
class CuratedSubject:
    """A subject kept for a clip: its best instance and the reference variants built from it."""

    instance: Instance
    references: dict[str, str]  # sample type -> reference image path (relative to the data root)
    masks: dict[str, str]  # sample type -> mask aligned with that image (no entry for redux)
    bounds: tuple[int, int, int, int]  # pixel bounds of the crop-like references in the frame
    frame_size: tuple[int, int]  # (height, width) of the clip's frames

    def to_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance.to_json(),
            "references": dict(self.references),
            "masks": dict(self.masks),
            "bounds": list(self.bounds),
            "frame_size": list(self.frame_size),
        }

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> CuratedSubject:
        return cls(
            instance=Instance.from_json(row["instance"]),
            references=dict(row["references"]),
            masks=dict(row["masks"]),
            bounds=tuple(row["bounds"]),  # type: ignore[arg-type]
            frame_size=tuple(row["frame_size"]),  # type: ignore[arg-type]
        )


@dataclass
class CurationResult:
    """Everything `curate_clip` produced for one clip (JSON round-trips with to_json / from_json)."""

    clip: ClipRecord
    subjects: list[CuratedSubject] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)  # every instance that passed the filters
    rejections: list[Rejection] = field(default_factory=list)
    plate: str | None = None  # background plate frame (relative path)
    plate_mask: str | None = None  # union mask of the subjects kept on the plate's frame (None: none on it)
    enabled_types: list[str] = field(default_factory=list)  # sample types the configured models can build
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    written_to: str = ""  # absolute folder the files went to (`rel_dir` maps onto it); "" in a stage's shards
    rel_dir: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.subjects)

    def resolve(self, path: str, data_root: str | Path | None = None) -> Path:
        """The file behind a recorded relative path: under `data_root` when given, else where it was written."""
        if data_root is not None:
            return Path(data_root) / path
        if self.rel_dir and path.startswith(self.rel_dir + "/"):
            path = path[len(self.rel_dir) + 1 :]
        return Path(self.written_to) / path

    def to_json(self) -> dict[str, Any]:
        return {
            "clip": self.clip.to_json(),
            "subjects": [subject.to_json() for subject in self.subjects],
            "instances": [instance.to_json() for instance in self.instances],
            "rejections": [rejection.to_json() for rejection in self.rejections],
            "plate": self.plate,
            "plate_mask": self.plate_mask,
            "enabled_types": list(self.enabled_types),
            "stats": self.stats,
            "notes": list(self.notes),
            "written_to": self.written_to,
            "rel_dir": self.rel_dir,
        }

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> CurationResult:
        return cls(
            clip=ClipRecord.from_json(row["clip"]),
            subjects=[CuratedSubject.from_json(s) for s in row.get("subjects", [])],
            instances=[Instance.from_json(i) for i in row.get("instances", [])],
            rejections=[Rejection(**r) for r in row.get("rejections", [])],
            plate=row.get("plate"),
            plate_mask=row.get("plate_mask"),
            enabled_types=list(row.get("enabled_types", [])),
            stats=dict(row.get("stats", {})),
            notes=list(row.get("notes", [])),
            written_to=row.get("written_to", ""),
            rel_dir=row.get("rel_dir", ""),
        )
