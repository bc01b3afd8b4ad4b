"""Synthetic videos with GROUND TRUTH, and oracle models that return it, for exact curation tests.

Subjects are photos bundled with scikit-image (astronaut, chelsea the cat, coffee, rocket), cut out
with a mask we define (an ellipse or the full rectangle inside a chosen crop of the photo), pasted
on a moving procedural texture. Because we paste them, the per-frame boxes and masks are known
exactly; the oracles answer the same interfaces as the real wrappers (kaleido.vision):
- `OracleDetector.detect(image, terms)` / `OracleSegmenter.segment(image, boxes)`: the true boxes /
  visible masks of the frame (frames are recognised by content hash),
- `FixedScorer.category_score`: a fixed CLIP-like score per category,
- `TextureInpainter` / `MirrorVariator`: cheap non-generative stand-ins for FLUX fill / redux.

Boxes are AMODAL: the whole pasted sprite (clipped to the frame) even where a later subject covers
it; masks are the VISIBLE pixels. Subjects are pasted in list order (later ones in front).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image

from kaleido.data.filters import box_iou
from kaleido.data.records import ClipRecord, SubjectMatch
from kaleido.vision import Box, Detection, ImageLike, to_rgb_array


@dataclass(frozen=True)
class SubjectSource:
    image: str  # skimage.data function name
    crop: tuple[int, int, int, int]  # y0, y1, x0, x1 of the subject in that photo
    category: str
    group: str
    term: str  # words used in captions


SUBJECTS: dict[str, SubjectSource] = {
    "astronaut": SubjectSource("astronaut", (0, 512, 20, 380), "astronaut", "human", "astronaut"),
    "cat": SubjectSource("chelsea", (0, 300, 30, 420), "cat", "animal", "cat"),
    "cup": SubjectSource("coffee", (20, 390, 80, 480), "cup", "object", "coffee cup"),
    "rocket": SubjectSource("rocket", (110, 420, 280, 356), "rocket", "object", "rocket"),
}


@dataclass(frozen=True)
class SubjectSpec:
    """Where a subject goes: sprite size (h, w), top-left (x, y) at the first and last frame."""

    name: str  # key of SUBJECTS
    size: tuple[int, int] = (28, 28)
    start: tuple[float, float] = (8.0, 8.0)
    end: tuple[float, float] = (16.0, 12.0)
    shape: Literal["ellipse", "rect"] = "ellipse"
    score: float = 0.9  # what the oracle detector reports


@dataclass
class SyntheticSubject:
    spec: SubjectSpec
    category: str
    group: str
    term: str
    boxes: np.ndarray  # [T, 4] float, amodal sprite box clipped to the frame
    masks: np.ndarray  # [T, H, W] bool, visible pixels


@dataclass
class SyntheticClip:
    frames: np.ndarray  # [T, H, W, 3] uint8
    background: np.ndarray  # [T, H, W, 3] uint8: the frames without subjects
    subjects: list[SyntheticSubject]
    caption: str
    matches: list[SubjectMatch] = field(default_factory=list)

    def record(
        self, clip_id: str, source: str = "synthetic/source.mp4", path: str = "", fps: float = 16.0
    ) -> ClipRecord:
        """A ClipRecord describing this clip (ingest-like fields filled from the arrays)."""
        count, height, width = self.frames.shape[:3]
        return ClipRecord(
            clip_id=clip_id,
            source=source,
            start_frame=0,
            end_frame=count,
            start_s=0.0,
            end_s=count / fps,
            source_fps=fps,
            fps=fps,
            width=width,
            height=height,
            num_frames=count,
            duration_s=count / fps,
            path=path or f"clips/{clip_id}.mp4",
            caption=self.caption,
            caption_source="synthetic",
            subjects=list(self.matches),
        )

    def write(self, path: str | Path, fps: int = 16) -> Path:
        """The frames as an H.264 mp4 (kaleido.model.media.write_video)."""
        from kaleido.model.media import write_video

        return write_video(self.frames, path, fps=fps)


@cache
def _photo(name: str) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(getattr(data, name)()[:, :, :3])


def sprite(name: str, size: tuple[int, int], shape: str = "ellipse") -> tuple[np.ndarray, np.ndarray]:
    """(RGB [h, w, 3], mask [h, w]) of a subject: its photo crop resized, cut out by `shape`."""
    source = SUBJECTS[name]
    y0, y1, x0, x1 = source.crop
    h, w = size
    pixels = np.asarray(Image.fromarray(_photo(source.image)[y0:y1, x0:x1]).resize((w, h), Image.Resampling.LANCZOS))
    if shape == "rect":
        return pixels, np.ones((h, w), dtype=bool)
    yy, xx = np.mgrid[0:h, 0:w]
    # pixel centres inside the ellipse inscribed in the sprite
    inside = ((xx + 0.5 - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - h / 2) / (h / 2)) ** 2 <= 1.0
    return pixels, inside


def texture(height: int, width: int, seed: int = 0, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """A colourful procedural texture (sinusoidal gratings over a gradient), seen through a pan by `shift`.

    Sharp (variance of the Laplacian in the hundreds) and mid-bright (mean luma ~120), so the default
    quality filters pass it.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    xx, yy = xx + shift[0], yy + shift[1]
    image = np.zeros((height, width, 3))
    base = rng.uniform(70, 170, size=3)
    gradient = rng.uniform(-0.4, 0.4, size=(2, 3))
    image += base + xx[..., None] * gradient[0] + yy[..., None] * gradient[1]
    for _ in range(4):
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(3.0, 9.0)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + phase)
        image += wave[..., None] * rng.uniform(8, 22, size=3)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def make_caption(subjects: Sequence[SyntheticSubject]) -> tuple[str, list[SubjectMatch]]:
    """'A video of a cat and a coffee cup moving over a patterned background.' with the term spans."""
    caption, matches = "A video of ", []
    for index, subject in enumerate(subjects):
        if index:
            caption += " and " if index == len(subjects) - 1 else ", "
        caption += "a "
        start = len(caption)
        matches.append(SubjectMatch(subject.term, subject.category, subject.group, start, start + len(subject.term)))
        caption += subject.term
    return caption + " moving over a patterned background.", matches


