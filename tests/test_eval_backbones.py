"""The real metric code paths (timm DINO, open_clip, LAION head, pyiqa MUSIQ, ViCLIP via TorchScript) on
tiny random-weight models loaded from disk, with known answers where the weights do not matter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kaleido.eval import vbench


@pytest.fixture(scope="module")
def clip(tiny_vision: dict[str, Path]) -> vbench.ClipFeatures:
    from kaleido.vision.clip import ClipScorer

    return vbench.ClipFeatures.from_scorer(ClipScorer.from_pretrained(tiny_vision["clip"]), "tiny")


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    from kaleido.data.synthetic import SubjectSpec, make_clip

    return make_clip([SubjectSpec("cat")], frames=5, height=48, width=64).frames


def test_static_video_has_full_subject_and_background_consistency(
    tiny_eval: dict[str, Path], clip: vbench.ClipFeatures, frames: np.ndarray
) -> None:
    dino = vbench.DinoFeatures.from_pretrained(tiny_eval["dino"])  # timm local-dir, dynamic image size
    static = np.repeat(frames[:1], 4, axis=0)
    assert vbench.subject_consistency(static, dino) == pytest.approx(1.0, abs=1e-6)
    assert vbench.background_consistency(static, clip) == pytest.approx(1.0, abs=1e-6)
    moving = vbench.subject_consistency(frames, dino)
    assert 0.0 <= moving <= 1.0
    features = dino.frame_features(frames)
    assert features.shape[0] == 5 and np.allclose(np.linalg.norm(features, axis=1), 1.0)
    with pytest.raises(FileNotFoundError, match=r"eval\.models\.dino"):
        vbench.DinoFeatures.from_pretrained(tiny_eval["dino"].parent / "missing")


def test_dino_weights_file_with_an_architecture(tiny_eval: dict[str, Path], tmp_path: Path) -> None:
    """The other layout: a bare weights file plus the timm architecture name (eval.models.dino_arch)."""
    import timm
    import torch

    model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    torch.save(model.state_dict(), tmp_path / "dino.pth")
    dino = vbench.DinoFeatures.from_pretrained(tmp_path / "dino.pth", arch="test_vit")
    assert dino.frame_features(np.zeros((1, 32, 48, 3), np.uint8)).shape == (1, 64)


def test_aesthetic_head_known_answer(clip: vbench.ClipFeatures, frames: np.ndarray, tmp_path: Path) -> None:
    """A head whose weight is 10 x the frame's own unit embedding scores exactly 1.0 (= cos 1 x 10 / 10)."""
    import torch

    static = np.repeat(frames[:1], 3, axis=0)
    direction = torch.from_numpy(clip.frame_features(static[:1])[0]).float()
    torch.save({"weight": 10.0 * direction[None], "bias": torch.zeros(1)}, tmp_path / "head.pth")
    predictor = vbench.AestheticPredictor.from_files(clip, tmp_path / "head.pth")
    assert vbench.aesthetic_quality(static, predictor) == pytest.approx(1.0, abs=1e-5)
    torch.save(torch.nn.Linear(768, 1).state_dict(), tmp_path / "vit_l.pth")
    with pytest.raises(ValueError, match="ViT-L/14"):
        vbench.AestheticPredictor.from_files(clip, tmp_path / "vit_l.pth")


def test_musiq_loads_locally_without_downloading(
    tiny_eval: dict[str, Path], frames: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyiqa.archs.arch_util as arch_util
    import pyiqa.archs.musiq_arch as musiq_arch

    def no_network(*args, **kwargs):
        raise AssertionError("pyiqa tried to fetch weights")

    monkeypatch.setattr(arch_util, "load_file_from_url", no_network)
    monkeypatch.setattr(musiq_arch, "load_pretrained_network", no_network)
    scorer = vbench.MusiqScorer.from_checkpoint(tiny_eval["musiq"])
    assert not scorer.model.training  # eval mode: MUSIQ builds its multi-scale patches itself
    scores = scorer.frame_scores(frames[:2])
    assert scores.shape == (2,) and np.isfinite(scores).all()
    assert vbench.imaging_quality(frames[:2], scorer) == pytest.approx(float(scores.mean()) / 100)
    with pytest.raises(ValueError, match="not a pyiqa MUSIQ"):
        import torch

        torch.save({"weight": torch.zeros(1)}, Path(tiny_eval["musiq"]).parent / "bad_musiq.pth")
        vbench.MusiqScorer.from_checkpoint(Path(tiny_eval["musiq"]).parent / "bad_musiq.pth")


def test_text_alignment_viclip_export_or_labelled_clip(
    tiny_vision: dict[str, Path], clip: vbench.ClipFeatures, frames: np.ndarray, tmp_path: Path
) -> None:
    import torch

    from kaleido.vision.clip import ClipScorer

    fallback = vbench.ClipTextScorer(ClipScorer.from_pretrained(tiny_vision["clip"]), clip)
    assert fallback.metric == "clip_text_score" and "ViCLIP weights not given" in fallback.label
    assert -1.0 <= fallback.score(frames, "a cat walks") <= 1.0

    class TinyViClip(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.context_length = 32
            self.image_size = 32
            self.vision = torch.nn.Linear(3, 4)
            self.text = torch.nn.Embedding(49408, 4)

        def forward(self, video: torch.Tensor) -> torch.Tensor:
            return self.encode_vision(video)

        @torch.jit.export
        def encode_vision(self, video: torch.Tensor) -> torch.Tensor:
            assert video.shape[1] == 5 or video.shape[1] == 8
            return self.vision(video.mean(dim=(1, 3, 4)))

        @torch.jit.export
        def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.text(tokens).mean(dim=1)

    torch.jit.save(torch.jit.script(TinyViClip()), str(tmp_path / "viclip.pt"))
    viclip = vbench.ViClipScorer.from_file(tmp_path / "viclip.pt")
    assert viclip.metric == "viclip_score" and viclip.context_length == 32 and viclip.size == 32
    assert -1.0 <= viclip.score(frames, "a cat walks") <= 1.0
