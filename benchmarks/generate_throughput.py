"""Generation time and peak memory through the real S2V pipeline (text encoder, reference encoding, CFG sampling,
VAE decode) with random weights of the real architectures.

    .venv/bin/python benchmarks/generate_throughput.py [--config 1.3B] [--frames 81 --height 480 --width 832]
        [--steps 4] [--refs 3] [--json out.json]
    .venv/bin/python benchmarks/generate_throughput.py --smoke     # tiny model, 9x64x96, 2 steps, CPU
    .venv/bin/python benchmarks/generate_throughput.py --config 14B --height 720 --width 1280 \
        --offload blocks --text-encoder-device cpu --release-encoders     # the memory options of params.yaml
    .venv/bin/python benchmarks/generate_throughput.py --estimate  # analytic memory, 1.3B/14B at 480p/720p
    .venv/bin/python benchmarks/generate_throughput.py --sweep [tiny mid] --steps 2   # every option, measured

Models: the DiT of --config; for 1.3B/14B the Wan2.1 VAE architecture (diffusers `AutoencoderKLWan` defaults) and
umt5-xxl's architecture (24 layers, d_model 4096), both random; for tiny/mid the tiny assets' VAE and encoder
sizes. Weights are random, so only time and memory mean anything. On a GPU everything runs in bf16 as shipped
(DiT bf16, VAE bf16); on CPU in fp32. Prints seconds per sampling step (both CFG branches), the text, reference
and decode times, and the peak memory (torch.cuda.max_memory_allocated on a GPU, peak RSS on CPU), next to
kaleido.model.memory's estimate for the same options. --estimate prints only the estimates (no model runs).
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


def build_pipeline(config: str, device: torch.device, dtype: torch.dtype, assets: Path,
                   text_encoder_device: str = "auto", release_encoders: bool = False, offload: str = "none"):
    """S2VPipeline with random weights: the DiT of `config`, the real VAE/umT5 architectures for 1.3B/14B; the
    memory options as `generate` in params.yaml names them."""
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
    dit_device = torch.device("cpu") if offload == "blocks" else device
    text_device = torch.device("cpu") if text_encoder_device == "cpu" else device
    with torch.device(dit_device):
        dit = KaleidoDiT(cfg, attention_backend="sdpa").to(dtype)
    with torch.device(device):
        vae_model = AutoencoderKLWan() if real else AutoencoderKLWan(**TINY_VAE)
    with torch.device(text_device):
        sizes = UMT5_XXL if real else {"d_model": cfg.text_dim, "d_kv": 8, "d_ff": 2 * cfg.text_dim, "num_layers": 2,
                                       "num_heads": 4, "vocab_size": 640}
        encoder = UMT5EncoderModel(UMT5Config(**sizes, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    if not real:
        vae_model = AutoencoderKLWan.from_pretrained(str(assets / "vae"))
    tokenizer = AutoTokenizer.from_pretrained(str(assets / "tokenizer"), local_files_only=True)
    vae = WanVAE(vae_model.eval(), device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    text = TextEncoder(encoder, tokenizer, device=text_device, dtype=dtype)
    return S2VPipeline(dit, vae, text, device=device, dtype=dtype, release_encoders=release_encoders,
                       offload=offload)


def estimate(config: str, frames: int, height: int, width: int, refs: int, options: dict) -> dict:
    """kaleido.model.memory's estimate (GB) for the options of build_pipeline."""
    from kaleido.model.dit import dit_config
    from kaleido.model.memory import generation_memory

    return generation_memory(dit_config(config), frames, height, width, refs,
                             text_encoder_on_cpu=options.get("text_encoder_device") == "cpu",
                             release_encoders=bool(options.get("release_encoders")),
                             block_offload=options.get("offload") == "blocks").to_dict()


def measure(config: str, frames: int, height: int, width: int, steps: int, refs: int,
            options: dict | None = None) -> dict:
    from PIL import Image

    options = options or {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        pipe = build_pipeline(config, device, dtype, Path(scratch) / "assets", **options)
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
        "dit_parameters": sum(p.numel() for p in pipe.dit.parameters()), "options": options,
        "estimate": estimate(config, frames, height, width, refs, options),
    }


