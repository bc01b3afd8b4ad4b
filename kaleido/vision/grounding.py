"""Open-vocabulary detection with Grounding DINO (transformers), loaded from a local folder.

The folder is what `save_pretrained` writes for `GroundingDinoForObjectDetection` plus its processor
(e.g. a local copy of IDEA-Research/grounding-dino-base): config.json, model.safetensors,
preprocessor/processor config and the BERT tokenizer files.

Terms are joined into one prompt "term one. term two." (the format Grounding DINO was trained on).
Each query's score for a term is the highest token probability inside that term's character span,
so a detection is attributed to exactly one input term; a query is kept when that score is above
`box_threshold` (and above `text_threshold`, Grounding DINO's threshold for a phrase token).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kaleido.vision import Detection, ImageLike, clip_box, resolve_device, to_pil

log = logging.getLogger(__name__)


def normalise_terms(terms: Sequence[str]) -> list[str]:
    """Lower-case, single-spaced, without the '.' separator; duplicates and empties dropped, order kept."""
    seen: dict[str, None] = {}
    for term in terms:
        cleaned = " ".join(str(term).replace(".", " ").lower().split())
        if cleaned:
            seen.setdefault(cleaned, None)
    return list(seen)


def build_prompt(terms: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """'a. b.' and the character span of each term in it."""
    spans, parts, cursor = [], [], 0
    for term in terms:
        spans.append((cursor, cursor + len(term)))
        parts.append(term + ".")
        cursor += len(term) + 2  # the '.' and the following space
    return " ".join(parts), spans


class GroundingDino:
    """`detect(image, terms) -> list[Detection]`, sorted by score (highest first)."""

    name = "grounding_dino"

    def __init__(
        self,
        model: Any,
        processor: Any,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        device: str = "cpu",
    ) -> None:
        self.model = model.eval().to(device)
        self.processor = processor
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.device = device
        self.max_text_len = int(getattr(model.config, "max_text_len", 256))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        device: str | None = None,
    ) -> GroundingDino:
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        from kaleido.model.text_encoder import quiet_hf_progress

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"Grounding DINO folder {path}: no config.json; point data.models.grounding_dino at a local "
                "folder written by save_pretrained (model + processor), e.g. a copy of grounding-dino-base"
            )
        with quiet_hf_progress():
            model = GroundingDinoForObjectDetection.from_pretrained(str(path), local_files_only=True)
            processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        return cls(model, processor, box_threshold, text_threshold, resolve_device(device))

    def _token_spans(self, prompt: str, spans: list[tuple[int, int]]) -> list[list[int]]:
        """Token positions of each term (via the fast tokenizer's character offsets)."""
        encoded = self.processor.tokenizer(prompt, return_offsets_mapping=True)
        positions: list[list[int]] = [[] for _ in spans]
        for index, (start, end) in enumerate(encoded["offset_mapping"]):
            if end <= start:
                continue  # special tokens carry (0, 0)
            for term_index, (t_start, t_end) in enumerate(spans):
                if start < t_end and end > t_start:
                    positions[term_index].append(index)
        return positions

    def _chunks(self, terms: list[str]) -> list[list[str]]:
        """Split the terms so each prompt fits the model's text length (long term lists)."""
        prompt, _ = build_prompt(terms)
        length = len(self.processor.tokenizer(prompt)["input_ids"])
        if length <= self.max_text_len or len(terms) == 1:
            return [terms]
        half = len(terms) // 2
        return self._chunks(terms[:half]) + self._chunks(terms[half:])

    def detect(self, image: ImageLike, terms: Sequence[str]) -> list[Detection]:
        import torch

        terms = normalise_terms(terms)
        if not terms:
            return []
        pil = to_pil(image)
        width, height = pil.size
        detections: list[Detection] = []
        for chunk in self._chunks(terms):
            prompt, spans = build_prompt(chunk)
            token_positions = self._token_spans(prompt, spans)
            inputs = self.processor(images=pil, text=prompt, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                outputs = self.model(**inputs)
            # threshold -1 keeps every query, so result rows line up with the logits' query axis
            (result,) = self.processor.post_process_grounded_object_detection(
                outputs,
                inputs["input_ids"],
                threshold=-1.0,
                text_threshold=self.text_threshold,
                target_sizes=[(height, width)],
            )
            boxes = result["boxes"].float().cpu().numpy()
            probs = outputs.logits[0].sigmoid().float().cpu().numpy()  # [queries, text tokens]
            if boxes.shape[0] != probs.shape[0]:
                raise RuntimeError(
                    f"Grounding DINO post-processing returned {boxes.shape[0]} boxes for {probs.shape[0]} queries"
                )
            term_scores = np.stack(
                [probs[:, pos].max(axis=1) if pos else np.zeros(len(probs)) for pos in token_positions], axis=1
            )
            best = term_scores.argmax(axis=1)
            scores = term_scores[np.arange(len(best)), best]
            for query in np.flatnonzero((scores > self.box_threshold) & (scores > self.text_threshold)):
                box = clip_box(boxes[query], height, width)
                if box[2] - box[0] < 1.0 or box[3] - box[1] < 1.0:
                    continue  # degenerate once clipped to the image
                detections.append(Detection(box=box, score=float(scores[query]), label=chunk[best[query]]))
        detections.sort(key=lambda d: -d.score)
        return detections
