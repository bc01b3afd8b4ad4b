"""The official optimizer (zai-org/Kaleido's SwissArmyTransformer trainer): weight-decay groups and the SFT learning
rate schedule. Expected values are worked out by hand from the official rules quoted in kaleido/train/optim.py
(sat/training/deepspeed_training.py get_params_for_weight_decay_optimization and get_learning_rate_scheduler,
sat/training/learning_rates.py AnnealingLR, configs/training/video_wanx_14B_concat.yaml), not from our code."""

from __future__ import annotations

import pytest
import torch

from kaleido.config.schema import LRSchedule, TrainConfig
from kaleido.model.dit import KaleidoDiT, dit_config
from kaleido.train.optim import decay_split, lr_factor, sat_learning_rate, weight_decay_groups

SHIPPED_SFT = LRSchedule(mode="finetune", warmup=0.01, decay_style="constant")


def test_shipped_sft_schedule_is_sats_finetune_warmup() -> None:
    # lr 5e-6, train_iters 5000, --warmup 0.01 -> W = 50; finetune: updates 1..100 at min(0.05 lr, lr k / 50)
    lrs = [sat_learning_rate(k, 5e-6, 5000, SHIPPED_SFT) for k in range(1, 5001)]
    assert lrs[0] == pytest.approx(1e-7) and lrs[1] == pytest.approx(2e-7)
    assert lrs[2:100] == pytest.approx([2.5e-7] * 98)
    assert lrs[100:] == pytest.approx([5e-6] * 4900)  # update 101 on: constant (k > W, decay style constant)


def test_the_schema_defaults_are_the_shipped_sft_config() -> None:
    train = TrainConfig()
    assert train.sft.schedule == SHIPPED_SFT and train.sft.lr == 5e-6 and train.sft.steps == 5000
    assert train.weight_decay == 1e-4 and train.betas == (0.9, 0.95)
    with pytest.raises(ValueError, match="warmup"):
        LRSchedule(mode="finetune", warmup=0.0)  # SAT divides by the warmup length in its automatic warmup


@pytest.mark.parametrize("k,expected", [(5, 0.5), (10, 1.0), (35, 0.868198), (60, 0.55), (100, 0.122024)])
def test_pretrain_mode_cosine(k: int, expected: float) -> None:
    # pretrain mode from iteration 0: no automatic warmup; W = 0.1 * 100 = 10; r = 1 / 0.1 = 10:
    # lr / r * ((cos(pi * (k - W) / N) + 1) * (r - 1) / 2 + 1)
    schedule = LRSchedule(mode="pretrain", warmup=0.1, decay_style="cosine", decay_ratio=0.1)
    assert sat_learning_rate(k, 1.0, 100, schedule) == pytest.approx(expected, abs=1e-6)


def test_linear_decay_and_a_warmup_longer_than_the_automatic_one() -> None:
    linear = LRSchedule(mode="pretrain", warmup=0.1, decay_style="linear")
    assert [sat_learning_rate(k, 1.0, 100, linear) for k in (1, 10, 60, 100)] == pytest.approx([0.1, 1.0, 0.5, 0.1])
    long = LRSchedule(mode="finetune", warmup=0.5)  # W = 500 of 1000
    assert [sat_learning_rate(k, 1.0, 1000, long) for k in (50, 100, 101, 500, 600)] == pytest.approx(
        [0.05, 0.05, 0.202, 1.0, 1.0])
    decay_iters = LRSchedule(mode="pretrain", warmup=0.5, decay_iters=40)  # W = 20 of decay_iters 40, not steps
    assert sat_learning_rate(10, 1.0, 1000, decay_iters) == pytest.approx(0.5)


def test_lambda_lr_applies_it_update_by_update() -> None:
    """The LR each AdamW update uses, stepped as DeepSpeed steps the client scheduler (once per optimizer step)."""
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=5e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(5e-6, 5000, SHIPPED_SFT))
    seen = []
    for _ in range(102):
        seen.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    assert seen[:3] == pytest.approx([1e-7, 2e-7, 2.5e-7]) and seen[99] == pytest.approx(2.5e-7)
    assert seen[100] == pytest.approx(5e-6)


def _expected_no_decay(names: list[str]) -> set[str]:
    # the official rule on Wan names: every bias, and the affine LayerNorm before the cross-attention (norm3,
    # SAT post_cross_attention_layernorm, a SAT LayerNorm); the q/k RMSNorms are Kaleido's own RMSNorm class (decayed)
    return {n for n in names if n.endswith(".bias") or ".norm3." in n}


def test_weight_decay_groups_follow_the_official_rule() -> None:
    model = KaleidoDiT(dit_config("tiny"))
    names = [n for n, _ in model.named_parameters()]
    decayed, kept = decay_split(model)
    assert set(kept) == _expected_no_decay(names) and set(decayed) == set(names) - set(kept)
    for name in ("blocks.0.self_attn.norm_q.weight", "blocks.1.cross_attn.norm_k.weight", "blocks.0.modulation",
                 "head.modulation", "patch_embedding.weight", "blocks.0.ffn.0.weight"):
        assert name in decayed
    for name in ("blocks.0.norm3.weight", "blocks.0.norm3.bias", "patch_embedding.bias", "head.head.bias"):
        assert name in kept
    groups = weight_decay_groups(model, 1e-4)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_adamw_decays_only_the_decayed_group() -> None:
    model = KaleidoDiT(dit_config("tiny"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decoupled decay moves a weight, by (1 - lr * wd)
    optimizer.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["blocks.0.norm3.weight"], before["blocks.0.norm3.weight"])
    assert torch.equal(after["blocks.0.ffn.0.bias"], before["blocks.0.ffn.0.bias"])
    torch.testing.assert_close(after["blocks.0.self_attn.norm_q.weight"].detach(),
                               before["blocks.0.self_attn.norm_q.weight"] * 0.95)


def test_lora_groups_hold_the_adapter_only() -> None:
    from kaleido.model.lora import add_lora

    model = add_lora(KaleidoDiT(dit_config("tiny")), 2, 2.0, ["self_attn.q"])
    decayed, kept = decay_split(model)
    assert kept == [] and decayed and all("lora_" in name for name in decayed)
