"""Small synthetic source videos and stand-in curation models for tests of the whole data path (no model weights):
every source is a short clip of two sharp subjects on a flat background, one shot, captioned "a cat and a dog"."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

CAPTION = "a cat sits next to a dog in a quiet room"
STAGE_OVERRIDES: dict[str, Any] = {
    "data.workers": 1,  # in-process: the stand-in models below are patched into this process
    "data.grounding.frames_per_clip": 1,
    "data.models.flux_fill": None,
    "data.models.flux_redux": None,
    "data.filters": {"min_area": 0.0, "max_area": 1.0, "clip_min_score": -1.0, "min_sharpness": 0.0,
                     "min_brightness": 0.0, "max_brightness": 255.0},
    "data.ingest.clip_min_seconds": 1.0,
    "data.ingest.clip_max_seconds": 4.0,
    "data.ingest.fps": 16,
}


def source_frames(seed: int, frames: int = 20) -> np.ndarray:
    """uint8 [frames, 96, 144, 3]: two noise patches (the 'cat' and the 'dog') drifting on a grey background."""
    rng = np.random.default_rng(seed)
    level = int(rng.integers(90, 160))
    patches = rng.integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    video = np.full((frames, 96, 144, 3), level, dtype=np.uint8)
    for t in range(frames):
        video[t, 20:60, 8 + t : 58 + t] = patches[0]
        video[t, 30:70, 80 + t // 2 : 130 + t // 2] = patches[1]
    return video


def write_sources(root: Path, names: Iterable[str], sidecar: str = "captions.jsonl") -> None:
    """Each name (root-relative, e.g. "raw/m-03.mp4") as a synthetic video, and one sidecar row per source."""
    from kaleido.data.keys import stable_hash
    from kaleido.model.media import write_video

    rows = []
    path = root / sidecar
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(source_frames(stable_hash(name) % 2**31), root / name, fps=16)
        rows = [row for row in rows if row["key"] != name] + [{"key": name, "caption": CAPTION}]
    path.write_text("".join(json.dumps(row) + "\n" for row in sorted(rows, key=lambda r: r["key"])))


class HalvesDetector:
    """A stand-in Grounding DINO: the left half for the first term, the right half for the second."""

    name = "halves_detector"

    def detect(self, image: Any, terms: list[str]) -> list[Any]:
        from kaleido.vision import Detection

        height, width = np.asarray(image).shape[:2]
        boxes = [(2.0, 4.0, width / 2 - 2, height - 4.0), (width / 2 + 2, 4.0, width - 2.0, height - 4.0)]
        return [Detection(boxes[k % 2], 0.9, term) for k, term in enumerate(terms)]


class BoxMasks:
    """A stand-in SAM: the mask is the box."""

    name = "box_masks"

    def segment(self, image: Any, boxes: list[Any]) -> np.ndarray:
        height, width = np.asarray(image).shape[:2]
        masks = np.zeros((len(boxes), height, width), dtype=bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
            mask[int(y0) : int(y1), int(x0) : int(x1)] = True
        return masks


@contextmanager
def stand_in_models() -> Iterator[None]:
    """Curation with the stand-ins above, in this process (data.workers 1)."""
    import kaleido.data.curate as curate
    import kaleido.data.pipeline as pipeline
    from kaleido.data.synthetic import FixedScorer

    original = curate.load_curation_models
    curate.load_curation_models = lambda cfg, params=None: curate.CurationModels(HalvesDetector(), BoxMasks(),
                                                                                  FixedScorer())
    pipeline._CURATION_MODELS.clear()
    try:
        yield
    finally:
        curate.load_curation_models = original
        pipeline._CURATION_MODELS.clear()


def run_data_stages(params: Any) -> dict[str, Any]:
    """ingest -> caption -> curate -> write-dataset with the stand-in models; the reports by stage."""
    from kaleido.data.pipeline import run_caption, run_curation, run_ingest, run_write_dataset

    with stand_in_models():
        return {
            "ingest": run_ingest(params, progress=False),
            "caption": run_caption(params, progress=False),
            "curate": run_curation(params, progress=False),
            "write": run_write_dataset(params, progress=False),
        }
