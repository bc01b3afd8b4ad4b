"""What a DiT's forward depends on beyond its tensor shapes, carried with its weights.

The shapes give the DiTConfig (dims, heads, layers; `checkpoint.read_config`). They do not say how the references
were placed (R-RoPE variant and offset), how many text tokens the DiT saw (text_len: the zero-padded tokens go
through the text embedding and the cross-attention, so the length changes the output) or how many references it was
trained with. A model trained with R-RoPE `none` and run as `shift_wh` is a different function (issue 23 measured
val loss 2.44 instead of 0.31), so every export we write records these `ModelSettings` next to the weights
(`_kaleido` in config.json, or in the metadata of a single .safetensors file; diffusers and Wan ignore keys that
start with `_`), and every loader follows them.

Who decides when params.yaml disagrees (`resolve_settings`):
- running a model (generate, evaluate, serve, gate, register): the checkpoint. The weights compute the function
  they were trained as; params.yaml's `model.rope` / `model.text_len` are the defaults for checkpoints that say
  nothing (Wan2.1, the official Kaleido release). A disagreeing params.yaml is overridden with a warning naming both
  values, not refused: one params.yaml must be able to run a candidate and a champion (or Table 2's ablations) that
  were trained differently, and refusing would only make the user type the one value that works.
- training: params.yaml. It says what is being trained (a fine-tune may change the variant on purpose: a
  text-to-video model fine-tuned as `shift_wh`); the change from the init's settings is logged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kaleido.config import Params

log = logging.getLogger(__name__)

SETTINGS_KEY = "_kaleido"  # in config.json (Wan / diffusers) and in the embedded config of a .safetensors file


@dataclass(frozen=True)
class ModelSettings:
    """The forward's settings besides the DiTConfig. Defaults: the shipped Kaleido-14B-S2V."""

    rope_variant: str = "shift_wh"  # kaleido.model.rope.ROPE_VARIANTS
    rope_offset: int = 80  # latent patches; official max_h = max_w = 80
    text_len: int = 512  # text tokens (zero-padded), Wan: 512
    max_references: int = 3  # official max_subjects

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> ModelSettings:
        """ValueError naming `source` for an unknown variant, a missing key or a non-integer size."""
        from kaleido.model.rope import ROPE_VARIANTS

        try:
            settings = cls(rope_variant=str(data["rope_variant"]), rope_offset=int(data["rope_offset"]),
                           text_len=int(data["text_len"]), max_references=int(data["max_references"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: damaged model settings {data!r} ({exc}); export the model again") from None
        if settings.rope_variant not in ROPE_VARIANTS:
            raise ValueError(f"{source}: model settings name R-RoPE variant {settings.rope_variant!r}, which this "
                             f"version does not know ({', '.join(ROPE_VARIANTS)})")
        return settings

    @classmethod
    def from_params(cls, params: Params) -> ModelSettings:
        model = params.model
        return cls(model.rope.variant, model.rope.offset, model.text_len, model.max_references)

    def differences(self, other: ModelSettings) -> list[tuple[str, Any, Any]]:
        """(params.yaml key, self's value, other's value) for every field that differs."""
        keys = {"rope_variant": "model.rope.variant", "rope_offset": "model.rope.offset",
                "text_len": "model.text_len", "max_references": "model.max_references"}
        return [(keys[f.name], getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]


def settings_from_config(data: dict[str, Any], source: str) -> ModelSettings | None:
    """The settings block of a parsed config.json (or embedded config), None when it has none."""
    block = data.get(SETTINGS_KEY)
    return None if block is None else ModelSettings.from_dict(block, source)


def settings_from_metadata(meta: dict[str, str], source: str) -> ModelSettings | None:
    """The settings a LoRA adapter file carries in its metadata (`kaleido_lora` JSON, key `model_settings`)."""
    extra = json.loads(meta.get("kaleido_lora", "{}") or "{}")
    block = extra.get("model_settings")
    if isinstance(block, str):
        block = json.loads(block)
    return None if block is None else ModelSettings.from_dict(block, source)


def resolve_settings(recorded: ModelSettings | None, requested: ModelSettings, where: str,
                     purpose: str = "run") -> ModelSettings:
    """The settings to build the model with: `recorded` (what the checkpoint at `where` was trained with) or
    `requested` (params.yaml). See the module docstring for who decides.

    purpose "run": the recorded settings win; each disagreement is logged as a warning naming both values.
    purpose "train": the requested settings win; each change from the init's is logged (info).
    """
    if recorded is None:
        return requested
    changes = recorded.differences(requested)
    if purpose == "train":
        for key, theirs, ours in changes:
            log.info("%s: %s=%r here, the init %s was trained with %r; training with %r", key, key, ours, where,
                     theirs, ours)
        return requested
    for key, theirs, ours in changes:
        log.warning("%s: params.yaml says %r but %s was trained with %r; running it with %r (a model only computes "
                    "what it was trained as; set %s: %r to silence this)", key, ours, where, theirs, theirs, key,
                    theirs)
    return recorded
