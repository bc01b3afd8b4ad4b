"""The training memory planner: shipped-size figures from DeepSpeed's own estimators and the official token
arithmetic, `kaleido train --plan`, refusal before launch, and the estimate against measured CPU peaks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.model.dit import dit_config
from kaleido.train.memory import REDUCE_BUCKET, TrainingShape, estimate

ATTENTION = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
             "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o")  # fmt: skip
GB = 1e9


def shipped(arch: str, **kw) -> TrainingShape:
    """480x832, 81 frames, 3 references (the shipped training size), 512 text tokens, 8 GPUs."""
    return TrainingShape(dit_config(arch), 81, 480, 832, 3, 512, world_size=8, **kw)


def test_tokens_at_the_shipped_training_size():
    # 81 frames -> 21 latent frames (Wan VAE: 1 + 80 / 4); 480x832 -> 60x104 latents -> 30x52 patches (2x2)
    assert shipped("14B").tokens == 21 * 30 * 52 + 3 * 30 * 52 == 37440


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
    lora = estimate(shipped("14B", zero_stage=3, lora_rank=16, lora_targets=ATTENTION))
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
