"""Ingest: raw source videos -> shot-bounded clips at a fixed frame rate and size, plus manifest rows.

Paper section 3.2 (1): raw videos are sliced into short clips, each a coherent action or event.
Per source: probe the container (every frame's presentation time, the display rotation), detect shots
(shots.py), cut each shot into clips of [clip_min_seconds, clip_max_seconds] of SOURCE TIME (a longer shot
is split into equal pieces, a shorter one is rejected as `too_short`), resample to `data.ingest.fps` by
presentation timestamps (at each output time, the source frame on screen then: a variable-frame-rate phone
video keeps its real timeline), rotate as the display matrix says (a phone video tagged 90 degrees comes out
upright), resize so the frame covers height x width and centre-crop, and write H.264 mp4 (media.write_video).

A source that cannot be read (empty, not a video, truncated, corrupt mid-stream) becomes a
`Rejection` and its partial clips are deleted; the other sources of the run are not affected.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import itertools
import math
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kaleido.config.schema import IngestConfig
from kaleido.data.paths import PathOutsideRoot, relative_to_root, resolve_inside, safe_name
from kaleido.data.records import ClipRecord, Rejection
from kaleido.data.shots import Shot, ShotDetector
from kaleido.model.media import centre_crop_box, cover_size, display_width, sample_aspect_ratio

STAGE = "ingest"
TIME_EPS = 1e-6  # seconds: timestamps are exact fractions; this absorbs float rounding


class VideoError(Exception):
    """A source that cannot be ingested; `reason` is the Rejection key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SourceInfo:
    fps: float  # average rate (the container's); the timeline itself is `frame_times`
    declared_frames: int  # from the container header; 0 when unknown
    width: int  # as displayed (after rotation)
    height: int
    frame_times: tuple[float, ...] = ()  # presentation time of every frame, seconds from the first, ascending
    end_time: float = 0.0  # when the last frame stops being shown
    rotation: int = 0  # display rotation, degrees counter-clockwise (0, 90, 180, 270)
    sample_aspect: float = 1.0  # pixel width / height (SAR): 4:3-pixel DV, anamorphic 2:1 editors' exports

    def time_at(self, index: int) -> float:
        """Presentation time of frame `index`; `end_time` for index == number of frames."""
        return self.frame_times[index] if index < len(self.frame_times) else self.end_time

    def index_at(self, seconds: float) -> int:
        """The frame on screen at `seconds` (the last one presented at or before it)."""
        return max(0, bisect.bisect_right(self.frame_times, seconds + TIME_EPS) - 1)


@dataclass(frozen=True)
class ClipSpan:
    shot_index: int
    piece: int
    start: int  # source frames, end exclusive
    end: int


# ---------------------------------------------------------------------------------------------
# discovery


class NoSources(ValueError):
    """No file under data.root matched data.ingest.sources; the message lists what is there instead."""


def case_insensitive_glob(pattern: str) -> str:
    """`pattern` with every letter outside a [...] class as [xX]: camera files are GOPR0001.MP4, IMG_0001.MOV."""
    out, in_class = [], False
    for char in pattern:
        if char == "[":
            in_class = True
        elif char == "]":
            in_class = False
        out.append(f"[{char.lower()}{char.upper()}]" if char.isalpha() and not in_class else char)
    return "".join(out)


def _glob_base(pattern: str) -> str:
    """The literal folder a glob starts in (`raw` of `raw/**/*.mp4`)."""
    parts = []
    for part in Path(pattern).parts[:-1]:
        if glob.has_magic(part):
            break
        parts.append(part)
    return "/".join(parts)


