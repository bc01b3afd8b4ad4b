"""Object storage and verify-on-read: shards uploaded marker last and restored checked; dataset tars and latent
shards refused when their bytes differ from their seal; a DVC remote on S3 with verification; and the data stages,
encode and a training step against a real S3-protocol server (moto's server mode, one per session, 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _data_helpers import STAGE_OVERRIDES, run_data_stages, write_sources
from conftest import make_data_params

from kaleido.platform.integrity import IntegrityError


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server's environment in this test (and the processes it starts); a fresh bucket per test."""
    import uuid

    from kaleido.platform.storage import Remote

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    bucket = f"kaleido-{uuid.uuid4().hex[:12]}"
    Remote(f"s3://{bucket}").ensure_bucket()
    return bucket


def _flip_byte(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


def _write_files(ctx) -> dict:
    (ctx.work_dir / "clips.jsonl").write_text("".join(f'{{"clip_id": "{item}"}}\n' for item in ctx.spec.items))
    (ctx.work_dir / "clips").mkdir()
    for item in ctx.spec.items:
        (ctx.work_dir / "clips" / f"{item}.bin").write_bytes(hashlib.sha256(item.encode()).digest() * 64)
    return {"clips": len(ctx.spec.items)}


def test_finished_shards_go_up_marker_last_and_come_back_checked(s3, tmp_path):
    from kaleido.data import shard_store
    from kaleido.data.shards import ShardSpec, merge_jsonl, run_shards
    from kaleido.platform.storage import Remote

    params = make_data_params(tmp_path / "unused", {"data.root": f"s3://{s3}/data", "data.workers": 1,
                                                    "platform.staging": str(tmp_path / "staging")})
    specs = [ShardSpec(3, ("a", "b")), ShardSpec(5, ("c",))]
    first = run_shards("ingest", specs, _write_files, params, progress=False)
    assert [o.status for o in first.outcomes] == ["done", "done"]
    remote = Remote(f"s3://{s3}/data")
    assert sorted(remote.listing("")) == ["ingest/shard-00003.json", "ingest/shard-00003.tar",
                                          "ingest/shard-00005.json", "ingest/shard-00005.tar"]
    root = shard_store.local_root(params)
    for name in ("shard-00003", "shard-00005"):  # every object is the staging folder's file, byte for byte
        for suffix in (".tar", ".json"):
            assert remote.read_bytes(f"ingest/{name}{suffix}") == (root / "ingest" / f"{name}{suffix}").read_bytes()
        record = json.loads(remote.read_bytes(f"ingest/{name}.json"))
        assert record["pack_sha256"] == hashlib.sha256(remote.read_bytes(f"ingest/{name}.tar")).hexdigest()

    # another machine (an empty staging folder): finished shards are skipped from their remote markers, merged from
    # the packs' first members, and unpacked (checked) only when a stage needs their files
    shutil.rmtree(tmp_path / "staging")
    again = run_shards("ingest", specs, _write_files, params, progress=False)
    assert [o.status for o in again.outcomes] == ["skipped", "skipped"]
    root = shard_store.local_root(params)
    assert merge_jsonl(again.shard_dirs(), "clips.jsonl", root / "m.jsonl") == 3
    assert not (root / "ingest" / "shard-00003").exists()
    shard_store.ensure_shard(root / "ingest" / "shard-00003")
    assert (root / "ingest" / "shard-00003" / "clips" / "a.bin").read_bytes() == hashlib.sha256(b"a").digest() * 64

    # a remote pack corrupted in place (same size): refused on download, naming the pack and the fix
    remote.write_bytes("ingest/shard-00005.tar", _flip_byte(remote.read_bytes("ingest/shard-00005.tar"), -700))
    shutil.rmtree(tmp_path / "staging")
    with pytest.raises(IntegrityError, match=r"shard pack .*shard-00005\.tar has sha256 .* its seal records"):
        shard_store.ensure_shard(shard_store.local_root(params) / "ingest" / "shard-00005")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """Two synthetic sources through the real stages (stand-in curation models) into a local data root."""
    root = tmp_path_factory.mktemp("sealed") / "data"
    write_sources(root, ["raw/one.mp4", "raw/two.mp4"])
    params = make_data_params(root, {**STAGE_OVERRIDES, "data.shards": 2, "data.dataset_shards": 1})
    run_data_stages(params)
    return root


def test_a_dataset_tar_that_differs_from_its_seal_is_refused_by_the_reader(small_dataset, tmp_path):
    from kaleido.data.writer import dataset_tars, iter_training_samples

    dataset = tmp_path / "dataset"
    shutil.copytree(small_dataset / "dataset", dataset)
    tars = dataset_tars(dataset)
    assert len(list(iter_training_samples(dataset))) == 2
    tar = Path(tars[0])
    tar.write_bytes(_flip_byte(tar.read_bytes(), 2000))  # same size, other bytes (and a new mtime)
    with pytest.raises(IntegrityError) as caught:
        dataset_tars(dataset)
    message = str(caught.value)
    assert f"dataset tar {tar}" in message and "its seal records" in message and "kaleido write-dataset" in message
    with pytest.raises(IntegrityError):
        list(iter_training_samples(dataset))


def _tiny_cache(folder: Path) -> Path:
    """A latent cache written by hand in encode's format: one shard, the empty prompt, the index with its seals."""
    import torch
    from safetensors.torch import save_file

    from kaleido.train.latents import NULL_CONTEXT_NAME, CachedSample, write_index

    folder.mkdir(parents=True)
    name = "shard-00000__train-00000"
    save_file({"s0/video": torch.ones(16, 2, 4, 6), "s0/refs": torch.ones(1, 16, 4, 6), "s0/text": torch.ones(3, 8)},
              str(folder / f"{name}.safetensors"))
    save_file({"null_context": torch.zeros(1, 8)}, str(folder / NULL_CONTEXT_NAME))

    def seal(path: Path) -> dict:
        return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size}

    sample = CachedSample("s0", name, (5, 32, 48, 1), 3)
    write_index(folder, [sample], {"dataset": "d", "text_dim": 8, "z_dim": 16,
                                   "shards": {name: seal(folder / f"{name}.safetensors")},
                                   "null_context": seal(folder / NULL_CONTEXT_NAME)})
    return folder / f"{name}.safetensors"


