"""The training memory planner: shipped-size figures from DeepSpeed's own estimators and the official token
arithmetic, `kaleido train --plan`, refusal before launch, and the estimate against measured CPU peaks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.config.schema import LORA_ATTENTION_TARGETS
from kaleido.model.dit import dit_config
from kaleido.train.memory import REDUCE_BUCKET, TrainingShape, estimate

GB = 1e9


def shipped(arch: str, **kw) -> TrainingShape:
    """480x832, 81 frames, 3 references (the shipped training size), 512 text tokens, 8 GPUs."""
    return TrainingShape(dit_config(arch), 81, 480, 832, 3, 512, world_size=8, **kw)


def test_tokens_at_the_shipped_training_size():
    # 81 frames -> 21 latent frames (Wan VAE: 1 + 80 / 4); 480x832 -> 60x104 latents -> 30x52 patches (2x2)
    assert shipped("14B").tokens == 21 * 30 * 52 + 3 * 30 * 52 == 37440
    # the shipped sampling size 512x896 (32x56 patches) and 720p (45x80 patches), 81 frames, 3 references
    assert TrainingShape(dit_config("14B"), 81, 512, 896, 3, 512).tokens == (21 + 3) * 32 * 56 == 43008
    assert TrainingShape(dit_config("14B"), 81, 720, 1280, 3, 512).tokens == (21 + 3) * 45 * 80 == 86400


def test_720p_14b_full_fine_tuning_needs_sequence_parallelism():
    """At 720p (86,400 tokens) one 14B block's saved tensors alone are tens of GB: the planner must say so."""
    from dataclasses import replace

    from kaleido.train.memory import block_activation_bytes

    full = TrainingShape(dit_config("14B"), 81, 720, 1280, 3, 512, world_size=8, zero_stage=3)
    # 86,400 tokens x 5120 wide x (10 fp32 + 12 bf16 copies) + two 13,824-wide FFN hidden states
    assert block_activation_bytes(full) / GB == pytest.approx(
        (86400 * 5120 * (10 * 4 + 12 * 2) + 2 * 86400 * 13824 * 2) / GB, rel=0.01)
    assert estimate(full).total_gb > 80 and estimate(replace(full, sequence_parallel=8)).total_gb < 80
    # LoRA keeps 6 fp32 + 8 bf16 copies and one FFN hidden state per block
    lora = replace(full, lora_rank=16, lora_targets=LORA_ATTENTION_TARGETS)
    assert block_activation_bytes(lora) / GB == pytest.approx(
        (86400 * 5120 * (6 * 4 + 8 * 2) + 86400 * 13824 * 2) / GB, rel=0.01)


@pytest.mark.parametrize("arch", ["1.3B", "14B"])
def test_model_states_are_deepspeeds_estimates(arch):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from kaleido.model.checkpoint import expected_shapes

    shapes = expected_shapes(dit_config(arch))  # the checkpoint layout
    params = sum(int(s.numel()) for s in shapes.values())
    layer = max(int(s.numel()) for s in shapes.values())  # ZeRO-3 gathers one tensor at a time
    bucket = 2 * REDUCE_BUCKET
    for offload in (False, True):
        found = estimate(shipped(arch, zero_stage=2, offload_optimizer=offload)).rows
        states = found["parameters"] + found["gradients"] + found["optimizer states"]
        assert states == pytest.approx(estimate_zero2_model_states_mem_needs(params, 8, 1, offload)[1] + bucket)
        found = estimate(shipped(arch, zero_stage=3, offload_optimizer=offload)).rows
        states = found["parameters"] + found["gradients"] + found["optimizer states"]
        ds = estimate_zero3_model_states_mem_needs(params, layer, 8, 1, offload, cpu_offload_params=False)[1]
        assert states == pytest.approx(ds + bucket)


