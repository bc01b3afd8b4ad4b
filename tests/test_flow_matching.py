"""Rectified-flow loss as shipped: logistic-normal sigma, resolution shift, text dropout, velocity target."""

import math

import pytest
import torch

from kaleido.config import FlowMatchingConfig
from kaleido.model.dit import KaleidoDiT, dit_config
from kaleido.model.flow_matching import (
    FlowMatchingBatch,
    flow_matching_loss,
    frame_token_count,
    sample_sigmas,
    shift_mu,
    time_shift,
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
    large = sample_sigmas(20000, 3600, CFG, gen())
    assert small.min() > 0 and large.max() < 1
    assert large.mean() > small.mean() + 0.05
    # logistic-normal(0, 1) shifted by mu = 0.5: the median is sigmoid(0.5)
    assert small.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.01)


# The shipped rule, worked out by hand from the official loss (zai-org/Kaleido sgm/modules/diffusionmodules/
# loss.py, RFLoss): image_seq_len = latent W*H // 2 // 2 (one latent frame), mu = 0.5 + 0.65 (n - 256) / 3840,
# sigma = e^mu / (e^mu + 1/s - 1) with s = sigmoid(z), z ~ N(0, 1). The quantiles of sigma are those of z
# pushed through both monotone maps: q50 = sigmoid(mu); q25/q75 from z = -/+0.6745.
#   video (H x W x frames)     latent     tokens/frame   mu        q25     q50     q75
SHIPPED_SIGMAS = [
    ((480, 832, 81), (21, 60, 104), 1560, 0.720729, 0.5116, 0.6728, 0.8014),  # training size
    ((512, 896, 81), (21, 64, 112), 1792, 0.760000, 0.5214, 0.6814, 0.8076),  # shipped sampling size
    ((720, 1280, 81), (21, 90, 160), 3600, 1.066042, 0.5967, 0.7438, 0.8508),  # 720p
    ((32, 48, 5), (2, 4, 6), 6, 0.457682, 0.4460, 0.6125, 0.7562),  # the embedded default's tiny bucket
]


@pytest.mark.parametrize(("video", "latent", "tokens", "mu", "q25", "q50", "q75"), SHIPPED_SIGMAS)
def test_training_sigmas_at_the_shipped_sizes(video, latent, tokens, mu, q25, q50, q75):
    frames, height, width = latent
    assert (frames, height, width) == ((video[2] - 1) // 4 + 1, video[0] // 8, video[1] // 8)
    latents = torch.Size([1, 16, frames, height, width])
    assert frame_token_count(latents, (1, 2, 2)) == tokens
    assert shift_mu(tokens, CFG) == pytest.approx(mu, abs=1e-6)
    sigmas = sample_sigmas(200_000, tokens, CFG, torch.Generator().manual_seed(0))
    quantiles = torch.quantile(sigmas[:100_000].double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(quantiles, torch.tensor([q25, q50, q75], dtype=torch.float64), atol=6e-3, rtol=0)
    # The median is exact: the logistic-normal's median 1/2 maps to sigmoid(mu).
    assert time_shift(torch.tensor(0.5, dtype=torch.float64), mu).item() == pytest.approx(q50, abs=1e-4)


def test_the_frame_count_does_not_move_the_noise_level():
    """The old whole-video count gave mu = 6.0 at 480x832x81 (median sigma 0.9975): the loss saw pure noise."""
    one_frame = torch.Size([1, 16, 1, 60, 104])
    eighty_one = torch.Size([1, 16, 21, 60, 104])
    assert frame_token_count(one_frame, (1, 2, 2)) == frame_token_count(eighty_one, (1, 2, 2)) == 1560
    assert time_shift(torch.tensor(0.5), shift_mu(1560, CFG)).item() < 0.7


def test_loss_draws_sigmas_for_one_latent_frame():
    """flow_matching_loss feeds the per-frame token count to the sampler: the sigmas it used have the 480p median."""
    x0 = torch.zeros(2000, 1, 3, 60, 104)  # one channel keeps it small; the count only reads H and W
    sigmas = []

    class Recorder(torch.nn.Module):
        cfg = dit_config("tiny")

        def forward(self, noisy, timestep, context, references):
            sigmas.append(timestep / 1000)
            return torch.zeros_like(noisy)

    batch = FlowMatchingBatch(x0, torch.zeros(2000, 1, 32), torch.zeros(1, 32))
    flow_matching_loss(Recorder(), batch, CFG, torch.Generator().manual_seed(0))
    assert sigmas[0].median().item() == pytest.approx(0.6728, abs=0.02)


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


def test_token_count_follows_the_official_integer_order():
    # W*H // pw // ph: the product is divided, not each side (equal for the even latents of real videos)
    assert frame_token_count(torch.Size([1, 16, 21, 60, 104]), (1, 2, 2)) == 1560
    assert frame_token_count((5, 6), (1, 2, 2)) == 7