ESTIMATE_CASES = [("1.3B", 81, 480, 832), ("14B", 81, 480, 832), ("14B", 81, 512, 896), ("14B", 81, 720, 1280)]
OPTION_SETS = {
    "none": {},
    "t5 cpu": {"text_encoder_device": "cpu"},
    "t5 cpu + release": {"text_encoder_device": "cpu", "release_encoders": True},
    "all + block offload": {"text_encoder_device": "cpu", "release_encoders": True, "offload": "blocks"},
}


def print_estimates(refs: int) -> None:
    """The analytic table: sampling-time GPU memory (GB) per size and memory option (kaleido.model.memory)."""
    print(f"# estimated GPU memory while sampling, GB (bf16, CFG batched, {refs} references; kaleido.model.memory)")
    print("config | video | tokens | " + " | ".join(OPTION_SETS))
    for config, frames, height, width in ESTIMATE_CASES:
        rows = [estimate(config, frames, height, width, refs, options) for options in OPTION_SETS.values()]
        print(f"{config} | {frames}x{height}x{width} | {rows[0]['tokens']} | "
              + " | ".join(f"{row['sampling_peak_gb']:.1f}" for row in rows))


SWEEP_SIZES = {"tiny": (9, 64, 96), "mid": (17, 128, 224)}


def sweep(configs: list[str], args: argparse.Namespace) -> int:
    """Each option set of OPTION_SETS on each config in a fresh process; one table of time and peak memory."""
    import subprocess

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for config in configs:
            frames, height, width = SWEEP_SIZES.get(config, (args.frames, args.height, args.width))
            for label, options in OPTION_SETS.items():
                out = Path(scratch) / f"{config}-{len(rows)}.json"
                command = [sys.executable, __file__, "--config", config, "--frames", str(frames), "--height",
                           str(height), "--width", str(width), "--steps", str(args.steps), "--refs", str(args.refs),
                           "--json", str(out), "--text-encoder-device", options.get("text_encoder_device", "auto"),
                           "--offload", options.get("offload", "none")]
                command += ["--release-encoders"] if options.get("release_encoders") else []
                subprocess.run(command, check=True, capture_output=True, text=True)
                rows.append((label, json.loads(out.read_text())))
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}; {args.steps} steps, "
          f"{args.refs} references; peak = {'max_memory_allocated' if torch.cuda.is_available() else 'peak RSS'}")
    print("config | video | options | s/step (CFG) | total s | peak GB")
    for label, row in rows:
        print(f"{row['config']} | {row['frames']}x{row['height']}x{row['width']} | {label} | {row['step_s']:.3f} | "
              f"{row['generate_s']:.2f} | {row['peak_memory_gb']:.3f}")
    print()
    print_estimates(args.refs)
    return 0


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
    parser.add_argument("--text-encoder-device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--release-encoders", action="store_true")
    parser.add_argument("--offload", choices=["none", "blocks"], default="none")
    parser.add_argument("--estimate", action="store_true", help="print the analytic memory table and exit")
    parser.add_argument("--sweep", nargs="*", metavar="CONFIG",
                        help="every memory option on these configs (default: tiny mid), each in its own process "
                        "(peak RSS is per process), then the analytic table")
    args = parser.parse_args(argv)
    if args.estimate:
        print_estimates(args.refs)
        return 0
    if args.sweep is not None:
        return sweep(args.sweep or ["tiny", "mid"], args)
    if args.smoke:
        args.config, args.frames, args.height, args.width, args.steps, args.refs = "tiny", 9, 64, 96, 2, 2
    options = {"text_encoder_device": args.text_encoder_device, "release_encoders": args.release_encoders,
               "offload": args.offload}
    row = measure(args.config, args.frames, args.height, args.width, args.steps, args.refs, options)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}; options {options}")
    print("config | device | dtype | video | refs | s/step (CFG) | text s | refs s | decode s | peak mem GB | "
          "estimate GB")
    print(f"{row['config']} | {row['device']} | {row['dtype']} | {args.frames}x{args.height}x{args.width} | "
          f"{row['references']} | {row['step_s']:.3f} | {row['text_s']:.3f} | {row['references_s']:.3f} | "
          f"{row['decode_s']:.3f} | {row['peak_memory_gb']:.2f} | {row['estimate']['sampling_peak_gb']:.2f}")
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