def test_shipped_size_plans_scale_as_they_must():
    full = estimate(shipped("14B", zero_stage=2))
    # 14B full fine-tuning: 2 bytes x 14.29e9 parameters on every rank before anything else
    assert full.rows["parameters"] > 28.5 * GB and full.total_gb > 80
    # Ulysses splits every [tokens, .] activation over the group: SP 8 keeps well under a quarter of them
    sp8 = estimate(shipped("14B", zero_stage=2, sequence_parallel=8))
    assert sp8.rows["activations"] < full.rows["activations"] / 4
    # without activation checkpointing the 40 blocks of 14B cannot hold 37440 tokens on one GPU
    assert estimate(shipped("14B", zero_stage=3, checkpointing=False)).total_gb > 300
    # LoRA: gradients and Adam moments only for the adapter (rank 16 on the attention: ~0.1% of 14B)
    lora = estimate(shipped("14B", zero_stage=3, lora_rank=16, lora_targets=LORA_ATTENTION_TARGETS))
    assert lora.rows["optimizer states"] < 0.01 * estimate(shipped("14B", zero_stage=3)).rows["optimizer states"]


def _plan_params(params_for, tmp_path, tiny_assets, overrides):
    base = {"model.arch": "14B", "model.checkpoint": str(tmp_path / "none"), "train.launcher": "kubernetes",
            "train.kubernetes.nodes": 1, "train.kubernetes.gpus_per_node": 8, "train.frames": 81,
            "train.buckets": [[480, 832]], "train.pretrain.global_batch": 8}
    return params_for(tmp_path, tiny_assets, {**base, **overrides})


def test_plan_prints_the_table_and_refuses_what_cannot_fit(params_for, tiny_assets, tmp_path):
    runner = CliRunner()
    fits = _plan_params(params_for, tmp_path / "fits", tiny_assets,
                        {"train.zero_stage": 3, "train.sequence_parallel": 8})
    result = runner.invoke(app, ["train", "--stage", "pretrain", "--plan", "--params", str(fits)])
    assert result.exit_code == 0, result.output
    for row in ("parameters", "gradients", "optimizer states", "activations", "backward buffers", "total"):
        assert row in result.output
    assert "plan: fits" in result.output and "37440 tokens" in result.output

    too_big = _plan_params(params_for, tmp_path / "big", tiny_assets, {"train.zero_stage": 2})
    result = runner.invoke(app, ["train", "--stage", "pretrain", "--plan", "--params", str(too_big)])
    assert result.exit_code == 2
    assert "train.gpu_memory_gb is 80" in result.output and "options that fit" in result.output
    assert "train.sequence_parallel: 8" in result.output or "train.zero_stage: 3" in result.output
    # the same check before a launch: nothing is rendered or applied
    result = runner.invoke(app, ["train", "--stage", "pretrain", "--dry-run", "--params", str(too_big)])
    assert result.exit_code == 2 and "train.gpu_memory_gb is 80" in result.output, result.output


def test_offload_is_planned_on_the_gpu_and_on_the_machines(params_for, tiny_assets, tmp_path):
    zero3 = shipped("14B", zero_stage=3)
    params_only = estimate(shipped("14B", zero_stage=3, offload_parameters=True))
    assert params_only.rows["parameters"] < estimate(zero3).rows["parameters"]
    # both offloads: ~386 GB of CPU memory per 8-GPU machine (DeepSpeed: 18 bytes x 14.3e9 x 1.5)
    runner = CliRunner()
    path = _plan_params(params_for, tmp_path / "offload", tiny_assets, {
        "train.zero_stage": 3, "train.offload_optimizer": True, "train.offload_parameters": True,
        "train.kubernetes.memory": "64Gi"})  # fmt: skip
    result = runner.invoke(app, ["train", "--stage", "pretrain", "--plan", "--params", str(path)])
    assert result.exit_code == 2 and "train.kubernetes.memory gives 69 GB" in result.output, result.output
    assert "parameter offload" in result.output  # the table says what it planned
    path = _plan_params(params_for, tmp_path / "offload-ok", tiny_assets, {
        "train.zero_stage": 3, "train.offload_optimizer": True, "train.offload_parameters": True,
        "train.kubernetes.memory": "512Gi"})  # fmt: skip
    result = runner.invoke(app, ["train", "--stage", "pretrain", "--plan", "--params", str(path)])
    assert result.exit_code == 0 and "plan: fits" in result.output, result.output


