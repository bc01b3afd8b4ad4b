"""LoRA adapters: peft injection, the three file layouts, diffusers' own loader, merging and bad files."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.config.schema import LORA_TARGETS, LoraSettings
from kaleido.model import lora
from kaleido.model.dit import KaleidoDiT, dit_config
from kaleido.model.keymaps import wan_to_diffusers

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def base() -> KaleidoDiT:
    torch.manual_seed(0)
    model = KaleidoDiT(dit_config("tiny"))
    with torch.no_grad():  # randomise every weight (zero-initialised biases would hide terms)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def fresh(base: KaleidoDiT) -> KaleidoDiT:
    model = KaleidoDiT(base.cfg)
    model.load_state_dict(base.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def adapted(base):
    """The base with a LoRA of non-zero factors on every allowed target, and its adapter."""
    model = lora.add_lora(fresh(base), RANK, ALPHA, LORA_TARGETS)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model, lora.adapter_of(model, RANK, ALPHA)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(3)
    cfg = dit_config("tiny")
    return (torch.randn(1, 16, 3, 8, 12, generator=gen), torch.tensor([600.0]),
            torch.randn(1, 7, cfg.text_dim, generator=gen))


def test_injection_freezes_the_base_and_starts_at_the_base_function(base, inputs):
    model = lora.add_lora(fresh(base), RANK, ALPHA, ["self_attn.q", "ffn.2"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * base.cfg.num_layers  # A and B, two targets, every block
    with torch.no_grad():  # B starts at zero
        torch.testing.assert_close(model(*inputs), base(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("layout", lora.LORA_LAYOUTS)
def test_each_layout_round_trips_and_merges_to_the_adapted_function(layout, base, adapted, inputs, tmp_path):
    model, adapter = adapted
    written = lora.save_adapter(adapter, tmp_path / "adapter", layout)
    loaded, found = lora.load_adapter(written if layout != "peft" else tmp_path / "adapter")
    assert found == layout and loaded.rank == RANK
    merged = lora.merge_lora(fresh(base), loaded)
    assert type(merged) is KaleidoDiT and list(merged.state_dict()) == list(base.state_dict())
    with torch.no_grad():
        want = model(*inputs)
        assert (want - base(*inputs)).abs().max() > 0.1  # the adapter changes the function
        torch.testing.assert_close(merged(*inputs), want, rtol=0, atol=2e-5)


def test_layout_keys_are_the_ones_other_tools_read(adapted, tmp_path):
    from safetensors import safe_open

    _, adapter = adapted
    with safe_open(str(lora.save_adapter(adapter, tmp_path / "d.safetensors", "diffusers")), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "transformer.blocks.1.attn2.to_out.0.lora_B.weight" in keys
    assert {"transformer.blocks.0.ffn.net.0.proj.lora_A.weight", "transformer.blocks.0.ffn.net.2.lora_B.weight"} <= keys
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == RANK  # alpha folded into B
    with safe_open(str(lora.save_adapter(adapter, tmp_path / "w.safetensors", "wan")), "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("diffusion_model.blocks.0.self_attn.q.alpha").item() == ALPHA
    assert {"diffusion_model.blocks.0.self_attn.q.lora_down.weight",
            "diffusion_model.blocks.0.cross_attn.o.lora_up.weight",
            "diffusion_model.blocks.1.ffn.0.lora_down.weight"} <= keys
    peft_dir = tmp_path / "p"
    lora.save_adapter(adapter, peft_dir, "peft")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA and config["peft_type"] == "LORA"


@pytest.mark.parametrize("layout", ["diffusers", "wan"])
def test_diffusers_own_loader_reproduces_our_adapted_model(layout, base, adapted, inputs, tmp_path):
    """WanPipeline.load_lora_weights (diffusers' loader and its Wan/ComfyUI converter) into diffusers' own
    WanTransformer3DModel with the same base weights gives our merged model's output."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    _, adapter = adapted
    cfg = base.cfg
    theirs = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
    )
    theirs.load_state_dict(wan_to_diffusers(base.state_dict()))
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=theirs,
                       scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.load_lora_weights(str(lora.save_adapter(adapter, tmp_path / f"{layout}.safetensors", layout)))
    merged = lora.merge_lora(fresh(base), adapter)
    with torch.no_grad():
        got = theirs(*inputs, return_dict=False)[0]
        torch.testing.assert_close(got, merged(*inputs), rtol=0, atol=2e-5)
        assert (got - base(*inputs)).abs().max() > 0.1


