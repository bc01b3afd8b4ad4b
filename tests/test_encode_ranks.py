"""`kaleido encode` across ranks: disjoint shares of the latent shards, byte-for-byte the cache one process writes,
resumable shard by shard; and the Kubernetes launcher's Job can run the same encode worker."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from _data_helpers import STAGE_OVERRIDES, run_data_stages, write_sources

from kaleido.train.encode import rank_share


def test_rank_shares_are_disjoint_and_cover_every_shard() -> None:
    names = [f"shard-{i:05d}__train-{i:05d}" for i in (7, 1, 3, 12, 5)]
    shares = [rank_share(names, rank, 3) for rank in range(3)]
    assert sorted(n for share in shares for n in share) == sorted(names)
    assert all(not set(a) & set(b) for i, a in enumerate(shares) for b in shares[i + 1 :])
    assert rank_share(names, 0, 1) == sorted(names)
    with pytest.raises(ValueError):
        rank_share(names, 3, 3)


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_two_cpu_ranks_write_the_same_cache_as_one(tmp_path, tiny_assets, params_for, monkeypatch):
    import torch
    from typer.testing import CliRunner

    from kaleido.cli import app
    from kaleido.config import load_params
    from kaleido.train.encode import run_encode

    data = tmp_path / "data"
    write_sources(data, [f"raw/s{i}.mp4" for i in range(6)])
    overrides = {**STAGE_OVERRIDES, "data.root": str(data), "data.shards": 8, "data.dataset_shards": 4,
                 "train.dataset": str(data / "dataset"), "train.frames": 5}
    one = params_for(tmp_path / "one", tiny_assets, {**overrides, "train.latents": str(tmp_path / "one-rank")})
    two = params_for(tmp_path / "two", tiny_assets, {**overrides, "train.latents": str(tmp_path / "two-ranks"),
                                                     "train.encode_ranks": 2})
    run_data_stages(load_params(one))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the two ranks runs with below
    try:
        single = run_encode(load_params(one), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(single.encoded_shards) >= 3

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = CliRunner().invoke(app, ["encode", "--params", str(two), "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"{len(single.encoded_shards)} shards encoded" in result.output  # every rank's share, counted once
    for rank in (0, 1):
        assert f"encode rank {rank}/2:" in result.output
    reference = _files(tmp_path / "one-rank")
    assert _files(tmp_path / "two-ranks") == reference

    # resumable: a lost shard is encoded again (alone), to the same bytes
    lost = single.encoded_shards[1]
    for suffix in (".safetensors", ".json", ".done"):
        (tmp_path / "two-ranks" / f"{lost}{suffix}").unlink()
    torch.set_num_threads(1)
    try:
        again = run_encode(load_params(two), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert again.encoded_shards == [lost] and len(again.skipped_shards) == len(single.encoded_shards) - 1
    assert _files(tmp_path / "two-ranks") == reference
    shutil.rmtree(tmp_path / "two-ranks")


def test_the_kubernetes_job_can_run_the_encode_worker(tmp_path) -> None:
    import yaml
    from conftest import REPO_PARAMS

    from kaleido.config import load_params
    from kaleido.train.launch_kubernetes import render_training_manifests

    params = load_params(REPO_PARAMS)
    _, _, job = render_training_manifests(params, "pretrain", False, REPO_PARAMS, run_id="enc",
                                          module="kaleido.train.encode_worker")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("-m") + 1] == "kaleido.train.encode_worker"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "encode"
    yaml.safe_dump(job)