def test_a_latent_shard_that_differs_from_its_seal_is_refused(tmp_path):
    from kaleido.train.latents import LatentCache

    shard = _tiny_cache(tmp_path / "latents")
    assert LatentCache(tmp_path / "latents").load(0)["video"].shape == (16, 2, 4, 6)
    data = shard.read_bytes()
    shard.write_bytes(_flip_byte(data, len(data) - 5))  # a tensor byte: the header still parses
    with pytest.raises(IntegrityError, match=r"latent shard .*shard-00000__train-00000\.safetensors has sha256.*"
                                             r"re-run `kaleido encode`"):
        LatentCache(tmp_path / "latents").load(0)


def test_dvc_remote_on_s3_verifies_what_it_pulls_and_the_reader_catches_the_rest(s3, small_dataset, tmp_path):
    """The probe's case: a DVC remote object of a dataset tar corrupted in place (same size). With the remote's
    `verify` on (the flow's settings, storage.dvc_remote_commands) `dvc pull` fails and checks out nothing; with it
    off, DVC checks out the bad bytes with exit 0, and the dataset reader refuses the tar."""
    import boto3

    from kaleido.data.writer import dataset_tars
    from kaleido.platform.storage import dvc_remote_commands

    dvc = str(Path(sys.executable).with_name("dvc"))
    repo = tmp_path / "repo"
    shutil.copytree(small_dataset / "dataset", repo / "data" / "dataset")

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=repo, capture_output=True, text=True, env=os.environ.copy(), timeout=120)
        assert not check or result.returncode == 0, result.stdout + result.stderr
        return result

    run(dvc, "init", "-q", "--no-scm")
    run(dvc, "add", "data/dataset")
    for command in dvc_remote_commands(dvc, "kaleido", f"s3://{s3}/dvc"):
        run(*command)
    assert "endpointurl" in (repo / ".dvc" / "config.local").read_text()
    run(dvc, "push")
    tar = next((repo / "data" / "dataset").rglob("*.tar"))
    md5 = hashlib.md5(tar.read_bytes()).hexdigest()
    client = boto3.client("s3")
    key = f"dvc/files/md5/{md5[:2]}/{md5[2:]}"
    body = client.get_object(Bucket=s3, Key=key)["Body"].read()
    client.put_object(Bucket=s3, Key=key, Body=_flip_byte(body, 3000))

    shutil.rmtree(repo / "data" / "dataset")
    shutil.rmtree(repo / ".dvc" / "cache")
    pulled = run(dvc, "pull", check=False)
    assert pulled.returncode != 0 and "data/dataset" in pulled.stdout + pulled.stderr
    assert not tar.exists()

    run(dvc, "remote", "modify", "--local", "kaleido", "verify", "false")
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)
    unverified = run(dvc, "pull", check=False)
    assert unverified.returncode == 0 and tar.is_file()  # DVC alone hands over the bad bytes
    with pytest.raises(IntegrityError, match=r"dataset tar .* its seal records"):
        dataset_tars(repo / "data" / "dataset")


