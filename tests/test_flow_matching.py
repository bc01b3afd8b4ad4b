"""Rectified-flow loss as shipped: logistic-normal sigma, resolution shift, text dropout, velocity target."""

import math

import pytest
import torch

from kaleido.config import FlowMatchingConfig
from kaleido.model.dit import KaleidoDiT, dit_config
from kaleido.model.flow_matching import (
    FlowMatchingBatch,
    flow_matching_loss,
    sample_sigmas,
    shift_mu,
    time_shift,
    video_token_count,
)

CFG = FlowMatchingConfig()


def test_mu_is_linear_between_the_anchors():
    assert shift_mu(256, CFG) == pytest.approx(0.5)
    assert shift_mu(4096, CFG) == pytest.approx(1.15)
    assert shift_mu(2176, CFG) == pytest.approx(0.825)


def test_time_shift_formula_and_direction():
    sigma = torch.tensor([0.1, 0.5, 0.9])
    shifted = time_shift(sigma, 1.0)
    expected = math.e / (math.e + (1 / sigma - 1))
    torch.testing.assert_close(shifted, expected)
    assert (shifted > sigma).all()


def test_more_tokens_means_more_noise():
    gen = lambda: torch.Generator().manual_seed(0)
    small = sample_sigmas(20000, 256, CFG, gen())
    large = sample_sigmas(20000, 32760, CFG, gen())
    assert small.min() > 0 and large.max() < 1
    assert large.mean() > small.mean() + 0.1
    # logistic-normal(0, 1) shifted by mu = 0.5: the median is sigmoid(0.5)
    assert small.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.01)


class VelocityOracle(torch.nn.Module):
    """Knows x0 and predicts the exact velocity eps - x0 from x_t and sigma: the loss must be 0."""

    def __init__(self, x0):
        super().__init__()
        self.cfg = dit_config("tiny")
        self.x0 = x0
        self.calls = []

    def forward(self, noisy, timestep, context, references):
        self.calls.append((timestep, context, references))
        sigma = (timestep / 1000).view(-1, 1, 1, 1, 1)
        noise = (noisy - (1 - sigma) * self.x0) / sigma
        return noise - self.x0


def _batch(bsz=4, refs=True):
    gen = torch.Generator().manual_seed(1)
    return FlowMatchingBatch(
        latents=torch.randn(bsz, 16, 3, 4, 4, generator=gen),
        context=torch.randn(bsz, 6, 32, generator=gen) + 5.0,
        null_context=torch.zeros(6, 32),
        reference_latents=torch.randn(bsz, 2, 16, 4, 4, generator=gen) if refs else None,
    )


def test_target_is_noise_minus_data():
    batch = _batch()
    oracle = VelocityOracle(batch.latents)
    loss, info = flow_matching_loss(oracle, batch, CFG, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    assert info["sigma"].shape == (4,)
    # references are passed through un-noised
    assert oracle.calls[0][2] is batch.reference_latents


def test_text_dropout_rate_and_null_context():
    batch = _batch(bsz=1)
    oracle = VelocityOracle(batch.latents)
    gen = torch.Generator().manual_seed(0)
    dropped = 0
    trials = 2000
    for _ in range(trials):
        _, info = flow_matching_loss(oracle, batch, CFG, gen)
        context = oracle.calls[-1][1]
        if info["text_dropped"].item():
            dropped += 1
            assert torch.equal(context, torch.zeros_like(context))
        else:
            assert torch.equal(context, batch.context)
    assert abs(dropped / trials - 0.1) < 0.025


def test_loss_trains_the_tiny_dit():
    torch.manual_seed(0)
    model = KaleidoDiT(dit_config("tiny"), attention_backend="sdpa")
    batch = _batch(bsz=2)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        loss, _ = flow_matching_loss(model, batch, CFG, gen)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.85 * sum(losses[:10]) / 10


def test_token_count():
    assert video_token_count(torch.Size([1, 16, 21, 60, 104]), (1, 2, 2)) == 32760
