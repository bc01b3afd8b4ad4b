"""Exports carry what the model was trained with (R-RoPE variant and offset, text length, max references) in every
layout, and loading follows it: a `none`-trained model runs as `none` under a default params.yaml, with a warning that
names both values (kaleido/model/settings.py says why it overrides rather than refuses)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from kaleido.model.checkpoint import convert_checkpoint, load_dit, read_config, read_settings, save_dit
from kaleido.model.dit import KaleidoDiT, dit_config
from kaleido.model.settings import ModelSettings, resolve_settings

NONE = ModelSettings(rope_variant="none", rope_offset=40, text_len=16, max_references=2)


@pytest.fixture(scope="module")
def none_model() -> KaleidoDiT:
    torch.manual_seed(3)
    model = KaleidoDiT(dit_config("tiny"), rope_variant="none", rope_offset=40).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _forward(model: KaleidoDiT) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 2, 4, 6, generator=gen)
    context = torch.randn(1, 16, model.cfg.text_dim, generator=gen)
    refs = torch.randn(1, 2, 16, 4, 6, generator=gen)
    with torch.no_grad():
        return model(latents, torch.tensor([500.0]), context, refs)


@pytest.mark.parametrize("fmt,name", [("wan", "wan"), ("wan", "one.safetensors"), ("diffusers", "diffusers"),
                                      ("sat", "sat")])
def test_every_layout_records_the_settings_and_loading_follows_them(none_model, tmp_path, fmt, name) -> None:
    path = tmp_path / name
    save_dit(none_model, path, fmt, none_model.cfg, settings=NONE)
    assert read_settings(path) == NONE
    assert read_config(path) == none_model.cfg  # the architecture record is unchanged by the extra block
    loaded = load_dit(path)  # no rope arguments: the checkpoint's record decides
    assert (loaded.rope_variant, loaded.rope_offset) == ("none", 40)
    assert torch.equal(_forward(loaded), _forward(none_model))
    # the same weights run as the shipped shift_wh compute another function: the record is what makes them right
    wrong = load_dit(path, rope_variant="shift_wh", rope_offset=80)
    assert not torch.allclose(_forward(wrong), _forward(none_model), atol=1e-4)


def test_conversion_carries_the_settings_into_every_layout(none_model, tmp_path) -> None:
    save_dit(none_model, tmp_path / "src", "wan", none_model.cfg, settings=NONE)
    for fmt, dst in (("sat", "sat"), ("diffusers", "diffusers"), ("wan", "file.safetensors")):
        convert_checkpoint(tmp_path / "src", tmp_path / dst, fmt)
        assert read_settings(tmp_path / dst) == NONE, fmt


def test_wan_config_keeps_its_own_keys_and_diffusers_loads_ours_as_private(none_model, tmp_path, caplog) -> None:
    save_dit(none_model, tmp_path / "wan", "wan", none_model.cfg, settings=NONE)
    data = json.loads((tmp_path / "wan" / "config.json").read_text())
    assert data["text_len"] == 16 and data["_kaleido"]["rope_variant"] == "none"
    diffusers = pytest.importorskip("diffusers")
    save_dit(none_model, tmp_path / "diffusers", "diffusers", none_model.cfg, settings=NONE)
    with caplog.at_level(logging.WARNING):
        model = diffusers.WanTransformer3DModel.from_pretrained(str(tmp_path / "diffusers"))
    assert "_kaleido" not in caplog.text  # not an init argument: no "ignored attributes" warning
    assert model.config["_kaleido"]["rope_variant"] == "none"  # kept as private config, saved again with the model


def test_a_checkpoint_without_a_record_uses_the_params(none_model, tmp_path) -> None:
    save_dit(none_model, tmp_path / "bare", "wan", none_model.cfg)  # a Wan release says nothing of R-RoPE
    assert read_settings(tmp_path / "bare") is None
    assert load_dit(tmp_path / "bare").rope_variant == "shift_wh"  # the shipped default
    requested = ModelSettings(rope_variant="shift_h")
    assert resolve_settings(None, requested, "x") == requested


def test_disagreeing_params_are_overridden_with_a_warning_naming_both(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="kaleido.model.settings"):
        chosen = resolve_settings(NONE, ModelSettings(), "ckpt/export")
    assert chosen == NONE
    text = caplog.text
    assert "model.rope.variant: params.yaml says 'shift_wh' but ckpt/export was trained with 'none'" in text
    assert "model.text_len" in text and "model.rope.offset" in text and "model.max_references" in text
    caplog.clear()
    # training: params.yaml says what is trained; no warning, the change is logged at info
    with caplog.at_level(logging.INFO, logger="kaleido.model.settings"):
        assert resolve_settings(NONE, ModelSettings(), "init", purpose="train") == ModelSettings()
    assert all(record.levelno == logging.INFO for record in caplog.records) and caplog.records


def test_a_damaged_record_is_named(none_model, tmp_path) -> None:
    save_dit(none_model, tmp_path / "m", "wan", none_model.cfg, settings=NONE)
    config = tmp_path / "m" / "config.json"
    data = json.loads(config.read_text())
    data["_kaleido"]["rope_variant"] = "diagonal"
    config.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="diagonal"):
        read_settings(tmp_path / "m")


def test_none_export_runs_as_none_with_default_params(none_model, tiny_assets: Path, params_for, tmp_path,
                                                      caplog) -> None:
    """The issue's case: a model trained with R-RoPE `none`, loaded with the default params.yaml (shift_wh)."""
    from kaleido.config import load_params
    from kaleido.model.generate import S2VPipeline

    settings = ModelSettings(rope_variant="none", rope_offset=80, text_len=512, max_references=3)
    save_dit(none_model, tmp_path / "export", "wan", none_model.cfg, settings=settings)
    params = load_params(params_for(tmp_path / "p", tiny_assets, {"model.checkpoint": str(tmp_path / "export")}))
    assert params.model.rope.variant == "shift_wh"
    with caplog.at_level(logging.WARNING, logger="kaleido.model.settings"):
        pipe = S2VPipeline.from_params(params, device="cpu")
    assert pipe.dit.rope_variant == "none"
    assert "trained with 'none'" in caplog.text
    reference = KaleidoDiT(none_model.cfg, rope_variant="none").eval()
    reference.load_state_dict(none_model.state_dict())
    assert torch.equal(_forward(pipe.dit), _forward(reference))
    frames = pipe("a red square", [], 5, 32, 48, 2, 1.0, 3.0, "euler", 0, "", progress=False, output_type="latents")
    assert torch.isfinite(frames).all()


