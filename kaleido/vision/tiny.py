"""Tiny random-weight vision models in their REAL on-disk formats, built offline from a seed.

`build_tiny_vision_models(out_dir)` writes
  grounding_dino/  transformers GroundingDinoForObjectDetection + processor (BERT WordPiece vocab written here)
  sam_tiny.pth     segment-anything state dict of the "tiny" SAM (sam_type: tiny)
  clip/            open_clip folder: open_clip_config.json + open_clip_model.safetensors
  flux_fill/       diffusers FluxFillPipeline (tiny FluxTransformer2DModel, AutoencoderKL, CLIP + T5 encoders)
  flux_base/       diffusers FluxPipeline sharing the fill pipeline's VAE and text encoders
  flux_redux/      diffusers FluxPriorReduxPipeline (tiny SigLIP vision tower + ReduxImageEncoder)
and returns {data.models key: path}. Every loader of kaleido.vision reads them unchanged, so tests
and the embedded (laptop) default run the real code paths; the outputs are meaningless.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# Bump when a part's layout or contents change: a stale folder is rebuilt, not reused.
TINY_VISION_VERSION = 2
MARKER = "kaleido_tiny_vision.json"
PARTS = ("grounding_dino", "sam", "clip", "flux_fill", "flux_base", "flux_redux")
OUTPUTS = {
    "grounding_dino": "grounding_dino",
    "sam": "sam_tiny.pth",
    "clip": "clip",
    "flux_fill": "flux_fill",
    "flux_base": "flux_base",
    "flux_redux": "flux_redux",
}
IMAGE_SIZE = 64  # the FLUX sizes the tiny models are meant for
# Grounding DINO's shortest edge: at 64 a SQUARE image leaves the extra feature level at 1x1, where its
# GroupNorm fails ("more than 1 value per channel"); 96 keeps it at 2x2.
DETECTION_SIZE = 96
TEXT_DIM = 32  # width of every tiny text / vision tower

# Words in the tiny Grounding DINO vocabulary (anything else falls back to single-letter pieces).
_WORDS_TEXT = (
    "a an the of and with in on at to is are person people man woman boy girl child baby astronaut chef "
    "dancer player cat dog kitten puppy horse bird fish cow sheep bear lion tiger rabbit duck cup mug "
    "coffee espresso teapot rocket car bike bicycle guitar ball chair table book phone lamp robot toy "
    "cartoon character face hat bag bottle flower tree house street beach forest room kitchen"
)


def _grounding_dino(out: Path) -> None:
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "'", "-", *_WORDS_TEXT.split(), *letters]
    tokens += ["##" + piece for piece in letters]
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(dict.fromkeys(tokens))})
    backbone = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        image_size=IMAGE_SIZE,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * TEXT_DIM,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        num_queries=20,
        encoder_layers=1,
        decoder_layers=2,  # the two-stage box refinement needs at least two decoder layers
        d_model=TEXT_DIM,
        encoder_ffn_dim=2 * TEXT_DIM,
        decoder_ffn_dim=2 * TEXT_DIM,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    GroundingDinoForObjectDetection(config).eval().save_pretrained(str(out))
    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": DETECTION_SIZE, "longest_edge": 2 * DETECTION_SIZE}
    )
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out))


def _sam(out: Path) -> None:
    from kaleido.vision.segmentation import build_sam

    torch.save(build_sam("tiny").state_dict(), out)


def _clip(out: Path) -> None:
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": TEXT_DIM,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": TEXT_DIM, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TEXT_DIM, "heads": 2, "layers": 1},
    }
    model = CLIP(**model_cfg).eval()
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    preprocess = {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2) + "\n"
    )


def _text_parts() -> dict[str, Any]:
    """CLIP-L / T5 stand-ins: tokenizers from letter vocabularies, 1-layer encoders of width TEXT_DIM."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in letters + [letter + "</w>" for letter in letters]:
        clip_vocab[piece] = len(clip_vocab)
    clip_tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    t5_vocab += [(letter, -3.0) for letter in letters] + [("\u2581" + letter, -3.0) for letter in letters]
    t5_tokenizer = T5TokenizerFast(vocab=t5_vocab, extra_ids=0)
    clip_text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=2 * TEXT_DIM,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=TEXT_DIM,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=2 * TEXT_DIM,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    return {"text_encoder": clip_text, "tokenizer": clip_tokenizer, "text_encoder_2": t5, "tokenizer_2": t5_tokenizer}


