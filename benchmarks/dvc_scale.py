"""Versioning by shard: files DVC tracks per 1,000 clips, and `dvc commit` / `dvc status` time at a simulated 100k
clips, extrapolated to 2M.

    nice -n 10 .venv/bin/python benchmarks/dvc_scale.py [--clips 100000] [--per-clip 4000] [--json out.json]

Two layouts of the same data, as synthetic files (no models; sizes scaled down, so the figures are DVC's per-file
cost; hashing the real bytes is added on paper from the md5 throughput measured here):
- per clip (before): one file per clip per artifact, 16 per clip (the issue's count), at --per-clip clips;
- by shard (now): what `dvc.yaml`'s data outs hold with `.dvcignore`: per work shard one pack + marker in each of
  ingest, caption and curate; per dataset shard one pack + marker in pair and the tar, written.jsonl,
  rejections.jsonl and _SUCCESS of the dataset; the merged manifests. Shard counts scale with the data like the
  prod params (4096 work / 1024 dataset shards at 2M clips: ~500 clips per work shard).
For each: `dvc add` of the outs (first commit: hashes everything), `dvc status` with nothing changed, and after
one shard (or one clip) changed `dvc status` then `dvc commit`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _provenance import provenance

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))
PER_CLIP_FILES = 16  # the measurement: a clip, masks, references, plates, composites, json rows
CLIPS_PER_WORK_SHARD = 2_000_000 / 4096  # the prod overlay at the paper's 2M clips
WORK_PER_DATASET_SHARD = 4


def _run(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)}: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.perf_counter() - start


def _write(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(seed.to_bytes(8, "big") * (size // 8))


def shard_files(clips: int) -> dict[str, int]:
    """The by-shard layout's DVC-visible files (relative path -> bytes, scaled down) for `clips` clips."""
    work = max(1, round(clips / CLIPS_PER_WORK_SHARD))
    dataset = max(1, work // WORK_PER_DATASET_SHARD)
    files: dict[str, int] = {}
    for stage, count in (("ingest", work), ("caption", work), ("curate", work), ("pair", dataset)):
        for i in range(count):
            files[f"data/{stage}/shard-{i:05d}.tar"] = 64 * 1024
            files[f"data/{stage}/shard-{i:05d}.json"] = 1024
        files[f"data/{stage}/_MANIFESTS.json"] = 4096
    for i in range(dataset):
        for name, size in ((f"train-{i:05d}.tar", 64 * 1024), ("written.jsonl", 8192), ("rejections.jsonl", 512),
                           ("_SUCCESS", 2048)):
            files[f"data/dataset/shard-{i:05d}/{name}"] = size
    files["data/dataset/index.json"] = 8192
    return files


def per_clip_files(clips: int) -> dict[str, int]:
    files = {}
    for c in range(clips):
        for k in range(PER_CLIP_FILES):
            files[f"data/clips/{c // 1000:04d}/{c:07d}-{k:02d}.bin"] = 2048
    return files


def bench_layout(work: Path, name: str, files: dict[str, int], outs: list[str]) -> dict[str, Any]:
    repo = work / name
    repo.mkdir(parents=True)
    _run([DVC, "init", "--no-scm", "-q"], repo)
    shutil.copy(REPO / ".dvcignore", repo / ".dvcignore")
    start = time.perf_counter()
    for i, (relative, size) in enumerate(sorted(files.items())):
        _write(repo / relative, size, i)
    write_s = time.perf_counter() - start
    row: dict[str, Any] = {"layout": name, "files": len(files), "mb": round(sum(files.values()) / 2**20, 1),
                           "write_s": round(write_s, 2)}
    row["add_s"] = round(_run([DVC, "add", "-q", *outs], repo), 2)
    row["status_s"] = round(_run([DVC, "status", "-q"], repo), 2)
    changed = sorted(files)[len(files) // 2]
    _write(repo / changed, files[changed], 10**9)
    row["status_after_change_s"] = round(_status(repo), 2)
    row["commit_after_change_s"] = round(_run([DVC, "commit", "-f", "-q"], repo), 2)
    row["ms_per_file_add"] = round(1000 * row["add_s"] / len(files), 3)
    print(f"{name:10s} {len(files):7d} files ({row['mb']} MB): dvc add {row['add_s']:7.2f} s "
          f"({row['ms_per_file_add']:.3f} ms/file), status {row['status_s']:6.2f} s, one shard changed: status "
          f"{row['status_after_change_s']:6.2f} s, commit {row['commit_after_change_s']:6.2f} s", flush=True)
    shutil.rmtree(repo)
    return row


def _status(repo: Path) -> float:
    start = time.perf_counter()
    subprocess.run([DVC, "status", "-q"], cwd=repo, capture_output=True)  # exit 1: changes found
    return time.perf_counter() - start


def md5_throughput() -> float:
    import hashlib

    block = os.urandom(1 << 24)
    start = time.perf_counter()
    digest = hashlib.md5()
    for _ in range(16):
        digest.update(block)
    return 256 / (time.perf_counter() - start)  # MB/s, one core


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=100_000, help="simulated clips, by-shard layout")
    parser.add_argument("--per-clip", type=int, default=4000, help="simulated clips, per-clip layout")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = provenance()
    with tempfile.TemporaryDirectory(prefix="kaleido-dvc-") as tmp:
        work = Path(tmp)
        shards = shard_files(args.clips)
        outs = ["data/ingest", "data/caption", "data/curate", "data/pair", "data/dataset"]
        results["by_shard"] = bench_layout(work, "by-shard", shards, outs)
        results["per_clip"] = bench_layout(work, "per-clip", per_clip_files(args.per_clip), ["data/clips"])
    results["md5_mb_per_s_one_core"] = round(md5_throughput(), 1)
    by_shard, per_clip = results["by_shard"], results["per_clip"]
    results["files_per_1000_clips"] = {
        "per_clip": PER_CLIP_FILES * 1000,
        "by_shard_at_100k": round(1000 * by_shard["files"] / args.clips, 1),
        "by_shard_at_2M": round(1000 * len(shard_files(2_000_000)) / 2_000_000, 1),
    }
    files_2m = len(shard_files(2_000_000))
    results["extrapolated_2M"] = {
        "by_shard_files": files_2m,
        "by_shard_add_s_per_file_cost": round(by_shard["ms_per_file_add"] * files_2m / 1000, 1),
        "per_clip_files": PER_CLIP_FILES * 2_000_000,
        "per_clip_add_h": round(per_clip["ms_per_file_add"] * PER_CLIP_FILES * 2_000_000 / 1000 / 3600, 2),
    }
    print(json.dumps({k: results[k] for k in ("files_per_1000_clips", "extrapolated_2M", "md5_mb_per_s_one_core")},
                     indent=1))
    print(f"{results['machine']}; {results['date']}; commit {results['commit']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
