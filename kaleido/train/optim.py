"""The optimizer's parameter groups and the learning-rate schedule, as the official Kaleido trainer builds them.

The official trainer is SwissArmyTransformer's (vendored in zai-org/Kaleido under sat/):

Weight decay (sat/training/deepspeed_training.py, `get_params_for_weight_decay_optimization`): for every module,
its own parameters go to the no-decay group (weight_decay 0) when the module is one of NO_WD_MODULES (SAT's
LayerNorm, torch.nn.LayerNorm, SAT's RMSNorm; sat/transformer_defaults.py) or when the parameter is named `bias`;
every other parameter is decayed. For the Wan2.1 DiT as Kaleido builds it this means: no decay for every bias and
for the affine LayerNorm before the cross-attention (Wan `norm3`, SAT `post_cross_attention_layernorm`, a SAT
LayerNorm, sat/model/transformer.py); decay for every other weight, INCLUDING the q/k RMSNorm weights (Kaleido's
dit_video_crossattn.py defines its own `RMSNorm(nn.Module)`, which is not in NO_WD_MODULES) and the adaLN
modulation tables (`nn.Parameter`s named like weights). Our modules: `WanLayerNorm` is a torch LayerNorm (no
decay), `WanRMSNorm` is not (decay), as in the official model.

Learning rate (`get_learning_rate_scheduler` there, `AnnealingLR` in sat/training/learning_rates.py), for a run
that starts at iteration 0: with N = decay_iters or the run's steps, W = warmup * N, and the k-th optimizer update
(k = 1, 2, ...; the scheduler steps once per optimizer step, at the gradient-accumulation boundary):
  finetune mode and k <= auto_warmup_steps (100):  lr * min(auto_warmup_rate (0.05), k / W)
  else if W > 0 and k <= W:                        lr * k / W
  else constant / exponential:                      lr   (SAT's `exponential` does not decay)
       linear:                                      lr * (N - (k - W)) / N
       cosine:                                      lr / r * ((cos(pi * min(1, (k - W) / N)) + 1) * (r - 1) / 2 + 1),
                                                    r = 1 / decay_ratio
pretrain mode from iteration 0 has no automatic warmup. The shipped SFT config (configs/training/
video_wanx_14B_concat.yaml: mode finetune, lr 5e-6, lr_decay_style constant, train_iters 5000, SAT's default
--warmup 0.01 so W = 50) therefore trains at 1e-7, 2e-7, then 2.5e-7 up to update 100, and 5e-6 from update 101.
Deliberate difference: SAT restarts the automatic warmup after every resume (init_step = iteration - 100, and
AnnealingLR.load_state_dict does nothing); our resume continues the schedule exactly where it stopped, so a
resumed run repeats the uninterrupted one (kaleido/train/trainer.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from kaleido.config.schema import LRSchedule


def no_decay(module: torch.nn.Module, name: str) -> bool:
    """Whether `module`'s own parameter `name` gets no weight decay (the official rule, see the module docstring)."""
    return isinstance(module, torch.nn.LayerNorm) or name == "bias"


def decay_split(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(decayed, not decayed) qualified names of `model`'s trainable parameters, by the official rule."""
    split: dict[bool, list[str]] = {False: [], True: []}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                split[no_decay(module, name)].append(f"{module_name}.{name}" if module_name else name)
    return split[False], split[True]


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of `model`'s trainable parameters: decayed (weight_decay), then not decayed (0.0);
    an empty group is left out (the official order and rule)."""
    parameters = dict(model.named_parameters())
    decayed, kept = decay_split(model)
    groups = [{"params": [parameters[n] for n in decayed], "weight_decay": weight_decay},
              {"params": [parameters[n] for n in kept], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def sat_learning_rate(step: int, lr: float, steps: int, schedule: LRSchedule) -> float:
    """The learning rate of the `step`-th optimizer update (1-based) of a `steps`-step run; see the module docstring
    for the rule and its source."""
    if step < 1:
        raise ValueError(f"step {step}: optimizer updates count from 1")
    iters = max(1, schedule.decay_iters or steps)
    warmup = schedule.warmup * iters
    auto_steps = schedule.auto_warmup_steps if schedule.mode == "finetune" else 0
    if step <= auto_steps:
        return min(lr * schedule.auto_warmup_rate, lr * step / warmup)
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if schedule.decay_style == "linear":
        return lr * (iters - (step - warmup)) / iters
    if schedule.decay_style == "cosine":
        ratio = 1.0 / schedule.decay_ratio
        progress = min(1.0, (step - warmup) / iters)
        return lr / ratio * ((math.cos(math.pi * progress) + 1) * (ratio - 1) / 2 + 1)
    return lr  # constant, and SAT's exponential


def lr_factor(lr: float, steps: int, schedule: LRSchedule) -> Callable[[int], float]:
    """The multiplier a torch LambdaLR applies to `lr`: LambdaLR asks for index 0 before the first update, so
    index i is update i + 1."""

    def factor(index: int) -> float:
        return sat_learning_rate(index + 1, lr, steps, schedule) / lr

    return factor
