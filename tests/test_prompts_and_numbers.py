"""Prompts and numbers from users: never silently cut, checked before any model loads, and numerical failure is an
error, not a black video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.config import load_params

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
LONG = " ".join(["a fluffy cat plays with a small dog in a sunny park"] * 60)  # ~700 tokens


def test_prompt_truncation_names_the_count_and_the_dropped_words(tiny_assets):
    from kaleido.model.text_encoder import load_tokenizer, prompt_truncation

    tokenizer = load_tokenizer(tiny_assets / "tokenizer")
    assert prompt_truncation(tokenizer, "a cat", 512) is None
    truncation = prompt_truncation(tokenizer, LONG + " and then a red balloon flies away", 512)
    assert truncation is not None and truncation.tokens > 600 and truncation.kept == 512
    assert truncation.dropped_text.endswith("then a red balloon flies away")
    message = truncation.message("--prompt")
    assert f"{truncation.tokens} tokens" in message and f"last {truncation.tokens - 512} are dropped" in message


@pytest.mark.slow
def test_generate_warns_for_a_long_prompt_and_records_a_random_seed(tiny_assets, params_for, tmp_path):
    from kaleido.model.media import read_video_metadata

    params = params_for(tmp_path / "p", tiny_assets, {"generate.steps": 2, "generate.frames": 5})
    out = tmp_path / "v.mp4"
    result = CliRunner().invoke(app, ["generate", "--prompt", LONG, "--out", str(out), "--params", str(params),
                                      "--seed", "-1"])
    assert result.exit_code == 0, result.output
    assert result.output.count("warning: --prompt has ") == 1 and "(model.text_len)" in result.output
    seed = int(result.output.split("seed: ")[1].split()[0])
    import json

    recorded = json.loads(read_video_metadata(out)["comment"])
    assert recorded["seed"] == seed and recorded["requested_seed"] == -1 and recorded["prompt"] == LONG


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--steps", "0", "generate.steps = 0: Input should be greater than or equal to 1"),
        ("--steps", "5000", "generate.steps = 5000: Input should be less than or equal to 1000"),
        ("--guidance-scale", "nan", "generate.guidance_scale = nan: Input should be a finite number"),
        ("--guidance-scale", "-1", "generate.guidance_scale = -1.0: Input should be greater than or equal to 0"),
        ("--shift", "0", "generate.shift = 0.0: Input should be greater than 0"),
        ("--shift", "inf", "generate.shift = inf: Input should be a finite number"),
        ("--seed", "-2", "generate.seed = -2: Input should be greater than or equal to -1"),
        ("--seed", str(2**63), "Input should be less than or equal to 9223372036854775807"),
        ("--frames", "10", "frames=10: the Wan VAE needs 4k+1 frames"),
        ("--height", "100", "height=100: must be a multiple of 16"),
        ("--width", "1296", "width=1296: R-RoPE (shift_wh) places reference tokens from latent patch 80"),
        ("--sampler", "ddim", "generate.sampler = 'ddim': Input should be 'euler' or 'unipc'"),
    ],
)
def test_every_number_is_checked_before_any_model_loads(tmp_path, option, value, message):
    # The repository params point at tiny assets that do not exist here: had a model been loaded, the error
    # would name a missing folder instead.
    result = CliRunner().invoke(app, ["generate", "--prompt", "a cat", "--out", str(tmp_path / "v.mp4"),
                                      "--params", str(REPO_PARAMS), option, value])
    assert result.exit_code == 2, result.output
    assert message in result.output and "does not exist" not in result.output and "Traceback" not in result.output


def test_params_refuse_nan_and_sizes_past_the_rope_offset(tmp_path):
    from kaleido.config import ParamsError

    with pytest.raises(ParamsError, match=r"gate\.regression_tolerance = nan: Input should be a finite number"):
        load_params(REPO_PARAMS, {"gate.regression_tolerance": float("nan")})
    with pytest.raises(ParamsError, match=r"train.buckets\[0\]: height=1920: R-RoPE"):
        load_params(REPO_PARAMS, {"train.buckets": [[1920, 1088]]})
    # 720x1280 (Wan 720p) is the largest the shipped offset takes; variant `none` shifts nothing
    load_params(REPO_PARAMS, {"train.buckets": [[720, 1280]], "generate.height": 720, "generate.width": 1280})
    load_params(REPO_PARAMS, {"generate.width": 1920, "model.rope.variant": "none"})


@pytest.fixture(scope="module")
def overflow_checkpoint(tiny_assets, tmp_path_factory) -> Path:
    """The tiny DiT with weights that float32 holds but float16 overflows (like a real fp16 conversion gone bad)."""
    from kaleido.model.checkpoint import load_dit, save_dit

    model = load_dit(tiny_assets / "transformer")
    with torch.no_grad():
        model.head.head.weight.mul_(1e5)
    folder = tmp_path_factory.mktemp("overflow") / "transformer"
    save_dit({k: v.clone() for k, v in model.state_dict().items()}, folder, "wan", model.cfg)
    return folder


def test_float16_overflow_is_an_error_not_a_black_video(tiny_assets, params_for, overflow_checkpoint, tmp_path):
    from kaleido.model.generate import NumericalError, S2VPipeline

    params = load_params(params_for(tmp_path / "p", tiny_assets, {
        "model.checkpoint": str(overflow_checkpoint), "model.dtype": "float16", "generate.steps": 2}))
    pipe = S2VPipeline.from_params(params, device="cpu")
    with pytest.raises(NumericalError) as info:
        pipe("a cat", [], frames=5, height=32, width=48, steps=2, progress=False)
    message = str(info.value)
    assert "NaN/Inf" in message and "model.dtype=float16" in message and "bfloat16" in message
    assert "after sampling step 1 of 2" in message
    # the same weights in float32 generate normally (the values are large, not broken)
    params32 = load_params(params_for(tmp_path / "q", tiny_assets, {"model.checkpoint": str(overflow_checkpoint)}))
    frames = S2VPipeline.from_params(params32, device="cpu")("a cat", [], frames=5, height=32, width=48, steps=2,
                                                             progress=False)
    assert frames.shape == (5, 32, 48, 3)


def test_a_nan_checkpoint_fails_the_command_with_one_line(tiny_assets, params_for, tmp_path):
    from kaleido.model.checkpoint import load_dit, save_dit

    model = load_dit(tiny_assets / "transformer")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["blocks.0.ffn.0.weight"][0, 0] = float("nan")
    save_dit(state, tmp_path / "nan", "wan", model.cfg)
    params = params_for(tmp_path / "p", tiny_assets, {"model.checkpoint": str(tmp_path / "nan"), "generate.steps": 2})
    result = CliRunner().invoke(app, ["generate", "--prompt", "a cat", "--out", str(tmp_path / "v.mp4"),
                                      "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert "error: generation produced NaN/Inf in the latents after sampling step 1" in result.output
    assert not (tmp_path / "v.mp4").exists()


def test_eval_warns_for_long_case_prompts_before_generating(tiny_assets, params_for, tmp_path):
    import yaml
    from PIL import Image

    from kaleido.eval.evalset import load_eval_set
    from kaleido.eval.run import _prompt_truncations

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "r.png")
    cases = [{"id": "short", "prompt": "a cat", "category": "animal", "references": ["r.png"]},
             {"id": "long", "prompt": LONG, "category": "animal", "references": ["r.png"]}]
    (tmp_path / "evalset.yaml").write_text(yaml.safe_dump({"cases": cases}))
    params = load_params(params_for(tmp_path / "p", tiny_assets))
    lines: list[str] = []
    found = _prompt_truncations(params, load_eval_set(tmp_path), lines.append)
    assert list(found) == ["long"] and found["long"]["tokens"] > 512
    assert len(lines) == 1 and lines[0].startswith("warning: case long: prompt has ")
