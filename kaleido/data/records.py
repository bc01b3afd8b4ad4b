"""Records that flow between the curation stages (paper section 3, appendix A.1).

Each stage reads and writes JSON lines of these records, so a stage can be re-run, inspected and
versioned (DVC) on its own. Paths inside records are RELATIVE to the data root (`data.root`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SUBJECT_GROUPS = ("human", "animal", "object", "cartoon", "background")
SAMPLE_TYPES = ("crop", "segment", "inpaint", "redux")


@dataclass
class ClipRecord:
    """One shot-bounded clip cut from a source video (ingest output, one manifest row)."""

    clip_id: str  # stable: "<source stem>-<8 hex of source hash>-<shot index>"
    source: str  # source video, relative to the data root
    start_frame: int  # span in SOURCE frames, end exclusive
    end_frame: int
    start_s: float
    end_s: float
    source_fps: float
    fps: float  # after normalisation
    width: int
    height: int
    num_frames: int
    duration_s: float
    path: str  # the clip mp4, relative to the data root
    caption: str | None = None
    caption_source: str | None = None  # "vlm:<model path>" or "sidecar:<file>"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SubjectMatch:
    """A taxonomy term found in a caption."""

    term: str  # the words as they appear in the caption
    category: str  # taxonomy category, e.g. "dog"
    group: str  # one of SUBJECT_GROUPS
    start: int  # character span in the caption
    end: int


@dataclass
class Instance:
    """One grounded, segmented subject instance on one sampled frame of a clip."""

    clip_id: str
    frame_index: int  # index within the clip
    category: str
    group: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float
    mask_path: str | None = None  # PNG (0/255), relative to the data root
    mask_area: float | None = None  # fraction of the frame
    metrics: dict[str, float] = field(default_factory=dict)  # brightness, blur, clip_score, face_score ...


@dataclass
class Rejection:
    """Something dropped, and why: every stage records these instead of failing the run."""

    stage: str  # ingest | caption | subjects | ground | filter | references | write
    item: str  # a source path, clip id or instance id
    reason: str  # a short machine-friendly key, e.g. "too_small", "blurry", "corrupt_video"
    detail: str = ""  # a human sentence: what was measured and the threshold

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