def _vae() -> Any:
    from diffusers import AutoencoderKL

    # 3 blocks -> VAE stride 4 (FLUX's is 8); 4 latent channels (FLUX's is 16)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).eval()


def _flux_transformer(fill: bool, latent_channels: int, vae_stride: int) -> Any:
    from diffusers import FluxTransformer2DModel

    packed = 4 * latent_channels  # 2x2 latent patches
    # Fill concatenates the masked image's packed latents and the packed pixel-resolution mask
    in_channels = packed + (packed + 4 * vae_stride * vae_stride if fill else 0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=packed,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True,  # as FLUX.1-dev / Fill-dev (guidance-distilled)
        axes_dims_rope=(4, 6, 6),
    ).eval()


def _scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's scheduler settings
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _flux(out: Path, fill: bool, seed: int) -> None:
    from diffusers import FluxFillPipeline, FluxPipeline

    torch.manual_seed(seed)  # same text encoders and VAE in the fill and base pipelines
    parts = _text_parts()
    vae = _vae()
    stride = 2 ** (len(vae.config.block_out_channels) - 1)
    torch.manual_seed(seed + (1 if fill else 2))
    transformer = _flux_transformer(fill, vae.config.latent_channels, stride)
    pipeline_cls = FluxFillPipeline if fill else FluxPipeline
    pipeline_cls(scheduler=_scheduler(), vae=vae, transformer=transformer, **parts).save_pretrained(str(out))


def _flux_redux(out: Path) -> None:
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    vision = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=TEXT_DIM,
            intermediate_size=2 * TEXT_DIM,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    FluxPriorReduxPipeline(
        image_encoder=vision,
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
        image_embedder=ReduxImageEncoder(redux_dim=TEXT_DIM, txt_in_features=TEXT_DIM),
    ).save_pretrained(str(out))


def tiny_vision_settings(paths: dict[str, Path]) -> dict[str, Any]:
    """`data.models` values for the tiny models (paths as strings, the tiny SAM type, float32 FLUX)."""
    settings: dict[str, Any] = {key: str(path) for key, path in paths.items()}
    settings.update({"sam_type": "tiny", "flux_dtype": "float32"})
    return settings


def _complete(out_dir: Path, seed: int, parts: Sequence[str]) -> bool:
    try:
        info = json.loads((out_dir / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("seed") != seed or info.get("version") != TINY_VISION_VERSION:
        return False
    return all(part in info.get("parts", []) and (out_dir / OUTPUTS[part]).exists() for part in parts)


def build_tiny_vision_models(
    out_dir: str | Path, seed: int = 0, parts: Sequence[str] | None = None, force: bool = False
) -> dict[str, Path]:
    """Write the tiny models (all, or `parts`) under `out_dir`; return {data.models key: path}.

    Skips parts already built by this version with this seed. Each part is built in a scratch
    folder and moved in; the marker listing the finished parts is written last.
    """
    from kaleido.model.text_encoder import quiet_hf_progress

    out_dir = Path(out_dir).resolve()
    wanted = list(PARTS if parts is None else parts)
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown tiny vision parts {unknown}; choose from {', '.join(PARTS)}")
    paths = {part: out_dir / OUTPUTS[part] for part in wanted}
    if not force and _complete(out_dir, seed, wanted):
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        info = json.loads((out_dir / MARKER).read_text())
        done = set(info["parts"]) if info.get("seed") == seed and info.get("version") == TINY_VISION_VERSION else set()
    except (OSError, json.JSONDecodeError, KeyError):
        done = set()
    builders: dict[str, Callable[[Path], None]] = {
        "grounding_dino": _grounding_dino,
        "sam": _sam,
        "clip": _clip,
        "flux_fill": lambda out: _flux(out, fill=True, seed=seed + 10),
        "flux_base": lambda out: _flux(out, fill=False, seed=seed + 10),
        "flux_redux": _flux_redux,
    }
    (out_dir / MARKER).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny-vision-", dir=out_dir) as scratch_name, quiet_hf_progress():
        scratch = Path(scratch_name)
        # fork_rng: building must not disturb the caller's global RNG state
        with torch.random.fork_rng(devices=[]):
            for index, part in enumerate(PARTS):
                if part not in wanted or (part in done and not force and paths[part].exists()):
                    continue
                torch.manual_seed(seed * 1000 + index)
                builders[part](scratch / OUTPUTS[part])
                target = out_dir / OUTPUTS[part]
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
                (scratch / OUTPUTS[part]).rename(target)
                done.add(part)
    marker = {"version": TINY_VISION_VERSION, "seed": seed, "parts": sorted(done)}
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return paths
