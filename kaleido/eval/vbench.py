"""The five VBench video-quality metrics and the text-alignment score, with VBench's preprocessing.

Frames are uint8 [T, H, W, 3] RGB, exactly what the S2V pipeline returns (VBench decodes its mp4s to
the same uint8 tensors). Preprocessing follows VBench's transforms on uint8 tensors:
- DINO: resize so the SHORT side is 224 (bilinear, no antialias), no crop, /255, ImageNet mean/std;
  the ViT interpolates its position embeddings to the resulting grid (timm `dynamic_img_size`; timm
  resamples them bicubically as DINO does, without DINO's +0.1 offset: tiny numeric differences).
- CLIP: resize short side to the model's input size (224 for ViT-B/32 and ViT-L/14; bicubic, no
  antialias), centre crop, /255, CLIP mean/std.
- MUSIQ: when the LONG side exceeds 512, resize it to 512 (bilinear, no antialias); /255.
Every model loads from a local path; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from kaleido.eval.interpolation import FrameInterpolator
from kaleido.eval.metrics import interpolation_error_score, normalise_rows, temporal_consistency
from kaleido.vision import resolve_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DINO_SHORT_SIDE = 224
MUSIQ_LONG_SIDE = 512
VICLIP_FRAMES = 8
BATCH = 16  # frames per forward: bounds activation memory for 81-frame 480p videos


def check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise ValueError(f"expected uint8 frames [T, H, W, 3] with T >= 1, got {frames.dtype} {tuple(frames.shape)}")
    return frames


def _to_tensor(frames: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(check_frames(frames))).permute(0, 3, 1, 2)  # uint8 [T, 3, H, W]


def _normalise(batch: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    import torch

    x = batch.float().div(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def dino_preprocess(frames: np.ndarray, short_side: int = DINO_SHORT_SIDE) -> Any:
    """VBench `dino_transform`: uint8 resize (short side, bilinear, no antialias), /255, ImageNet norm."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    resized = TF.resize(_to_tensor(frames), short_side, interpolation=InterpolationMode.BILINEAR, antialias=False)
    return _normalise(resized, IMAGENET_MEAN, IMAGENET_STD)


