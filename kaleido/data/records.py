"""Records that flow between the curation stages (paper section 3, appendix A.1).

Each stage reads and writes JSON lines of these records, so a stage can be re-run, inspected and
versioned (DVC) on its own. Paths inside records are RELATIVE to the data root (`data.root`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SUBJECT_GROUPS = ("human", "animal", "object", "cartoon", "background")
SAMPLE_TYPES = ("crop", "segment", "inpaint", "redux")


@dataclass
class ClipRecord:
    """One shot-bounded clip cut from a source video (ingest output, one manifest row)."""

    clip_id: str  # stable: "<source stem>-<8 hex of the source path's hash>-<shot:03d>-<piece:02d>"
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
    # Added by the caption stage: taxonomy terms found in the caption (the subject candidates).
    subjects: list[SubjectMatch] = field(default_factory=list)
    shot_index: int = 0  # shot of the source this clip came from
    piece: int = 0  # a shot longer than clip_max_seconds is split into pieces 0, 1, ...

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> ClipRecord:
        row = {key: value for key, value in row.items() if key in _field_names(cls)}
        row["subjects"] = [SubjectMatch(**match) for match in row.get("subjects") or []]
        return cls(**row)


@dataclass
class SubjectMatch:
    """A taxonomy term found in a caption."""

    term: str  # the words as they appear in the caption
    category: str  # taxonomy category, e.g. "dog"
    group: str  # one of SUBJECT_GROUPS
    start: int  # character span in the caption
    end: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
    # In-memory mask (bool/uint8 [H, W]) a curation step may return instead of a file; the pipeline
    # writes it as PNG, fills mask_path, and never puts the array in JSON.
    mask: Any = field(default=None, repr=False, compare=False)
    term: str = ""  # the caption words that were grounded (SubjectMatch.term)
    instance_id: str = ""  # "<clip id>/f<frame>/<term>#<k>": the `item` of this instance's Rejections

    def to_json(self) -> dict[str, Any]:
        return record_to_json(self)  # as asdict, minus the in-memory `mask` array

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Instance:
        row = {key: value for key, value in row.items() if key in _field_names(cls)}
        row["box"] = tuple(row["box"])
        return cls(**row)


@dataclass
class Rejection:
    """Something dropped, and why: every stage records these instead of failing the run."""

    stage: str  # ingest | caption | subjects | ground | filter | references | write
    item: str  # a source path, clip id or instance id
    reason: str  # a short machine-friendly key, e.g. "too_small", "blurry", "corrupt_video"
    detail: str = ""  # a human sentence: what was measured and the threshold

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReferenceImage:
    """One reference image of a training sample (a subject cut from a clip, maybe inpainted or redux'ed).

    A curation step may hand back the pixels in memory (`image`, `mask`: uint8 arrays, [H, W, 3] and
    [H, W]); the pipeline then writes them as PNG and fills `image_path` / `mask_path`. The arrays
    never reach JSON.
    """

    category: str
    group: str  # one of SUBJECT_GROUPS
    source_clip_id: str  # the clip the subject was cut from (differs from the sample's clip for cross pairs)
    frame_index: int = 0
    box: tuple[float, float, float, float] | None = None
    image_path: str | None = None  # PNG, relative to the data root
    mask_path: str | None = None  # PNG (0/255), relative to the data root
    sample_type: str | None = None  # one of SAMPLE_TYPES, when it differs per reference
    instance_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    image: Any = field(default=None, repr=False, compare=False)
    mask: Any = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return record_to_json(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> ReferenceImage:
        row = {key: value for key, value in row.items() if key in _field_names(cls)}
        if row.get("box") is not None:
            row["box"] = tuple(row["box"])
        return cls(**row)


@dataclass
class TrainingSample:
    """One (video, caption, references) training pair, as the dataset writer stores it."""

    sample_id: str  # unique and stable; letters, digits, '_' and '-' only (it becomes the webdataset key)
    clip_id: str  # the target video
    clip_path: str  # its mp4, relative to the data root
    caption: str
    sample_type: str  # one of SAMPLE_TYPES
    cross_pair: bool  # True when the references come from other clips than the target video
    references: list[ReferenceImage] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  # source, span, models, thresholds, seeds
    split: str = "train"  # "train" or "val": held out by source video (data.validation)

    def to_json(self) -> dict[str, Any]:
        row = record_to_json(self)
        row["references"] = [reference.to_json() for reference in self.references]
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> TrainingSample:
        row = {key: value for key, value in row.items() if key in _field_names(cls)}
        row["references"] = [ReferenceImage.from_json(ref) for ref in row.get("references") or []]
        return cls(**row)


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


_IN_MEMORY_FIELDS = ("image", "mask")


def record_to_json(record: Any) -> dict[str, Any]:
    """A dataclass record as a JSON-ready dict, without in-memory pixel fields."""
    row = {}
    for f in fields(record):
        if f.name in _IN_MEMORY_FIELDS:
            continue
        value = getattr(record, f.name)
        if hasattr(value, "to_json"):
            value = value.to_json()
        elif isinstance(value, list):
            value = [item.to_json() if hasattr(item, "to_json") else item for item in value]
        elif isinstance(value, tuple):
            value = list(value)
        row[f.name] = value
    return row


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Write records (dataclasses or dicts) as JSON lines with sorted keys (byte-stable); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            row = record if isinstance(record, dict) else record_to_json(record)
            handle.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a JSON-lines file (blank lines skipped)."""
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
