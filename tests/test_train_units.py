"""Training pieces that need no process group: bucket sampler, pre-launch validation, encode helpers, records."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.config import load_params
from kaleido.train.data import BucketBatchSampler, micro_batches_per_epoch, pad_text
from kaleido.train.encode import nearest_bucket, resize_cover, select_frames
from kaleido.train.launch_local import summarize_failure
from kaleido.train.plan import TrainPlanError, plan_training
from kaleido.train.tracking import LossCurve, flatten, read_loss_curve

BUCKETS = [(5, 32, 48, 1)] * 7 + [(5, 48, 32, 1)] * 3 + [(5, 32, 48, 2)] * 5 + [(1, 32, 48, 1)] * 2


def _drain(sampler: BucketBatchSampler, count: int) -> list[list[int]]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def test_sampler_one_bucket_per_micro_batch_and_disjoint_ranks():
    ranks = [BucketBatchSampler(BUCKETS, micro_batch=2, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    per_rank = ranks[0].per_rank_batches()
    assert per_rank == micro_batches_per_epoch(BUCKETS, 2) // 2 == 3  # 3 + 1 + 2 + 1 = 7 -> 6 dealt
    epoch = [_drain(sampler, per_rank) for sampler in ranks]
    for batch in epoch[0] + epoch[1]:
        assert len(batch) == 2 and len({BUCKETS[i] for i in batch}) == 1
    seen = [i for rank in epoch for batch in rank for i in batch]
    assert len(seen) == len(set(seen))  # no sample twice within an epoch, across ranks


def test_sampler_is_deterministic_and_resumes_mid_epoch():
    a = BucketBatchSampler(BUCKETS, 1, 0, 2, seed=7)
    b = BucketBatchSampler(BUCKETS, 1, 0, 2, seed=7)
    assert _drain(a, 20) == _drain(b, 20)  # crosses an epoch boundary (8 per rank and epoch)
    assert BucketBatchSampler(BUCKETS, 1, 0, 2, seed=8).epoch_batches(0) != a.epoch_batches(0)
    assert a.epoch_batches(0) != a.epoch_batches(1)

    first = BucketBatchSampler(BUCKETS, 1, 1, 2, seed=7)
    head = _drain(first, 11)
    state = first.state_dict()
    expected = _drain(first, 9)
    resumed = BucketBatchSampler(BUCKETS, 1, 1, 2, seed=7)
    resumed.load_state_dict(state)
    assert head and _drain(resumed, 9) == expected
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler(BUCKETS, 1, 0, 2, seed=7).load_state_dict(state)


def test_sampler_refuses_too_little_data():
    with pytest.raises(ValueError, match="fewer than the 4 data-parallel ranks"):
        BucketBatchSampler([(5, 32, 48, 1)] * 5, micro_batch=2, dp_rank=0, dp_size=4)


def test_encode_helpers():
    assert select_frames(9, 81, 0, "k") == (0, 9)
    start, count = select_frames(30, 17, 0, "k")
    assert count == 17 and 0 <= start <= 13 and select_frames(30, 17, 0, "k") == (start, count)
    assert select_frames(7, 81, 0, "k")[1] == 5  # the largest 4k+1 that fits
    buckets = [(32, 48), (48, 32)]
    assert nearest_bucket(64, 96, buckets) == (32, 48) and nearest_bucket(96, 64, buckets) == (48, 32)
    frames = np.random.default_rng(0).integers(0, 255, (5, 64, 80, 3), dtype=np.uint8)
    pixels = resize_cover(frames, 32, 48)
    assert pixels.shape == (3, 5, 32, 48) and pixels.min() >= -1 and pixels.max() <= 1
    padded = pad_text(torch.ones(3, 4), 6)
    assert padded.shape == (6, 4) and padded[:3].eq(1).all() and padded[3:].eq(0).all()


def test_records(tmp_path: Path):
    flat = flatten({"a": {"b": 1, "c": [1, 2]}, "d": None})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": ""}
    assert flatten({"world_size": 2, "zero": {"stage": 2}}, "plan.") == {"plan.world_size": "2", "plan.zero.stage": "2"}
    path = tmp_path / "loss.csv"
    curve = LossCurve(path, None)
    for step in range(1, 6):
        curve.add({"step": step, "loss": 1.0 / step, "lr": 0.1})
    curve.close()
    resumed = LossCurve(path, resume_step=3)  # a resumed run drops what came after its checkpoint
    resumed.add({"step": 4, "loss": 9.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_loss_curve(path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 9.0)]


def test_failure_summary_names_the_rank():
    lines = [
        "Traceback (most recent call last):",
        "Root Cause (first observed failure):",
        "[0]:",
        "  rank      : 1 (local_rank: 1)",
        "  exitcode  : 1 (pid: 42)",
        "  traceback : Traceback (most recent call last):",
        "    kaleido.train.latents.CacheError: latent cache /x: broken",
    ]
    assert summarize_failure(lines) == "rank 1 (exit code 1): kaleido.train.latents.CacheError: latent cache /x: broken"
    assert summarize_failure(["all fine"]) is None
    # torchrun's agent died collecting the ranks (an error file read while a rank still wrote it): no summary,
    # but the rank's own operator line is still the reason
    from kaleido.train.launch_local import operator_error

    crashed = ["error: no space left on device writing /d/runs/checkpoints/step-8 (0 MB free)",
               "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)"]
    assert operator_error(crashed) == "no space left on device writing /d/runs/checkpoints/step-8 (0 MB free)"
    assert operator_error(["json.decoder.JSONDecodeError: Expecting value"]) is None


# ---- pre-launch validation -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_params(tiny_assets, params_for, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_plan")
    counter = itertools.count()

    def make(overrides: dict) -> Path:
        base = {
            "train.dataset": str(folder / "dataset"),
            "train.latents": str(folder / "no-cache"),
            "train.output_dir": str(folder / "runs"),
            "platform.mlflow_tracking_uri": "",
        }
        return params_for(folder / f"p{next(counter)}", tiny_assets, {**base, **overrides})

    return make


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        ({"train.sequence_parallel": 3, "train.nproc_per_node": 3}, ["train.sequence_parallel=3", "2 attention heads"]),
        ({"train.sequence_parallel": 2, "train.nproc_per_node": 3}, ["train.sequence_parallel=2", "world size 3"]),
        ({"train.pretrain.global_batch": 5}, ["train.pretrain.global_batch=5", "train.micro_batch=1", "data-parallel"]),
        ({}, ["train.latents", "run `kaleido encode` first"]),
        ({"platform.mlflow_tracking_uri": "http://mlflow.invalid:5000"}, ["platform.mlflow_tracking_uri"]),
    ],
    ids=["sp-vs-heads", "sp-vs-world", "global-batch", "no-cache", "tracking-down"],
)
def test_bad_combination_fails_before_launch(bad_params, monkeypatch, overrides, keys):
    path = bad_params(overrides)
    with pytest.raises(TrainPlanError) as info:
        params = load_params(path)
        plan_training(params, "pretrain", params.train.nproc_per_node)
    for key in keys:
        assert key in str(info.value)

    def no_launch(*args, **kwargs):
        raise AssertionError("a process was started for a bad params combination")

    monkeypatch.setattr(subprocess, "Popen", no_launch)
    result = CliRunner().invoke(app, ["train", "--stage", "pretrain", "--params", str(path)])
    assert result.exit_code == 2, result.output
    for key in keys:
        assert key in result.output


def test_invalid_zero_stage_and_sft_without_pretrain(bad_params, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a process was started for a bad params combination")

    monkeypatch.setattr(subprocess, "Popen", no_launch)
    bad_zero = bad_params({"train.zero_stage": 4})
    result = CliRunner().invoke(app, ["train", "--stage", "pretrain", "--params", str(bad_zero)])
    assert result.exit_code == 2 and "train.zero_stage" in result.output
    result = CliRunner().invoke(app, ["train", "--stage", "sft", "--params", str(bad_params({}))])
    assert result.exit_code == 2 and "train.sft.init" in result.output
    assert "kaleido train --stage pretrain" in result.output
    result = CliRunner().invoke(app, ["train", "--stage", "pretrain", "--resume", "--params", str(bad_params({}))])
    assert result.exit_code == 2 and "--resume: no DeepSpeed checkpoint" in result.output



def test_mlflow_request_limits_apply_inside_the_block_and_restore_after(monkeypatch):
    import os

    from kaleido.config.schema import PlatformConfig
    from kaleido.train.tracking import mlflow_request_limits

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "999")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    platform = PlatformConfig(mlflow_request_retries=3, mlflow_request_timeout_s=7)
    with mlflow_request_limits(platform):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "999" and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
