"""References FLUX generates at pairing time, only for the samples whose type needs them (two-phase curation).

`curate_clip` builds what needs no FLUX (crop and segment references, the plate's frame and subject mask). Pairing
decides each sample's type and cross-pair flag first (kaleido.data.pairing), then `FluxBuilder` makes
- an inpaint reference per subject of a NON-cross inpaint sample (a cross-paired sample's subject is composited on a
  donor's plate instead: its inpaint reference would go unused),
- a redux variation per subject of a redux sample (cross or not: the variation is the reference either way),
- an inpainted plate (the kept subjects painted out) once per donor clip that a cross pair actually draws, cached
  for the dataset shard.
FLUX is called exactly that often: `FluxBuilder.calls` counts it and the planner (kaleido.data.plan.calls_per_clip)
predicts the same counts. Prompts and seeds are draws from stable hashes of (data.seed, sample id, subject index)
(or the donor's clip id), so a sample's references depend on nothing else: deterministic and incremental.

A failing FLUX call is never hidden: the sample falls back to its segment reference (counted as the mix's
shortfall, a Rejection names the model and the error) and a plate that fails stays the raw frame (counted). A gone
model pool (kaleido.data.models.ModelUnavailable) fails the shard instead.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kaleido.config.schema import DataConfig, Params
from kaleido.data.keys import stable_hash
from kaleido.data.models import ModelUnavailable, configured, shard_model
from kaleido.data.records import SAMPLE_TYPES, Rejection
from kaleido.data.references import (
    CurationResult,
    inpaint_reference,
    load_image,
    load_mask,
    redux_reference,
    remove_subjects,
)
from kaleido.vision import Inpainter, Variator, describe

FrameSource = Callable[[CurationResult, int], np.ndarray]  # (clip's result, frame index) -> uint8 [H, W, 3]
SEED_RANGE = 2**31 - 1


def reference_types(cfg: DataConfig) -> list[str]:
    """The sample types the configured models can build: crop, segment, and the FLUX types whose model is set."""
    present = {"crop": True, "segment": True, "inpaint": cfg.models.flux_fill is not None,
               "redux": cfg.models.flux_redux is not None}
    return [t for t in SAMPLE_TYPES if present[t]]


@dataclass
class FluxModels:
    """The generators the pair stage may call; a None disables its sample type (the mix is renormalised)."""

    fill: Inpainter | None = None
    redux: Variator | None = None

    @property
    def enabled_types(self) -> list[str]:
        present = {"crop": True, "segment": True, "inpaint": self.fill is not None, "redux": self.redux is not None}
        return [t for t in SAMPLE_TYPES if present[t]]

    @property
    def disabled_types(self) -> dict[str, str]:
        reasons = {"inpaint": "data.models.flux_fill is null", "redux": "data.models.flux_redux is null"}
        return {t: reasons[t] for t in SAMPLE_TYPES if t not in self.enabled_types}


class _OnFirstCall:
    """A pool's model fetched (loaded, or its Ray proxy) when first called: a shard that needs no FLUX loads none."""

    def __init__(self, key: str, params: Params) -> None:
        self.key, self.params, self.name = key, params, key
        self._model: Any = None

    def _get(self) -> Any:
        if self._model is None:
            try:
                self._model = shard_model(self.key, self.params)
            except ModelUnavailable:
                raise
            except Exception as exc:  # a model that cannot load fails the shard, not every sample one by one
                raise ModelUnavailable(f"data.models.{self.key}: cannot load it ({type(exc).__name__}: {exc})") from exc
            self.name = describe(self._model)
        return self._model

    def inpaint(self, image: Any, mask: np.ndarray, prompt: str, seed: int = 0) -> np.ndarray:
        return self._get().inpaint(image, mask, prompt, seed=seed)

    def vary(self, image: Any, seed: int = 0) -> np.ndarray:
        return self._get().vary(image, seed=seed)


def load_flux_models(params: Params) -> FluxModels:
    """The configured FLUX generators for a pair shard (kaleido.data.models.shard_model: local or a Ray pool),
    fetched on their first call."""
    return FluxModels(
        fill=_OnFirstCall("flux_fill", params) if configured("flux_fill", params) else None,
        redux=_OnFirstCall("flux_redux", params) if configured("flux_redux", params) else None,
    )


class ClipFrames:
    """A FrameSource that decodes a result's clip file (root-relative path) once and serves its frames; the last
    clip stays decoded (a sample's subjects come from one clip)."""

    def __init__(self, data_root: Path) -> None:
        self.root = Path(data_root)
        self._clip: str | None = None
        self._frames: np.ndarray | None = None
        self.decoded = 0

    def __call__(self, result: CurationResult, index: int) -> np.ndarray:
        from kaleido.data.paths import resolve_inside
        from kaleido.model.media import read_video

        if self._clip != result.clip.clip_id or self._frames is None:
            self._frames = read_video(resolve_inside(self.root, result.clip.path))
            self._clip = result.clip.clip_id
            self.decoded += 1
        return self._frames[index]


