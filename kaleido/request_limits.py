"""One cost model and one set of limits for every request to a model, checked before any model work.

The served endpoint (`kaleido serve`, pyfunc `predict`), the `kaleido/generate` deployment and `kaleido generate`
all call `check_request`: a request that would exceed a limit is refused with a message naming the limit
(`serve.<key>` in params.yaml), the request's figure and the fix. Nothing here loads a model or torch.

Cost (the DiT's work dominates a generation; Wan2.1's VAE stride (4, 8, 8) and patch (1, 2, 2)):
  latent frames      = (frames - 1) / 4 + 1
  tokens per frame   = (height / 16) x (width / 16)
  tokens             = (latent frames + references) x tokens per frame   (each reference is one latent frame)
  token-steps        = tokens x steps x branches                         (2 branches with CFG: guidance != 1)
`tokens` bounds memory (activations, the latents, the VAE decode: one token is 4 x 16 x 16 = 1,024 pixels of
video); `token-steps` bounds time (attention makes a step super-linear in tokens, which max_tokens caps). A request
of several rows (one video each, generated one after another) is bounded by the sum of its rows' token-steps
(`check_total`): max_token_steps is the time of one request, whatever its number of rows.
Text fields are checked for NUL and control characters (a NUL cannot even be passed to a subprocess).
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kaleido.config import Params

TEMPORAL_STRIDE = 4  # Wan VAE: 4 frames per latent frame (after the first)
PIXELS_PER_TOKEN_SIDE = 16  # VAE stride 8 x DiT patch 2


class LimitError(ValueError):
    """A request over a limit, or a text field with a control character; the message names the field or the
    limit (`serve.<key>`), the request's figure and the fix."""


@dataclass(frozen=True)
class RequestCost:
    """The work of one generation, in DiT tokens."""

    frames: int
    height: int
    width: int
    steps: int
    references: int
    cfg: bool

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // TEMPORAL_STRIDE + 1

    @property
    def tokens_per_frame(self) -> int:
        return (self.height // PIXELS_PER_TOKEN_SIDE) * (self.width // PIXELS_PER_TOKEN_SIDE)

    @property
    def tokens(self) -> int:
        """Video plus reference tokens: the DiT's sequence length at every step."""
        return (self.latent_frames + self.references) * self.tokens_per_frame

    @property
    def token_steps(self) -> int:
        return self.tokens * self.steps * (2 if self.cfg else 1)

    def describe(self) -> str:
        refs = f" + {self.references} reference{'s' if self.references != 1 else ''}" if self.references else ""
        return (f"{self.frames} frames at {self.height}x{self.width}{refs} = {self.tokens:,} tokens per step "
                f"({self.latent_frames} latent frames{refs} x {self.tokens_per_frame:,}), x {self.steps} steps"
                f"{' x 2 (CFG)' if self.cfg else ''} = {self.token_steps:,} token-steps")


@dataclass(frozen=True)
class Limits:
    """serve.max_* of params.yaml (a registered version carries the values it was registered with)."""

    max_tokens: int
    max_token_steps: int
    max_prompt_chars: int
    max_image_bytes: int

    @classmethod
    def from_params(cls, params: Params) -> Limits:
        s = params.serve
        return cls(s.max_tokens, s.max_token_steps, s.max_prompt_chars, s.max_image_bytes)

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> Limits:
        """From a version's model_config["limits"]; a version registered before limits existed gets the schema's
        (shipped) defaults, never none."""
        from kaleido.config.schema import ServeConfig

        defaults = ServeConfig()
        given = config or {}
        return cls(*(int(given.get(key, getattr(defaults, key))) for key in cls.__dataclass_fields__))

    def to_config(self) -> dict[str, int]:
        return asdict(self)


def check_text(what: str, value: Any, *, multiline: bool = True, max_chars: int | None = None,
               limit_key: str = "serve.max_prompt_chars") -> str:
    """`value` as a string without NUL or other control characters (newlines and tabs allowed when `multiline`),
    at most `max_chars` long. LimitError naming `what` and the first bad character's position."""
    if not isinstance(value, str):
        raise LimitError(f"{what}: expected text, got {type(value).__name__}")
    allowed = "\n\t\r" if multiline else ""
    for position, char in enumerate(value):
        if char not in allowed and unicodedata.category(char) == "Cc":
            raise LimitError(f"{what}: control character U+{ord(char):04X} at position {position}; send plain text "
                             f"(no NUL or control characters{'' if multiline else ', no line breaks'})")
    if max_chars is not None and len(value) > max_chars:
        raise LimitError(f"{what}: {len(value):,} characters, the limit is {max_chars:,} ({limit_key}); shorten it")
    return value


def check_cost(cost: RequestCost, limits: Limits) -> None:
    """LimitError when a generation's tokens or token-steps exceed the limits."""
    if cost.tokens > limits.max_tokens:
        raise LimitError(
            f"request too large: {cost.describe()}; serve.max_tokens is {limits.max_tokens:,} tokens per step. Lower "
            "frames, height, width or the number of references (or raise serve.max_tokens where the GPU's memory "
            "allows)")
    if cost.token_steps > limits.max_token_steps:
        raise LimitError(
            f"request too large: {cost.describe()}; serve.max_token_steps is {limits.max_token_steps:,}. Lower steps "
            "or the video's size (or raise serve.max_token_steps; long generations belong to the kaleido/generate "
            "deployment)")


def check_total(costs: list[RequestCost], limits: Limits) -> None:
    """LimitError when the rows of one request (one generation each, one after another) together exceed
    serve.max_token_steps: the time a request may take does not grow with its number of rows."""
    total = sum(cost.token_steps for cost in costs)
    if len(costs) > 1 and total > limits.max_token_steps:
        fits = sum(1 for spent in accumulate(cost.token_steps for cost in costs) if spent <= limits.max_token_steps)
        raise LimitError(
            f"request too large: {len(costs)} rows (one video each) cost {total:,} token-steps in all "
            f"({costs[0].token_steps:,} for row 0: {costs[0].describe()}); serve.max_token_steps is "
            f"{limits.max_token_steps:,} per request, all rows together. Send at most {fits} of these rows per request "
            "(or lower steps or the video's size)")


def check_image_bytes(what: str, size: int, limits: Limits) -> None:
    if size > limits.max_image_bytes:
        raise LimitError(f"{what}: {size:,} bytes, the limit is {limits.max_image_bytes:,} (serve.max_image_bytes); "
                         "send a smaller image (references are resized to the video anyway)")


def check_request(limits: Limits, prompt: Any, negative_prompt: Any, frames: int, height: int, width: int,
                  steps: int, guidance_scale: float, references: int, what: str = "") -> RequestCost:
    """Every cheap check of one generation: text fields, then its cost. Returns the cost; LimitError otherwise.

    `what` prefixes the field names (e.g. "row 2: ")."""
    check_text(f"{what}prompt", prompt, max_chars=limits.max_prompt_chars)
    if not prompt.strip():
        raise LimitError(f"{what}prompt is empty; describe the video to generate")
    check_text(f"{what}negative_prompt", negative_prompt, max_chars=limits.max_prompt_chars)
    cost = RequestCost(int(frames), int(height), int(width), int(steps), int(references), float(guidance_scale) != 1.0)
    check_cost(cost, limits)
    return cost