def make_clip(
    specs: Sequence[SubjectSpec],
    frames: int = 8,
    height: int = 64,
    width: int = 96,
    seed: int = 0,
    pan: tuple[float, float] = (1.5, 0.5),
    brightness: float = 1.0,
    blur_sigma: float = 0.0,
) -> SyntheticClip:
    """A clip of `frames` frames: the texture pans by `pan` px per frame, subjects move start -> end.

    `brightness` scales every pixel (0.1 gives a dark clip); `blur_sigma` > 0 Gaussian-blurs the frames.
    """
    background = np.stack([texture(height, width, seed, (pan[0] * t, pan[1] * t)) for t in range(frames)])
    video = background.copy()
    masks = np.zeros((len(specs), frames, height, width), dtype=bool)
    boxes = np.zeros((len(specs), frames, 4), dtype=np.float64)
    for index, spec in enumerate(specs):
        pixels, shape_mask = sprite(spec.name, spec.size, spec.shape)
        h, w = spec.size
        for t in range(frames):
            alpha = t / (frames - 1) if frames > 1 else 0.0
            x = round(spec.start[0] + alpha * (spec.end[0] - spec.start[0]))
            y = round(spec.start[1] + alpha * (spec.end[1] - spec.start[1]))
            fx0, fy0, fx1, fy1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
            if fx1 <= fx0 or fy1 <= fy0:
                continue  # off-screen this frame
            sx0, sy0 = fx0 - x, fy0 - y
            local = shape_mask[sy0 : sy0 + fy1 - fy0, sx0 : sx0 + fx1 - fx0]
            region = video[t, fy0:fy1, fx0:fx1]
            region[local] = pixels[sy0 : sy0 + fy1 - fy0, sx0 : sx0 + fx1 - fx0][local]
            masks[:index, t, fy0:fy1, fx0:fx1] &= ~local  # a later subject hides the earlier ones
            masks[index, t, fy0:fy1, fx0:fx1] = local
            boxes[index, t] = (fx0, fy0, fx1, fy1)
    if blur_sigma > 0:
        video = np.stack([cv2.GaussianBlur(frame, (0, 0), blur_sigma) for frame in video])
    if brightness != 1.0:
        video = np.clip(np.round(video.astype(np.float64) * brightness), 0, 255).astype(np.uint8)
    subjects = [
        SyntheticSubject(spec, SUBJECTS[spec.name].category, SUBJECTS[spec.name].group, SUBJECTS[spec.name].term,
                         boxes[i], masks[i])
        for i, spec in enumerate(specs)
    ]
    caption, matches = make_caption(subjects)
    return SyntheticClip(video, background, subjects, caption, matches)