def test_a_layout_problem_is_named_without_a_misleading_table(params_for, tiny_assets, tmp_path):
    path = _plan_params(params_for, tmp_path / "sp", tiny_assets, {"train.sequence_parallel": 16})
    result = CliRunner().invoke(app, ["train", "--stage", "pretrain", "--plan", "--params", str(path)])
    assert result.exit_code == 2 and "total (peak)" not in result.output
    assert "use one of [1, 2, 4, 8]" in result.output, result.output


def test_the_plan_names_what_set_the_model_and_the_world_size(params_for, tiny_assets, tmp_path):
    """`-S model.arch=14B` over tiny init weights plans the weights' model and says so; a world size given by
    `--gpus` is named as `--gpus` in a layout refusal, not as the params keys it overrode."""
    path = _plan_params(params_for, tmp_path / "tiny", tiny_assets,
                        {"model.checkpoint": str(tiny_assets / "transformer")})
    result = CliRunner().invoke(app, ["train", "--stage", "pretrain", "--plan", "--params", str(path)])
    assert result.exit_code == 0, result.output
    assert "the config of model.checkpoint, not model.arch=14B" in result.output
    path = _plan_params(params_for, tmp_path / "gpus", tiny_assets, {})
    result = CliRunner().invoke(app, ["train", "--stage", "pretrain", "--plan", "--params", str(path), "--gpus", "16"])
    assert result.exit_code == 2 and "16 ranks (--gpus)" in result.output, result.output


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["--arch", "tiny", "--frames", "21", "--height", "512", "--width", "512"],
    ["--arch", "mid", "--no-checkpointing"],
    ["--arch", "mid", "--lora-rank", "16"],
], ids=["tiny", "mid-no-checkpointing", "mid-lora"])
def test_estimate_within_20_percent_of_the_measured_cpu_peak(args):
    done = subprocess.run([sys.executable, "-m", "kaleido.train.memory_probe", *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["measured_peak"] > 100e6  # large enough that the comparison means something
    assert 0.8 <= result["ratio"] <= 1.2, result


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("lora_targets", [(), LORA_ATTENTION_TARGETS, (*LORA_ATTENTION_TARGETS, "ffn.0", "ffn.2")],
                         ids=["full", "lora-attention", "lora-all"])
def test_block_activations_are_what_the_block_saves(precision, lora_targets):
    """The per-block count against the tensors a real WanAttentionBlock forward saves for backward (mid config,
    L != T != d so no term can stand in for another): the bf16 branch is what every GPU figure rests on."""
    import torch

    from kaleido.model.dit import KaleidoDiT
    from kaleido.model.lora import add_lora

    cfg = dit_config("mid")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = KaleidoDiT(cfg)
    if lora_targets:
        add_lora(model, 16, 16.0, lora_targets)
    model = model.to(dtype)
    tokens, text = 704, 300  # 256x352, 1 frame + 1 reference: 2 x (16 x 22) patches; T = 300 text tokens
    block = model.blocks[1]
    x = torch.randn(1, tokens, cfg.dim, dtype=dtype, requires_grad=True)  # as from an earlier block
    context = torch.randn(1, text, cfg.dim, dtype=dtype)
    rope = (torch.randn(tokens, cfg.head_dim // 2), torch.randn(tokens, cfg.head_dim // 2))
    time_mod = torch.randn(1, 6, cfg.dim)
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), x, context, *rope, time_mod]}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, time_mod, context, rope, model.backend)
    shape = TrainingShape(cfg, 1, 256, 352, 1, text, precision=precision, lora_rank=16 if lora_targets else 0,
                          lora_targets=tuple(lora_targets))
    assert shape.tokens == tokens
    from kaleido.train.memory import block_activation_bytes

    assert block_activation_bytes(shape) == pytest.approx(sum(saved.values()), rel=0.05)
