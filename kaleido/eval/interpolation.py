"""Frame interpolators for VBench motion smoothness, behind one interface.

VBench uses AMT-S. Its network is not part of any installed package and we do not rebuild third-party
architectures, so two interpolators ship:
- `FarnebackInterpolator`: classical, offline, no weights. Dense Farneback optical flow (OpenCV) in
  both directions, then backward warping of each neighbour half-way and an average. Exact for static
  content, near-exact for smooth translations; it is NOT AMT-S, so its scores are comparable only
  with other Farneback scores (the report names the interpolator).
- `TorchScriptInterpolator`: any interpolation network exported with TorchScript (e.g. AMT-S traced in
  its own repository with `torch.jit.trace(model, (img0, img1, embt))`), loaded with plain PyTorch from
  a local file. Called as VBench calls AMT: `model(img0, img1, embt)` with RGB in [0, 1], [1, 3, H, W],
  H and W padded to a multiple of 16, embt = 0.5; the output is the middle frame or a dict holding
  it under `imgt_pred`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

INTERPOLATORS = ("farneback", "torchscript")


@runtime_checkable
class FrameInterpolator(Protocol):
    name: str

    def interpolate(self, frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
        """The frame half-way between two RGB uint8 frames [H, W, 3], as RGB uint8."""
        ...


def _check_pair(frame0: np.ndarray, frame1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    frame0, frame1 = np.asarray(frame0), np.asarray(frame1)
    if frame0.shape != frame1.shape or frame0.ndim != 3 or frame0.shape[2] != 3:
        raise ValueError(f"interpolation needs two RGB frames of one size, got {frame0.shape} and {frame1.shape}")
    if frame0.dtype != np.uint8 or frame1.dtype != np.uint8:
        raise ValueError("interpolation frames must be uint8")
    return frame0, frame1


class FarnebackInterpolator:
    """Bidirectional Farneback flow + backward warping (OpenCV), no learned weights."""

    name = "farneback"

    def __init__(
        self,
        pyr_scale: float = 0.5,
        levels: int = 3,
        winsize: int = 15,
        iterations: int = 3,
        poly_n: int = 5,
        poly_sigma: float = 1.2,
    ) -> None:
        # OpenCV's documented typical settings for calcOpticalFlowFarneback
        self.options = (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, 0)

    def describe(self) -> str:
        return "Farneback optical flow + backward warping (OpenCV; classical stand-in for VBench's AMT-S)"

    def _flow(self, grey_a: np.ndarray, grey_b: np.ndarray) -> np.ndarray:
        import cv2

        return cv2.calcOpticalFlowFarneback(grey_a, grey_b, None, *self.options)

    def interpolate(self, frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
        import cv2

        frame0, frame1 = _check_pair(frame0, frame1)
        if np.array_equal(frame0, frame1):
            return frame0.copy()  # nothing moves: the flow is zero and warping would only resample
        grey0 = cv2.cvtColor(frame0, cv2.COLOR_RGB2GRAY)
        grey1 = cv2.cvtColor(frame1, cv2.COLOR_RGB2GRAY)
        flow01 = self._flow(grey0, grey1)  # frame0(p) ~ frame1(p + flow01(p))
        flow10 = self._flow(grey1, grey0)
        height, width = grey0.shape
        xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        # The middle frame's pixel p came from p - flow/2 in either neighbour; the flow at p stands in
        # for the flow at that source point (exact for a constant flow field).
        halves = []
        for frame, flow in ((frame0, flow01), (frame1, flow10)):
            map_x = xs - 0.5 * flow[..., 0]
            map_y = ys - 0.5 * flow[..., 1]
            halves.append(
                cv2.remap(frame, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
            )
        return np.clip(np.round((halves[0] + halves[1]) / 2.0), 0, 255).astype(np.uint8)


class TorchScriptInterpolator:
    """A TorchScript frame-interpolation network (e.g. an AMT-S export) from a local file."""

    name = "torchscript"

    def __init__(self, module: Any, source: str = "", device: str = "cpu", pad_multiple: int = 16) -> None:
        self.module = module
        self.source = source
        self.device = device
        self.pad_multiple = int(pad_multiple)

    @classmethod
    def from_file(cls, path: str | Path, device: str | None = None) -> TorchScriptInterpolator:
        import torch

        from kaleido.vision import resolve_device

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"interpolator {path}: file not found; eval.models.interpolator_path must be a TorchScript file "
                "(torch.jit.save of a traced AMT-S), or set eval.models.interpolator: farneback"
            )
        device = resolve_device(device)
        try:
            module = torch.jit.load(str(path), map_location=device)
        except RuntimeError as exc:
            raise ValueError(f"interpolator {path}: not a TorchScript archive ({str(exc)[:200]})") from None
        return cls(module.eval(), source=str(path), device=device)

    def describe(self) -> str:
        return f"TorchScript interpolation network from {self.source} (VBench: AMT-S)"

    def interpolate(self, frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        frame0, frame1 = _check_pair(frame0, frame1)
        height, width = frame0.shape[:2]
        # VBench (third_party/amt/utils/utils.py InputPadder): pad to a multiple of 16 on BOTH sides, the odd
        # pixel right / bottom, replicating the border; unpad the same window.
        pad_h = (-height) % self.pad_multiple
        pad_w = (-width) % self.pad_multiple
        left, top = pad_w // 2, pad_h // 2
        padding = (left, pad_w - left, top, pad_h - top)

        def tensor(frame: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(frame).permute(2, 0, 1)[None].float().div(255.0).to(self.device)
            return F.pad(x, padding, mode="replicate") if pad_h or pad_w else x

        embt = torch.full((1, 1, 1, 1), 0.5, device=self.device)
        with torch.inference_mode():
            output = self.module(tensor(frame0), tensor(frame1), embt)
        if isinstance(output, dict):
            output = output["imgt_pred"]
        if isinstance(output, tuple | list):
            output = output[0]
        # VBench's tensor2img: (x * 255).clip(0, 255).astype(uint8), i.e. TRUNCATED, not rounded
        middle = output[0, :, top : top + height, left : left + width].mul(255.0).clamp(0, 255).to(torch.uint8)
        return middle.permute(1, 2, 0).cpu().numpy()


def load_interpolator(kind: str, path: str | Path | None = None, device: str | None = None) -> FrameInterpolator:
    """`farneback` (no weights) or `torchscript` (a local TorchScript file)."""
    if kind == "farneback":
        return FarnebackInterpolator()
    if kind == "torchscript":
        if path is None:
            raise FileNotFoundError(
                "eval.models.interpolator is torchscript but eval.models.interpolator_path is null; "
                "point it at a TorchScript export of AMT-S"
            )
        return TorchScriptInterpolator.from_file(path, device)
    raise ValueError(f"interpolator {kind!r}: unknown; use one of {', '.join(INTERPOLATORS)}")