def clip_preprocess(
    frames: np.ndarray, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> Any:
    """VBench `clip_transform`: uint8 resize (short side, bicubic, no antialias), centre crop, /255, CLIP norm."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    resized = TF.resize(_to_tensor(frames), size, interpolation=InterpolationMode.BICUBIC, antialias=False)
    return _normalise(TF.center_crop(resized, [size, size]), mean, std)


def musiq_preprocess(frames: np.ndarray, long_side: int = MUSIQ_LONG_SIDE) -> Any:
    """VBench imaging-quality 'longer' mode: shrink so the long side is at most 512, then /255."""
    from torchvision.transforms import functional as TF

    batch = _to_tensor(frames)
    height, width = batch.shape[-2:]
    if max(height, width) > long_side:
        scale = long_side / max(height, width)
        batch = TF.resize(batch, [int(scale * height), int(scale * width)], antialias=False)
    return batch.float().div(255.0)


@runtime_checkable
class FrameFeatures(Protocol):
    """Per-frame image features for the consistency metrics."""

    def frame_features(self, frames: np.ndarray) -> np.ndarray:
        """L2-normalised features [T, D] of uint8 frames [T, H, W, 3]."""
        ...


# ---- backbones ------------------------------------------------------------------------------------


class DinoFeatures:
    """DINO ViT features (timm) for subject consistency: the class token after the final norm."""

    name = "dino"

    def __init__(self, model: Any, source: str, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.source = source
        self.device = device

    @classmethod
    def from_pretrained(
        cls, path: str | Path, arch: str = "vit_base_patch16_224.dino", device: str | None = None
    ) -> DinoFeatures:
        """`path`: a timm folder (config.json + weights, the Hub layout) or a weights file for `arch`."""
        import timm

        path = Path(path)
        device = resolve_device(device)
        # dynamic_img_size: VBench feeds short-side-224 frames of any aspect ratio (DINO interpolates
        # its position embeddings the same way); num_classes=0 returns the pooled class token.
        options: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True}
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"DINO folder {path}: no config.json; point eval.models.dino at a local copy of the timm "
                    f"model folder (e.g. timm/vit_base_patch16_224.dino) or at a weights file for {arch}"
                )
            model = timm.create_model(f"local-dir:{path}", pretrained=True, **options)
        elif path.is_file():
            model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **options)
        else:
            raise FileNotFoundError(
                f"DINO weights {path}: not found; point eval.models.dino at a local timm folder or weights file"
            )
        return cls(model, f"timm {arch if path.is_file() else path.name} from {path}", device)

    def describe(self) -> str:
        return f"DINO ViT ({self.source})"

    def frame_features(self, frames: np.ndarray) -> np.ndarray:
        import torch

        batch = dino_preprocess(frames)
        # DINO's stride-16 patch conv drops a partial last row/column of patches; timm asserts instead
        # (or pads), so crop to whole patches first: the same tokens DINO sees.
        patch_h, patch_w = self.model.patch_embed.patch_size
        height, width = batch.shape[-2:]
        batch = batch[..., : height - height % patch_h, : width - width % patch_w]
        outputs = []
        with torch.inference_mode():
            for start in range(0, batch.shape[0], BATCH):
                outputs.append(self.model(batch[start : start + BATCH].to(self.device)).float().cpu())
        return normalise_rows(torch.cat(outputs).numpy())


class ClipFeatures:
    """open_clip image features with VBench's CLIP preprocessing (background consistency, aesthetics)."""

    name = "clip"

    def __init__(self, model: Any, source: str, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.source = source
        self.device = device
        size = getattr(model.visual, "image_size", 224)
        self.size = int(size[0] if isinstance(size, tuple | list) else size)
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", CLIP_MEAN))
        self.std = tuple(cfg.get("std", CLIP_STD))

    @classmethod
    def from_scorer(cls, scorer: Any, source: str) -> ClipFeatures:
        """Share the model of a kaleido.vision ClipScorer (no second copy in memory)."""
        return cls(scorer.model, source, scorer.device)

    def describe(self) -> str:
        return f"CLIP {self.source}"

    def embed_dim(self) -> int:
        return int(getattr(self.model.visual, "output_dim", 0) or self.model.text_projection.shape[1])

    def frame_features(self, frames: np.ndarray) -> np.ndarray:
        import torch

        batch = clip_preprocess(frames, self.size, self.mean, self.std)
        outputs = []
        with torch.inference_mode():
            for start in range(0, batch.shape[0], BATCH):
                outputs.append(self.model.encode_image(batch[start : start + BATCH].to(self.device)).float().cpu())
        return normalise_rows(torch.cat(outputs).numpy())


class AestheticPredictor:
    """LAION aesthetic predictor: Linear(embed_dim -> 1) on normalised CLIP ViT-L/14 image embeddings."""

    def __init__(self, features: ClipFeatures, head: Any, source: str) -> None:
        self.features = features
        self.head = head.eval()
        self.source = source

    @classmethod
    def from_files(cls, features: ClipFeatures, head_path: str | Path) -> AestheticPredictor:
        import torch

        head_path = Path(head_path)
        if not head_path.is_file():
            raise FileNotFoundError(
                f"aesthetic head {head_path}: not found; point eval.models.aesthetic_head at a local copy of "
                "LAION's sa_0_4_vit_l_14_linear.pth"
            )
        state = torch.load(str(head_path), map_location="cpu", weights_only=True)
        if "weight" not in state or "bias" not in state:
            raise ValueError(f"aesthetic head {head_path}: expected a Linear state dict (weight, bias)")
        out_features, in_features = state["weight"].shape
        dim = features.embed_dim()
        if out_features != 1 or in_features != dim:
            raise ValueError(
                f"aesthetic head {head_path} is Linear({in_features} -> {out_features}) but the CLIP model gives "
                f"{dim}-dim embeddings; LAION's head needs CLIP ViT-L/14 (768) at eval.models.aesthetic_clip"
            )
        head = torch.nn.Linear(in_features, 1)
        head.load_state_dict(state)
        return cls(features, head, str(head_path))

    def describe(self) -> str:
        return f"LAION linear head {self.source} on {self.features.describe()}"

    def frame_scores(self, frames: np.ndarray) -> np.ndarray:
        import torch

        embeddings = torch.from_numpy(self.features.frame_features(frames)).float()
        with torch.inference_mode():
            return self.head(embeddings)[:, 0].numpy() / 10.0


def _musiq_config(state: dict[str, Any]) -> dict[str, Any]:
    """MUSIQ constructor arguments read from a checkpoint's shapes (pyiqa's SPAQ checkpoint -> its defaults)."""
    prefix = "transformer_encoder.transformer.encoderblock_"
    hidden = int(state["embedding.weight"].shape[0])
    layers = {int(key[len(prefix) :].split(".")[0]) for key in state if key.startswith(prefix)}
    head = state.get("head.weight", state.get("head.0.weight"))
    grid = round(state["transformer_encoder.posembed_input.position_emb"].shape[1] ** 0.5)
    return {
        "hidden_size": hidden,
        "mlp_dim": int(state[f"{prefix}0.mlp.fc1.weight"].shape[0]),
        "num_heads": max(1, hidden // 64),  # MUSIQ's attention heads are 64 wide (384 -> 6 heads)
        "num_layers": len(layers),
        "num_class": int(head.shape[0]) if head is not None else 1,
        "spatial_pos_grid_size": grid,
        "num_scales": int(state["transformer_encoder.scaleembed_input.scale_emb"].shape[0]),
    }


class MusiqScorer:
    """MUSIQ (pyiqa architecture) from a local checkpoint; VBench uses the SPAQ weights."""

    def __init__(self, model: Any, source: str, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.source = source
        self.device = device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None) -> MusiqScorer:
        import torch
        from pyiqa.archs.musiq_arch import MUSIQ

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"MUSIQ checkpoint {path}: not found; point eval.models.musiq at a local copy of pyiqa's "
                "musiq_spaq_ckpt-358bb6af.pth"
            )
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("params", state)  # basicsr-style wrapper
        state = {key.removeprefix("module."): value for key, value in state.items()}
        try:
            config = _musiq_config(state)
        except KeyError:
            raise ValueError(f"MUSIQ checkpoint {path}: not a pyiqa MUSIQ state dict") from None
        # pretrained=False: pyiqa would otherwise fetch its default (AVA) weights from the network
        model = MUSIQ(pretrained=False, **config)
        model.load_state_dict(state)
        return cls(model, str(path), resolve_device(device))

    def describe(self) -> str:
        return f"MUSIQ (pyiqa) {self.source}"

    def frame_scores(self, frames: np.ndarray) -> np.ndarray:
        import torch

        batch = musiq_preprocess(frames)
        scores = []
        with torch.inference_mode():
            for start in range(0, batch.shape[0], BATCH):
                scores.append(self.model(batch[start : start + BATCH].to(self.device)).float().reshape(-1).cpu())
        return torch.cat(scores).numpy()


# ---- metrics --------------------------------------------------------------------------------------


def subject_consistency(frames: np.ndarray, features: FrameFeatures) -> float:
    return temporal_consistency(features.frame_features(check_frames(frames)))


def background_consistency(frames: np.ndarray, features: FrameFeatures) -> float:
    return temporal_consistency(features.frame_features(check_frames(frames)))


def motion_smoothness(frames: np.ndarray, interpolator: FrameInterpolator) -> float:
    """Interpolate each odd frame from its even neighbours and score the error (VBench, AMT-S there)."""
    frames = check_frames(frames)
    evens = frames[0::2]
    predicted = [interpolator.interpolate(evens[i], evens[i + 1]) for i in range(len(evens) - 1)]
    return interpolation_error_score(frames[1::2], predicted)


def aesthetic_quality(frames: np.ndarray, predictor: AestheticPredictor) -> float:
    return float(np.mean(predictor.frame_scores(check_frames(frames))))


def imaging_quality(frames: np.ndarray, scorer: MusiqScorer) -> float:
    return float(np.mean(scorer.frame_scores(check_frames(frames)))) / 100.0


def middle_frame_indices(num_frames: int, count: int = VICLIP_FRAMES) -> list[int]:
    """VBench's 'middle' sampling: split [0, T) into `count` intervals and take each one's middle."""
    count = min(count, num_frames)
    edges = np.linspace(0, num_frames, count + 1).astype(int)
    return [int((edges[i] + edges[i + 1] - 1) // 2) for i in range(count)]


# ---- text alignment -------------------------------------------------------------------------------


@runtime_checkable
class TextVideoScorer(Protocol):
    metric: str  # metrics.json key: viclip_score or clip_text_score
    label: str  # what the report prints

    def score(self, frames: np.ndarray, text: str) -> float: ...


class ClipTextScorer:
    """CLIP image-text cosine averaged over frames: the labelled fallback when no ViCLIP is given."""

    metric = "clip_text_score"

    def __init__(self, scorer: Any, features: ClipFeatures) -> None:
        self.scorer = scorer  # kaleido.vision.clip.ClipScorer: tokenizer + text tower
        self.features = features
        self.label = f"CLIP image-text score ({features.describe()}); ViCLIP weights not given"

    def describe(self) -> str:
        return self.label

    def score(self, frames: np.ndarray, text: str) -> float:
        image = self.features.frame_features(check_frames(frames))
        prompt = self.scorer.text_embeddings([text])[0]
        return float(np.mean(image @ prompt))


class ViClipScorer:
    """ViCLIP as a TorchScript export from a local file (we do not rebuild the ViCLIP architecture).

    The module must expose `encode_vision(video)` (video [1, 8, 3, 224, 224], CLIP-normalised) and
    `encode_text(tokens)` (CLIP BPE token ids [1, L], L = its `context_length` attribute, default 32:
    ViCLIP's text length); both return embeddings that are L2-normalised here.
    """

    metric = "viclip_score"

    def __init__(self, module: Any, source: str, device: str = "cpu", size: int = 224) -> None:
        self.module = module
        self.source = source
        self.device = device
        self.size = size
        self.context_length = int(getattr(module, "context_length", 32))
        self.label = f"ViCLIP (TorchScript {source})"

    @classmethod
    def from_file(cls, path: str | Path, device: str | None = None) -> ViClipScorer:
        import torch

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"ViCLIP {path}: not found; eval.models.viclip must be a TorchScript file exposing encode_vision "
                "and encode_text, or null to use the labelled CLIP image-text score"
            )
        device = resolve_device(device)
        module = torch.jit.load(str(path), map_location=device).eval()
        for method in ("encode_vision", "encode_text"):
            if not hasattr(module, method):
                raise ValueError(f"ViCLIP {path}: the TorchScript module has no {method}() method")
        size = int(getattr(module, "image_size", 224))
        return cls(module, str(path), device, size)

    def describe(self) -> str:
        return self.label

    def score(self, frames: np.ndarray, text: str) -> float:
        import open_clip
        import torch

        frames = check_frames(frames)
        picked = frames[middle_frame_indices(len(frames))]
        video = clip_preprocess(picked, self.size)[None].to(self.device)
        tokens = open_clip.tokenize([text], context_length=self.context_length).to(self.device)
        with torch.inference_mode():
            vision = torch.nn.functional.normalize(self.module.encode_vision(video).float(), dim=-1)
            words = torch.nn.functional.normalize(self.module.encode_text(tokens).float(), dim=-1)
        return float((vision @ words.T)[0, 0])