def test_a_version_records_the_checkpoints_settings_not_the_registering_params(none_model, tiny_assets, params_for,
                                                                            tmp_path) -> None:
    from kaleido.config import load_params
    from kaleido.serving import build_model, params_for_model, read_model_config

    save_dit(none_model, tmp_path / "export", "wan", none_model.cfg, settings=NONE)
    params = load_params(params_for(tmp_path / "p", tiny_assets), {"platform.model_assets": "copy"})
    folder = build_model(tmp_path / "export", params, tmp_path / "model")
    config = read_model_config(folder)
    assert (config["rope_variant"], config["rope_offset"], config["text_len"], config["max_references"]) == (
        "none", 40, 16, 2)
    local = params_for_model(params, folder)  # what evaluate / generate / the gate run the version with
    assert (local.model.rope.variant, local.model.rope.offset, local.model.text_len) == ("none", 40, 16)


def test_a_lora_export_records_its_settings_and_they_win_over_the_base(none_model, tmp_path) -> None:
    from kaleido.model import lora

    save_dit(none_model, tmp_path / "base", "wan", none_model.cfg, settings=NONE)
    model = lora.add_lora(KaleidoDiT(none_model.cfg), 2, 2.0, ["self_attn.q"])
    adapter = lora.adapter_of(model, 2, 2.0)
    trained = ModelSettings(rope_variant="shift_h", rope_offset=40, text_len=16, max_references=2)
    adapter.meta["model_settings"] = json.dumps(trained.to_dict())  # what Trainer.export writes
    for layout in lora.LORA_LAYOUTS:
        file = lora.save_adapter(adapter, tmp_path / layout, layout)
        assert read_settings(tmp_path / "base", file) == trained, layout
    assert load_dit(tmp_path / "base", lora=file).rope_variant == "shift_h"
    assert read_settings(tmp_path / "base") == NONE
