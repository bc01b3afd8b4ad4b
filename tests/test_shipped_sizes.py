"""Every number that depends on size, at the sizes that ship, without running the real model.

Shipped sizes: training 480x832, sampling 512x896 (zai-org/Kaleido configs), 720x1280 (Wan2.1 720p), 81 frames
(21 latent frames), 1.3B and 14B, sequence parallel 2/4/8. Tools: meta-device models, header-only checkpoint files
(sparse: no data on disk), analytic values. Expected values are worked out by hand from the official code
(zai-org/Kaleido, Wan-Video/Wan2.1) and written here as literals, never computed by the code under test.
(The training noise schedule at these sizes is in test_flow_matching.py.)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.model.checkpoint import CheckpointError, checkpoint_extras, inspect_checkpoint, load_dit, save_dit
from kaleido.model.dit import KaleidoDiT, dit_config
from kaleido.model.keymaps import wan_key_to_diffusers, wan_to_sat
from kaleido.model.media import centre_crop_box, cover_size, fit_and_pad, fit_size, reference_pixels
from kaleido.model.rope import reference_positions, rope_table
from kaleido.train.sequence_parallel import shard_bounds

# ---- reference preprocessing ------------------------------------------------------------------------------
# The official rule (sample_video.py and data_video.py `_load_reference_images`): img_ratio = w/h of the photo;
# if img_ratio > W/H: new = (W, int(W / img_ratio)) else (int(H * img_ratio), H); pad (dw//2, dh//2, dw - dw//2,
# dh - dh//2) with white. Worked out for phone, camera and odd photo sizes:
#   photo (w x h)    target (H, W)    resized (w, h)   padding (left, top, right, bottom)
FIT_TABLE = [
    ((4032, 3024), (512, 896), (682, 512), (107, 0, 107, 0)),  # 12 MP phone, landscape: rounding gave 683
    ((3024, 4032), (512, 896), (384, 512), (256, 0, 256, 0)),  # portrait
    ((1080, 1920), (512, 896), (288, 512), (304, 0, 304, 0)),  # phone screenshot
    ((512, 512), (512, 896), (512, 512), (192, 0, 192, 0)),
    ((4928, 3264), (512, 896), (773, 512), (61, 0, 62, 0)),  # DSLR 3:2: odd padding goes right
    ((97, 65), (512, 896), (764, 512), (66, 0, 66, 0)),  # tiny thumbnail, upscaled
    ((1170, 2532), (512, 896), (236, 512), (330, 0, 330, 0)),  # iPhone screenshot: rounding gave 237
    ((300, 1000), (512, 896), (153, 512), (371, 0, 372, 0)),  # rounding gave 154
    ((1920, 1080), (512, 896), (896, 504), (0, 4, 0, 4)),  # wider than the target: width takes 896
    ((4032, 3024), (480, 832), (640, 480), (96, 0, 96, 0)),
    ((3024, 4032), (480, 832), (360, 480), (236, 0, 236, 0)),
    ((1080, 1920), (480, 832), (270, 480), (281, 0, 281, 0)),
    ((512, 512), (480, 832), (480, 480), (176, 0, 176, 0)),
    ((4928, 3264), (480, 832), (724, 480), (54, 0, 54, 0)),  # rounding gave 725
    ((97, 65), (480, 832), (716, 480), (58, 0, 58, 0)),
    ((1170, 2532), (480, 832), (221, 480), (305, 0, 306, 0)),  # rounding gave 222
    ((896, 512), (480, 832), (832, 475), (0, 2, 0, 3)),  # a 512x896 frame at the training size
    ((2532, 1170), (480, 832), (832, 384), (0, 48, 0, 48)),
]


def _photo(width: int, height: int) -> Image.Image:
    """A smooth colour photo stand-in: any misplaced pixel or wrong resize changes many values."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize(("photo", "target", "resized", "padding"), FIT_TABLE)