# ---- oracles ------------------------------------------------------------------------------------


def frame_key(image: ImageLike) -> bytes:
    array = to_rgb_array(image)
    return hashlib.blake2b(array.tobytes(), digest_size=16, person=str(array.shape).encode()[:16]).digest()


class _FrameIndex:
    def __init__(self, clips: Iterable[SyntheticClip] = ()) -> None:
        self._frames: dict[bytes, tuple[SyntheticClip, int]] = {}
        for clip in clips:
            self.register(clip)

    def register(self, clip: SyntheticClip) -> None:
        for t, frame in enumerate(clip.frames):
            self._frames[frame_key(frame)] = (clip, t)

    def lookup(self, image: ImageLike) -> tuple[SyntheticClip, int] | None:
        return self._frames.get(frame_key(image))


class OracleDetector(_FrameIndex):
    """The true amodal boxes of the registered clips' subjects whose term or category is asked for."""

    name = "oracle_detector"

    def detect(self, image: ImageLike, terms: Sequence[str]) -> list[Detection]:
        found = self.lookup(image)
        if found is None:
            return []
        clip, t = found
        wanted = {term.lower(): term for term in terms}
        detections = []
        for subject in clip.subjects:
            label = wanted.get(subject.term.lower()) or wanted.get(subject.category.lower())
            if label is None or not subject.masks[t].any():
                continue
            box = tuple(float(v) for v in subject.boxes[t])
            detections.append(Detection(box=box, score=subject.spec.score, label=label))  # type: ignore[arg-type]
        return sorted(detections, key=lambda d: -d.score)


