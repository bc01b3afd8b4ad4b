"""Damaged inputs give one `error:` line naming the file and what is wrong (exit 2), before a model loads:
truncated or empty safetensors (weights, latent cache), a NUL byte in an eval-set path (docs/operations.md,
"When things fail")."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.eval.evalset import EvalSetError, init_builtin, load_eval_set


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(size)


def test_every_kind_of_damaged_safetensors_file_is_named_with_what_is_wrong(tmp_path: Path) -> None:
    from kaleido.model.checkpoint import CheckpointError, check_weight_files

    whole = tmp_path / "model" / "weights.safetensors"
    whole.parent.mkdir()
    save_file({"a": torch.zeros(64, 64), "b": torch.ones(8)}, str(whole))
    size = whole.stat().st_size
    assert check_weight_files(whole.parent) == [whole]
    header = int.from_bytes(whole.read_bytes()[:8], "little")
    cases = {
        0: "not a safetensors file: empty (0 bytes)",
        5: "not a safetensors file: truncated (5 bytes)",
        8 + header // 2: f"truncated header: {header // 2} of its {header} header bytes",
        size - 100: f"truncated: the header describes {size} bytes, the file has {size - 100}",
    }
    for cut, expected in cases.items():
        damaged = tmp_path / f"cut{cut}" / "weights.safetensors"
        damaged.parent.mkdir()
        shutil.copy(whole, damaged)
        _truncate(damaged, cut)
        with pytest.raises(CheckpointError) as caught:
            check_weight_files(damaged.parent)
        assert str(caught.value).startswith(f"{damaged}: {expected}"), str(caught.value)
    longer = tmp_path / "longer" / "weights.safetensors"  # two writers at once, or a copy appended to
    longer.parent.mkdir()
    longer.write_bytes(whole.read_bytes() + b"\0" * 10)
    with pytest.raises(CheckpointError, match=rf"{longer}: size mismatch: the header describes {size} bytes"):
        check_weight_files(longer)


@pytest.fixture
def broken_assets(tiny_assets: Path, tmp_path: Path) -> Callable[[str], Path]:
    """`broken(part)` -> a copy of the tiny assets whose `part` (transformer, vae, text_encoder) weights are cut."""

    def broken(part: str) -> Path:
        folder = tmp_path / f"broken-{part}"
        shutil.copytree(tiny_assets, folder)
        (weights,) = (folder / part).glob("*.safetensors")
        _truncate(weights, weights.stat().st_size // 2)
        return folder

    return broken


@pytest.mark.parametrize("part", ["vae", "text_encoder"])
def test_generate_and_evaluate_name_a_truncated_weight_file_before_any_model_loads(
    part: str, broken_assets: Callable[[str], Path], params_for: Callable[..., Path], tmp_path: Path, monkeypatch
) -> None:
    from kaleido.model import generate

    assets = broken_assets(part)
    (weights,) = (assets / part).glob("*.safetensors")
    params = params_for(tmp_path / "cfg", assets, {"platform.mlflow_tracking_uri": "", "eval.frames": 5,
                                                   "eval.height": 32, "eval.width": 48, "eval.steps": 2,
                                                   "eval.metrics": ["motion_smoothness"]})  # fmt: skip
    init_builtin(tmp_path / "set")
    reference = next((tmp_path / "set" / "images").glob("*.png"))
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "--params", str(params), "--prompt", "a cat", "--ref", str(reference),
                                 "--out", str(tmp_path / "out.mp4")])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"error: {weights}: truncated: the header describes " in result.output

    def no_models(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the weight files were checked")

    monkeypatch.setattr(generate.S2VPipeline, "from_params", no_models)
    result = runner.invoke(app, ["evaluate", "--model", str(assets / "transformer"), "--eval-set",
                                 str(tmp_path / "set"), "--out", str(tmp_path / "eval"), "--params", str(params),
                                 "--no-mlflow", "--quiet"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"{weights}: truncated: the header describes " in result.output


def test_train_refuses_truncated_init_weights_and_cache_shards_before_any_launch(
    broken_assets: Callable[[str], Path], params_for: Callable[..., Path], tmp_path: Path, monkeypatch
) -> None:
    def no_launch(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was started with damaged inputs")

    assets = broken_assets("transformer")
    (weights,) = (assets / "transformer").glob("*.safetensors")
    cache = tmp_path / "latents"
    cache.mkdir()
    save_file({"s0/video": torch.zeros(16, 2, 4, 6)}, str(cache / "train-00000.safetensors"))
    _truncate(cache / "train-00000.safetensors", 40)
    save_file({"null_context": torch.zeros(1, 32)}, str(cache / "null_context.safetensors"))
    sample = {"key": "s0", "shard": "train-00000", "bucket": {"frames": 5, "height": 32, "width": 48, "num_refs": 1},
              "text_tokens": 1, "split": "train"}  # fmt: skip
    (cache / "index.json").write_text(json.dumps({"format": "kaleido-latents", "version": 1, "text_dim": 32,
                                                  "z_dim": 16, "dataset": "x", "samples": [sample]}))  # fmt: skip
    params = params_for(tmp_path / "cfg", assets, {"train.latents": str(cache), "platform.mlflow_tracking_uri": ""})
    monkeypatch.setattr(subprocess, "Popen", no_launch)
    result = CliRunner().invoke(app, ["train", "--stage", "pretrain", "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert f"model.checkpoint: {weights}: truncated: the header describes " in result.output
    shard = cache / "train-00000.safetensors"
    assert f"train.latents: {shard}: truncated header: " in result.output and "kaleido encode --force" in result.output


# ---- a NUL byte in an eval-set path ----------------------------------------------------------------------------


def test_a_nul_byte_in_an_eval_set_path_names_the_file_and_line(tmp_path: Path) -> None:
    init_builtin(tmp_path / "set")
    spec = tmp_path / "set" / "evalset.yaml"
    text = spec.read_text()
    line = text.splitlines().index("  - images/chelsea.png") + 1  # the cat case's reference

    spec.write_text(text.replace("  - images/chelsea.png", '  - "images/chel\\0sea.png"', 1))  # YAML's escape
    with pytest.raises(EvalSetError) as caught:
        load_eval_set(tmp_path / "set")
    assert f"line {line}: case 'cat-garden' (#2): reference 'images/chel\\x00sea.png' contains a NUL" in str(
        caught.value)
    assert str(caught.value).startswith(f"{spec}: 1 problem(s)")

    spec.write_bytes(text.replace("  - images/chelsea.png", "  - images/chel\0sea.png", 1).encode())  # a raw byte
    with pytest.raises(EvalSetError, match=rf"^{spec}: line {line}: a NUL byte"):
        load_eval_set(tmp_path / "set")

    # in the folder's own path (params.yaml's eval.eval_set): an error line, not a traceback
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"eval": {"eval_set": str(tmp_path / "se\0t")}}))
    result = CliRunner().invoke(app, ["eval-set", "check", "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert "contains a NUL byte; check --eval-set or eval.eval_set" in result.output