def discover_sources(root: Path, patterns: Sequence[str]) -> tuple[list[str], list[Rejection]]:
    """Files matching the globs under `root` (letters matched case-insensitively), as sorted root-relative paths;
    escapes become Rejections.

    Says what it leaves out: files in the globs' folders that match none (a warning naming them and the key), and
    NoSources when nothing matched at all (with the files it saw there), so a run never ends with "sources 0"."""
    root = Path(root)
    found: set[str] = set()
    rejections: list[Rejection] = []
    bases: set[str] = set()
    for pattern in patterns:
        if os.path.isabs(pattern) or ".." in Path(pattern).parts:
            rejections.append(
                Rejection(STAGE, pattern, "path_outside_root", f"source glob {pattern!r} must be relative to data.root")
            )
            continue
        bases.add(_glob_base(pattern))
        for match in sorted(glob.glob(str(root / case_insensitive_glob(pattern)), recursive=True)):
            if os.path.isdir(match):
                continue
            shown = Path(match).relative_to(root).as_posix() if Path(match).is_relative_to(root) else match
            try:
                found.add(relative_to_root(root, resolve_inside(root, shown)))
            except PathOutsideRoot as exc:
                rejections.append(Rejection(STAGE, shown, exc.reason, str(exc)))
    skipped = _unmatched_files(root, bases, found, {r.item for r in rejections})
    if not found and not rejections:
        seen = f"; files there: {', '.join(skipped[:8])}" + (" ..." if len(skipped) > 8 else "") if skipped else ""
        raise NoSources(
            f"data.ingest.sources {list(patterns)} matched no file under {root}{seen or ' (it holds no file)'}. "
            "Put the videos there or add globs for their names (matched case-insensitively, e.g. raw/**/*.mts)"
        )
    if skipped:
        import logging

        logging.getLogger("kaleido.data").warning(
            "ingest: %d file(s) under %s match no data.ingest.sources glob and are left out: %s%s (add a glob to "
            "take them)", len(skipped), ", ".join(sorted(f"{b or '.'}/" for b in bases)), ", ".join(skipped[:8]),
            " ..." if len(skipped) > 8 else "",
        )  # fmt: skip
    return sorted(found), rejections


def _unmatched_files(root: Path, bases: set[str], found: set[str], rejected: set[str]) -> list[str]:
    """Files (not hidden) below the globs' folders that no glob took; the data root's own output folders are not
    looked at when a glob starts at the root itself."""
    if "" in bases:
        return []  # a glob over the whole data root: its output folders are not sources, nothing to report
    unmatched = []
    for base in sorted(bases):
        folder = root / base
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(root).as_posix()
            if path.is_file() and not any(p.startswith(".") for p in Path(relative).parts) \
                    and relative not in found and relative not in rejected:
                unmatched.append(relative)
    return unmatched


# ---------------------------------------------------------------------------------------------
# probing


def _iso_bmff_truncated(path: Path, size: int) -> bool | None:
    """For an MP4/MOV file: True when a top-level box runs past the end of the file (cut short).

    None when the file is not ISO-BMFF. Walking only the box headers costs a few reads, and it
    names the fault that ffmpeg reports only as "invalid data" (a missing or cut moov/mdat).
    """
    with path.open("rb") as handle:
        head = handle.read(12)
        if len(head) < 12 or head[4:8] != b"ftyp":
            return None
        offset = 0
        while offset < size:
            handle.seek(offset)
            header = handle.read(16)
            if len(header) < 8:
                return True
            box_size = struct.unpack(">I", header[:4])[0]
            if box_size == 1:
                if len(header) < 16:
                    return True
                box_size = struct.unpack(">Q", header[8:16])[0]
            elif box_size == 0:  # "to the end of the file"
                return False
            if box_size < 8 or offset + box_size > size:
                return True
            offset += box_size
    return False


