"""The distributed set-up of one worker: process groups, the DiT, optimizer, LR schedule, DeepSpeed engine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from kaleido.config import Params
from kaleido.train.plan import TrainPlan, deepspeed_config, stage_init, stage_preset


@dataclass
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    sp_group: Any
    dp_rank: int
    dp_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(sequence_parallel: int) -> DistContext:
    """deepspeed.init_distributed from torchrun's environment; NCCL on GPUs, gloo on CPU."""
    import deepspeed
    import torch.distributed as dist

    from kaleido.train.sequence_parallel import sequence_parallel_groups

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if sequence_parallel > 1:
        group, dp_rank, dp_size = sequence_parallel_groups(sequence_parallel)
    else:
        group, dp_rank, dp_size = None, rank, world
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistContext(rank, local_rank, world, device, group, dp_rank, dp_size)


def load_model(params: Params, stage: str, device: torch.device) -> torch.nn.Module:
    """The stage's starting DiT (Wan2.1 checkpoint or the pretrain export), fp32, detached from its file.

    With train.<stage>.lora.enabled, peft LoRA layers are injected and every base weight is frozen.
    """
    from kaleido.model.checkpoint import load_dit, read_config, read_settings
    from kaleido.model.dit import dit_config
    from kaleido.model.settings import ModelSettings, resolve_settings

    path, _ = stage_init(params, stage)
    config = None if read_config(path) is not None else dit_config(params.model.arch)
    # params.yaml says what is trained; a change from what the init was trained with is logged
    resolve_settings(read_settings(path), ModelSettings.from_params(params), str(path), purpose="train")
    model = load_dit(
        path,
        config=config,
        attention_backend=params.model.attention_backend,
        rope_variant=params.model.rope.variant,
        rope_offset=params.model.rope.offset,
        dtype=torch.float32,  # DeepSpeed casts to bf16 itself and keeps fp32 master weights
        device=device,
    )
    # load_dit leaves CPU tensors memory-mapped from the file; training writes them, so own the memory.
    for param in model.parameters():
        param.data = param.data.clone()
    lora = stage_preset(params, stage).lora
    if lora.enabled:
        from kaleido.model.lora import add_lora

        # peft creates each adapter on its base layer's device
        add_lora(model, lora.rank, lora.alpha, lora.target_modules, lora.dropout, seed=params.train.seed)
    model.gradient_checkpointing = params.train.activation_checkpointing
    return model


def build_engine(
    model: torch.nn.Module, params: Params, plan: TrainPlan, ctx: DistContext
) -> tuple[Any, dict[str, Any]]:
    """deepspeed.initialize with a client AdamW (the official weight-decay groups) and SAT's LR schedule as a
    LambdaLR (kaleido/train/optim.py); returns (engine, DeepSpeed config)."""
    import deepspeed

    from kaleido.train.optim import lr_factor, weight_decay_groups

    train = params.train
    preset = stage_preset(params, plan.stage)
    # A torch AdamW instance, not a DeepSpeed "optimizer" config block: that would JIT-build FusedAdam
    # (minutes, and a CUDA toolchain); ZeRO partitions the client optimizer's state just the same.
    # LoRA: only the adapter is trainable, so only it has gradients and optimizer state
    optimizer = torch.optim.AdamW(
        weight_decay_groups(model, train.weight_decay), lr=preset.lr, betas=tuple(train.betas)
    )
    # stepped by DeepSpeed once per optimizer step (at the gradient-accumulation boundary), as SAT steps it
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(preset.lr, plan.steps, preset.schedule))
    config = deepspeed_config(plan, params, bf16=ctx.device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
    )
    return engine, config