def test_scale_zero_is_the_base_and_scale_multiplies(base, adapted, inputs):
    _, adapter = adapted
    with torch.no_grad():
        torch.testing.assert_close(lora.merge_lora(fresh(base), adapter, scale=0.0)(*inputs), base(*inputs))
        half = lora.merge_lora(fresh(base), adapter, scale=0.5).blocks[0].self_attn.q.weight
        full = lora.merge_lora(fresh(base), adapter).blocks[0].self_attn.q.weight
        torch.testing.assert_close(half - base.blocks[0].self_attn.q.weight,
                                   (full - base.blocks[0].self_attn.q.weight) / 2, rtol=1e-4, atol=1e-6)


def test_bad_adapters_are_refused_with_the_file_named(base, adapted, tmp_path):
    from safetensors.torch import save_file

    _, adapter = adapted
    good = lora.save_adapter(adapter, tmp_path / "good.safetensors", "wan")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(lora.LoraError, match=r"truncated\.safetensors: truncated header: 192 of its \d+ header bytes"):
        lora.load_adapter(truncated)
    plain = tmp_path / "weights.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(lora.LoraError, match=r"weights\.safetensors: not a LoRA adapter"):
        lora.load_adapter(plain)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"diffusion_model.blocks.0.norm3.lora_down.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(lora.LoraError, match="not LoRA factors of the DiT's linear layers"):
        lora.load_adapter(foreign)
    # an incomplete file (a factor missing) or a diverged one (NaN) would merge as a silent no-op / poison
    from safetensors.torch import load_file

    raw = load_file(str(good))
    lone = {k: v for k, v in raw.items() if k != "diffusion_model.blocks.1.self_attn.q.lora_up.weight"}
    save_file(lone, str(tmp_path / "lone.safetensors"))
    with pytest.raises(lora.LoraError, match=r"1 module\(s\) lack a factor.*blocks\.1\.self_attn\.q"):
        lora.load_adapter(tmp_path / "lone.safetensors")
    raw["diffusion_model.blocks.0.ffn.2.lora_up.weight"][0, 0] = float("nan")
    save_file(raw, str(tmp_path / "nan.safetensors"))
    with pytest.raises(lora.LoraError, match="NaN or infinite"):
        lora.load_adapter(tmp_path / "nan.safetensors")
    with pytest.raises(lora.LoraError, match=r"written as a \.safetensors file, or into a folder"):
        lora.save_adapter(adapter, tmp_path / "out.pt", "wan")
    bigger = KaleidoDiT(dit_config("tiny", dim=96, num_heads=3))
    with pytest.raises(lora.LoraError, match="belongs to a model of another size"):
        lora.merge_lora(bigger, adapter)
    with pytest.raises(lora.LoraError, match="no such LoRA file"):
        lora.load_adapter(tmp_path / "missing")


def test_settings_name_the_allowed_targets():
    from pydantic import ValidationError

    assert LoraSettings().target_modules == [t for t in LORA_TARGETS if not t.startswith("ffn")]
    with pytest.raises(ValidationError, match=r"unknown \['attn1.to_q'\].*self_attn.q"):
        LoraSettings(target_modules=["attn1.to_q"])


