"""Per-clip curation (paper section 3.2 steps 3-6): ground, segment, filter, build the references that need no FLUX.

`curate_clip` runs in a shard worker on one decoded clip and never raises for a bad clip: model
failures, odd inputs and empty outcomes all come back as `Rejection`s in the `CurationResult`.
It builds the crop and segment references of every kept subject and saves the background plate's frame with the
union mask of its kept subjects. FLUX runs later, in the pair stage, only for the samples whose type needs it
(kaleido.data.generated): inpaint references, redux variations and the inpainted plates of the donor clips that
cross pairs actually draw. `pair_samples` (kaleido.data.pairing) turns the results of a dataset shard into training
samples with the exact sample-type mix and cross-pair ratio.
"""

from __future__ import annotations

import logging
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kaleido.config.schema import DataConfig, Params
from kaleido.data import filters
from kaleido.data.generated import FluxModels, load_flux_models, reference_types
from kaleido.data.models import ModelUnavailable, build_model
from kaleido.data.pairing import pair_samples
from kaleido.data.paths import safe_name
from kaleido.data.records import SAMPLE_TYPES, ClipRecord, Instance, Rejection, SubjectMatch
from kaleido.data.references import (
    CuratedSubject,
    CurationResult,
    OutputDir,
    crop_bounds,
    crop_reference,
    segment_reference,
)
from kaleido.vision import CategoryScorer, Detector, FaceDetector, Segmenter, describe

__all__ = ["CurationModels", "CurationResult", "FluxModels", "curate_clip", "load_curation_models",
           "load_flux_models", "pair_samples"]

log = logging.getLogger(__name__)
FACE_SKIPPED_NOTE = "frontal-face check skipped: data.models.face is null (human instances are NOT face-checked)"
_face_warning_logged = False


@dataclass
class CurationModels:
    """The models curate_clip uses (face may be None: that check is skipped, and the notes say so). FLUX is not
    among them: the pair stage builds the generated references (kaleido.data.generated.FluxModels)."""

    detector: Detector
    segmenter: Segmenter
    clip: CategoryScorer
    face: FaceDetector | None = None
    notes: list[str] = field(default_factory=list)  # what is disabled and why


def load_curation_models(cfg: DataConfig, params: Params | None = None, device: str | None = None) -> CurationModels:
    """Build the grounding, segmentation, CLIP and (when configured) face models (kaleido.data.models.build_model:
    local paths, relative ones against params.yaml's folder, or data.models.factory).

    Grounding DINO, SAM and CLIP are required; a null face model skips the face check (the notes say so). A set
    path that cannot be loaded raises a clear error.
    """
    detector = build_model("grounding_dino", cfg, params, device)
    segmenter = build_model("sam", cfg, params, device)
    scorer = build_model("clip", cfg, params, device)
    face = build_model("face", cfg, params, device) if cfg.models.face is not None else None
    return CurationModels(detector, segmenter, scorer, face, curation_notes(cfg))


def curation_notes(cfg: DataConfig) -> list[str]:
    """What the configuration disables, and why (recorded in every CurationResult)."""
    notes = [FACE_SKIPPED_NOTE] if cfg.models.face is None else []
    if cfg.models.flux_fill is None:
        notes.append("inpaint references disabled: data.models.flux_fill is null (mix renormalised)")
    if cfg.models.flux_redux is None:
        notes.append("redux references disabled: data.models.flux_redux is null (mix renormalised)")
    return notes


def sample_frame_indices(num_frames: int, count: int) -> list[int]:
    """`count` evenly spaced frames, away from the clip's ends (where shot cuts blur); all if fewer."""
    if num_frames <= count:
        return list(range(num_frames))
    positions = np.linspace(0, num_frames - 1, count + 2)[1:-1]
    return sorted({round(float(p)) for p in positions})


def _error(stage: str, item: str, model: Any, exc: BaseException, reason: str = "model_error") -> Rejection:
    """A Rejection naming the model (or step) that raised, the exception and where it was raised.

    A ModelUnavailable (a model pool is gone) is re-raised: it fails the shard, never one item."""
    if isinstance(exc, ModelUnavailable):
        raise exc
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    name = model if isinstance(model, str) else describe(model)
    return Rejection(stage=stage, item=item, reason=reason, detail=f"{name} raised {type(exc).__name__}: {exc}{at}")


