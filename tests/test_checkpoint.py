"""DiT checkpoints: Wan2.1, diffusers and official Kaleido (SAT) layouts round-trip bit for bit, convert into each
other through the CLI, interoperate with diffusers, report every mismatch at once, and load shard by shard onto a
meta-built model without a second copy in memory."""

import contextlib
import ctypes
import gc
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.model.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    detect_format,
    expected_shapes,
    infer_config,
    inspect_checkpoint,
    iter_wan_shards,
    load_dit,
    parse_size,
    read_config,
    read_shapes,
    save_dit,
)
from kaleido.model.dit import KaleidoDiT, dit_config
from kaleido.model.keymaps import wan_to_diffusers

SHARD = 150_000  # bytes: the tiny DiT (~590 KB in fp32) then spans 4+ shards
# id -> (format, path under the module's folder, max shard bytes)
LAYOUTS = {
    "wan-file": ("wan", "wan.safetensors", 5 * 10**9),
    "wan-folder": ("wan", "wan", 5 * 10**9),
    "wan-sharded": ("wan", "wan_sharded", SHARD),
    "diffusers": ("diffusers", "diffusers", 5 * 10**9),
    "diffusers-sharded": ("diffusers", "diffusers_sharded", SHARD),
    "sat": ("sat", "sat", SHARD),
}


@pytest.fixture(scope="module")
def tiny() -> KaleidoDiT:
    torch.manual_seed(0)
    model = KaleidoDiT(dit_config("tiny")).eval()
    with torch.no_grad():
        # Norm weights start at 1 and some biases alike: randomise all so a swapped tensor cannot hide.
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 2, 4, 6, generator=gen)
    timestep = torch.tensor([437.0])
    context = torch.randn(1, 5, dit_config("tiny").text_dim, generator=gen)
    return latents, timestep, context


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saved")
    paths = {}
    for name, (fmt, rel, shard) in LAYOUTS.items():
        paths[name] = root / rel
        save_dit(tiny, paths[name], fmt, tiny.cfg, max_shard_bytes=shard)
    return paths


@pytest.fixture(scope="module")
def wan_transformer():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.WanTransformer3DModel


def assert_same_model(loaded: KaleidoDiT, original: KaleidoDiT, inputs=None) -> None:
    got, want = loaded.state_dict(), original.state_dict()
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key
    assert not [n for n, p in loaded.named_parameters() if p.is_meta]
    if inputs is not None:
        # Same weights, yet not bit-equal outputs: memory-mapped safetensors data is only 8-byte aligned, and CPU
        # GEMM kernels pick their code path by pointer alignment (differences of an ulp or two).
        with torch.no_grad():
            torch.testing.assert_close(loaded(*inputs), original(*inputs), rtol=0, atol=1e-5)


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))


# ---- round trips -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trip(layout, saved, tiny, inputs):
    fmt = LAYOUTS[layout][0]
    path = saved[layout]
    assert detect_format(path) == fmt
    assert read_config(path) == tiny.cfg  # config.json, or metadata of the single file
    assert_same_model(load_dit(path), tiny, inputs)


@pytest.mark.parametrize("layout", ["wan-sharded", "diffusers-sharded"])
def test_sharded_layout(layout, saved):
    folder = saved[layout]
    shards = shard_files(folder)
    assert len(shards) >= 3
    assert all(s.stat().st_size <= SHARD + 64 * 1024 for s in shards)  # header + at most one over-size tensor
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    # Shard by shard: each yielded dict is one file's tensors, never the whole model.
    sizes = [len(shard) for shard in iter_wan_shards(folder)]
    assert len(sizes) == len(shards)
    assert sum(sizes) == len(expected_shapes(dit_config("tiny")))


def test_config_json_is_the_format_own(saved):
    wan = json.loads((saved["wan-folder"] / "config.json").read_text())
    assert wan["_class_name"] == "WanModel" and wan["num_heads"] == 2 and wan["dim"] == 64
    diffusers = json.loads((saved["diffusers"] / "config.json").read_text())
    assert diffusers["_class_name"] == "WanTransformer3DModel"
    assert (diffusers["num_attention_heads"], diffusers["attention_head_dim"]) == (2, 32)