def test_convert_and_merge_commands(base, adapted, inputs, tmp_path):
    from kaleido.model.checkpoint import load_dit, save_dit

    model, adapter = adapted
    save_dit(base.state_dict(), tmp_path / "base", "wan", base.cfg)
    lora.save_adapter(adapter, tmp_path / "run", "peft")
    runner = CliRunner()
    result = runner.invoke(app, ["convert-checkpoint", str(tmp_path / "run"), str(tmp_path / "comfy.safetensors"),
                                 "--to", "wan"])
    assert result.exit_code == 0, result.output
    assert "LoRA (peft layout): rank 4" in result.output
    assert lora.load_adapter(tmp_path / "comfy.safetensors")[1] == "wan"
    for fmt in ("wan", "diffusers", "sat"):
        result = runner.invoke(app, ["merge-lora", str(tmp_path / "base"), str(tmp_path / "comfy.safetensors"),
                                     str(tmp_path / f"merged-{fmt}"), "--to", fmt])
        assert result.exit_code == 0, result.output
        with torch.no_grad():
            torch.testing.assert_close(load_dit(tmp_path / f"merged-{fmt}")(*inputs), model(*inputs),
                                       rtol=0, atol=2e-5)
    result = runner.invoke(app, ["inspect-checkpoint", str(tmp_path / "comfy.safetensors")])
    assert result.exit_code == 0 and "rank 4, alpha 8" in result.output, result.output
    result = runner.invoke(app, ["merge-lora", str(tmp_path / "base"), str(tmp_path / "base"), str(tmp_path / "x")])
    assert result.exit_code == 2 and "not a LoRA adapter" in result.output, result.output


