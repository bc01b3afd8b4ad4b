"""R-RoPE positions (every variant) and the fp32 3D rotary table."""

import pytest
import torch

from kaleido.model.rope import (
    ROPE_VARIANTS,
    apply_rope,
    reference_positions,
    rope_split,
    rope_table,
    sequence_rope,
)

VIDEO = (3, 2, 4)  # F, H, W latent patches
REF = (1, 2, 4)


def _refs(positions: torch.Tensor, n: int) -> list[torch.Tensor]:
    per = REF[1] * REF[2]
    return [positions[j * per : (j + 1) * per] for j in range(n)]


def test_layout_references_first_then_video_in_raster_order():
    positions = reference_positions(VIDEO, [REF, REF], "shift_wh", 80)
    assert positions.shape == (2 * 8 + 24, 3)
    video = positions[16:]
    expected = torch.tensor([[t, h, w] for t in range(3) for h in range(2) for w in range(4)])
    assert torch.equal(video, expected)


@pytest.mark.parametrize(
    ("variant", "t_of_ref", "h0", "w0"),
    [
        ("shift_wh", [0, 1, 2], [80, 80, 80], [80, 80, 80]),
        ("shift_w", [0, 1, 2], [0, 0, 0], [80, 80, 80]),
        ("shift_h", [0, 1, 2], [80, 80, 80], [0, 0, 0]),
        ("none", [0, 1, 2], [0, 0, 0], [0, 0, 0]),
        ("shift_wh_no_overlap", [0, 1, 2], [80, 82, 84], [80, 84, 88]),
        ("time_fixed_neg", [-1, -1, -1], [80, 80, 80], [80, 80, 80]),
        ("time_staggered_neg", [-3, -2, -1], [80, 80, 80], [80, 80, 80]),
        ("time_future", [3, 4, 5], [80, 80, 80], [80, 80, 80]),
    ],
)
def test_reference_positions_per_variant(variant, t_of_ref, h0, w0):
    positions = reference_positions(VIDEO, [REF] * 3, variant, 80)
    for j, ref in enumerate(_refs(positions, 3)):
        assert set(ref[:, 0].tolist()) == {t_of_ref[j]}
        assert ref[:, 1].min().item() == h0[j] and ref[:, 1].max().item() == h0[j] + REF[1] - 1
        assert ref[:, 2].min().item() == w0[j] and ref[:, 2].max().item() == w0[j] + REF[2] - 1
    video = positions[24:]
    video_t0 = 3 if variant == "none" else 0  # plain concat: the video follows the reference frames
    assert video[:, 0].min().item() == video_t0 and video[:, 1].max().item() == 1 and video[:, 2].max().item() == 3


def test_shipped_variant_shares_spatial_positions_and_overlaps_video_time():
    positions = reference_positions(VIDEO, [REF, REF], "shift_wh", 80)
    first, second = _refs(positions, 2)
    assert torch.equal(first[:, 1:], second[:, 1:])  # same (h, w) for every reference
    assert first[0, 0] == 0 and second[0, 0] == 1  # t overlaps video frames 0..n-1


def test_no_overlap_variant_separates_references():
    positions = reference_positions(VIDEO, [REF] * 3, "shift_wh_no_overlap", 80)
    spatial = [set(map(tuple, ref[:, 1:].tolist())) for ref in _refs(positions, 3)]
    assert not (spatial[0] & spatial[1]) and not (spatial[1] & spatial[2])


def test_no_references_is_plain_video_rope():
    for variant in ROPE_VARIANTS:
        assert torch.equal(reference_positions(VIDEO, [], variant, 80), reference_positions(VIDEO, [], "none", 0))


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown R-RoPE variant"):
        reference_positions(VIDEO, [REF], "shift_xy", 80)
    with pytest.raises(ValueError, match="one latent frame"):
        reference_positions(VIDEO, [(2, 2, 4)], "shift_wh", 80)


def test_split_matches_wan():
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(64) == (24, 20, 20)
    assert sum(rope_split(32)) == 32


def test_fp32_table_close_to_float64():
    positions = reference_positions((21, 30, 52), [(1, 30, 52)] * 3, "shift_wh", 80)
    cos32, sin32 = rope_table(positions, 128)
    cos64, sin64 = rope_table(positions, 128, dtype=torch.float64)
    assert cos32.dtype == torch.float32 and cos32.shape == (positions.shape[0], 64)
    assert (cos32.double() - cos64).abs().max() < 2e-5 and (sin32.double() - sin64).abs().max() < 2e-5


def test_table_against_independent_formula():
    # angle for pair i of axis a at position p: p * theta^(-2i/part_a), parts 44/42/42, interleaved pairs
    positions = torch.tensor([[2, 5, 7]])
    cos, _ = rope_table(positions, 128, dtype=torch.float64)
    angles = []
    for p, part in zip([2, 5, 7], [44, 42, 42], strict=True):
        angles += [p * 10000.0 ** (-2 * i / part) for i in range(part // 2)]
    assert torch.allclose(cos[0], torch.cos(torch.tensor(angles, dtype=torch.float64)), atol=1e-12)


def test_table_is_cached_per_shape():
    a = sequence_rope((2, 2, 2), [(1, 2, 2)], "shift_wh", 80, 32)
    b = sequence_rope((2, 2, 2), [(1, 2, 2)], "shift_wh", 80, 32)
    c = sequence_rope((2, 2, 2), [(1, 2, 2)], "shift_w", 80, 32)
    assert a[0] is b[0] and a[0] is not c[0]


def test_rotation_is_relative():
    # <R(p) q, R(p') k> depends only on p - p': shift every position by a constant
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 1, 32, dtype=torch.float64), torch.randn(1, 2, 1, 32, dtype=torch.float64)
    pos = torch.tensor([[1, 4, 2], [3, 0, 5]])
    def score(positions):
        cos, sin = rope_table(positions, 32, dtype=torch.float64)
        return (apply_rope(q, cos, sin)[0, 0, 0] * apply_rope(k, cos, sin)[0, 1, 0]).sum()
    assert torch.allclose(score(pos), score(pos + torch.tensor([7, 80, 80])), atol=1e-10)
    assert not torch.allclose(score(pos), score(pos * 2), atol=1e-3)


def test_rotation_preserves_norm_and_dtype():
    x = torch.randn(2, 5, 3, 32).to(torch.bfloat16)
    cos, sin = rope_table(torch.randint(0, 50, (5, 3)), 32)
    y = apply_rope(x, cos, sin)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().norm(dim=-1), x.float().norm(dim=-1), rtol=2e-2, atol=2e-2)
