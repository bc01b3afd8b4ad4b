"""Generation time and peak memory through the real S2V pipeline (text encoder, reference encoding, CFG sampling,
VAE decode) with random weights of the real architectures.

    .venv/bin/python benchmarks/generate_throughput.py [--config 1.3B] [--frames 81 --height 480 --width 832]
        [--steps 4] [--refs 3] [--json out.json]
    .venv/bin/python benchmarks/generate_throughput.py --smoke     # tiny model, 9x64x96, 2 steps, CPU

Models: the DiT of --config; for 1.3B/14B the Wan2.1 VAE architecture (diffusers `AutoencoderKLWan` defaults) and
umt5-xxl's architecture (24 layers, d_model 4096), both random; for tiny/mid the tiny assets' VAE and encoder
sizes. Weights are random, so only time and memory mean anything. On a GPU everything runs in bf16 as shipped
(DiT bf16, VAE bf16); on CPU in fp32. Prints seconds per sampling step (both CFG branches), the text, reference
and decode times, and the peak memory (torch.cuda.max_memory_allocated on a GPU, peak RSS on CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UMT5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "vocab_size": 256384}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build_pipeline(config: str, device: torch.device, dtype: torch.dtype, assets: Path):
    """S2VPipeline with random weights: the DiT of `config`, the real VAE/umT5 architectures for 1.3B/14B."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from kaleido.model.dit import KaleidoDiT, dit_config
    from kaleido.model.generate import S2VPipeline
    from kaleido.model.text_encoder import TextEncoder
    from kaleido.model.tiny import TINY_VAE, build_tiny_assets
    from kaleido.model.vae import WanVAE

    build_tiny_assets(assets)  # the tokenizer (ids fit any umT5 vocabulary) and the tiny VAE's calibration
    cfg = dit_config(config)
    real = config in ("1.3B", "14B")
    torch.manual_seed(0)
    with torch.device(device):
        dit = KaleidoDiT(cfg, attention_backend="sdpa").to(dtype)
        vae_model = AutoencoderKLWan() if real else AutoencoderKLWan(**TINY_VAE)
        sizes = UMT5_XXL if real else {"d_model": cfg.text_dim, "d_kv": 8, "d_ff": 2 * cfg.text_dim, "num_layers": 2,
                                       "num_heads": 4, "vocab_size": 640}
        encoder = UMT5EncoderModel(UMT5Config(**sizes, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    if not real:
        vae_model = AutoencoderKLWan.from_pretrained(str(assets / "vae"))
    tokenizer = AutoTokenizer.from_pretrained(str(assets / "tokenizer"), local_files_only=True)
    vae = WanVAE(vae_model.eval(), device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    text = TextEncoder(encoder, tokenizer, device=device, dtype=dtype)
    return S2VPipeline(dit, vae, text, device=device, dtype=dtype)


def measure(config: str, frames: int, height: int, width: int, steps: int, refs: int) -> dict:
    from PIL import Image

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        pipe = build_pipeline(config, device, dtype, Path(scratch) / "assets")
        build_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (300 + 40 * i, 400, 3), dtype=np.uint8)) for i in range(refs)]
    prompt = "A young woman walks a fluffy dog in a park at sunset. The camera tracks the movement."

    timings: dict[str, float] = {}

    def timed(name: str, fn):
        _sync(device)
        begin = time.perf_counter()
        out = fn()
        _sync(device)
        timings[name] = time.perf_counter() - begin
        return out

    with torch.no_grad():
        timed("text_s", lambda: pipe.encode_prompts(prompt, "", cfg=True))
        timed("references_s", lambda: pipe.encode_references(images, height, width))
        video = timed("generate_s", lambda: pipe(prompt, images, frames, height, width, steps=steps, progress=False))
        latents = torch.zeros(1, *pipe.vae.latent_shape(frames, height, width))
        timed("decode_s", lambda: pipe.vae.decode(latents))
    sampling = timings["generate_s"] - timings["text_s"] - timings["references_s"] - timings["decode_s"]
    return {
        "config": config, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "frames": frames, "height": height, "width": width,
        "references": refs, "steps": steps, "build_s": build_s, **timings,
        "step_s": max(sampling, 0.0) / steps, "peak_memory_gb": _peak_gb(device), "video_shape": list(video.shape),
        "dit_parameters": sum(p.numel() for p in pipe.dit.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="1.3B", choices=["tiny", "mid", "1.3B", "14B"])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--refs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 9x64x96, 2 steps: checks the code path")
    parser.add_argument("--json", dest="json_path", type=Path)
    args = parser.parse_args(argv)
    if args.smoke:
        args.config, args.frames, args.height, args.width, args.steps, args.refs = "tiny", 9, 64, 96, 2, 2
    row = measure(args.config, args.frames, args.height, args.width, args.steps, args.refs)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("config | device | dtype | video | refs | s/step (CFG) | text s | refs s | decode s | peak mem GB")
    print(f"{row['config']} | {row['device']} | {row['dtype']} | {args.frames}x{args.height}x{args.width} | "
          f"{row['references']} | {row['step_s']:.3f} | {row['text_s']:.3f} | {row['references_s']:.3f} | "
          f"{row['decode_s']:.3f} | {row['peak_memory_gb']:.2f}")
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
