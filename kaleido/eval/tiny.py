"""Tiny random-weight metric backbones in their REAL on-disk formats, built offline from a seed.

`build_tiny_eval_models(out_dir)` writes
  dino/               timm folder (config.json + model.safetensors) of a 1-block ViT-B/16-shaped DINO
  musiq_tiny.pth      pyiqa MUSIQ state dict (1 layer, 64 wide)
  aesthetic_head.pth  LAION-style Linear(clip_dim -> 1) state dict, sized for the tiny CLIP
and returns {eval.models key: path}. Grounding DINO, SAM and CLIP come from kaleido.vision.tiny. The
loaders of kaleido.eval read these unchanged, so tests and the embedded default run the real code
paths; the scores are meaningless.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TINY_EVAL_VERSION = 1
MARKER = "kaleido_tiny_eval.json"
OUTPUTS = {"dino": "dino", "musiq": "musiq_tiny.pth", "aesthetic_head": "aesthetic_head.pth"}
DINO_ARGS = {"embed_dim": 64, "depth": 1, "num_heads": 2}
MUSIQ_ARGS = {"hidden_size": 64, "mlp_dim": 128, "num_heads": 1, "num_layers": 1}


def _complete(out_dir: Path, seed: int, clip_dim: int) -> bool:
    try:
        info = json.loads((out_dir / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    expected = {"version": TINY_EVAL_VERSION, "seed": seed, "clip_dim": clip_dim}
    return info == expected and all((out_dir / name).exists() for name in OUTPUTS.values())


def build_tiny_eval_models(
    out_dir: str | Path, seed: int = 0, clip_dim: int | None = None, force: bool = False
) -> dict[str, Path]:
    """Write the tiny metric backbones under `out_dir` (skipped when already built with this seed)."""
    from kaleido.vision.tiny import TEXT_DIM

    clip_dim = TEXT_DIM if clip_dim is None else int(clip_dim)
    out_dir = Path(out_dir).resolve()
    paths = {key: out_dir / name for key, name in OUTPUTS.items()}
    if not force and _complete(out_dir, seed, clip_dim):
        return paths
    import timm  # heavy imports only when something is built
    from pyiqa.archs.musiq_arch import MUSIQ
    from timm.models import save_for_hf

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        dino = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **DINO_ARGS)
        if paths["dino"].exists():
            shutil.rmtree(paths["dino"])
        save_for_hf(dino, str(paths["dino"]), model_args=dict(DINO_ARGS), safe_serialization=True)
        torch.manual_seed(seed + 1)
        torch.save(MUSIQ(pretrained=False, **MUSIQ_ARGS).state_dict(), paths["musiq"])
        torch.manual_seed(seed + 2)
        torch.save(torch.nn.Linear(clip_dim, 1).state_dict(), paths["aesthetic_head"])
    marker = {"version": TINY_EVAL_VERSION, "seed": seed, "clip_dim": clip_dim}
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return paths