def probe_video(path: Path) -> SourceInfo:
    """Open the container and read the first video stream's rate and size; VideoError when it cannot."""
    import av

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise VideoError("io_error", f"cannot stat {path.name}: {exc}") from None
    if size == 0:
        raise VideoError("empty_file", "the file is empty (0 bytes)")
    if _iso_bmff_truncated(path, size):
        raise VideoError("truncated", "MP4 box structure runs past the end of the file: the file was cut short")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("no_video_stream", "the container has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            width, height = stream.codec_context.width, stream.codec_context.height
            declared = int(stream.frames or 0)  # read before demuxing: PyAV's value is garbage afterwards
            sar = sample_aspect_ratio(stream)
            pts, durations, rotation, discarded = _packet_times(container, stream)
            # an edit list (`ffmpeg -ss ... -c copy`) starts the stream at the keyframe before the cut; the frames
            # before it are in the file (and in its frame count) but never shown: the demuxer marks them discard
            declared = max(0, declared - discarded) if declared else 0
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VideoError("not_a_video", f"not a readable video ({exc.__class__.__name__}: {exc})") from None
    if not math.isfinite(fps) or fps <= 0:
        raise VideoError("no_frame_rate", "the video stream declares no frame rate")
    if width <= 0 or height <= 0:
        raise VideoError("not_a_video", f"the video stream has no picture size ({width}x{height})")
    width = display_width(width, sar)  # non-square pixels: the picture a player shows is wider or narrower
    if rotation in (90, 270):
        width, height = height, width
    times, end_time = _timeline(pts, durations, fps)
    if not times:
        raise VideoError("no_frames", "the video stream holds no frame that is shown")
    return SourceInfo(fps, declared, width, height, times, end_time, rotation, sar)



def _packet_times(container: object, stream: object) -> tuple[list[float | None], list[float], int, int]:
    """Presentation times (seconds, None when a packet has none) and durations of every SHOWN video packet, read by
    demuxing only (no decoding), the display rotation of the first decoded frame, and the number of packets an edit
    list hides (flagged discard: decoded as references for the frames after them, never shown)."""
    from kaleido.model.media import frame_rotation

    base = stream.time_base
    pts: list[float | None] = []
    durations: list[float] = []
    rotation = None
    discarded = 0
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's final flush packet
            continue
        if getattr(packet, "is_discard", False):
            discarded += 1
            continue
        pts.append(float(packet.pts * base) if packet.pts is not None else None)
        durations.append(float(packet.duration * base) if packet.duration else 0.0)
        if rotation is None:
            for frame in packet.decode():
                rotation = frame_rotation(frame)
                break
    return pts, durations, rotation or 0, discarded


def _timeline(pts: list[float | None], durations: list[float], fps: float) -> tuple[tuple[float, ...], float]:
    """Frame times in presentation order, from the first frame (0.0), and the end of the last frame.

    Without timestamps (raw streams) frame k is at k / fps. The last frame lasts its packet's duration, else the
    median frame interval, else 1 / fps.
    """
    if not pts:
        return (), 0.0
    if any(t is None for t in pts):
        return tuple(k / fps for k in range(len(pts))), len(pts) / fps
    order = sorted(range(len(pts)), key=lambda k: pts[k])  # decode order -> presentation order (B-frames)
    first = pts[order[0]]
    times = tuple(pts[k] - first for k in order)
    gaps = sorted(b - a for a, b in itertools.pairwise(times) if b > a)
    last = durations[order[-1]] or (gaps[len(gaps) // 2] if gaps else 1.0 / fps)
    return times, times[-1] + last


# ---------------------------------------------------------------------------------------------
# planning


def plan_clips(
    shots: Sequence[Shot], info: SourceInfo, cfg: IngestConfig, item: str
) -> tuple[list[ClipSpan], list[Rejection]]:
    """Cut shots into clip spans lasting [clip_min_seconds, clip_max_seconds] of presentation time.

    A shot longer than the maximum is split into equal-duration pieces, their boundaries on the first frame
    presented at or after each boundary time (so a variable-frame-rate source is split by time, not by frame
    count). Spans are in source frames (presentation order), end exclusive.
    """
    min_s, max_s = cfg.clip_min_seconds, cfg.clip_max_seconds
    spans: list[ClipSpan] = []
    rejections: list[Rejection] = []

    def first_at(seconds: float) -> int:
        return bisect.bisect_left(info.frame_times, seconds - TIME_EPS)

    for index, shot in enumerate(shots):
        start_s, end_s = info.time_at(shot.start), info.time_at(shot.end)
        length = end_s - start_s
        if length < min_s - TIME_EPS:
            rejections.append(
                Rejection(
                    STAGE,
                    f"{item}#shot{index}",
                    "too_short",
                    f"shot {index} (frames {shot.start}-{shot.end}, {start_s:.3f}-{end_s:.3f} s) lasts "
                    f"{length:.2f} s < clip_min_seconds {min_s}",
                )
            )
            continue
        pieces = max(1, math.ceil(length / max_s - TIME_EPS))
        bounds = [shot.start] + [first_at(start_s + k * length / pieces) for k in range(1, pieces)] + [shot.end]
        if min(info.time_at(b) - info.time_at(a) for a, b in itertools.pairwise(bounds)) < min_s - TIME_EPS:
            # equal pieces would be too short (clip_min_seconds > clip_max_seconds / 2): take whole
            # clip_max_seconds pieces and drop the tail
            bounds = [shot.start]
            while info.time_at(shot.end) - info.time_at(bounds[-1]) >= max_s - TIME_EPS:
                bounds.append(min(shot.end, first_at(info.time_at(bounds[-1]) + max_s)))
            tail = info.time_at(shot.end) - info.time_at(bounds[-1])
            if tail >= min_s - TIME_EPS:
                bounds.append(shot.end)
            elif tail > TIME_EPS:
                rejections.append(
                    Rejection(
                        STAGE,
                        f"{item}#shot{index}.tail",
                        "too_short",
                        f"the last {tail:.2f} s of shot {index} after splitting into "
                        f"{max_s} s pieces is < clip_min_seconds {min_s}",
                    )
                )
        for piece, (start, end) in enumerate(itertools.pairwise(bounds)):
            if end > start:
                spans.append(ClipSpan(index, piece, start, end))
    return spans, rejections


def frame_indices(span: ClipSpan, info: SourceInfo, fps: float) -> list[int]:
    """Source frames (presentation order) that make up `span` resampled to `fps`: output frame k is shown at
    t_k = start + k / fps for every t_k before the span's end, and takes the source frame on screen at t_k
    (the last one presented at or before it). For a constant rate this is start + floor(k * rate / fps)."""
    start_s, end_s = info.time_at(span.start), info.time_at(span.end)
    indices = []
    k = 0
    while start_s + k / fps < end_s - TIME_EPS:
        indices.append(min(max(info.index_at(start_s + k / fps), span.start), span.end - 1))
        k += 1
    return indices


def centre_crop(frame: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    left, top = centre_crop_box(frame.shape[1], frame.shape[0], out_width, out_height)
    return frame[top : top + out_height, left : left + out_width]


def source_hash(relative: str) -> str:
    return hashlib.sha256(relative.encode()).hexdigest()[:8]


def clip_id_for(relative: str, shot_index: int, piece: int) -> str:
    """'<source stem>-<8 hex of the source path's hash>-<shot:03d>-<piece:02d>' (stable across runs)."""
    stem = safe_name(Path(relative).stem, 40)
    return f"{stem}-{source_hash(relative)}-{shot_index:03d}-{piece:02d}"


# ---------------------------------------------------------------------------------------------
# cutting


def cut_clips(
    path: Path,
    spans: Sequence[ClipSpan],
    info: SourceInfo,
    cfg: IngestConfig,
    out_dir: Path,
) -> tuple[list[tuple[ClipSpan, Path, int]], int]:
    """Decode the source once and write every span as a normalised mp4 under `out_dir`.

    Returns ((span, mp4 path, frame count) per clip, frames decoded). Only the clips still open
    are held in memory. VideoError (and no files left behind) when decoding fails.
    """
    import av

    from kaleido.model.media import frame_to_rgb, write_video

    fps = cfg.fps
    wanted: dict[int, list[tuple[int, int]]] = {}  # source frame -> [(clip, slot)]
    plans = []
    for clip_number, span in enumerate(spans):
        indices = frame_indices(span, info, fps)
        plans.append(indices)
        for slot, index in enumerate(indices):
            wanted.setdefault(index, []).append((clip_number, slot))
    last_needed = {n: plan[-1] for n, plan in enumerate(plans) if plan}
    buffers: dict[int, list[np.ndarray | None]] = {}
    written: list[tuple[ClipSpan, Path, int]] = []
    decoded = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame + slice threads: decode is the ingest bottleneck
            for frame_number, frame in enumerate(container.decode(stream)):
                decoded = frame_number + 1
                targets = wanted.get(frame_number)
                if not targets:
                    continue
                # sizes of the frame as displayed (rotation applied)
                new_w, new_h = cover_size(info.width, info.height, cfg.width, cfg.height)
                image = frame_to_rgb(frame, (new_w, new_h), interpolation="AREA")
                image = np.ascontiguousarray(centre_crop(image, cfg.height, cfg.width))
                for clip_number, slot in targets:
                    buffer = buffers.setdefault(clip_number, [None] * len(plans[clip_number]))
                    buffer[slot] = image
                    if frame_number == last_needed[clip_number] and all(f is not None for f in buffer):
                        span = spans[clip_number]
                        clip_path = out_dir / f"{span.shot_index}-{span.piece}.mp4"
                        try:
                            write_video(np.stack(buffer), clip_path, fps=round(fps))
                        except (av.error.FFmpegError, OSError) as exc:
                            raise VideoError("write_failed", f"writing {clip_path.name} failed: {exc}") from None
                        written.append((span, clip_path, len(buffer)))
                        del buffers[clip_number]
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        for _, clip_path, _ in written:
            clip_path.unlink(missing_ok=True)
        raise VideoError(
            "corrupt_video", f"decoding failed after {decoded} frames ({exc.__class__.__name__}: {exc})"
        ) from None
    if info.declared_frames and decoded < info.declared_frames - max(2, info.declared_frames // 100):
        for _, clip_path, _ in written:
            clip_path.unlink(missing_ok=True)
        raise VideoError(
            "truncated", f"decoded {decoded} frames but the container declares {info.declared_frames}"
        )
    if buffers:  # a shot reached past the last decodable frame
        for _, clip_path, _ in written:
            clip_path.unlink(missing_ok=True)
        raise VideoError("truncated", f"the video ended after {decoded} frames, inside a detected shot")
    return written, decoded


def ingest_source(
    root: Path,
    relative: str,
    cfg: IngestConfig,
    detector: ShotDetector,
    out_dir: Path,
    out_rel: str,
) -> tuple[list[ClipRecord], list[Rejection], float]:
    """Clips, rejections and seconds of source video for one source (root-relative path)."""
    try:
        path = resolve_inside(root, relative)
    except PathOutsideRoot as exc:
        return [], [Rejection(STAGE, relative, exc.reason, str(exc))], 0.0
    try:
        info = probe_video(path)
        try:
            shots = detector.detect(path, info.frame_times)
        except Exception as exc:  # any detector failure is this source's fault, not the run's
            raise VideoError(
                "shot_detection_failed", f"{detector.name} failed ({exc.__class__.__name__}: {exc})"
            ) from None
        if not shots:
            raise VideoError("no_frames", f"{detector.name} found no frames")
        spans, rejections = plan_clips(shots, info, cfg, relative)
        work = out_dir / f".{source_hash(relative)}"
        written, _ = cut_clips(path, spans, info, cfg, work)
    except VideoError as exc:
        shutil.rmtree(out_dir / f".{source_hash(relative)}", ignore_errors=True)
        return [], [Rejection(STAGE, relative, exc.reason, exc.detail)], 0.0
    records = []
    for span, clip_path, count in written:
        clip_id = clip_id_for(relative, span.shot_index, span.piece)
        final = out_dir / f"{clip_id}.mp4"
        os.replace(clip_path, final)
        records.append(
            ClipRecord(
                clip_id=clip_id,
                source=relative,
                start_frame=span.start,
                end_frame=span.end,
                start_s=round(info.time_at(span.start), 6),
                end_s=round(info.time_at(span.end), 6),
                source_fps=round(info.fps, 6),
                fps=float(cfg.fps),
                width=cfg.width,
                height=cfg.height,
                num_frames=count,
                duration_s=round(count / cfg.fps, 6),
                path=f"{out_rel}/{clip_id}.mp4",
                shot_index=span.shot_index,
                piece=span.piece,
            )
        )
    if work.exists():
        work.rmdir()
    records.sort(key=lambda record: (record.start_frame, record.piece))
    return records, rejections, info.end_time
