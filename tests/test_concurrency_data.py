"""The data stages under concurrency and faults, as an operator meets them: real `kaleido` processes on one
data root, SIGKILLs between a stage's start and its end, symlinked stage folders, damaged shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO_PARAMS

from kaleido.config.schema import set_dotted

KALEIDO = [str(Path(sys.executable).parent / "kaleido")]  # the installed console script, as users run it


def _params_file(tmp: Path, tiny_vision: dict[str, Path], overrides: dict | None = None, root: Path | None = None,
                 name: str = "params.yaml") -> Path:
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    raw["data"]["root"] = str(root or tmp / "data")
    for key, path in tiny_vision.items():
        raw["data"]["models"][key] = str(path)
    settings = {
        "data.ingest.sources": ["raw/carphone_pristine.mp4"],  # one 4 s clip: curation is the slow part
        "data.grounding.frames_per_clip": 1,
        "data.workers": 1,
        "data.ingest.clip_min_seconds": 1.0,
        "data.ingest.clip_max_seconds": 4.0,
        "data.ingest.fps": 8,
        "data.ingest.height": 64,
        "data.ingest.width": 96,
        **(overrides or {}),
    }
    for dotted, value in settings.items():
        set_dotted(raw, dotted, value)
    path = tmp / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _kaleido(*args: str, params: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*KALEIDO, *args, "--params", str(params), "--quiet"], capture_output=True, text=True,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, tiny_vision) -> dict[str, Path]:
    """A data root with the sample videos ingested and captioned (CLI), ready for `kaleido curate`."""
    from kaleido.platform.sample_data import write_sample_data

    tmp = tmp_path_factory.mktemp("race")
    write_sample_data(tmp / "data")
    params = _params_file(tmp, tiny_vision)
    _kaleido("ingest", params=params)
    _kaleido("caption", params=params)
    return {"tmp": tmp, "root": tmp / "data", "params": params, "vision": tiny_vision}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_curates_on_one_data_root_one_is_refused_and_the_output_is_whole(captioned):
    root, params = captioned["root"], captioned["params"]
    # both start at once (real processes); whichever takes the stage lock runs, the other is refused at once
    runs = [subprocess.Popen([*KALEIDO, "curate", "--params", str(params), "--quiet", "--force"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in outcomes)
    refused = [err for code, err in outcomes if code == 2]
    # normally one is refused; if the first finished before the second started, both ran one after the other
    assert codes in ([0, 2], [0, 0]), outcomes
    for err in refused:
        assert "is being written by pid" in err and "kaleido curate" in err, err
    samples = _rows(root / "manifests" / "samples.jsonl")
    assert samples
    report = _kaleido("write-dataset", params=params)
    assert f"samples {len(samples)}," in report.stdout and "rejected 0" in report.stdout, report.stdout

    # and deterministically: while another process holds the stage, a run is refused naming it
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom kaleido.platform.files import exclusive_output\n"
         f"with exclusive_output({str(root / 'curate')!r}, 'kaleido curate'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused_run = _kaleido("curate", params=params, check=False)
        assert refused_run.returncode == 2
        assert f"pid {holder.pid}" in refused_run.stderr and "another output folder" in refused_run.stderr
    finally:
        holder.kill()
        holder.wait()


def test_killed_recurate_after_a_params_change_leaves_no_stale_manifest(captioned):
    root, tmp, vision, params = captioned["root"], captioned["tmp"], captioned["vision"], captioned["params"]
    _kaleido("curate", params=params)  # finished (the race test ran it): shards and sealed manifests in place
    samples = root / "manifests" / "samples.jsonl"
    assert samples.is_file()
    changed = _params_file(tmp, vision, {"data.seed": 8}, name="seed8.yaml")
    run = subprocess.Popen([*KALEIDO, "curate", "--params", str(changed), "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while samples.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not samples.exists(), "the stage must drop its merged manifest before it works"
    result = _kaleido("write-dataset", params=changed, check=False)
    assert result.returncode == 2 and "`kaleido curate` first" in result.stderr, result.stderr
    # the killed run's lock died with it: a re-run proceeds (the old shards still match the old params and are
    # skipped) and the next stage accepts its output
    again = _kaleido("curate", params=params)
    assert "curate: 0 shards run, " in again.stdout and "0 failed" in again.stdout, again.stdout
    written = _kaleido("write-dataset", params=params)
    assert "rejected 0" in written.stdout
    # a run refused over its input (a mistyped --manifest) leaves the finished dataset as it was
    dataset_manifest, index = root / "manifests" / "dataset.jsonl", root / "dataset" / "index.json"
    before = dataset_manifest.read_bytes(), index.read_bytes()
    refused = _kaleido("write-dataset", "--manifest", "no-such.jsonl", params=params, check=False)
    assert refused.returncode == 2, refused.stderr
    assert (dataset_manifest.read_bytes(), index.read_bytes()) == before


def test_a_manifest_edited_after_its_stage_is_refused(captioned):
    root, params = captioned["root"], captioned["params"]
    _kaleido("curate", params=params)
    samples = root / "manifests" / "samples.jsonl"
    original = samples.read_text()
    try:
        samples.write_text(original.splitlines()[0] + "\n")
        result = _kaleido("write-dataset", params=params, check=False)
        assert result.returncode == 2 and "changed after `kaleido curate` wrote it" in result.stderr, result.stderr
    finally:
        samples.write_text(original)


def test_symlinked_stage_folder_is_refused_and_nothing_outside_is_deleted(tmp_path, tiny_vision):
    from kaleido.platform.sample_data import write_sample_data

    write_sample_data(tmp_path / "data")
    outside = tmp_path / "elsewhere"
    (outside / "shard-09999").mkdir(parents=True)
    (outside / "shard-09999" / "precious.txt").write_text("keep me")
    os.symlink(outside, tmp_path / "data" / "ingest")
    params = _params_file(tmp_path, tiny_vision)
    result = _kaleido("ingest", params=params, check=False)
    assert result.returncode == 2 and "is a symlink" in result.stderr and str(outside) in result.stderr
    assert (outside / "shard-09999" / "precious.txt").read_text() == "keep me"
    assert list(outside.iterdir()) == [outside / "shard-09999"]
    # the manifests folder is written by every stage: a link there is refused the same way
    (tmp_path / "data" / "ingest").unlink()
    os.symlink(outside, tmp_path / "data" / "manifests")
    result = _kaleido("ingest", params=params, check=False)
    assert result.returncode == 2 and "output folder" in result.stderr and "is a symlink" in result.stderr
    assert list(outside.iterdir()) == [outside / "shard-09999"]


def test_a_shard_symlinked_out_of_the_stage_is_unlinked_not_followed(tmp_path, data_params):
    from kaleido.data.paths import remove_inside
    from kaleido.data.shards import ShardSpec, run_shards

    root = tmp_path / "data"
    (root / "stage").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    os.symlink(outside, root / "stage" / "shard-00007")  # an orphan shard name that is a link
    params = data_params(root, {"data.workers": 1})
    run_shards("stage", [ShardSpec(0, ("a",))], _write_one, params, progress=False)
    assert (outside / "keep.txt").is_file() and not (root / "stage" / "shard-00007").exists()
    with pytest.raises(ValueError, match="outside the data root"):
        remove_inside(root, outside)


def _write_one(ctx) -> dict:
    (ctx.work_dir / "out.txt").write_text(",".join(ctx.spec.items))
    (ctx.work_dir / "big.bin").write_bytes(b"0" * 1000)
    return {}


def test_a_damaged_finished_shard_is_redone_not_trusted(tmp_path, data_params, caplog):
    from kaleido.data.shards import ShardSpec, run_shards

    root = tmp_path / "data"
    params = data_params(root, {"data.workers": 1})
    specs = [ShardSpec(0, ("a",)), ShardSpec(1, ("b",))]
    first = run_shards("stage", specs, _write_one, params, progress=False)
    assert [o.status for o in first.outcomes] == ["done", "done"]
    again = run_shards("stage", specs, _write_one, params, progress=False)
    assert [o.status for o in again.outcomes] == ["skipped", "skipped"]
    big = root / "stage" / "shard-00001" / "big.bin"
    big.write_bytes(b"0" * 10)  # cut short (a racing writer, a killed copy)
    (root / "stage" / "shard-00000" / "out.txt").unlink()
    with caplog.at_level("WARNING", logger="kaleido.data"):
        third = run_shards("stage", specs, _write_one, params, progress=False)
    assert [o.status for o in third.outcomes] == ["done", "done"]
    assert big.stat().st_size == 1000 and (root / "stage" / "shard-00000" / "out.txt").is_file()
    assert "big.bin is 10 bytes, 1000 were written" in caplog.text and "out.txt is missing" in caplog.text


def test_an_unusable_sidecar_file_fails_the_caption_stage(captioned, tmp_path):
    raw = yaml.safe_load(captioned["params"].read_text())
    for bad in ("../outside.jsonl", "no-such-captions.jsonl"):
        raw["data"]["caption"]["sidecar"] = bad
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        result = _kaleido("caption", params=path, check=False)
        assert result.returncode == 2 and "data.caption.sidecar" in result.stderr, result.stderr
        # refused over its inputs: the finished output of the last good run is untouched
        assert (captioned["root"] / "manifests" / "captions.jsonl").is_file()
    # unparsable: the file's own line is named, and the fix is the file, not its path
    bad = captioned["root"] / "bad-captions.jsonl"
    bad.write_text('{"key": "raw/a.mp4", "caption": "a"}\n{"key": oops}\n')
    raw["data"]["caption"]["sidecar"] = bad.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = _kaleido("caption", params=path, check=False)
    bad.unlink()
    assert result.returncode == 2 and "line 2 is not JSON" in result.stderr, result.stderr
    assert f"fix {bad.name}" in result.stderr and "fix the path" not in result.stderr, result.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_full_disk_in_a_shard_exits_2_naming_the_file(tmp_path, data_params, monkeypatch):
    import errno

    from typer.testing import CliRunner

    import kaleido.data.pipeline as pipeline
    from kaleido.cli import app
    from kaleido.platform.sample_data import write_sample_data

    root = tmp_path / "data"
    write_sample_data(root)
    target = root / "ingest" / ".shard-00000.tmp" / "clips" / "x.mp4"

    def no_space(ctx):  # what the encoder meets on a full filesystem (ENOSPC injected: no tmpfs in CI)
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(pipeline, "ingest_shard", no_space)
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    raw["data"]["root"] = str(root)
    raw["data"]["workers"] = 1
    raw["data"]["shards"] = 1  # every source in shard-00000
    params.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["ingest", "--params", str(params), "--quiet"])
    assert result.exit_code == 2, result.output
    assert f"shard-00000: {target}: no space left on device (" in result.output and "MB free)" in result.output
    assert "Traceback" not in result.output


def test_a_second_encode_into_one_latent_cache_is_refused_naming_the_holder(tmp_path):
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    raw["train"]["pretrain"]["latents"] = str(tmp_path / "latents")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time\nfrom kaleido.platform.files import exclusive_output\n"
         f"with exclusive_output({str(tmp_path / 'latents')!r}, 'kaleido encode'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = subprocess.run([*KALEIDO, "encode", "--params", str(params), "--quiet"], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and f"pid {holder.pid}" in result.stderr, result.stderr
    finally:
        holder.kill()
        holder.wait()
