"""Versioning by shard: DVC tracks one pack and one marker per finished shard of the per-clip stages (the working
folders are in .dvcignore), and a stage whose working folders are gone (a fresh `dvc pull`) restores them from the
packs, checked, instead of redoing the work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from _data_helpers import STAGE_OVERRIDES, run_data_stages, write_sources
from conftest import REPO_PARAMS, make_data_params

DVC = str(Path(sys.executable).with_name("dvc"))


def _tracked(repo: Path, out: str) -> list[str]:
    """The files DVC recorded for a folder out (its .dir object)."""
    meta = (repo / f"{out}.dvc").read_text()
    md5 = next(line.split(": ")[1] for line in meta.splitlines() if "md5:" in line).removesuffix(".dir")
    listing = json.loads((repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / f"{md5[2:]}.dir").read_text())
    return sorted(entry["relpath"] for entry in listing)


def test_dvc_tracks_shard_packs_and_stages_restore_from_them(tmp_path):
    repo = tmp_path / "repo"
    data = repo / "data"
    names = ["raw/a.mp4", "raw/b.mp4", "raw/c.mp4"]
    write_sources(data, names)
    params = make_data_params(data, {**STAGE_OVERRIDES, "data.shards": 4, "data.dataset_shards": 2})
    first = run_data_stages(params)
    clips = first["ingest"].counts["clips"]
    shutil.copy(REPO_PARAMS.parent / ".dvcignore", repo / ".dvcignore")
    subprocess.run([DVC, "init", "-q", "--no-scm"], cwd=repo, check=True)
    outs = ["data/ingest", "data/caption", "data/curate", "data/pair", "data/dataset"]
    subprocess.run([DVC, "add", "-q", *outs], cwd=repo, check=True, capture_output=True)
    for stage in ("ingest", "caption", "curate", "pair"):
        shards = sorted(p.name for p in (data / stage).glob("shard-*") if p.is_dir())
        stage_files = [p.name for p in (data / stage).iterdir() if p.is_file() and not p.name.startswith("shard-")]
        expected = sorted([f"{s}.tar" for s in shards] + [f"{s}.json" for s in shards] + stage_files)
        assert _tracked(repo, f"data/{stage}") == expected, stage  # _MANIFESTS.json, pair's pairing.json
    ingest_files = sum(1 for p in (data / "ingest").rglob("*.mp4"))
    assert ingest_files == clips > 0  # one clip file each in the working folders, none of them tracked

    # the working folders are gone (a clone after `dvc pull` has only the packs): every stage skips its shards,
    # and what a later stage reads is unpacked from the packs, checked
    for stage in ("ingest", "caption", "curate", "pair"):
        for folder in (data / stage).glob("shard-*"):
            if folder.is_dir():
                shutil.rmtree(folder)
    tars = {p.name: p.read_bytes() for p in (data / "dataset").rglob("*.tar")}
    shutil.rmtree(data / "dataset")
    again = run_data_stages(params)
    for stage in ("ingest", "caption", "curate"):
        assert not again[stage].result.done, stage
    assert {p.name: p.read_bytes() for p in (data / "dataset").rglob("*.tar")} == tars  # rebuilt from the packs
    assert (data / "curate").glob("shard-*/clips")  # unpacked for the writer
    status = subprocess.run([DVC, "status", "-q", *[f"{out}.dvc" for out in outs]], cwd=repo, capture_output=True)
    assert status.returncode == 0, status.stdout  # the same data version