def _rejection(item: str, model: Any, exc: BaseException, what: str) -> Rejection:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return Rejection("references", item, "model_error",
                     f"{describe(model)} raised {type(exc).__name__}: {exc}{at} ({what})")


class FluxBuilder:
    """Builds the generated references of one dataset shard and counts every FLUX call (see the module docstring).

    calls: {"inpaint": inpaint references, "plate": plates, "redux": variations}, one per FLUX call made;
    failures: the same keys, calls that raised; rejections: a Rejection per failure.
    """

    def __init__(self, flux: FluxModels, cfg: DataConfig, seed: int, data_root: Path | None,
                 frames: FrameSource | None) -> None:
        self.flux, self.cfg, self.seed, self.root = flux, cfg, seed, data_root
        self.frames = frames if frames is not None else (ClipFrames(data_root) if data_root is not None else None)
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.rejections: list[Rejection] = []
        self._plates: dict[str, tuple[np.ndarray, str]] = {}

    def _draw(self, *parts: int | str) -> int:
        return stable_hash(self.seed, *parts) % SEED_RANGE

    def _failed(self, kind: str, item: str, model: Any, exc: Exception) -> None:
        if isinstance(exc, ModelUnavailable):
            raise exc
        self.failures[kind] += 1
        self.rejections.append(_rejection(item, model, exc, f"{kind}: the sample falls back" if kind != "plate"
                                          else "plate: the raw frame is used"))

    def inpaint(self, result: CurationResult, sample_id: str) -> list[np.ndarray] | None:
        """One inpaint reference per subject (the subject kept, its surroundings repainted from a drawn background
        prompt), cropped like its crop reference; None when a call failed (counted)."""
        fill, refs = self.flux.fill, self.cfg.references
        assert fill is not None, "inpaint drawn without a fill model"
        images = []
        for k, subject in enumerate(result.subjects):
            instance = subject.instance
            prompt = refs.background_prompts[stable_hash(self.seed, "inpaint-prompt", sample_id, k)
                                              % len(refs.background_prompts)]
            self.calls["inpaint"] += 1
            try:
                if self.frames is None or instance.mask_path is None:
                    raise ValueError("no frame source or subject mask to inpaint from")
                frame = self.frames(result, instance.frame_index)
                mask = load_mask(result.resolve(instance.mask_path, self.root))
                image, _ = inpaint_reference(frame, mask, subject.bounds, fill, prompt,
                                             self._draw("inpaint", sample_id, k), refs.mask_dilation)
            except Exception as exc:
                self._failed("inpaint", f"{sample_id}/{instance.instance_id}", fill, exc)
                return None
            images.append(image)
        return images

    def redux(self, result: CurationResult, sample_id: str) -> list[np.ndarray] | None:
        """One redux variation of each subject's segment reference; None when a call failed (counted)."""
        redux = self.flux.redux
        assert redux is not None, "redux drawn without a redux model"
        images = []
        for k, subject in enumerate(result.subjects):
            self.calls["redux"] += 1
            try:
                segment = load_image(result.resolve(subject.references["segment"], self.root))
                images.append(redux_reference(segment, redux, self._draw("redux", sample_id, k)))
            except Exception as exc:
                self._failed("redux", f"{sample_id}/{subject.instance.instance_id}", redux, exc)
                return None
        return images

    def plate(self, donor: CurationResult) -> tuple[np.ndarray, str]:
        """The donor's background plate and how it was made: "inpainted" (its kept subjects painted out, one FLUX
        call per donor clip in the shard), "raw" (no fill model, or no subject on that frame) or "raw: fill
        failed" (counted)."""
        clip_id = donor.clip.clip_id
        if clip_id not in self._plates:
            frame = load_image(donor.resolve(donor.plate or "", self.root))
            fill, refs = self.flux.fill, self.cfg.references
            plate, how = frame, "raw"
            if fill is not None and donor.plate_mask:
                mask = load_mask(donor.resolve(donor.plate_mask, self.root))
                self.calls["plate"] += 1
                try:
                    plate = remove_subjects(frame, [mask], fill, refs.plate_prompt, self._draw("plate", clip_id),
                                            refs.mask_dilation)
                    how = "inpainted"
                except Exception as exc:
                    self._failed("plate", f"{clip_id}/plate", fill, exc)
                    how = "raw: fill failed"
            self._plates[clip_id] = (plate, how)
        return self._plates[clip_id]
