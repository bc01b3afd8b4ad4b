"""CLIP image / text embeddings with open_clip, loaded from local files only.

`data.models.clip` may be
- a checkpoint FILE (open_clip_pytorch_model.bin / .safetensors / OpenAI .pt) for the built-in
  architecture named by `data.models.clip_arch` (e.g. "ViT-B-32"), or
- a FOLDER holding open_clip_config.json plus the weights (the layout of the open_clip releases on
  the Hugging Face hub, copied locally); `clip_arch` is then ignored.
The tokenizer is open_clip's SimpleTokenizer, whose BPE vocabulary ships inside the wheel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kaleido.vision import ImageLike, resolve_device, to_pil

PROMPT = "a photo of a {category}"


def category_prompt(category: str) -> str:
    return PROMPT.format(category=category)


class ClipScorer:
    """Normalised CLIP embeddings; `category_score` = cosine(image, "a photo of a {category}")."""

    name = "clip"

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self._text_cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, arch: str = "ViT-B-32", device: str | None = None) -> ClipScorer:
        import open_clip

        path = Path(path)
        device = resolve_device(device)
        if path.is_dir():
            if not (path / "open_clip_config.json").is_file():
                raise FileNotFoundError(
                    f"CLIP folder {path}: no open_clip_config.json; point data.models.clip at that folder or at a "
                    f"checkpoint file for data.models.clip_arch={arch!r}"
                )
            name = f"local-dir:{path}"
            model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, pretrained_text=False)
        elif path.is_file():
            name = arch
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=str(path), device=device, pretrained_text=False
            )
        else:
            raise FileNotFoundError(
                f"CLIP checkpoint {path}: not found; point data.models.clip at a local open_clip checkpoint file "
                f"(for data.models.clip_arch={arch!r}) or a folder with open_clip_config.json"
            )
        return cls(model, preprocess, open_clip.get_tokenizer(name), device)

    def image_embeddings(self, images: Sequence[ImageLike]) -> np.ndarray:
        """L2-normalised image embeddings [N, D] (float32)."""
        import torch

        if len(images) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        batch = torch.stack([self.preprocess(to_pil(image)) for image in images]).to(self.device)
        with torch.inference_mode():
            features = self.model.encode_image(batch).float()
        return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings [N, D]; repeated texts are served from a cache."""
        import torch

        missing = [text for text in dict.fromkeys(texts) if text not in self._text_cache]
        if missing:
            tokens = self.tokenizer(missing).to(self.device)
            with torch.inference_mode():
                features = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
            for text, row in zip(missing, features.cpu().numpy(), strict=True):
                self._text_cache[text] = row
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return np.stack([self._text_cache[text] for text in texts])

    @property
    def embed_dim(self) -> int:
        projection = getattr(self.model.visual, "output_dim", None)
        return int(projection) if projection is not None else int(self.model.text_projection.shape[1])

    def category_score(self, image: ImageLike, category: str) -> float:
        image_vec = self.image_embeddings([image])[0]
        text_vec = self.text_embeddings([category_prompt(category)])[0]
        return float(np.dot(image_vec, text_vec))

    def category_scores(self, images: Sequence[ImageLike], categories: Sequence[str]) -> list[float]:
        """`category_score` of each (image, category) pair, the images embedded in ONE forward pass (the batch a
        Ray pool actor gathers, kaleido.data.pools). The float32 sums of a batch may differ from one-by-one calls in
        the last bits on some BLAS back ends (tests/test_pools.py bounds it on the tiny CLIP)."""
        image_vecs = self.image_embeddings(list(images))
        text_vecs = self.text_embeddings([category_prompt(category) for category in categories])
        return [float(np.dot(i, t)) for i, t in zip(image_vecs, text_vecs, strict=True)]

    def image_similarity(self, a: ImageLike, b: ImageLike) -> float:
        """Cosine similarity of two images' CLIP embeddings."""
        first, second = self.image_embeddings([a, b])
        return float(np.dot(first, second))

    def similarity_matrix(self, images_a: Sequence[ImageLike], images_b: Sequence[ImageLike]) -> np.ndarray:
        """Cosine similarities [len(a), len(b)] (S2V consistency: frames x references)."""
        return self.image_embeddings(images_a) @ self.image_embeddings(images_b).T