def test_generation_pipeline_merges_model_lora(tmp_path, tiny_assets, params_for, adapted):
    """model.lora: S2VPipeline.from_params merges the adapter into the DiT it loads (the base file is untouched)."""
    from kaleido.config import load_params
    from kaleido.model.checkpoint import load_dit
    from kaleido.model.generate import S2VPipeline

    base = load_dit(tiny_assets / "transformer")
    model = lora.add_lora(fresh(base), RANK, ALPHA, ["self_attn.q", "cross_attn.v"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.fill_(0.05)
    lora.save_adapter(lora.adapter_of(model, RANK, ALPHA), tmp_path / "adapter", "diffusers")
    params = load_params(params_for(tmp_path / "p", tiny_assets, {"model.lora": str(tmp_path / "adapter")}))
    pipe = S2VPipeline.from_params(params, device="cpu")
    key = "blocks.1.cross_attn.v.weight"
    merged = lora.merge_lora(fresh(base), lora.load_adapter(tmp_path / "adapter")[0]).state_dict()[key]
    torch.testing.assert_close(pipe.dit.state_dict()[key], merged)
    assert not torch.equal(pipe.dit.state_dict()[key], base.state_dict()[key])
    assert torch.equal(load_dit(tiny_assets / "transformer").state_dict()[key], base.state_dict()[key])


def test_lora_scale_without_an_adapter_is_refused_before_loading(tmp_path, tiny_assets, params_for):
    params = params_for(tmp_path / "p", tiny_assets, {})
    result = CliRunner().invoke(app, ["generate", "--prompt", "a cat", "--out", str(tmp_path / "v.mp4"),
                                      "--lora-scale", "0.5", "--params", str(params)])
    assert result.exit_code == 2 and "--lora-scale scales an adapter: give --lora" in result.output, result.output


# ---- adapters as other trainers write them ---------------------------------------------------------------------


def _model_with_patterns(base: KaleidoDiT):
    """A LoRA with its own rank on one module and its own alpha on two others (peft rank_pattern / alpha_pattern)."""
    from peft import inject_adapter_in_model

    ranks = {"blocks.1.ffn.0": 2, "blocks.0.cross_attn.k": 6}
    alphas = {"blocks.0.self_attn.q": 3.0, "blocks.1.ffn.0": 1.0}
    config = lora.lora_config(RANK, ALPHA, LORA_TARGETS, rank_pattern=ranks, alpha_pattern=alphas)
    model = inject_adapter_in_model(config, fresh(base))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model.eval(), config, ranks, alphas


def test_per_module_rank_and_alpha_as_peft_writes_them(base, inputs, tmp_path):
    """peft's rank_pattern / alpha_pattern (adapter_config.json as peft saves it): read, merged to the same function,
    and carried by each of our layouts; diffusers' own loader applies our diffusers and Wan files the same way."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    model, config, ranks, alphas = _model_with_patterns(base)
    folder = tmp_path / "peft"
    config.save_pretrained(str(folder))
    state = {f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(folder / lora.PEFT_WEIGHTS))
    adapter, layout = lora.load_adapter(folder)
    assert layout == "peft" and (adapter.rank, adapter.alpha) == (RANK, ALPHA)
    assert adapter.rank_pattern == ranks and adapter.alpha_pattern == alphas
    assert "3 with their own rank or alpha" in lora.adapter_summary(adapter, layout)
    with torch.no_grad():
        want = model(*inputs)
        torch.testing.assert_close(lora.merge_lora(fresh(base), adapter)(*inputs), want, rtol=0, atol=2e-5)
        for out in lora.LORA_LAYOUTS:
            again, _ = lora.load_adapter(lora.save_adapter(adapter, tmp_path / f"{out}-copy", out))
            torch.testing.assert_close(lora.merge_lora(fresh(base), again)(*inputs), want, rtol=0, atol=2e-5)
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    cfg = base.cfg
    for out in ("diffusers", "wan"):
        theirs = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=cfg.eps,
        )
        theirs.load_state_dict(wan_to_diffusers(base.state_dict()))
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=theirs,
                           scheduler=FlowMatchEulerDiscreteScheduler())
        pipe.load_lora_weights(str(lora.save_adapter(adapter, tmp_path / f"theirs-{out}.safetensors", out)))
        with torch.no_grad():
            torch.testing.assert_close(theirs(*inputs, return_dict=False)[0], want, rtol=0, atol=2e-5)


def test_musubi_tuner_and_kohya_names_load(base, adapted, inputs, tmp_path):
    """`lora_unet_blocks_N_<module>.lora_down/lora_up/alpha`, as musubi-tuner and kohya's scripts save a Wan LoRA
    (per-module alpha tensors, a module without alpha at scale 1): the same function as the adapter they hold; a text
    encoder's or an unknown module's tensors are refused by name."""
    from safetensors.torch import save_file

    model, adapter = adapted
    raw: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.state.items():
        module, kind = key.rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        raw[f"{stem}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = tensor.contiguous()
        raw[f"{stem}.alpha"] = torch.tensor(ALPHA)
    save_file(raw, str(tmp_path / "musubi.safetensors"))
    loaded, layout = lora.load_adapter(tmp_path / "musubi.safetensors")
    assert layout == "kohya" and loaded.modules == adapter.modules and (loaded.rank, loaded.alpha) == (RANK, ALPHA)
    with torch.no_grad():
        torch.testing.assert_close(lora.merge_lora(fresh(base), loaded)(*inputs), model(*inputs), rtol=0, atol=2e-5)
    del raw["lora_unet_blocks_0_ffn_2.alpha"]  # no alpha: alpha = rank, scale 1 for that module
    save_file(raw, str(tmp_path / "no-alpha.safetensors"))
    partial, _ = lora.load_adapter(tmp_path / "no-alpha.safetensors")
    assert partial.module_scaling("blocks.0.ffn.2") == 1.0 and partial.module_scaling("blocks.0.ffn.0") == ALPHA / RANK
    for bad, name in (("lora_te_encoder_layers_0_q", "lora_te_"), ("lora_unet_blocks_0_norm3", "blocks_0_norm3")):
        save_file({**raw, f"{bad}.lora_down.weight": torch.zeros(RANK, 4)}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(lora.LoraError, match=name):
            lora.load_adapter(tmp_path / "bad.safetensors")