def test_reference_fit_matches_the_official_truncation(photo, target, resized, padding):
    height, width = target
    assert fit_size(*photo, width, height) == resized
    image = _photo(*photo)
    # Built independently: Lanczos resize to the official size, pasted on white at the official offset.
    expected = Image.new("RGB", (width, height), (255, 255, 255))
    expected.paste(image.resize(resized, Image.Resampling.LANCZOS) if resized != photo else image, padding[:2])
    got = fit_and_pad(image, height, width)
    assert got.size == (width, height)
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    left, top, right, bottom = padding
    assert left + resized[0] + right == width and top + resized[1] + bottom == height


def test_one_reference_preprocessing_for_generation_encoding_and_evaluation(tmp_path):
    """WanVAE.encode_reference (generation, hence evaluation) and the latent cache's encode both call
    media.reference_pixels: equal tensors for a 12 MP photo at the training size, scaled as shipped."""
    from kaleido.config.schema import validate_params
    from kaleido.data.writer import TrainingExample
    from kaleido.model.media import write_video
    from kaleido.model.vae import WanVAE
    from kaleido.train.encode import _prepare_sample

    photo = _photo(4032, 3024)
    pixels = reference_pixels(photo, 480, 832)
    official = (torch.from_numpy(np.array(fit_and_pad(photo, 480, 832))).permute(2, 0, 1).float() - 127.5) / 127.5
    assert torch.equal(pixels, official)
    assert torch.equal(WanVAE.preprocess_reference(object.__new__(WanVAE), photo, 480, 832), pixels)

    clip = write_video(np.zeros((5, 480, 832, 3), dtype=np.uint8), tmp_path / "clip.mp4")
    example = TrainingExample("k", clip.read_bytes(), "a cat", [np.asarray(photo)], [None])
    raw = {"train": {"buckets": [[480, 832]], "frames": 5}}
    params = validate_params(raw, base_dir=tmp_path)
    video, refs = _prepare_sample(example, params)
    assert video.shape == (3, 5, 480, 832)
    assert torch.equal(refs[0], pixels)


# The official training video resize (data_video.py `resize_for_rectangle_crop`, centre): cover the target,
# the other side int(...)-truncated, then crop at delta // 2.
#   source (w, h)    target (H, W)    resized (w, h)   crop (left, top)
COVER_TABLE = [
    ((1280, 720), (480, 832), (853, 480), (10, 0)),
    ((1920, 1080), (480, 832), (853, 480), (10, 0)),
    ((1080, 1920), (480, 832), (832, 1479), (0, 499)),  # portrait phone video
    ((720, 480), (480, 832), (832, 554), (0, 37)),  # rounding gave 555
    ((640, 272), (512, 896), (1204, 512), (154, 0)),  # rounding gave 1205
    ((854, 480), (512, 896), (910, 512), (7, 0)),  # rounding gave 911
    ((1080, 1920), (720, 1280), (1280, 2275), (0, 777)),  # rounding gave 2276
    ((1440, 1080), (720, 1280), (1280, 960), (0, 120)),
    ((832, 480), (480, 832), (832, 480), (0, 0)),
]


@pytest.mark.parametrize(("source", "target", "resized", "crop"), COVER_TABLE)
def test_video_cover_matches_the_official_truncation(source, target, resized, crop):
    height, width = target
    assert cover_size(*source, width, height) == resized
    assert centre_crop_box(*resized, width, height) == crop