class OracleSegmenter(_FrameIndex):
    """For each box, the visible mask of the subject whose true box overlaps it most (else the box itself)."""

    name = "oracle_segmenter"

    def segment(self, image: ImageLike, boxes: Sequence[Box]) -> np.ndarray:
        array = to_rgb_array(image)
        height, width = array.shape[:2]
        masks = np.zeros((len(boxes), height, width), dtype=bool)
        found = self.lookup(array)
        for index, box in enumerate(boxes):
            best, best_iou = None, 0.0
            if found is not None:
                clip, t = found
                for subject in clip.subjects:
                    iou = box_iou(tuple(subject.boxes[t]), box)
                    if iou > best_iou:
                        best, best_iou = subject.masks[t], iou
            if best is not None:
                masks[index] = best
            else:
                x0, y0, x1, y1 = (round(float(v)) for v in box)
                masks[index, max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
        return masks


class FixedScorer:
    """A CategoryScorer returning `scores[category]` (default `default`) whatever the image."""

    name = "fixed_scorer"

    def __init__(self, scores: dict[str, float] | None = None, default: float = 1.0) -> None:
        self.scores = dict(scores or {})
        self.default = float(default)

    def category_score(self, image: ImageLike, category: str) -> float:
        return self.scores.get(category, self.default)

    def category_scores(self, images: Sequence[ImageLike], categories: Sequence[str]) -> list[float]:
        """The batch form (kaleido.data.pools batches CLIP calls through it)."""
        return [self.category_score(image, category) for image, category in zip(images, categories, strict=True)]


class TextureInpainter:
    """Inpainter stand-in: fills the mask with a procedural texture seeded by `seed` (no generative model).

    `calls` counts the inpaint calls (what a FLUX Fill pool would be asked for)."""

    name = "texture_inpainter"

    def __init__(self) -> None:
        self.calls = 0

    def inpaint(self, image: ImageLike, mask: np.ndarray, prompt: str, seed: int = 0) -> np.ndarray:
        self.calls += 1
        array = to_rgb_array(image)
        fill = texture(array.shape[0], array.shape[1], seed=seed + 7919)
        return np.where(np.asarray(mask, dtype=bool)[:, :, None], fill, array)


class MirrorVariator:
    """Variator stand-in: the image mirrored left-right (a 'new pose' without a generative model); `calls` counts
    the calls."""

    name = "mirror_variator"

    def __init__(self) -> None:
        self.calls = 0

    def vary(self, image: ImageLike, seed: int = 0) -> np.ndarray:
        self.calls += 1
        return np.ascontiguousarray(to_rgb_array(image)[:, ::-1])


# ---- whole-pipeline stand-ins: synthetic SOURCE videos (ingested through PyAV) and models that need no lookup ----

SOURCE_CAPTION = "a cat sits next to a dog in a quiet room"


def source_frames(seed: int, shots: int = 1, frames_per_shot: int = 20) -> np.ndarray:
    """uint8 [shots x frames_per_shot, 96, 144, 3]: per shot, two noise patches (the caption's cat and dog)
    drifting on a flat background whose level jumps between shots (hard cuts a shot detector finds)."""
    rng = np.random.default_rng(seed)
    out = []
    for shot in range(shots):
        level = int(rng.integers(30, 90)) + 120 * (shot % 2)
        patches = rng.integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
        video = np.full((frames_per_shot, 96, 144, 3), level, dtype=np.uint8)
        for t in range(frames_per_shot):
            x = t if frames_per_shot <= 29 else t * 28 // (frames_per_shot - 1)  # long shots drift as far, slower
            video[t, 20:60, 8 + x : 58 + x] = patches[0]
            video[t, 30:70, 80 + x // 2 : 130 + x // 2] = patches[1]
        out.append(video)
    return np.concatenate(out)


def write_sources(root: str | Path, names: Iterable[str], sidecar: str = "captions.jsonl", shots: int = 1,
                  frames_per_shot: int = 20) -> None:
    """Each root-relative name ("raw/m-03.mp4") as a synthetic source video (seeded by its name), and a caption
    sidecar row per source (`SOURCE_CAPTION`), merged into `<root>/<sidecar>`."""
    import json

    from kaleido.data.keys import stable_hash
    from kaleido.model.media import write_video

    root = Path(root)
    path = root / sidecar
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(source_frames(stable_hash(name) % 2**31, shots, frames_per_shot), root / name, fps=16)
        rows = [row for row in rows if row["key"] != name] + [{"key": name, "caption": SOURCE_CAPTION}]
    path.write_text("".join(json.dumps(row) + "\n" for row in sorted(rows, key=lambda r: r["key"])))


class HalvesDetector:
    """A Detector stand-in for decoded (re-encoded) frames: the left half of the frame for the first term, the
    right half for the second (no lookup, so it works on frames that went through H.264)."""

    name = "halves_detector"

    def detect(self, image: ImageLike, terms: Sequence[str]) -> list[Detection]:
        height, width = np.asarray(image).shape[:2]
        boxes = [(2.0, 4.0, width / 2 - 2, height - 4.0), (width / 2 + 2, 4.0, width - 2.0, height - 4.0)]
        return [Detection(boxes[k % 2], 0.9, term) for k, term in enumerate(terms)]


class BoxSegmenter:
    """A Segmenter stand-in: each mask is its box."""

    name = "box_segmenter"

    def segment(self, image: ImageLike, boxes: Sequence[Box]) -> np.ndarray:
        height, width = np.asarray(image).shape[:2]
        masks = np.zeros((len(boxes), height, width), dtype=bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
            mask[int(y0) : int(y1), int(x0) : int(x1)] = True
        return masks


class StandInCaptioner:
    """A Captioner stand-in for the VLM: `SOURCE_CAPTION` for every clip that has frames (no model)."""

    name = "stand_in_captioner"
    source = "vlm:stand-in"

    def caption(self, clip: ClipRecord, frames: np.ndarray | None) -> str | None:
        if frames is None or not len(frames):
            raise ValueError("the stand-in captioner needs the clip's frames")
        return SOURCE_CAPTION


def stand_in_model(key: str, cfg: object = None) -> object | None:
    """`data.models.factory: kaleido.data.synthetic:stand_in_model`: the stand-ins above by pool key (no weights), so
    the whole data path runs with them in any process, a local worker or a Ray pool actor alike. Face: None (the
    built-in loader; keep data.models.face null)."""
    models = {"vlm": StandInCaptioner, "grounding_dino": HalvesDetector, "sam": BoxSegmenter, "clip": FixedScorer,
              "flux_fill": TextureInpainter, "flux_redux": MirrorVariator}
    return models[key]() if key in models else None


def curation_results(folder: str | Path, clips: int, subjects: int = 2, clips_per_source: int = 10) -> list:
    """`clips` synthetic CurationResults as curate_clip writes them (crop / segment references, full-frame subject
    masks, a plate frame with its mask), `subjects` per clip, `clips_per_source` clips per source video; the image
    files are shared from a small pool under `folder` (pairing reads them by path, so its cost per reference is what
    a real run pays). Frames for inpainting: `curation_frame`. For pairing at scale without curating."""
    from kaleido.data.records import Instance
    from kaleido.data.references import CuratedSubject, CurationResult

    folder = Path(folder)
    pool = folder / "pool"
    if not (pool / "done").is_file():
        pool.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(16):  # 40x40 subject crops and masks, 64x96 plates, full-frame masks
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(pool / f"img{i}.png")
            Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(pool / f"plate{i}.png")
            mask = np.zeros((40, 40), np.uint8)
            mask[4:36, 2 + i % 6 : 34 + i % 6] = 255
            Image.fromarray(mask).save(pool / f"mask{i}.png")
            frame_mask = np.zeros((64, 96), np.uint8)
            frame_mask[10:50, 12 + i % 6 : 44 + i % 6] = 255
            Image.fromarray(frame_mask).save(pool / f"frame_mask{i}.png")
        (pool / "done").write_text("")
    results = []
    for c in range(clips):
        source = f"raw/src-{c // clips_per_source:06d}.mp4"
        clip = ClipRecord(f"src{c // clips_per_source:06d}-{c:07d}", source, 0, 24, 0.0, 1.5, 16.0, 16.0, 96, 64, 24,
                          1.5, f"ingest/x/{c}.mp4", "a cat and a dog")
        chosen = []
        for k in range(subjects):
            category = ("cat", "dog", "cup")[k % 3]
            image, mask = f"pool/img{(c + k) % 16}.png", f"pool/mask{(c + k) % 16}.png"
            instance = Instance(clip.clip_id, 0, category, "animal", (10.0, 10.0, 50.0, 50.0), 0.9,
                                mask_path=f"pool/frame_mask{(c + k) % 16}.png", instance_id=f"{clip.clip_id}/{k}")
            chosen.append(CuratedSubject(instance, {"crop": image, "segment": image}, {"crop": mask, "segment": mask},
                                         (10, 10, 50, 50), (64, 96)))
        results.append(CurationResult(clip=clip, subjects=chosen, plate=f"pool/plate{c % 16}.png",
                                      plate_mask=f"pool/frame_mask{c % 16}.png", enabled_types=["crop", "segment"]))
    return results


def curation_frame(result: Any, index: int) -> np.ndarray:
    """The frame of a `curation_results` clip (a FrameSource): a texture seeded by the clip id."""
    from kaleido.data.keys import stable_hash

    return texture(64, 96, seed=stable_hash(result.clip.clip_id) % 2**31)


# The data stages on synthetic sources with the stand-in models above (no weights): the overrides the tests and
# benchmarks/curation_scale.py run them with (data.shards / dataset_shards are theirs to pick).
STAND_IN_STAGES: dict[str, Any] = {
    "data.workers": 1,
    "data.grounding.frames_per_clip": 1,
    # the stand-in detector and segmenter of kaleido.data.synthetic, built wherever a model is (any process)
    "data.models.factory": "kaleido.data.synthetic:stand_in_model",
    "data.models.flux_fill": None,
    "data.models.flux_redux": None,
    "data.filters": {"min_area": 0.0, "max_area": 1.0, "clip_min_score": -1.0, "min_sharpness": 0.0,
                     "min_brightness": 0.0, "max_brightness": 255.0},
    "data.ingest.clip_min_seconds": 1.0,
    "data.ingest.clip_max_seconds": 4.0,
    "data.ingest.fps": 16,
}