class _ClipCurator:
    """State of one curate_clip call (kept out of the public function to keep each step short)."""

    def __init__(
        self,
        clip: ClipRecord,
        frames: np.ndarray,
        models: CurationModels,
        cfg: DataConfig,
        out: OutputDir,
        result: CurationResult,
    ) -> None:
        self.clip, self.frames, self.models, self.cfg, self.out = clip, frames, models, cfg, out
        self.result = result
        self.counts: Counter[str] = Counter()
        self.masks: dict[str, np.ndarray] = {}  # instance id -> mask, for kept instances

    def reject(self, rejection: Rejection) -> None:
        self.result.rejections.append(rejection)
        self.counts[f"rejected.{rejection.reason}"] += 1

    def ground_frame(self, index: int, terms: list[str], by_term: dict[str, SubjectMatch]) -> list[Instance]:
        """Detect + segment + per-instance filters on one frame; returns the instances that pass."""
        frame = self.frames[index]
        height, width = frame.shape[:2]
        item = f"{self.clip.clip_id}/f{index}"
        try:
            detections = self.models.detector.detect(frame, terms)
        except Exception as exc:
            self.reject(_error("ground", item, self.models.detector, exc))
            return []
        detections = [d for d in detections if d.label.lower() in by_term]
        self.counts["detections"] += len(detections)
        if not detections:
            self.counts["frames_without_detections"] += 1
            return []
        try:
            masks = np.asarray(self.models.segmenter.segment(frame, [d.box for d in detections]), dtype=bool)
            if masks.shape != (len(detections), height, width):
                raise ValueError(f"expected masks {(len(detections), height, width)}, got {masks.shape}")
        except Exception as exc:
            self.reject(_error("ground", item, self.models.segmenter, exc))
            return []
        per_term: Counter[str] = Counter()
        passed = []
        for detection, mask in zip(detections, masks, strict=True):
            match = by_term[detection.label.lower()]
            per_term[match.term] += 1
            instance = Instance(
                clip_id=self.clip.clip_id,
                frame_index=index,
                category=match.category,
                group=match.group,
                box=tuple(float(v) for v in detection.box),  # type: ignore[arg-type]
                score=float(detection.score),
                term=match.term,
                instance_id=f"{item}/{safe_name(match.term)}#{per_term[match.term] - 1}",
            )
            self.counts["instances"] += 1
            if self.filter_instance(instance, frame, mask):
                passed.append(instance)
                self.masks[instance.instance_id] = mask
        kept, overlaps = filters.iou_filter(passed, self.cfg.filters)
        for rejection in overlaps:
            self.reject(rejection)
        return kept

    def filter_instance(self, instance: Instance, frame: np.ndarray, mask: np.ndarray) -> bool:
        """Size, brightness, blur, CLIP and (humans) face; records the first rejection."""
        cfg = self.cfg.filters
        x0, y0, x1, y1 = crop_bounds(instance.box, 0.0, *frame.shape[:2])
        crop = frame[y0:y1, x0:x1]
        checks: list[tuple[Any, Callable[[], Rejection | None]]] = [
            ("size filter", lambda: filters.size_filter(instance, mask, cfg)),
            ("brightness filter", lambda: filters.brightness_filter(instance, crop, cfg)),
            ("blur filter", lambda: filters.blur_filter(instance, crop, cfg)),
            (self.models.clip, lambda: filters.clip_filter(instance, crop, self.models.clip, cfg)),
            (self.models.face or "face filter", lambda: filters.face_filter(instance, crop, self.models.face, cfg)),
        ]
        for model, run in checks:
            try:
                rejection = run()
            except Exception as exc:
                self.reject(_error("filter", instance.instance_id, model, exc))
                return False
            if rejection is not None:
                self.reject(rejection)
                return False
        if instance.group == "human" and self.models.face is None:
            self.counts["face_check_skipped"] += 1
        return True

    def build_subject(self, instance: Instance) -> CuratedSubject:
        """Save the mask and the crop and segment references of a chosen instance (FLUX: at pairing time)."""
        refs_cfg = self.cfg.references
        frame = self.frames[instance.frame_index]
        mask = self.masks[instance.instance_id]
        height, width = frame.shape[:2]
        bounds = crop_bounds(instance.box, refs_cfg.crop_margin, height, width)
        stem = f"{instance.frame_index:04d}_{safe_name(instance.term or instance.category)}"
        instance.mask_path = self.out.save_mask(f"{stem}_mask.png", mask)  # full frame: the inpaint step's mask
        images: dict[str, np.ndarray] = {}
        images["crop"], crop_mask = crop_reference(frame, mask, bounds)
        images["segment"], _ = segment_reference(frame, mask, bounds)
        references = {kind: self.out.save_image(f"{stem}_{kind}.png", image) for kind, image in images.items()}
        # crop and segment (and a generated inpaint reference) share the same crop window, hence one mask file
        mask_path = self.out.save_mask(f"{stem}_refmask.png", crop_mask)
        return CuratedSubject(instance, references, {kind: mask_path for kind in images}, bounds, (height, width))

    def build_plate(self, index: int, kept: list[Instance]) -> None:
        """The background plate: frame `index` and the union mask of the subjects kept on it (the pair stage paints
        them out with FLUX Fill only when a cross pair draws this clip as its donor)."""
        frame = self.frames[index]
        union = np.zeros(frame.shape[:2], dtype=bool)
        for instance in kept:
            if instance.frame_index == index:
                union |= self.masks[instance.instance_id]
        self.result.plate = self.out.save_image(f"plate_{index:04d}.png", frame)
        self.result.plate_mask = self.out.save_mask(f"plate_{index:04d}_mask.png", union) if union.any() else None

    def run(self, matches: list[SubjectMatch]) -> None:
        clip_id = self.clip.clip_id
        groundable: dict[str, SubjectMatch] = {}
        for match in matches:
            if match.group == "background":
                self.reject(
                    Rejection(
                        "ground",
                        f"{clip_id}/{match.term}",
                        "background_term",
                        f"'{match.term}' is a background category: not grounded as a subject "
                        "(the clip's background plate serves cross-pair composites)",
                    )
                )
                continue
            groundable.setdefault(" ".join(match.term.lower().replace(".", " ").split()), match)
        groundable.pop("", None)
        if not groundable:
            self.reject(Rejection("ground", clip_id, "no_subject_terms", "no subject term in the caption to ground"))
            return
        terms = list(groundable)
        indices = sample_frame_indices(len(self.frames), self.cfg.grounding.frames_per_clip)
        self.counts["frames_sampled"] = len(indices)
        kept: list[Instance] = []
        for index in indices:
            kept.extend(self.ground_frame(index, terms, groundable))
        self.result.instances = kept
        self.counts["instances_kept"] = len(kept)
        # one instance per subject term: the highest detection score (earliest frame on ties)
        best: dict[str, Instance] = {}
        for instance in kept:
            current = best.get(instance.term)
            if current is None or instance.score > current.score:
                best[instance.term] = instance
        chosen = sorted(best.values(), key=lambda i: (-i.score, i.frame_index, i.term))
        chosen = chosen[: self.cfg.references.max_references]
        self.result.subjects = [self.build_subject(instance) for instance in chosen]
        self.build_plate(indices[len(indices) // 2], kept)
        if not self.result.subjects:
            grounded = self.counts["instances"]
            self.reject(
                Rejection(
                    "filter",
                    clip_id,
                    "no_subjects",
                    f"{grounded} instance(s) grounded on {len(indices)} frame(s); none passed the filters",
                )
            )


def curate_clip(
    clip: ClipRecord,
    frames: np.ndarray,
    matches: list[SubjectMatch],
    models: CurationModels,
    cfg: DataConfig,
    out_dir: Path,
    *,
    rel_dir: str | None = None,
) -> CurationResult:
    """Ground `matches` on `grounding.frames_per_clip` frames, segment, filter, build the crop and segment
    references and the background plate (frame + subject mask). Deterministic: no random draw (the pair stage
    draws FLUX prompts and seeds from stable hashes of the sample id).

    frames: the decoded clip, uint8 [T, H, W, 3] RGB. matches: the caption's taxonomy terms.
    Files go to `out_dir/<clip id>/`; records name them `<rel_dir>/<clip id>/...` (rel_dir: out_dir's
    future path relative to the data root, e.g. the shard's final folder; default: relative to out_dir).
    Never raises for a bad clip or a failing model: see `result.rejections`.
    """
    global _face_warning_logged
    folder = safe_name(clip.clip_id, limit=200)
    out = OutputDir(Path(out_dir) / folder, f"{rel_dir}/{folder}" if rel_dir else folder)
    result = CurationResult(
        clip=clip,
        enabled_types=reference_types(cfg),
        notes=list(models.notes),
        written_to=str(Path(out_dir).resolve()),
        rel_dir=rel_dir or "",
    )
    curator = _ClipCurator(clip, np.asarray(frames), models, cfg, out, result)
    shape, dtype = curator.frames.shape, curator.frames.dtype
    if curator.frames.ndim != 4 or shape[-1] != 3 or dtype != np.uint8 or shape[0] == 0:
        curator.reject(
            Rejection("ground", clip.clip_id, "bad_frames", f"frames must be uint8 [T>0, H, W, 3], got {dtype} {shape}")
        )
    else:
        try:
            curator.run(list(matches))
        except ModelUnavailable:
            raise
        except Exception as exc:  # a bug or an unexpected input must cost this clip only, not the run
            log.exception("curation of clip %s failed", clip.clip_id)
            curator.reject(_error("ground", clip.clip_id, "curate_clip", exc, reason="curation_error"))
            result.subjects = []
    if curator.counts["face_check_skipped"]:
        result.notes.append(f"{curator.counts['face_check_skipped']} human instance(s) kept without a face check")
        if not _face_warning_logged:
            log.warning(FACE_SKIPPED_NOTE)
            _face_warning_logged = True
    rejected = {key.split(".", 1)[1]: n for key, n in curator.counts.items() if key.startswith("rejected.")}
    result.stats = {
        **{key: n for key, n in curator.counts.items() if not key.startswith("rejected.")},
        "rejected": rejected,
        "subjects": len(result.subjects),
        "face_check": "on" if models.face is not None else "skipped (data.models.face is null)",
        "enabled_types": reference_types(cfg),
        "disabled_types": {t: f"data.models.flux_{'fill' if t == 'inpaint' else 'redux'} is null"
                           for t in SAMPLE_TYPES if t not in reference_types(cfg)},
    }
    return result
