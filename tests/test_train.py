"""Training end to end on CPU: latent cache, two DeepSpeed ranks on gloo, exact resume, ZeRO-3 + Ulysses, MLflow.

Expensive set-up is shared: one tiny dataset and latent cache per module, one uninterrupted ZeRO-2 run
that is both the "loss falls / MLflow / export" subject and the reference of the kill-and-resume test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.config import load_params
from kaleido.train.latents import LatentCache, read_index
from kaleido.train.tracking import read_loss_curve
from kaleido.train.trainer import EXIT_AFTER_STEP_ENV

STEPS = 16
EXPERIMENT = "kaleido-train-tests"
# (height, width, frames, references) per sample: three buckets of 5 frames, one of 1 frame
SPECS = [(64, 96, 9, 1)] * 6 + [(96, 64, 9, 1)] * 2 + [(64, 96, 9, 2)] * 4 + [(64, 96, 3, 1)] * 2
# held-out samples (split "val", as curation marks whole source videos): never trained on, evaluated at fixed triples
VAL_SPECS = [(64, 96, 9, 1), (64, 96, 9, 2), (96, 64, 9, 1)]


def write_dataset(
    root: Path, specs: list[tuple[int, int, int, int]], seed: int = 0, val_specs: list | tuple = ()
) -> list[Path]:
    """Tiny training tars through the real writer: moving noise clips, random reference images."""
    from PIL import Image

    from kaleido.data.records import ReferenceImage, TrainingSample
    from kaleido.data.writer import write_tar
    from kaleido.model.media import write_video

    rng = np.random.default_rng(seed)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    samples = []
    for i, (height, width, frames, refs) in enumerate([*specs, *val_specs]):
        still = np.repeat(np.repeat(rng.integers(0, 255, (height // 8, width // 8, 3)), 8, 0), 8, 1).astype(np.uint8)
        write_video(np.stack([np.roll(still, 2 * k, axis=1) for k in range(frames)]), root / f"clips/c{i}.mp4")
        references = []
        for j in range(refs):
            image = rng.integers(0, 255, (40 + 8 * j, 30, 3)).astype(np.uint8)
            Image.fromarray(image).save(root / f"refs/r{i}_{j}.png")
            references.append(
                ReferenceImage(category="cat", group="animal", source_clip_id=f"c{i}", image_path=f"refs/r{i}_{j}.png")
            )
        sample = TrainingSample(
            sample_id=f"s{i:03d}", clip_id=f"c{i}", clip_path=f"clips/c{i}.mp4", caption=f"a cat number {i} walks"
            + (" and walks on and on along the long river" * 80 if i == 3 else ""),  # > 512 tokens: truncated
            sample_type="crop", cross_pair=False, references=references,
            split="val" if i >= len(specs) else "train",
        )  # fmt: skip
        samples.append(sample)
    tars = [root / "dataset" / "train-00000.tar", root / "dataset" / "train-00001.tar"]
    write_tar([(s, None) for s in samples[:7]], root, tars[0])
    write_tar([(s, None) for s in samples[7:]], root, tars[1])
    return tars


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_assets, params_for):
    """The dataset, its latent cache, and `params(name, overrides)` -> a params.yaml writing under runs/<name>."""
    from kaleido.train.encode import run_encode

    folder = tmp_path_factory.mktemp("train")
    write_dataset(folder / "data", SPECS, val_specs=VAL_SPECS)

    def params(name: str, overrides: dict | None = None) -> Path:
        base = {
            "train.dataset": str(folder / "data" / "dataset"),
            "train.latents": str(folder / "latents"),
            "train.output_dir": str(folder / "runs" / name),
            "train.pretrain.steps": STEPS,
            "train.checkpoint_every": 4,
            "train.experiment": EXPERIMENT,
            "platform.mlflow_tracking_uri": "",
        }
        return params_for(folder / "params" / name, tiny_assets, {**base, **(overrides or {})})

    report = run_encode(load_params(params("encode")), progress=False)
    return {"folder": folder, "params": params, "report": report}


def _train(params: Path, *extra: str, env_vars: dict | None = None, monkeypatch=None) -> tuple[int, str]:
    if env_vars and monkeypatch is not None:
        for key, value in env_vars.items():
            monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["train", "--stage", "pretrain", "--params", str(params), *extra])
    return result.exit_code, result.output


@pytest.mark.slow
def test_encode_writes_buckets_and_skips_finished_shards(env, monkeypatch):
    from kaleido.train import encode

    report = env["report"]
    assert len(report.encoded_shards) == 2 and report.samples == len(SPECS) + len(VAL_SPECS)
    assert report.buckets == {"5x32x48+1ref": 7, "5x48x32+1ref": 3, "5x32x48+2ref": 5, "1x32x48+1ref": 2}
    assert report.splits == {"train": len(SPECS), "val": len(VAL_SPECS)}
    assert "14 train + 3 validation" in report.summary()
    cache = LatentCache(env["folder"] / "latents")
    sample = cache.load(cache.samples.index(next(s for s in cache.samples if s.bucket == (5, 32, 48, 2))))
    assert sample["video"].shape == (16, 2, 4, 6) and sample["refs"].shape == (2, 16, 4, 6)
    assert sample["text"].shape[1] == 32 and sample["text"].abs().sum(-1).gt(0).all()  # real tokens only
    assert cache.null_context().shape[1] == 32
    # the sampler the trainer uses never yields a held-out sample, over several epochs
    from kaleido.train.data import training_sampler

    held_out = set(cache.split_indices("val"))
    assert len(held_out) == len(VAL_SPECS)
    batches = iter(training_sampler(cache, micro_batch=1, dp_rank=0, dp_size=2))
    seen = {index for _ in range(60) for index in next(batches)}
    assert seen and not seen & held_out and seen <= set(cache.split_indices("train"))
    # the one caption longer than model.text_len is named, with its token count, not cut silently
    (key, tokens), = report.truncated_captions.items()
    assert "s003" in key and tokens > 512
    assert "warning: 1 captions are longer than the text encoder's 512 tokens" in report.summary()

    # A moved copy of dataset + cache is up to date: nothing is encoded, no model is even loaded.
    copy = env["folder"] / "copy"
    shutil.copytree(env["folder"] / "data", copy / "data")
    shutil.copytree(env["folder"] / "latents", copy / "latents")
    params = load_params(env["params"]("encode"), {
        "train.dataset": str(copy / "data" / "dataset"), "train.latents": str(copy / "latents"),
    })  # fmt: skip

    class NoModels:
        def __init__(self, *args, **kwargs):
            raise AssertionError("an up-to-date cache loaded the encoders")

    with monkeypatch.context() as patch:
        patch.setattr(encode, "_Encoders", NoModels)
        again = encode.run_encode(params, progress=False)
    assert again.skipped_shards == ["train-00000", "train-00001"] and not again.encoded_shards
    assert read_index(copy / "latents")["dataset"] == str(copy / "data" / "dataset")

    # Rewrite one tar (one sample fewer) and drop the other: only the changed one is encoded again.
    from kaleido.data.writer import iter_training_samples

    second = copy / "data" / "dataset" / "train-00001.tar"
    before = [example.key for example in iter_training_samples(second)]
    write_dataset(copy / "data", SPECS[:-1], seed=1, val_specs=VAL_SPECS)
    (copy / "data" / "dataset" / "train-00000.tar").unlink()
    third = encode.run_encode(params, progress=False)
    assert third.encoded_shards == ["train-00001"] and third.removed_shards == ["train-00000"]
    assert third.samples == len(before) - 1 == len(SPECS) + len(VAL_SPECS) - 8
    assert not (copy / "latents" / "train-00000.safetensors").exists()


@pytest.fixture(scope="module")
def zero2_run(env, mlflow_server):
    """Uninterrupted ZeRO-2 run on 2 ranks, tracked in MLflow: the reference curve."""
    params = env["params"]("zero2", {"platform.mlflow_tracking_uri": mlflow_server})
    code, output = _train(params)
    assert code == 0, output[-4000:]
    out = env["folder"] / "runs" / "zero2" / "pretrain"
    return {"params": params, "out": out, "output": output, "uri": mlflow_server}


@pytest.mark.slow
def test_two_ranks_zero2_loss_falls_and_exports_wan_weights(zero2_run, tiny_assets):
    from kaleido.model.checkpoint import load_dit

    rows = read_loss_curve(zero2_run["out"] / "loss.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses
    assert all(np.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["lr"] == pytest.approx(5e-4) and rows[-1]["lr"] == pytest.approx(1e-3)  # 2 warmup steps

    trained = load_dit(zero2_run["out"] / "export")  # the original Wan layout, strict
    initial = load_dit(tiny_assets / "transformer")
    assert set(trained.state_dict()) == set(initial.state_dict())
    moved = [k for k, v in trained.state_dict().items() if not torch.equal(v, initial.state_dict()[k])]
    assert len(moved) == len(initial.state_dict())
    info = json.loads((zero2_run["out"] / "export.json").read_text())
    assert info["format"] == "wan" and info["step"] == STEPS
    assert info["path"] == "export"  # relative to export.json: a copied run folder still names its own export

    # held-out loss: at step 0 (the base model), every 10 steps and at the end; in metrics.json for DVC
    validation = read_loss_curve(zero2_run["out"] / "val_loss.csv")
    assert [int(r["step"]) for r in validation] == [0, 10, STEPS]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["loss_sigma_0.50"]) for r in validation)
    summary = json.loads((zero2_run["out"] / "metrics.json").read_text())
    assert summary["val_loss_base"] == pytest.approx(validation[0]["loss"])
    assert summary["val_loss"] == pytest.approx(validation[-1]["loss"])
    assert summary["val_loss"] < summary["val_loss_base"]
    record = json.loads((zero2_run["out"] / "val_loss.json").read_text())
    assert len(record["final"]["per_sample"]) == len(VAL_SPECS)
    assert record["base"]["fingerprint"] == record["fingerprint"]

    # SFT starts from this export
    from kaleido.train.plan import plan_training

    sft = plan_training(load_params(zero2_run["params"]), "sft", 2, check_tracking=False)
    assert sft.init == str(zero2_run["out"] / "export") and sft.lr == pytest.approx(5e-4)


@pytest.mark.slow
def test_mlflow_run_has_params_and_metrics(zero2_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(zero2_run["uri"])
    run_id = json.loads((zero2_run["out"] / "metrics.json").read_text())["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    params = run.data.params
    assert params["train.zero_stage"] == "2" and params["model.arch"] == "tiny"
    assert params["plan.grad_accum"] == "2" and params["train.pretrain.steps"] == str(STEPS)
    assert len(params) > 100  # the whole params.yaml, flattened
    for metric in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "peak_memory_gb"):
        history = client.get_metric_history(run_id, metric)
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1)), metric
    for metric in ("val/loss", "val/loss_sigma_0.10", "val/loss_sigma_0.90"):
        assert sorted(m.step for m in client.get_metric_history(run_id, metric)) == [0, 10, STEPS], metric
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    csv = {int(r["step"]): r["loss"] for r in read_loss_curve(zero2_run["out"] / "loss.csv")}
    assert losses == pytest.approx(csv)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"loss.csv", "metrics.json", "export.json", "val_loss.csv", "val_loss.json"} <= artifacts


@pytest.mark.slow
def test_kill_and_resume_repeats_the_loss_curve_exactly(env, zero2_run, monkeypatch):
    # Same run, killed hard after step 6; the last checkpoint is step 4, so steps 5-6 are redone.
    params = env["params"]("killed", {"platform.mlflow_tracking_uri": zero2_run["uri"]})
    code, output = _train(params, env_vars={EXIT_AFTER_STEP_ENV: "6"}, monkeypatch=monkeypatch)
    assert code == 1 and "exit code 86" in output, output[-3000:]
    out = env["folder"] / "runs" / "killed" / "pretrain"
    assert len(read_loss_curve(out / "loss.csv")) == 6
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000004"

    monkeypatch.delenv(EXIT_AFTER_STEP_ENV)
    code, output = _train(params, "--resume")
    assert code == 0, output[-4000:]
    resumed = read_loss_curve(out / "loss.csv")
    reference = read_loss_curve(zero2_run["out"] / "loss.csv")
    assert [int(r["step"]) for r in resumed] == list(range(1, STEPS + 1))
    for mine, theirs in zip(resumed, reference, strict=True):
        assert mine["loss"] == theirs["loss"], (mine, theirs)  # bit for bit on CPU
        assert mine["grad_norm"] == theirs["grad_norm"] and mine["lr"] == theirs["lr"]
    # validation draws nothing from the training RNGs: the held-out curve is the reference's too
    assert read_loss_curve(out / "val_loss.csv") == read_loss_curve(zero2_run["out"] / "val_loss.csv")
    # the resumed process reopened the interrupted MLflow run
    from mlflow.tracking import MlflowClient

    run_id = json.loads((out / "metrics.json").read_text())["mlflow_run_id"]
    history = MlflowClient(zero2_run["uri"]).get_metric_history(run_id, "loss")
    assert {m.step for m in history} == set(range(1, STEPS + 1))


@pytest.mark.slow
def test_zero3_with_ulysses_sequence_parallel_and_offload_trains_and_exports(env, tiny_assets):
    from kaleido.model.checkpoint import load_dit

    # with ZeRO-Offload of the optimizer states (the torch AdamW steps the CPU copies; DeepSpeedCPUAdam would
    # need a C++ toolchain)
    params = env["params"]("zero3_sp2", {
        "train.zero_stage": 3, "train.sequence_parallel": 2, "train.pretrain.steps": 3, "train.checkpoint_every": 2,
        "train.offload_optimizer": True, "train.reduce_bucket_size": 10_000_000,
    })  # fmt: skip
    code, output = _train(params)
    assert code == 0, output[-4000:]
    assert "sequence parallel 2" in output and "ZeRO-3" in output and "data parallel 1" in output
    out = env["folder"] / "runs" / "zero3_sp2" / "pretrain"
    rows = read_loss_curve(out / "loss.csv")
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    # the held-out loss under ZeRO-3 + Ulysses equals a single-process evaluation of the same weights
    from kaleido.train.latents import LatentCache
    from kaleido.train.validation import ValidationSet

    validation = read_loss_curve(out / "val_loss.csv")
    assert [int(r["step"]) for r in validation] == [0, 3]
    single = ValidationSet(LatentCache(env["folder"] / "latents"), [0.1, 0.3, 0.5, 0.7, 0.9], 64, 0).evaluate(
        load_dit(tiny_assets / "transformer"), 512, torch.float32, torch.device("cpu"))
    assert validation[0]["loss"] == pytest.approx(single.loss, rel=1e-5)
    trained = load_dit(out / "export")  # gathered from the ZeRO-3 partitions
    initial = load_dit(tiny_assets / "transformer")
    key = "blocks.0.self_attn.q.weight"
    assert trained.state_dict()[key].shape == initial.state_dict()[key].shape
    assert not torch.equal(trained.state_dict()[key], initial.state_dict()[key])


@pytest.mark.slow
def test_a_failing_rank_fails_the_command_with_its_error(env):
    from safetensors.torch import save_file

    broken = env["folder"] / "broken-latents"
    shutil.copytree(env["folder"] / "latents", broken)
    # a whole file without the tensor the trainer reads (a damaged one is refused before the launch: test_faults_*),
    # re-sealed in the cache's index: the rank then fails on the missing tensor (a bug), not on the seal check
    save_file({"other": torch.zeros(1)}, str(broken / "null_context.safetensors"))
    index = json.loads((broken / "index.json").read_text())
    data = (broken / "null_context.safetensors").read_bytes()
    index["null_context"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (broken / "index.json").write_text(json.dumps(index))
    params = env["params"]("broken", {"train.latents": str(broken)})
    code, output = _train(params)
    assert code == 1
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: training stage 'pretrain' failed: rank ") and "Error" in last, last



LORA = {
    "train.pretrain.lora.enabled": True, "train.pretrain.lora.rank": 4, "train.pretrain.lora.alpha": 8.0,
    "train.pretrain.lora.target_modules": ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                           "cross_attn.q", "cross_attn.v", "ffn.0", "ffn.2"],
    # the hardest combination at once: ZeRO-3 partitions, Ulysses sequence parallelism, activation checkpointing
    "train.zero_stage": 3, "train.sequence_parallel": 2, "train.activation_checkpointing": True,
    "train.pretrain.steps": 6, "train.checkpoint_every": 2,
}


@pytest.mark.slow
def test_lora_trains_the_adapter_only_resumes_exactly_and_exports_three_layouts(env, tiny_assets, monkeypatch):
    from kaleido.model.checkpoint import load_dit
    from kaleido.model.lora import load_adapter

    code, output = _train(env["params"]("lora", LORA))
    assert code == 0, output[-4000:]
    assert "LoRA rank 4 (base frozen)" in output and "ZeRO-3" in output and "sequence parallel 2" in output
    out = env["folder"] / "runs" / "lora" / "pretrain"
    reference = read_loss_curve(out / "loss.csv")
    assert len(reference) == 6 and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in reference)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["val_loss"] < summary["val_loss_base"]  # the adapter alone lowers the held-out loss

    # the checkpoint holds the adapter (and its optimizer state) only: the base comes from its own file
    shards = list((out / "checkpoints" / "step00000006").glob("*model_states.pt"))
    assert shards
    for shard in shards:
        module = torch.load(shard, weights_only=False)["module"]
        assert all(".lora_" in key for key in module), list(module)[:5]

    # exports: peft folder, diffusers file, Wan / ComfyUI file; the same adapter in each
    export = out / "export"
    names = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "lora_wan.safetensors")
    assert {p.name for p in export.iterdir()} == {*names, "adapter_config.json"}
    assert [load_adapter(export / name)[1] for name in names] == ["peft", "diffusers", "wan"]
    info = json.loads((out / "export.json").read_text())
    assert info["format"] == "lora" and info["lora"]["rank"] == 4 and info["base"] == str(tiny_assets / "transformer")
    base = load_dit(tiny_assets / "transformer").state_dict()
    merged = [load_dit(tiny_assets / "transformer", lora=export / name).state_dict() for name in names]
    for key, tensor in base.items():
        targeted = any(f".{t}.weight" in key for t in LORA["train.pretrain.lora.target_modules"])
        assert targeted != torch.equal(merged[0][key], tensor), key  # only the targeted weights moved
        for other in merged[1:]:
            torch.testing.assert_close(other[key], merged[0][key], rtol=0, atol=1e-6)

    # kill after step 5 (last checkpoint: step 4), resume: the same losses and gradient norms, bit for bit
    killed = env["params"]("lora_killed", LORA)
    code, output = _train(killed, env_vars={EXIT_AFTER_STEP_ENV: "5"}, monkeypatch=monkeypatch)
    assert code == 1 and "exit code 86" in output, output[-3000:]
    monkeypatch.delenv(EXIT_AFTER_STEP_ENV)
    code, output = _train(killed, "--resume")
    assert code == 0, output[-4000:]
    resumed = read_loss_curve(env["folder"] / "runs" / "lora_killed" / "pretrain" / "loss.csv")
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in reference]
