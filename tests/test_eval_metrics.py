"""Known answers for the metric formulas, the interpolators and the bootstrap (no learned backbone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kaleido.eval.interpolation import FarnebackInterpolator, TorchScriptInterpolator, load_interpolator
from kaleido.eval.metrics import (
    aggregate,
    bootstrap_mean,
    interpolation_error_score,
    temporal_consistency,
)
from kaleido.eval.vbench import (
    clip_preprocess,
    dino_preprocess,
    middle_frame_indices,
    motion_smoothness,
    musiq_preprocess,
)


def _pan(speed: int, frames: int = 9, height: int = 64, width: int = 96) -> np.ndarray:
    """A real photograph seen through a window that slides `speed` pixels per frame (linear motion)."""
    from PIL import Image
    from skimage import data

    photo = np.asarray(Image.fromarray(data.astronaut()).resize((256, 256), Image.Resampling.LANCZOS))
    return np.stack([photo[40 : 40 + height, 20 + speed * t : 20 + speed * t + width] for t in range(frames)])


# ---- subject / background consistency formula ---------------------------------------------------


def test_static_features_score_one() -> None:
    features = np.tile(np.array([[0.3, -1.2, 2.0]]), (6, 1))
    assert temporal_consistency(features) == pytest.approx(1.0)
    assert temporal_consistency(features[:1]) == 1.0  # no pair: VBench's convention


def test_consistency_formula_by_hand() -> None:
    # f0 = e0, f1 = e1 (orthogonal), f2 = (e0 + e1)/sqrt2, f3 = -e0
    s = 1 / np.sqrt(2)
    features = np.array([[1.0, 0.0], [0.0, 1.0], [s, s], [-1.0, 0.0]])
    # i=1: (0 + 0)/2; i=2: (cos(f1,f2)=s + cos(f0,f2)=s)/2 = s; i=3: (max(0,-s) + max(0,-1))/2 = 0
    assert temporal_consistency(features) == pytest.approx(s / 3)
    # scale does not matter: features are L2-normalised first
    assert temporal_consistency(features * 7.5) == pytest.approx(s / 3)


# ---- motion smoothness ----------------------------------------------------------------------------


def test_interpolation_error_formula() -> None:
    real = [np.full((2, 2, 3), 100, np.uint8), np.full((2, 2, 3), 50, np.uint8)]
    pred = [np.full((2, 2, 3), 110, np.uint8), np.full((2, 2, 3), 40, np.uint8)]
    assert interpolation_error_score(real, pred) == pytest.approx((255 - 10) / 255)
    with pytest.raises(ValueError, match="at least 3 frames"):
        interpolation_error_score([], [])


class _Oracle:
    """Returns the real middle frame: a perfect interpolator for a known video."""

    name = "oracle"

    def __init__(self, frames: np.ndarray) -> None:
        self.frames = frames

    def interpolate(self, frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
        index = next(i for i in range(len(self.frames)) if np.array_equal(self.frames[i], frame0))
        return self.frames[index + 1]


@pytest.mark.parametrize("count", [8, 9])
def test_perfect_interpolation_scores_one_for_odd_and_even_lengths(count: int) -> None:
    frames = np.random.default_rng(0).integers(0, 255, (count, 8, 8, 3), dtype=np.uint8)
    assert motion_smoothness(frames, _Oracle(frames)) == pytest.approx(1.0)


def test_farneback_static_video_is_perfectly_smooth() -> None:
    frames = np.repeat(_pan(0, frames=1), 7, axis=0)
    assert motion_smoothness(frames, FarnebackInterpolator()) == 1.0


def test_farneback_linear_motion_scores_near_one_and_beats_blending() -> None:
    interpolator = FarnebackInterpolator()
    for speed in (1, 3):
        frames = _pan(speed)
        score = motion_smoothness(frames, interpolator)
        blend = interpolation_error_score(
            frames[1::2],
            [((a.astype(np.float64) + b) / 2).round().astype(np.uint8) for a, b in zip(frames[0:-1:2], frames[2::2],
                                                                                        strict=True)],
        )
        assert score > 0.99 and score > blend
    noise = np.random.default_rng(1).integers(0, 255, (9, 64, 96, 3), dtype=np.uint8)
    assert motion_smoothness(noise, interpolator) < 0.8  # nothing to interpolate: jitter is penalised


def test_torchscript_interpolator_loads_a_local_export(tmp_path: Path) -> None:
    import torch

    class Blend(torch.nn.Module):
        def forward(self, img0: torch.Tensor, img1: torch.Tensor, embt: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"imgt_pred": img0 * (1 - embt) + img1 * embt}  # AMT returns a dict with imgt_pred

    path = tmp_path / "blend.pt"
    torch.jit.save(torch.jit.script(Blend()), str(path))
    interpolator = load_interpolator("torchscript", path)
    assert isinstance(interpolator, TorchScriptInterpolator) and "blend.pt" in interpolator.describe()
    # a cross-fade (odd frames are the exact average of their neighbours) on a size that needs padding
    even = np.random.default_rng(2).integers(0, 128, (5, 30, 41, 3)).astype(np.uint8) * 2
    frames = np.empty((9, 30, 41, 3), np.uint8)
    frames[0::2] = even
    frames[1::2] = ((even[:-1].astype(np.uint16) + even[1:]) // 2).astype(np.uint8)
    assert motion_smoothness(frames, interpolator) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(FileNotFoundError, match="interpolator_path"):
        load_interpolator("torchscript", None)
    with pytest.raises(ValueError, match="not a TorchScript"):
        (tmp_path / "junk.pt").write_bytes(b"junk")
        load_interpolator("torchscript", tmp_path / "junk.pt")


# ---- VBench preprocessing ---------------------------------------------------------------------------


def test_preprocessing_matches_vbench_sizes() -> None:
    frames = np.zeros((2, 480, 832, 3), np.uint8)
    assert tuple(dino_preprocess(frames).shape) == (2, 3, 224, 388)  # short side 224, no crop
    assert tuple(clip_preprocess(frames, 224).shape) == (2, 3, 224, 224)  # resize + centre crop
    assert tuple(musiq_preprocess(frames).shape) == (2, 3, 295, 512)  # long side 512
    small = musiq_preprocess(np.full((1, 64, 96, 3), 255, np.uint8))
    assert tuple(small.shape) == (1, 3, 64, 96) and float(small.max()) == 1.0  # never enlarged; /255


def test_viclip_frame_sampling_is_vbench_middle() -> None:
    assert middle_frame_indices(81) == [4, 14, 24, 34, 44, 54, 64, 75]
    assert middle_frame_indices(5) == [0, 1, 2, 3, 4]


# ---- aggregation and bootstrap --------------------------------------------------------------------


def test_aggregate_overall_and_per_category() -> None:
    cases = [
        {"category": "human", "metrics": {"s2v_consistency": 0.2, "motion_smoothness": 0.9}},
        {"category": "human", "metrics": {"s2v_consistency": 0.4, "motion_smoothness": 0.7}},
        {"category": "object", "metrics": {"s2v_consistency": 0.9}},
    ]
    result = aggregate(cases)
    assert result["overall"]["s2v_consistency"] == pytest.approx(0.5)
    assert result["overall"]["motion_smoothness"] == pytest.approx(0.8)
    assert result["per_category"]["human"]["s2v_consistency"] == pytest.approx(0.3)
    assert result["per_category"]["object"]["motion_smoothness"] is None
    assert result["counts"] == {"cases": 3, "human": 2, "object": 1}


def test_bootstrap_is_seeded_and_degenerates_to_the_point() -> None:
    values = [0.1, 0.5, 0.3, 0.9, 0.2]
    first, again = bootstrap_mean(values, seed=3), bootstrap_mean(values, seed=3)
    assert first == again and first.low < first.mean < first.high and first.n == 5
    single = bootstrap_mean([0.42])
    assert single.low == single.high == pytest.approx(0.42)
    with pytest.raises(ValueError):
        bootstrap_mean([])


def test_torchscript_interpolator_pads_and_truncates_as_vbench(tmp_path: Path) -> None:
    """VBench's AMT-S path: InputPadder pads to a multiple of 16 symmetrically (replicate; odd pixel right/bottom)
    and tensor2img truncates. A fake network that adds a ramp over the PADDED columns shows where the frame sat."""
    import torch

    class RampBlend(torch.nn.Module):
        def forward(self, img0: torch.Tensor, img1: torch.Tensor, embt: torch.Tensor) -> dict[str, torch.Tensor]:
            ramp = torch.arange(img0.shape[-1], dtype=img0.dtype) * 0.01
            return {"imgt_pred": (img0 + img1) / 2 + ramp}

    path = tmp_path / "ramp.pt"
    torch.jit.save(torch.jit.script(RampBlend()), str(path))
    interpolator = load_interpolator("torchscript", path)
    frame = np.full((10, 11, 3), 128, np.uint8)  # 10x11 -> 16x16: 3 rows on top, 2 columns left (5 = 2 + 3)
    middle = interpolator.interpolate(frame, frame)
    # worked out from VBench's rule: pixel x of the frame sits at padded column x + 2; value (128/255 + 0.01 (x+2))
    # x 255, truncated: x=0 -> 133.1 -> 133, x=1 -> 135.65 -> 135, x=10 -> 158.6 -> 158
    expected = [int((128 / 255 + 0.01 * (x + 2)) * 255) for x in range(11)]
    assert middle[0, :, 0].tolist() == expected
    assert middle[0, :3, 0].tolist() == [133, 135, 138]  # rounding would give 133, 136, 138; no padding offset 128