def test_encode_resizes_frames_as_the_official_loader():
    """torchvision bicubic (antialiased) resize of uint8 frames to the cover size, centre crop, (x-127.5)/127.5."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    from kaleido.train.encode import resize_cover

    frames = np.asarray(_photo(720, 480))[None].repeat(2, axis=0)
    got = resize_cover(frames, 480, 832)
    big = resize(torch.from_numpy(frames).permute(0, 3, 1, 2), [554, 832], InterpolationMode.BICUBIC, antialias=True)
    expected = (big[:, :, 37 : 37 + 480, :].float() - 127.5) / 127.5
    assert torch.equal(got, expected.permute(1, 0, 2, 3))


# ---- sampling schedule -------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [50, 4])
def test_sampling_sigmas_and_timesteps_at_50_steps_shift_7(steps):
    """Official `make_hunyuan_timesteps(0, steps, shift_scale=7)`: s = linspace(0, 1, steps + 1),
    sigma = 1 - s / (7 + s - 7 s); the DiT gets timestep 1000 sigma (RFScaling c_noise)."""
    from kaleido.model.generate import make_scheduler

    s = np.linspace(0.0, 1.0, steps + 1)
    official = 1.0 - s / (7.0 + s - 7.0 * s)
    scheduler = make_scheduler("euler", 7.0, steps)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), official, atol=1e-6, rtol=0)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), 1000.0 * official[:-1], atol=1e-3, rtol=0)
    if steps == 50:  # spot values: step 1 is at 7(0.98)/(1 + 6(0.98)) = 0.99709, step 25 at 3.5/4 = 0.875
        assert official[1] == pytest.approx(0.997093, abs=1e-6)
        assert official[25] == pytest.approx(0.875, abs=1e-6)


# ---- RoPE and R-RoPE ---------------------------------------------------------------------------------------

#   video (H, W)    latent grid (F, h, w) in patches    tokens   per reference
ROPE_SIZES = [
    ((480, 832), (21, 30, 52), 32_760, 1_560),
    ((512, 896), (21, 32, 56), 37_632, 1_792),
    ((720, 1280), (21, 45, 80), 75_600, 3_600),
]


@pytest.mark.parametrize(("video", "grid", "tokens", "per_ref"), ROPE_SIZES)
def test_rope_positions_and_table_at_the_shipped_sizes(video, grid, tokens, per_ref):
    f, h, w = grid
    assert (f, h, w) == (21, video[0] // 16, video[1] // 16) and f * h * w == tokens and h * w == per_ref
    positions = reference_positions(grid, [(1, h, w)] * 3, "shift_wh", 80)
    assert positions.shape == (tokens + 3 * per_ref, 3) and positions.dtype == torch.int64
    refs, vid = positions[: 3 * per_ref], positions[3 * per_ref :]
    # Video: t 0..20, h 0..h-1, w 0..w-1. References (official: t = j, h/w from max_h = max_w = 80).
    assert vid.min(0).values.tolist() == [0, 0, 0] and vid.max(0).values.tolist() == [20, h - 1, w - 1]
    assert refs.min(0).values.tolist() == [0, 80, 80] and refs.max(0).values.tolist() == [2, 80 + h - 1, 80 + w - 1]
    assert (refs[:per_ref, 0] == 0).all() and (refs[-per_ref:, 0] == 2).all()
    # No two tokens share a position: references sit beyond the video's h/w range.
    assert torch.unique(positions, dim=0).shape[0] == positions.shape[0]
    cos, sin = rope_table(positions, 128)
    assert cos.shape == sin.shape == (tokens + 3 * per_ref, 64) and cos.dtype == torch.float32
    cos64, sin64 = rope_table(positions, 128, dtype=torch.float64)
    # fp32 angles up to 80 + 79 = 159 rad: error ~ 159 * 2^-24, far below bf16 rounding (2^-8)
    assert (cos.double() - cos64).abs().max() < 2e-5 and (sin.double() - sin64).abs().max() < 2e-5
    assert torch.isfinite(cos).all() and torch.isfinite(sin).all()


@pytest.mark.parametrize(
    ("video", "latent"),
    [((81, 480, 832), (16, 21, 60, 104)), ((81, 512, 896), (16, 21, 64, 112)), ((81, 720, 1280), (16, 21, 90, 160)),
     ((1, 480, 832), (16, 1, 60, 104))],
)
def test_vae_latent_shapes_at_the_shipped_sizes(video, latent):
    """Wan VAE stride (4, 8, 8) with a causal first frame: 81 frames -> 1 + 80 / 4 = 21 latent frames."""
    from kaleido.model.vae import WanVAE, validate_video_size

    validate_video_size(*video)
    vae = object.__new__(WanVAE)
    vae.z_dim = 16
    assert vae.latent_shape(*video) == latent


def test_the_14b_dit_runs_the_shipped_shapes_on_meta():
    """The whole forward at 480x832x81 + 3 references at 14B, on the meta device: every shape agrees."""
    with torch.device("meta"):
        model = KaleidoDiT(dit_config("14B"))
        out = model(
            torch.empty(1, 16, 21, 60, 104), torch.empty(1), torch.empty(1, 512, 4096), torch.empty(1, 3, 16, 60, 104)
        )
    assert out.shape == (1, 16, 21, 60, 104)


# ---- sequence parallelism ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "label"),
    [
        (32_760 + 3 * 1_560, "480x832x81 + 3 refs"),
        (37_632 + 3 * 1_792, "512x896x81 + 3 refs"),
        (75_600 + 3 * 3_600, "720x1280x81 + 3 refs"),
        (32_760 + 3 * 1_792, "the issue's mixed count"),
        (32_760 + 1_560, "480p + 1 ref"),
        (37_632 + 2 * 1_792 + 1, "odd length"),
    ],
)
@pytest.mark.parametrize("degree", [2, 4, 8])
def test_ulysses_sharding_at_the_shipped_sizes(tokens, label, degree):
    slices = [shard_bounds(tokens, degree, rank) for rank in range(degree)]
    padded = slices[0][0]
    assert padded % degree == 0 and tokens <= padded < tokens + degree, label
    assert slices[0][1] == 0 and slices[-1][2] == padded
    assert all(a[2] == b[1] for a, b in itertools.pairwise(slices))  # contiguous, no overlap
    assert {stop - start for _, start, stop in slices} == {padded // degree}


def test_shipped_heads_and_sequence_parallel_degrees():
    """Ulysses scatters heads: 1.3B's 12 heads take SP 2 and 4 but not 8; 14B's 40 take 2, 4 and 8."""
    assert [d for d in (2, 4, 8) if dit_config("1.3B").num_heads % d == 0] == [2, 4]
    assert [d for d in (2, 4, 8) if dit_config("14B").num_heads % d == 0] == [2, 4, 8]


def test_training_plan_at_shipped_world_sizes(tmp_path):
    """The released config: micro-batch 1, 32 GPUs, grad accumulation 8 = global batch 256; with SP 8 on 64 GPUs
    the data-parallel size is 8 and accumulation 32. 1.3B with SP 8 is refused, naming the divisors."""
    from kaleido.config.schema import validate_params
    from kaleido.train.plan import TrainPlanError, deepspeed_config, plan_training

    def plan(arch, world, sp):
        raw = {"model": {"arch": arch, "checkpoint": str(tmp_path / "none")},
               "train": {"sequence_parallel": sp, "pretrain": {"global_batch": 256, "lr": 1e-5, "steps": 10}}}
        return plan_training(validate_params(raw, base_dir=tmp_path), "pretrain", world, check_files=False,
                             check_tracking=False)

    shipped = plan("14B", 32, 1)
    assert (shipped.data_parallel, shipped.grad_accum, shipped.global_batch) == (32, 8, 256)
    sp8 = plan("14B", 64, 8)
    assert (sp8.data_parallel, sp8.grad_accum) == (8, 32)
    # DeepSpeed counts every rank as data-parallel (the Ulysses gather makes that average right), so its
    # batch check sees 1 x 32 x 64; the samples per optimizer step stay 256.
    ds = deepspeed_config(sp8, validate_params({}, base_dir=tmp_path), bf16=True)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (2048, 32)
    # a valid degree divides both the 12 heads and the 64 ranks: the divisors of gcd(12, 64) = 4
    with pytest.raises(TrainPlanError, match=r"does not divide the model's 12 attention heads.*\[1, 2, 4\]"):
        plan("1.3B", 64, 8)


# ---- checkpoints at 1.3B and 14B ---------------------------------------------------------------------------
# Parameter counts from Wan's module list (wan/modules/model.py), by hand: per block 8 d^2 + 2 d f + f + 21 d
# (self- and cross-attention q/k/v/o with biases 8 d^2 + 8 d, q/k RMSNorms 4 d, norm3 affine 2 d, FFN 2 d f + f + d,
# modulation 6 d); outside the blocks 8 d^2 + 4493 d + 64 (patch conv 64 d + d, text MLP 4096 d + d + d^2 + d,
# time MLP 256 d + d + d^2 + d, time projection 6 d^2 + 6 d, head 64 d + 64, head modulation 2 d).
# 1.3B: d 1536, f 8960, 30 blocks; 14B: d 5120, f 13824, 40 blocks. As published: Wan2.1-T2V-1.3B's fp32 file is
# 5.68 GB (= 4 bytes x 1,418,996,800).
PUBLISHED_PARAMETERS = {"1.3B": 1_418_996_800, "14B": 14_288_491_584}

# config.json as the releases ship it (Wan2.1-T2V-*: WanModel; *-Diffusers: WanTransformer3DModel)
WAN_CONFIG = {"_class_name": "WanModel", "model_type": "t2v", "text_len": 512, "in_dim": 16, "freq_dim": 256,
              "out_dim": 16, "eps": 1e-06}
SIZES = {"1.3B": {"dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30},
         "14B": {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40}}
_BYTES = {"F32": 4, "BF16": 2}


def _header_only_safetensors(path: Path, shapes: dict[str, torch.Size], dtype: str) -> None:
    """A valid safetensors file whose data is all zero and never written: the file is sparse (a hole)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * _BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        handle.truncate(8 + len(blob) + offset)


