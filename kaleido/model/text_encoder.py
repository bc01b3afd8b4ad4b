"""The umT5 text encoder (transformers `UMT5EncoderModel`) producing Wan's zero-padded `context`.

Wan keeps only each prompt's real tokens (its last hidden states up to the attention-mask length,
</s> included) and pads with ZEROS to `text_len`, rather than feeding the encoder's outputs at pad
positions. The DiT's cross-attention has no mask, so this convention is part of the model contract.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel


@contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Hide transformers' per-shard load/save progress bars (noise for small models), then restore them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _clean(prompt: str) -> str:
    # Wan's "whitespace" cleaning: collapse runs of whitespace, strip the ends.
    return " ".join(prompt.split())


@dataclass(frozen=True)
class PromptTruncation:
    """A prompt longer than the text encoder reads: what is kept and what is lost."""

    tokens: int  # the whole prompt, </s> included
    kept: int  # text_len: what the DiT sees (the last kept position is </s>)
    dropped_text: str  # the words past the cut

    def message(self, what: str = "prompt") -> str:
        shown = self.dropped_text if len(self.dropped_text) <= 80 else self.dropped_text[:77] + "..."
        return (
            f"{what} has {self.tokens} tokens; the text encoder reads {self.kept} (model.text_len), so the last "
            f"{self.tokens - self.kept} are dropped: \"{shown}\". Shorten it to keep them"
        )

    def to_json(self) -> dict[str, int | str]:
        return {"tokens": self.tokens, "kept": self.kept, "dropped_text": self.dropped_text}


def prompt_truncation(tokenizer: PreTrainedTokenizerBase, prompt: str, text_len: int) -> PromptTruncation | None:
    """None when `prompt` fits in `text_len` tokens (</s> included), else what truncation drops.

    The encoder's own tokenization truncates to text_len - 1 tokens plus </s> (as Wan's does), so the tokens
    from position text_len - 1 on, bar the final </s>, are lost.
    """
    ids = tokenizer(_clean(prompt), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    if len(ids) <= text_len:
        return None
    dropped = tokenizer.decode(ids[text_len - 1 : -1], skip_special_tokens=True).strip()
    return PromptTruncation(len(ids), text_len, dropped)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer alone (fast: no model weights), for checking prompts before any model loads."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path}: not found")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class TextEncoder:
    """Tokenizer + umT5 encoder. `encode(prompts, text_len) -> [B, text_len, d_model]`."""

    def __init__(
        self,
        model: UMT5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        tokenizer_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TextEncoder:
        from transformers import UMT5EncoderModel

        path = Path(path)
        tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else path
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {path}: no config.json (expected a UMT5EncoderModel folder)")
        from kaleido.model.checkpoint import check_weight_files

        check_weight_files(path)  # transformers' own error on a truncated file names no file
        tokenizer = load_tokenizer(tokenizer_path)
        with quiet_hf_progress():
            model = UMT5EncoderModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        return cls(model, tokenizer, device=device, dtype=dtype)

    def to_device(self, device: str | torch.device) -> TextEncoder:
        """Move the encoder to `device` (generate.release_encoders parks it on the CPU after encoding)."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def truncation(self, prompt: str, text_len: int) -> PromptTruncation | None:
        """What `encode` would drop from `prompt` at `text_len` tokens (None when it fits)."""
        return prompt_truncation(self.tokenizer, prompt, text_len)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: list[str], text_len: int) -> torch.Tensor:
        """Prompts -> [B, text_len, d_model]: real tokens' hidden states, then zeros (Wan's `context`)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if text_len < 1:
            raise ValueError(f"text_len={text_len}: must be at least 1")
        tokens = self.tokenizer(
            [_clean(p) for p in prompts],
            padding="max_length",
            max_length=text_len,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = mask.sum(dim=1)
        # zero every position past each prompt's length (the encoder's pad outputs are not zero)
        keep = torch.arange(text_len, device=self.device)[None, :] < lengths[:, None]
        return hidden * keep[..., None].to(hidden.dtype)
