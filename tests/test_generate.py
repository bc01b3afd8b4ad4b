"""Subject-to-video generation on the tiny random-weight assets (CPU): pipeline, media, tokenizer, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.config import load_params
from kaleido.model.generate import S2VPipeline
from kaleido.model.media import contact_sheet, fit_and_pad, load_reference_image, read_video, write_video
from kaleido.model.tiny import MARKER

# Tiny request: 5 frames -> 2 latent frames, 32x48 -> 2x3 DiT patches per frame.
SMALL = {"frames": 5, "height": 32, "width": 48, "steps": 2, "guidance_scale": 6.0, "shift": 7.0}
PROMPT = "An astronaut holds a cat and a cup of coffee in a kitchen"


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """astronaut / chelsea (cat) / coffee from scikit-image, as PNG files."""
    from skimage import data

    folder = tmp_path_factory.mktemp("refs")
    paths = []
    for name in ("astronaut", "chelsea", "coffee"):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def params_path(tiny_assets: Path, params_for, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # text_len 64 instead of 512: same code path, less cross-attention work on a 2-core CPU
    return params_for(tmp_path_factory.mktemp("params"), tiny_assets, {"model.text_len": 64})


@pytest.fixture(scope="module")
def pipe(params_path: Path) -> S2VPipeline:
    return S2VPipeline.from_params(load_params(params_path), device="cpu")


class ForwardSpy:
    """Records every DiT forward (shapes and reference latents), then runs the real one."""

    def __init__(self, forward):
        self.forward = forward
        self.calls: list[dict] = []

    def __call__(self, latents, timestep, context, reference_latents=None):
        self.calls.append(
            {"latents": latents.shape, "context": context.clone(), "refs": reference_latents}
        )
        return self.forward(latents, timestep, context, reference_latents)


@pytest.fixture
def dit_spy(pipe: S2VPipeline, monkeypatch: pytest.MonkeyPatch) -> ForwardSpy:
    spy = ForwardSpy(pipe.dit.forward)
    monkeypatch.setattr(pipe.dit, "forward", spy)
    return spy


def _run(pipe: S2VPipeline, references, **overrides) -> np.ndarray:
    kwargs = {**SMALL, "seed": 0, "sampler": "euler", "progress": False, **overrides}
    return pipe(PROMPT, references, **kwargs)


# ---- assets, tokenizer, text encoder -------------------------------------------------------------------


def test_tiny_assets_layout_and_skip(tiny_assets: Path) -> None:
    from kaleido.model.tiny import build_tiny_assets

    for part, name in [
        ("transformer", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
        ("tokenizer", "tokenizer.json"),
    ]:
        assert (tiny_assets / part / name).is_file(), f"{part}/{name} missing"
    marker = (tiny_assets / MARKER).stat().st_mtime_ns
    build_tiny_assets(tiny_assets, seed=0)  # complete: nothing is rewritten
    assert (tiny_assets / MARKER).stat().st_mtime_ns == marker


def test_tokenizer_loads_offline(tiny_assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer, UMT5Config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_assets / "tokenizer"), local_files_only=True)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert 400 <= len(tokenizer) <= 1000
    assert len(tokenizer) == UMT5Config.from_pretrained(str(tiny_assets / "text_encoder")).vocab_size
    ids = tokenizer("a fluffy cat sits on a wooden table")["input_ids"]
    assert ids[-1] == 1 and 2 not in ids  # ends with </s>; corpus words are known
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a fluffy cat sits on a wooden table"


def test_text_encoder_zero_pads(pipe: S2VPipeline) -> None:
    encoder = pipe.text_encoder
    prompts = ["a cat", "a tall astronaut walks on a sandy beach"]
    context = encoder.encode(prompts, text_len=24)
    assert context.shape == (2, 24, encoder.dim)
    lengths = encoder.tokenizer(prompts, padding="max_length", max_length=24, truncation=True)["attention_mask"]
    for row, mask in zip(context, lengths, strict=True):
        n = sum(mask)
        assert 1 < n < 24
        assert torch.all(row[n:] == 0), "positions past the prompt must be exactly zero"
        assert torch.all(row[:n].abs().sum(dim=-1) > 0)
    # truncation: a long prompt fills every position
    assert torch.all(encoder.encode([" ".join(["cat"] * 50)], text_len=8).abs().sum(-1) > 0)


# ---- media ---------------------------------------------------------------------------------------------


def test_white_padding_before_encoding(pipe: S2VPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    tall = Image.new("RGB", (20, 100), (0, 0, 0))  # width 20, height 100 into a 48x32 frame
    padded = np.asarray(fit_and_pad(tall, 32, 48))
    assert padded.shape == (32, 48, 3)
    # resized to 6x32 and centred: 21 white columns each side
    assert np.all(padded[:, :21] == 255) and np.all(padded[:, 27:] == 255)
    assert np.all(padded[:, 21:27] < 10)

    seen = []
    encode = pipe.vae.model.encode

    def spy(video, *args, **kwargs):
        seen.append(video.clone())
        return encode(video, *args, **kwargs)

    monkeypatch.setattr(pipe.vae.model, "encode", spy)
    latent = pipe.vae.encode_reference(tall, 32, 48)
    assert latent.shape == (16, 1, 4, 6)  # one latent frame
    (pixels,) = seen
    assert pixels.shape == (1, 3, 1, 32, 48)  # encoded alone, T = 1
    assert torch.all(pixels[..., :21] == 1.0) and torch.all(pixels[..., 27:] == 1.0)  # white in [-1, 1]


def test_video_roundtrip_and_contact_sheet(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 32, 48, 3), dtype=np.uint8)
    path = write_video(frames, tmp_path / "clip.mp4", fps=16)
    decoded = read_video(path)
    assert decoded.shape == (5, 32, 48, 3)
    sheet = contact_sheet(frames, tmp_path / "sheet.png", columns=3)
    assert Image.open(sheet).size == (3 * 48 + 2 * 2, 2 * 32 + 2)


def test_load_reference_image_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nope\.png: file not found"):
        load_reference_image(tmp_path / "nope.png")
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match=r"fake\.png: not a readable image"):
        load_reference_image(fake)


# ---- pipeline ------------------------------------------------------------------------------------------


def test_same_seed_same_video_other_seed_differs(pipe: S2VPipeline, refs: list[Path]) -> None:
    first = _run(pipe, refs[:2], seed=3)
    assert first.shape == (5, 32, 48, 3) and first.dtype == np.uint8
    assert np.array_equal(first, _run(pipe, refs[:2], seed=3))
    assert not np.array_equal(first, _run(pipe, refs[:2], seed=4))


def test_references_change_the_video(pipe: S2VPipeline, refs: list[Path]) -> None:
    with_refs = _run(pipe, refs)
    without = _run(pipe, [])
    # random weights mix the reference tokens in weakly (~5% of the velocity), but visibly
    assert (with_refs != without).mean() > 0.1
    assert np.abs(with_refs.astype(int) - without.astype(int)).mean() > 0.1


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_cfg_keeps_references_in_both_branches(
    pipe: S2VPipeline, refs: list[Path], dit_spy: ForwardSpy, monkeypatch: pytest.MonkeyPatch, batch_cfg: bool
) -> None:
    monkeypatch.setattr(pipe, "batch_cfg", batch_cfg)
    _run(pipe, refs, negative_prompt="blurry, low quality")
    calls = dit_spy.calls
    assert len(calls) == SMALL["steps"] * (1 if batch_cfg else 2)
    for call in calls:
        refs_in = call["refs"]
        assert refs_in is not None, "every DiT call (cond and uncond) must receive the reference latents"
        assert refs_in.shape[:2] == (call["latents"][0], 3)
        assert torch.equal(refs_in[0], refs_in[-1])
    cond, uncond = pipe.text_encoder.encode([PROMPT, "blurry, low quality"], pipe.text_len)
    contexts = calls[0]["context"] if batch_cfg else torch.cat([calls[0]["context"], calls[1]["context"]])
    torch.testing.assert_close(contexts[0], cond)
    torch.testing.assert_close(contexts[1], uncond)  # the uncond branch gets the negative prompt


def test_guidance_one_skips_uncond_branch(pipe: S2VPipeline, refs: list[Path], dit_spy: ForwardSpy) -> None:
    _run(pipe, refs[:1], guidance_scale=1.0)
    assert len(dit_spy.calls) == SMALL["steps"]
    assert all(call["latents"][0] == 1 and call["refs"] is not None for call in dit_spy.calls)


def test_euler_and_unipc_both_run(pipe: S2VPipeline, refs: list[Path]) -> None:
    euler = _run(pipe, refs[:1], sampler="euler", steps=3)
    unipc = _run(pipe, refs[:1], sampler="unipc", steps=3)
    assert euler.shape == unipc.shape == (5, 32, 48, 3)
    assert not np.array_equal(euler, unipc)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", r"missing\.png: file not found"),
        ("unreadable", r"broken\.png: not a readable image"),
        ("too_many", r"4 references given, the model supports at most 3"),
        ("frames", r"frames=10: the Wan VAE needs 4k\+1 frames"),
        ("size", r"height=100: must be a positive multiple of 16"),
    ],
)
def test_bad_requests_fail_before_any_compute(
    pipe: S2VPipeline,
    refs: list[Path],
    dit_spy: ForwardSpy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    case: str,
    message: str,
) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("a model ran before the request was validated")

    monkeypatch.setattr(pipe.vae.model, "encode", forbidden)
    monkeypatch.setattr(pipe.text_encoder.model, "forward", forbidden)
    broken = tmp_path / "broken.png"
    broken.write_text("this is text, not a PNG")
    references: list[Path] = refs[:1]
    kwargs = dict(SMALL)
    if case == "missing":
        references = [refs[0], tmp_path / "missing.png"]
    elif case == "unreadable":
        references = [broken]
    elif case == "too_many":
        references = [*refs, refs[0]]
    elif case == "frames":
        kwargs["frames"] = 10
    elif case == "size":
        kwargs["height"] = 100
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, references, **kwargs, progress=False)
    assert dit_spy.calls == []


# ---- CLI -----------------------------------------------------------------------------------------------


def test_cli_generate_writes_playable_mp4_and_sheet(params_path: Path, refs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "videos" / "video.mp4"
    args = ["generate", "--params", str(params_path), "--prompt", PROMPT, "--out", str(out)]
    for ref in refs:
        args += ["--ref", str(ref)]
    args += ["--frames", "5", "--height", "32", "--width", "48", "--steps", "2", "--seed", "1", "--sampler", "unipc"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    sheet = out.with_suffix(".png")
    assert str(out) in result.output and str(sheet) in result.output
    frames = read_video(out)  # decodes with PyAV: a playable H.264 mp4
    assert frames.shape == (5, 32, 48, 3)
    assert Image.open(sheet).format == "PNG"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ref", "{tmp}/missing.png"], "missing.png: file not found"),
        (["--frames", "10"], "frames=10"),
        (["--width", "100"], "width=100"),
        (["--ref", "{ref}", "--ref", "{ref}", "--ref", "{ref}", "--ref", "{ref}"], "4 references given"),
    ],
)
def test_cli_generate_fails_before_loading_models(
    params_path: Path,
    refs: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    message: str,
) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("models were loaded before the request was validated")

    monkeypatch.setattr(S2VPipeline, "from_params", forbidden)
    extra = [item.format(tmp=tmp_path, ref=refs[0]) for item in extra]
    args = ["generate", "--params", str(params_path), "--prompt", "a cat", "--out", str(tmp_path / "v.mp4"), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "v.mp4").exists()


def test_cli_init_tiny_reuses_complete_folder(tiny_assets: Path) -> None:
    result = CliRunner().invoke(app, ["init-tiny", str(tiny_assets)])
    assert result.exit_code == 0, result.output
    assert "already complete" in result.output


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_sampling_schedule_is_wans_shifted_linspace(
    pipe: S2VPipeline, refs: list[Path], monkeypatch: pytest.MonkeyPatch, sampler: str
) -> None:
    """sigma_i = shift*s/(1+(shift-1)*s) for s = linspace(1, 0, steps+1)[:-1], then 0 (shifted once, not twice)."""
    from kaleido.model import generate

    used = []
    original = generate.make_scheduler
    monkeypatch.setattr(generate, "make_scheduler", lambda *a: used.append(original(*a)) or used[-1])
    _run(pipe, refs[:1], steps=4, shift=7.0, sampler=sampler)
    s = np.linspace(1.0, 0.0, 5)[:-1]
    expected = np.append(7 * s / (1 + 6 * s), 0.0)
    assert np.allclose(used[0].sigmas.numpy(), expected, atol=2e-3)  # UniPC rounds timesteps to integers