def _shapes(arch: str) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in KaleidoDiT(dit_config(arch)).state_dict().items()}


def _official_client_state() -> dict:
    """What the official trainer saves beside the weights: SAT's save_ds_checkpoint client state (iteration,
    LR scheduler, Python/NumPy/torch/CUDA RNG states) merged into DeepSpeed's checkpoint dict."""
    return {
        "buffer_names": [], "optimizer": None, "param_shapes": None, "lr_scheduler": None, "skipped_steps": 0,
        "global_steps": 1000, "global_samples": 256_000, "dp_world_size": 32, "mp_world_size": 1,
        "ds_config": {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 8,
                      "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
        "ds_version": "0.14.4",
        "iteration": 1000,
        "client_lr_scheduler": {"start_lr": 5e-6, "warmup_iter": 0, "num_iters": 1000, "decay_style": "constant"},
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.get_rng_state(),  # a ByteTensor like torch.cuda.get_rng_state()
    }


def _write_layout(folder: Path, arch: str, layout: str) -> Path:
    shapes = _shapes(arch)
    config = {**WAN_CONFIG, **SIZES[arch]}
    folder.mkdir(parents=True)
    if layout == "wan":  # 14B ships six shards, 1.3B one file
        names = sorted(shapes)
        parts = 6 if arch == "14B" else 1
        chunks = [names[i::parts] for i in range(parts)]
        if parts == 1:
            _header_only_safetensors(folder / "diffusion_pytorch_model.safetensors", shapes, "F32")
        else:
            weight_map = {}
            for i, chunk in enumerate(chunks, start=1):
                name = f"diffusion_pytorch_model-{i:05d}-of-{parts:05d}.safetensors"
                _header_only_safetensors(folder / name, {k: shapes[k] for k in chunk}, "BF16")
                weight_map.update(dict.fromkeys(chunk, name))
            index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
            (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        (folder / "config.json").write_text(json.dumps(config))
    elif layout == "diffusers":
        heads = SIZES[arch]["num_heads"]
        diffusers_config = {
            "_class_name": "WanTransformer3DModel", "attention_head_dim": 128, "num_attention_heads": heads,
            "ffn_dim": SIZES[arch]["ffn_dim"], "num_layers": SIZES[arch]["num_layers"], "in_channels": 16,
            "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "patch_size": [1, 2, 2], "eps": 1e-06,
            "qk_norm": "rms_norm_across_heads", "cross_attn_norm": True, "rope_max_seq_len": 1024,
        }
        renamed = {wan_key_to_diffusers(k): v for k, v in shapes.items()}
        _header_only_safetensors(folder / "diffusion_pytorch_model.safetensors", renamed, "F32")
        (folder / "config.json").write_text(json.dumps(diffusers_config))
    else:  # official Kaleido: <folder>/latest + 1/mp_rank_00_model_states.pt, no config.json
        with torch.device("meta"):
            module = wan_to_sat({k: torch.empty(v, dtype=torch.bfloat16) for k, v in shapes.items()})
        (folder / "1").mkdir()
        torch.save({"module": module, **_official_client_state()}, folder / "1" / "mp_rank_00_model_states.pt")
        (folder / "latest").write_text("1")
    return folder


@pytest.mark.parametrize("layout", ["wan", "diffusers", "sat"])
@pytest.mark.parametrize("arch", ["1.3B", "14B"])
def test_released_checkpoint_shapes_load_on_meta(arch, layout, tmp_path):
    folder = _write_layout(tmp_path / layout, arch, layout)
    on_disk = sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())
    assert on_disk < 50 * 2**20, "the checkpoint files must stay sparse / meta (no tensor data)"
    info = inspect_checkpoint(folder)
    assert info.format == layout
    assert info.num_parameters == PUBLISHED_PARAMETERS[arch]
    assert info.config == dit_config(arch)
    model = load_dit(folder, device="meta")
    assert model.num_parameters() == PUBLISHED_PARAMETERS[arch]
    assert all(p.is_meta for p in model.parameters())
    if layout == "sat":
        assert "iteration=1000" in info.extras and "np_rng_state (NumPy RNG state)" in info.extras


def test_official_sat_checkpoint_with_client_state_loads(tmp_path):
    """A SAT/DeepSpeed file as the official trainer writes it (weights + RNG states, iteration, DeepSpeed config)
    loads weights-only: the weights equal, the other entries are named, nothing else is read."""
    torch.manual_seed(0)
    model = KaleidoDiT(dit_config("tiny"))
    save_dit(model, tmp_path / "ckpt", "sat", model.cfg)
    model_file = tmp_path / "ckpt" / "1" / "mp_rank_00_model_states.pt"
    plain = torch.load(model_file, weights_only=True)
    torch.save({**plain, **_official_client_state()}, model_file)
    with pytest.raises(Exception, match="numpy"):  # what plain weights-only loading says
        torch.load(model_file, weights_only=True)

    loaded = load_dit(tmp_path / "ckpt")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    extras = checkpoint_extras(tmp_path / "ckpt")
    for entry in ("iteration=1000", "ds_version=0.14.4", "np_rng_state (NumPy RNG state)",
                  "random_rng_state (Python RNG state)", "torch_rng_state (torch RNG state)",
                  "ds_config (DeepSpeed config)", "client_lr_scheduler (LR scheduler state)"):
        assert entry in extras, (entry, extras)
    result = CliRunner().invoke(app, ["inspect-checkpoint", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    assert "also in the file (not loaded): " in result.output and "np_rng_state (NumPy RNG state)" in result.output


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.manual_seed(0)
    model = KaleidoDiT(dit_config("tiny"))
    path = tmp_path / "evil.pt"
    torch.save({"module": model.state_dict(), "np_rng_state": np.random.get_state(), "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused: the file needs (posix|nt)\.system"):
        load_dit(path)
    assert not marker.exists()


@pytest.mark.parametrize("arch", ["tiny", "mid", "1.3B", "14B"])
def test_generation_memory_counts_the_model_it_estimates(arch):
    """The planner's parameter count is the meta-built model's, block by block; tokens as the DiT sees them."""
    from kaleido.model.memory import dit_parameters, tokens

    with torch.device("meta"):
        model = KaleidoDiT(dit_config(arch))
    total, block = dit_parameters(dit_config(arch))
    assert total == model.num_parameters() and block == sum(p.numel() for p in model.blocks[0].parameters())
    assert tokens(81, 480, 832, 3) == 32_760 + 3 * 1_560 and tokens(81, 720, 1280, 0) == 75_600


def test_generation_memory_options_at_the_shipped_sizes():
    from kaleido.model.memory import generation_memory

    cfg = dit_config("14B")
    full = generation_memory(cfg, 81, 720, 1280, 3)
    assert full.dit_weights_gb == pytest.approx(PUBLISHED_PARAMETERS["14B"] * 2 / 1e9)
    lean = generation_memory(cfg, 81, 720, 1280, 3, text_encoder_on_cpu=True, block_offload=True)
    assert lean.text_encoder_gb == 0 and lean.dit_weights_gb < 2.0 < full.dit_weights_gb
    assert lean.sampling_peak_gb < full.sampling_peak_gb - 35
    sp = generation_memory(cfg, 81, 720, 1280, 3, sequence_parallel=8)
    assert sp.activations_gb == pytest.approx(full.activations_gb / 8, rel=1e-3)