def _objects(remote) -> dict[str, bytes]:
    return {key: remote.read_bytes(key) for key in sorted(remote.listing(""))}


@pytest.mark.slow
def test_data_stages_encode_and_a_training_step_on_s3(s3, tmp_path, tiny_assets, params_for, mlflow_server):
    """data.root, the dataset, the latent cache and MLflow's artifacts all in a bucket. Every object written is
    checked against what the stage sealed; then a machine with nothing local trains one step from the bucket."""
    import mlflow
    from typer.testing import CliRunner

    from kaleido.cli import app
    from kaleido.config import load_params
    from kaleido.data.pipeline import run_stats
    from kaleido.platform.storage import Remote
    from kaleido.train.encode import run_encode

    data_uri, latents_uri = f"s3://{s3}/data", f"s3://{s3}/latents"
    local = tmp_path / "upload"
    write_sources(local, ["raw/one.mp4", "raw/two.mp4", "raw/three.mp4"])
    data = Remote(data_uri)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        data.upload(path, path.relative_to(local).as_posix())
    experiment = f"kaleido-s3-{s3}"
    mlflow.MlflowClient(mlflow_server).create_experiment(experiment, artifact_location=f"s3://{s3}/mlflow")
    overrides = {
        **STAGE_OVERRIDES, "data.root": data_uri, "data.shards": 4, "data.dataset_shards": 2,
        "platform.staging": str(tmp_path / "staging"),
        "train.dataset": f"{data_uri}/dataset", "train.latents": latents_uri, "train.frames": 5,
        "train.latents_staging": str(tmp_path / "latents-markers"),  # write-through, as prod's DVC out
        "train.nproc_per_node": 1, "train.pretrain.global_batch": 1, "train.pretrain.steps": 1,
        "train.validation.every": 1000, "train.output_dir": str(tmp_path / "runs"),
        "train.experiment": experiment, "platform.mlflow_tracking_uri": mlflow_server,
    }
    params_file = params_for(tmp_path / "params", tiny_assets, overrides)
    params = load_params(params_file)

    reports = run_data_stages(params)
    assert reports["write"].counts["samples"] == 3 and not reports["write"].result.failed
    run_stats(params)
    encoded = run_encode(params, progress=False)
    assert encoded.samples == 3

    # every object is the staging folder's file, byte for byte, and nothing the stages sealed is missing
    staging = tmp_path / "staging"
    data_root = next(p for p in staging.iterdir() if (p / ".remote.json").is_file() and "data" in p.name)
    objects = _objects(data)
    for key, body in objects.items():
        if key.startswith(("raw/", "captions.jsonl")):
            continue
        assert (data_root / key).read_bytes() == body, key
    for stage in ("ingest", "caption", "curate", "pair"):
        packs = {k for k in objects if k.startswith(f"{stage}/shard-") and k.endswith(".tar")}
        assert packs and {k.removesuffix(".tar") + ".json" for k in packs} <= set(objects), stage
        for pack in packs:
            record = json.loads(objects[pack.removesuffix(".tar") + ".json"])
            assert record["pack_sha256"] == hashlib.sha256(objects[pack]).hexdigest()
    index = json.loads(objects["dataset/index.json"])
    for row in index["shards"]:
        assert hashlib.sha256(objects[row["path"]]).hexdigest() == row["sha256"]
        assert f"{row['path'].rsplit('/', 1)[0]}/_SUCCESS" in objects
    for manifest in ("clips", "captions", "samples", "dataset"):
        assert f"manifests/{manifest}.jsonl" in objects
    assert {"ingest/_MANIFESTS.json", "curate/_MANIFESTS.json", "dataset/_MANIFESTS.json",
            "stats/stats.json"} <= set(objects)
    latents = _objects(Remote(latents_uri))
    cache_index = json.loads(latents["index.json"])
    assert set(cache_index["shards"]) == {s["shard"] for s in cache_index["samples"]}
    assert len(cache_index["shards"]) == 2
    for name, seal in cache_index["shards"].items():
        assert hashlib.sha256(latents[f"{name}.safetensors"]).hexdigest() == seal["sha256"]
        assert json.loads(latents[f"{name}.done"])["files"][f"{name}.safetensors"] == seal
        # the local folder keeps the markers and the index (what DVC versions), not the tensors
        assert (tmp_path / "latents-markers" / f"{name}.done").is_file()
        assert not (tmp_path / "latents-markers" / f"{name}.safetensors").exists()
    assert json.loads((tmp_path / "latents-markers" / "index.json").read_text()) == cache_index

    # a training step on a machine with nothing local: the cache comes down through the staging folder
    shutil.rmtree(staging)
    result = CliRunner().invoke(app, ["train", "--stage", "pretrain", "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "runs" / "pretrain" / "metrics.json").read_text())
    assert metrics["steps"] == 1
    artifacts = Remote(f"s3://{s3}/mlflow").listing("")
    assert any(key.endswith("/artifacts/loss.csv") for key in artifacts), sorted(artifacts)[:10]


def _ingest_on(root: str) -> Any:
    from conftest import REPO_PARAMS
    from typer.testing import CliRunner

    from kaleido.cli import app

    return CliRunner().invoke(app, ["ingest", "--params", str(REPO_PARAMS), "--quiet", "-S", f"data.root={root}"])


def _one_error_line(result: Any, uri: str, *words: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {uri}: ") and all(w in lines[0] for w in words), lines[0]


def test_storage_failures_are_one_line_naming_the_bucket_and_the_fix(s3, s3_server, monkeypatch) -> None:
    """Before: `error: The specified bucket does not exist`, or a PermissionError / NoCredentialsError /
    EndpointConnectionError traceback."""
    import moto.settings
    from conftest import free_port

    _one_error_line(_ingest_on("s3://kaleido-no-such-bucket/data"), "s3://kaleido-no-such-bucket/data",
                    "bucket kaleido-no-such-bucket does not exist", "aws s3 mb")
    # moto checks signatures once INITIAL_NO_AUTH_ACTION_COUNT requests are served: 0 turns it on, and the
    # fixture's access key is no IAM user's
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    _one_error_line(_ingest_on(f"s3://{s3}/data"), f"s3://{s3}/data", "access key", "AWS_ACCESS_KEY_ID")
    monkeypatch.undo()
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    _one_error_line(_ingest_on("s3://kbucket"), "s3://kbucket", "no S3 credentials", "AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "kaleido-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "kaleido-test-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # one refused connection, not botocore's retries
    _one_error_line(_ingest_on(f"s3://{s3}/data"), f"s3://{s3}/data", "cannot connect", "AWS_ENDPOINT_URL")


def test_a_wrong_secret_is_named() -> None:
    """SignatureDoesNotMatch (s3fs raises PermissionError with botocore's ClientError as the cause)."""
    from botocore.exceptions import ClientError

    from kaleido.platform.storage import storage_error

    exc = PermissionError("The request signature we calculated does not match the signature you provided.")
    exc.__cause__ = ClientError({"Error": {"Code": "SignatureDoesNotMatch", "Message": "..."}}, "ListObjectsV2")
    message = str(storage_error("s3://bucket/prefix", exc, "listing"))
    assert message.startswith("s3://bucket/prefix: the secret key does not match")
    assert "AWS_SECRET_ACCESS_KEY" in message