def test_sat_layout_and_accepted_paths(saved, tiny):
    root = saved["sat"]
    assert (root / "latest").read_text().strip() == "1"
    module = torch.load(root / "1" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    fused = module["model.diffusion_model.transformer.layers.0.attention.query_key_value.weight"]
    assert fused.shape == (3 * 64, 64)
    assert torch.equal(fused[64:128], tiny.blocks[0].self_attn.k.weight)
    for path in (root, root / "1", root / "1" / "mp_rank_00_model_states.pt"):
        assert detect_format(path) == "sat"
        assert_same_model(load_dit(path), tiny)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_original_wan_pth_with_prefix(zip_format, tiny, tmp_path):
    # Wan .pth files are plain state dicts; some carry `model.diffusion_model.`, and other sub-models beside it.
    state = {f"model.diffusion_model.{k}": v for k, v in tiny.state_dict().items()}
    state["first_stage_model.encoder.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "wan.pth", _use_new_zipfile_serialization=zip_format)
    assert detect_format(tmp_path / "wan.pth") == "wan"
    assert read_config(tmp_path / "wan.pth") is None
    assert_same_model(load_dit(tmp_path / "wan.pth", config=tiny.cfg), tiny)


def test_load_casts_dtype(saved, tiny):
    model = load_dit(saved["wan-sharded"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.head.head.weight, tiny.head.head.weight.to(torch.bfloat16))


# ---- configs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mid", "1.3B", "14B"])
def test_infer_config_from_shapes(name):
    assert infer_config(expected_shapes(dit_config(name))) == dit_config(name)


def test_infer_config_needs_heads_when_dim_is_not_wan_like(tiny, tmp_path):
    save_file(dict(tiny.state_dict()), tmp_path / "bare.safetensors")  # no config anywhere
    with pytest.raises(CheckpointError, match=r"number of attention heads.*--arch"):
        load_dit(tmp_path / "bare.safetensors")
    assert_same_model(load_dit(tmp_path / "bare.safetensors", config=tiny.cfg), tiny)


def test_read_shapes_splits_fused_sat_tensors(saved):
    shapes = read_shapes(saved["sat"])
    assert shapes == expected_shapes(dit_config("tiny"))


@pytest.mark.parametrize(("text", "size"), [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("150KB", 150_000), ("42", 42)])
def test_parse_size(text, size):
    assert parse_size(text) == size


# ---- errors ----------------------------------------------------------------------------------------------


def test_mismatches_are_reported_together(tiny, tmp_path):
    state = wan_to_diffusers(dict(tiny.state_dict()))
    del state["blocks.1.ffn.net.2.bias"]  # missing
    state["blocks.0.attn1.to_added.weight"] = torch.zeros(3)  # unexpected
    state["proj_out.weight"] = torch.zeros(10, 64)  # wrong shape
    folder = tmp_path / "bad"
    folder.mkdir()
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_dit(folder, config=tiny.cfg)
    message = str(info.value)
    assert "format diffusers" in message
    assert re.search(r"1 missing keys:\n\s+blocks\.1\.ffn\.2\.bias", message)
    assert re.search(r"1 unexpected keys:\n\s+blocks\.0\.attn1\.to_added\.weight", message)
    assert "1 wrong shapes:\n    head.head.weight: expected (64, 64), got (10, 64)" in message
    # The same check runs from headers alone before a conversion writes anything.
    with pytest.raises(CheckpointError, match="missing keys"):
        convert_checkpoint(folder, tmp_path / "out", "wan", config=tiny.cfg)
    assert not (tmp_path / "out").exists()


def test_long_lists_are_truncated(tiny, tmp_path):
    save_file({"patch_embedding.weight": tiny.patch_embedding.weight.detach()}, tmp_path / "part.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_dit(tmp_path / "part.safetensors", config=tiny.cfg)
    total = len(expected_shapes(tiny.cfg)) - 1
    assert f"{total} missing keys" in str(info.value)
    assert f"... and {total - 20} more" in str(info.value)


def test_save_rejects_a_state_dict_that_does_not_fit(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="state dict to save"):
        save_dit(tiny, tmp_path / "x", "wan", dit_config("tiny", ffn_dim=96))


@pytest.mark.parametrize("case", ["empty", "missing", "foreign-tensors", "dangling-latest", "bad-suffix"])
def test_no_checkpoint_is_a_clear_error(case, tmp_path):
    path = tmp_path / "ckpt"
    if case == "empty":
        path.mkdir()
        expected = "no DiT checkpoint in this folder"
    elif case == "missing":
        expected = "no such file or folder"
    elif case == "foreign-tensors":
        path.mkdir()
        save_file({"encoder.conv_in.weight": torch.zeros(2)}, path / "diffusion_pytorch_model.safetensors")
        expected = "tensor names match no known DiT layout"
    elif case == "dangling-latest":
        path.mkdir()
        (path / "latest").write_text("7")
        expected = "`latest` names '7'"
    else:
        path = tmp_path / "weights.ckpt"
        path.write_text("x")
        expected = "unsupported file type"
    with pytest.raises(CheckpointError) as info:
        detect_format(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)
    assert "Accepted layouts" in str(info.value)


def test_convert_to_a_single_wan_file(saved, tiny, tmp_path):
    written = convert_checkpoint(saved["sat"], tmp_path / "out.safetensors", "wan")
    assert written == [tmp_path / "out.safetensors"]
    assert read_config(tmp_path / "out.safetensors") == tiny.cfg
    assert_same_model(load_dit(tmp_path / "out.safetensors"), tiny)


def test_convert_refuses_to_overwrite_its_source(saved):
    with pytest.raises(CheckpointError, match="holds the source checkpoint"):
        convert_checkpoint(saved["wan-folder"], saved["wan-folder"], "diffusers")


# ---- CLI -------------------------------------------------------------------------------------------------

SOURCES = {"wan": "wan-sharded", "diffusers": "diffusers-sharded", "sat": "sat"}


@pytest.mark.parametrize(("src_fmt", "dst_fmt"), [(a, b) for a in SOURCES for b in SOURCES if a != b])
def test_cli_convert_every_pair(src_fmt, dst_fmt, saved, tiny, tmp_path):
    dst = tmp_path / dst_fmt
    result = CliRunner().invoke(
        app, ["convert-checkpoint", str(saved[SOURCES[src_fmt]]), str(dst), "--to", dst_fmt, "--shard-size", "150KB"]
    )
    assert result.exit_code == 0, result.output
    assert f"({src_fmt}) -> {dst} ({dst_fmt})" in result.output
    assert detect_format(dst) == dst_fmt
    if dst_fmt != "sat":
        assert len(shard_files(dst)) >= 3
    assert_same_model(load_dit(dst), tiny)


def test_cli_inspect(saved):
    result = CliRunner().invoke(app, ["inspect-checkpoint", str(saved["diffusers-sharded"])])
    assert result.exit_code == 0, result.output
    assert "format: diffusers" in result.output
    assert "num_heads: 2" in result.output
    assert f"parameters: {sum(s.numel() for s in expected_shapes(dit_config('tiny')).values())} " in result.output
    assert inspect_checkpoint(saved["sat"]).dtypes == {"float32": len(expected_shapes(dit_config("tiny")))}


def test_cli_errors_name_the_fix(saved, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["convert-checkpoint", str(saved["wan-folder"]), str(tmp_path / "o"), "--to", "onnx"])
    assert result.exit_code == 2 and "choose one of wan, diffusers, sat" in result.output
    result = runner.invoke(app, ["inspect-checkpoint", str(tmp_path)])
    assert result.exit_code == 2 and "no DiT checkpoint" in result.output
    save_file(dict(KaleidoDiT(dit_config("tiny")).state_dict()), tmp_path / "bare.safetensors")
    result = runner.invoke(app, ["inspect-checkpoint", str(tmp_path / "bare.safetensors")])
    assert result.exit_code == 2 and "--arch" in result.output
    result = runner.invoke(app, ["inspect-checkpoint", str(tmp_path / "bare.safetensors"), "--arch", "tiny"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect-checkpoint", str(tmp_path / "bare.safetensors"), "--arch", "mid"])
    assert result.exit_code == 2 and "wrong shapes" in result.output


# ---- diffusers interoperability --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["diffusers", "diffusers-sharded"])
def test_diffusers_loads_what_we_write(layout, saved, tiny, inputs, wan_transformer):
    ref = wan_transformer.from_pretrained(saved[layout], torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(*inputs, return_dict=False)[0]
        ours = tiny(*inputs)
    assert (theirs - ours).abs().max().item() < 1e-4


def test_we_load_what_diffusers_writes(tiny, inputs, wan_transformer, tmp_path):
    cfg = tiny.cfg
    torch.manual_seed(3)
    ref = wan_transformer(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    assert detect_format(tmp_path / "hf") == "diffusers"
    assert read_config(tmp_path / "hf") == cfg
    ours = load_dit(tmp_path / "hf")
    with torch.no_grad():
        diff = ours(*inputs) - ref(*inputs, return_dict=False)[0]
    assert diff.abs().max().item() < 1e-4


# ---- memory ----------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), flags=re.MULTILINE)
    assert match, field
    return int(match.group(1))


def _reset_peak_rss() -> bool:
    """Set VmHWM (peak RSS) to the current RSS (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def test_loading_holds_one_copy(tmp_path):
    """Peak RSS while loading a ~100 MB checkpoint in two shards (and touching every weight) grows by ~1x its size.

    Memory-mapped pages count in RSS once touched (hence the lower bound). Building the model in memory and
    copying into it needs the model plus the file pages of at least one shard: ~1.6x here, 2x if it gathers
    every shard first; assigning the mapped tensors as the parameters needs 1x.
    """
    if not _reset_peak_rss():
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak RSS")
    cfg = dit_config("mid", num_layers=6)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=gen) for k, shape in expected_shapes(cfg).items()}
    size = sum(t.nbytes for t in state.values())
    assert size > 80e6
    save_dit(state, tmp_path / "big", "wan", cfg, max_shard_bytes=int(size * 0.6))
    sample = state["blocks.3.ffn.0.weight"][:4].clone()
    del state
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so it cannot hide a new allocation
    assert _reset_peak_rss()
    before = _proc_status_kib("VmRSS") * 1024
    model = load_dit(tmp_path / "big")
    checksum = sum(p.sum().item() for p in model.parameters())  # reads every weight (faults in mapped pages)
    growth = _proc_status_kib("VmHWM") * 1024 - before
    assert math.isfinite(checksum)
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    assert torch.equal(model.blocks[3].ffn[0].weight[:4], sample)
    assert len(shard_files(tmp_path / "big")) == 2
    assert 0.5 * size < growth < 1.3 * size, f"RSS grew {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"
