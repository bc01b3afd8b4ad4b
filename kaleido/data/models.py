"""The curation models by pool key, built in this process or called through a Ray actor pool.

Every model stage asks for its models here by the planner's pool keys (kaleido.data.plan): `vlm` (caption),
`grounding_dino`, `sam`, `clip`, `face` (curate), `flux_fill`, `flux_redux` (pair). What it gets implements the
protocols of kaleido.vision (Detector, Segmenter, CategoryScorer, FaceDetector, Inpainter, Variator) or, for the
VLM, kaleido.data.caption.Captioner, whichever executor runs the shard:

- the local executor (processes or this process): `build_model` loads the model once per process and config
  (`local_model`), on `data.models.device`;
- Ray (`data.ray_address`): the driver starts one actor pool per model (kaleido.data.pools); a shard task runs with
  the pools installed (`installed_pools`) and `shard_model` hands back a proxy that sends each call to an actor.

`data.models.factory` ("module:function") plugs other models in: `function(key, cfg: DataConfig)` returns the model
for a key, or None for the built-in loader. It is called wherever the model is built (in a worker process or in a
pool actor), so it must be importable there. Whether a key is used at all still follows params.yaml (a null
`face` / `flux_fill` / `flux_redux` disables its step); kaleido.data.synthetic.stand_in_model is the one the tests
and benchmarks use.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kaleido.config.schema import DataConfig, Params

MODEL_KEYS = ("vlm", "grounding_dino", "sam", "clip", "face", "flux_fill", "flux_redux")
CURATE_KEYS = ("grounding_dino", "sam", "clip", "face")
FLUX_KEYS = ("flux_fill", "flux_redux")


class ModelUnavailable(RuntimeError):
    """A model service is gone (its pool's actors died past their restarts, or the pool was torn down).

    Model code catches model errors and rejects the one item; this error must never be caught that way: it fails
    the shard (the stage reports it and a re-run redoes the shard), never a silent per-item rejection."""


def configured(key: str, params: Params) -> bool:
    """Whether the configured curation uses pool `key` (a null optional model disables its step)."""
    m = params.data.models
    if key == "vlm":
        return params.data.caption.captioner == "vlm"
    if key in ("face", "flux_fill", "flux_redux"):
        return getattr(m, key) is not None
    return key in MODEL_KEYS


def _factory(cfg: DataConfig) -> Any:
    spec = cfg.models.factory
    if not spec:
        return None
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"data.models.factory={spec!r}: cannot import it ({exc}); give 'module:function' that the "
                         "workers (and Ray nodes) can import") from None


def _required(path: Path | None, key: str, what: str) -> Path:
    if path is None:
        raise ValueError(
            f"data.models.{key} is null: curation needs {what}; set it to a local path "
            "(or run `kaleido init-tiny` and use the tiny random-weight models)"
        )
    return path


def build_model(key: str, cfg: DataConfig, params: Params | None = None, device: str | None = None) -> Any:
    """Build pool `key`'s model from local paths (relative ones resolve against params.yaml's folder), or through
    data.models.factory. Raises ValueError naming the key when a required model is not configured."""
    factory = _factory(cfg)
    if factory is not None:
        model = factory(key, cfg)
        if model is not None:
            return model

    def resolve(path: Path | None) -> Path | None:
        return params.resolve(path) if params is not None else path

    m, refs = cfg.models, cfg.references
    device = device or m.device
    if key == "grounding_dino":
        from kaleido.vision.grounding import GroundingDino

        return GroundingDino.from_pretrained(
            _required(resolve(m.grounding_dino), "grounding_dino", "Grounding DINO (transformers folder)"),
            box_threshold=cfg.grounding.box_threshold, text_threshold=cfg.grounding.text_threshold, device=device,
        )
    if key == "sam":
        from kaleido.vision.segmentation import SamSegmenter

        return SamSegmenter.from_checkpoint(_required(resolve(m.sam), "sam", "a SAM checkpoint (.pth)"),
                                            sam_type=m.sam_type, device=device)
    if key == "clip":
        from kaleido.vision.clip import ClipScorer

        return ClipScorer.from_pretrained(_required(resolve(m.clip), "clip", "an open_clip checkpoint"),
                                          arch=m.clip_arch, device=device)
    if key == "face":
        from kaleido.vision import resolve_device
        from kaleido.vision.faces import InsightFaceDetector

        return InsightFaceDetector(resolve(_required(m.face, "face", "an insightface model root")),
                                   model_name=m.face_model, device=resolve_device(device))
    if key == "flux_fill":
        from kaleido.vision.flux import FluxInpainter

        return FluxInpainter.from_pretrained(
            resolve(_required(m.flux_fill, "flux_fill", "a FluxFillPipeline folder")), device, m.flux_dtype,
            refs.inpaint_steps, refs.inpaint_guidance, refs.flux_max_side,
        )
    if key == "flux_redux":
        from kaleido.vision.flux import FluxRedux

        return FluxRedux.from_pretrained(
            resolve(_required(m.flux_redux, "flux_redux", "a FluxPriorReduxPipeline folder")),
            _required(resolve(m.flux_base), "flux_base", "the base FluxPipeline that Redux feeds"),
            device, m.flux_dtype, refs.redux_steps, refs.redux_guidance, refs.redux_size,
        )
    if key == "vlm":
        from kaleido.data.caption import cached_vlm

        caption = cfg.caption
        model_dir = resolve(caption.vlm)
        if model_dir is None:
            raise ValueError("data.caption.captioner is 'vlm' but data.caption.vlm (a local model folder) is not set")
        return cached_vlm(model_dir, caption.max_new_tokens, caption.frames, caption.prompt, str(caption.vlm))
    raise KeyError(f"unknown model pool {key!r}; one of {', '.join(MODEL_KEYS)}")


_LOCAL: dict[str, Any] = {}


def local_model(key: str, params: Params) -> Any:
    """`build_model(key, params.data, params)` once per process and model config (a worker runs many shards). The
    VLM is cached by kaleido.data.caption.cached_vlm itself."""
    if key == "vlm":
        return build_model(key, params.data, params)
    config = json.dumps({"key": key, "models": params.data.models.model_dump(mode="json"),
                         "caption": params.data.caption.model_dump(mode="json") if key == "vlm" else None,
                         "refs": params.data.references.model_dump(mode="json") if key in FLUX_KEYS else None,
                         "grounding": params.data.grounding.model_dump(mode="json")}, sort_keys=True, default=str)
    if config not in _LOCAL:
        for stale in [k for k in _LOCAL if json.loads(k)["key"] == key]:
            del _LOCAL[stale]  # one config of a model in memory at a time
        _LOCAL[config] = build_model(key, params.data, params)
    return _LOCAL[config]


_INSTALLED: dict[str, Any] = {}  # key -> proxy, while a Ray shard task runs with the stage's pools


@contextmanager
def installed_pools(proxies: dict[str, Any] | None) -> Iterator[None]:
    """Within the block, `shard_model` answers the keys of `proxies` with them (a Ray task's models)."""
    saved = dict(_INSTALLED)
    _INSTALLED.update(proxies or {})
    try:
        yield
    finally:
        _INSTALLED.clear()
        _INSTALLED.update(saved)


def pools_installed() -> bool:
    return bool(_INSTALLED)


def shard_model(key: str, params: Params) -> Any:
    """The model a shard function calls: the installed pool's proxy on Ray, else the process's own model."""
    if key in _INSTALLED:
        return _INSTALLED[key]
    return local_model(key, params)
