"""Samples during training (train.samples): held-out samples drawn from the latent cache at fixed seeds with the
module being trained, written as videos and one contact sheet, logged to MLflow; off by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kaleido.config import load_params
from kaleido.train.latents import CachedSample, LatentCache, write_index


def _cache(folder: Path, text_dim: int) -> LatentCache:
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    tensors, samples = {}, []
    for i, (split, height, width) in enumerate([("train", 32, 48), ("val", 32, 48), ("val", 48, 32), ("val", 32, 48)]):
        key = f"{split}/s{i}"
        tensors[f"{key}/video"] = torch.randn(16, 2, height // 8, width // 8, generator=gen)
        tensors[f"{key}/refs"] = torch.randn(1, 16, height // 8, width // 8, generator=gen)
        tensors[f"{key}/text"] = torch.randn(4, text_dim, generator=gen)
        samples.append(CachedSample(key, "s0", (5, height, width, 1), 4, split))
    save_file(tensors, str(folder / "s0.safetensors"))
    save_file({"null_context": torch.zeros(1, text_dim)}, str(folder / "null_context.safetensors"))
    write_index(folder, samples, {"text_dim": text_dim, "z_dim": 16})
    return LatentCache(folder)


def test_samples_are_held_out_seeded_and_logged(tiny_assets: Path, params_for, tmp_path: Path) -> None:
    from kaleido.model.checkpoint import load_dit
    from kaleido.train.samples import TrainingSamples
    from kaleido.train.tracking import Tracker

    params = load_params(params_for(tmp_path / "p", tiny_assets, {"train.samples.every": 2, "generate.steps": 2}))
    module = load_dit(tiny_assets / "transformer").train()
    samples = TrainingSamples(params, _cache(tmp_path / "cache", module.cfg.text_dim), tmp_path / "out",
                              torch.device("cpu"))
    assert [samples.due(step) for step in (1, 2, 3, 4)] == [False, True, False, True]
    assert [samples.cache.samples[i].split for i in samples.indices] == ["val", "val"]  # held out, count 2
    first = samples.generate(module, 2)
    assert module.training  # its mode is restored for the next step
    assert sorted(p.name for p in first.iterdir()) == ["sample_0.mp4", "sample_1.mp4", "samples.json", "sheet.png"]
    again = samples.generate(module, 4)  # the same weights and seeds: the same videos
    from kaleido.model.media import read_video

    assert np.array_equal(read_video(first / "sample_1.mp4"), read_video(again / "sample_1.mp4"))
    assert read_video(first / "sample_1.mp4").shape == (5, 48, 32, 3)  # the sample's own bucket

    tracker = Tracker(True, tmp_path / "out", 4, 0, False, progress=False)
    tracker.start_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", "samples-test", "run", {}, {})
    tracker.log_samples(2, first)
    from mlflow import MlflowClient

    listed = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(tracker.run_id, "samples/step_000002")
    assert {Path(item.path).name for item in listed} >= {"sample_0.mp4", "sheet.png"}
    tracker.finish()


def test_samples_are_off_by_default_and_refused_where_one_rank_cannot_run_the_model(tiny_assets, params_for,
                                                                                     tmp_path) -> None:
    from kaleido.train.plan import TrainPlanError, plan_training

    assert load_params(params_for(tmp_path / "a", tiny_assets)).train.samples.every == 0
    params = load_params(params_for(tmp_path / "b", tiny_assets, {"train.samples.every": 5, "train.zero_stage": 3}))
    with pytest.raises(TrainPlanError, match=r"train\.samples\.every=5"):
        plan_training(params, "pretrain", 2, check_files=False, check_tracking=False)
