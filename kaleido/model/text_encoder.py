"""The umT5 text encoder (transformers `UMT5EncoderModel`) producing Wan's zero-padded `context`.

Wan keeps only each prompt's real tokens (its last hidden states up to the attention-mask length,
</s> included) and pads with ZEROS to `text_len`, rather than feeding the encoder's outputs at pad
positions. The DiT's cross-attention has no mask, so this convention is part of the model contract.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
        from transformers import AutoTokenizer, UMT5EncoderModel

        path = Path(path)
        tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else path
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {path}: no config.json (expected a UMT5EncoderModel folder)")
        if not tokenizer_path.is_dir():
            raise FileNotFoundError(f"tokenizer folder {tokenizer_path}: not found")
        with quiet_hf_progress():
            model = UMT5EncoderModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
        return cls(model, tokenizer, device=device, dtype=dtype)

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
