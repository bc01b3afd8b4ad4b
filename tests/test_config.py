"""params.yaml schema: the repository file validates; bad values fail naming key, value and what is allowed."""

from pathlib import Path

import pytest
import yaml

from kaleido.config import ParamsError, load_params, params_hash
from kaleido.config.schema import validate_params

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_validate():
    params = load_params(REPO / "params.yaml")
    assert params.model.rope.variant == "shift_wh"
    assert params.model.rope.offset == 80
    assert params.data.references.cross_pair_ratio == 0.4
    # relative paths resolve against the folder that holds params.yaml
    assert params.resolve(params.model.vae) == (REPO / "artifacts/models/tiny/vae").resolve()


def test_defaults_are_the_shipped_values():
    params = validate_params({})
    assert params.generate.steps == 50 and params.generate.guidance_scale == 6.0 and params.generate.shift == 7.0
    assert params.train.pretrain.lr == 1e-5 and params.train.sft.lr == 5e-6
    assert params.train.betas == (0.9, 0.95) and params.train.grad_clip == 0.1
    assert params.flow_matching.text_dropout == 0.1


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_bad_literal_names_key_value_and_allowed(tmp_path):
    path = _write(tmp_path, {"model": {"rope": {"variant": "shfit_wh"}}})
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "model.rope.variant" in message and "'shfit_wh'" in message and "'shift_wh'" in message


def test_unknown_key_lists_allowed_keys(tmp_path):
    path = _write(tmp_path, {"generate": {"stpes": 4}})
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "unknown key 'generate.stpes'" in message and "steps" in message


def test_several_errors_reported_together(tmp_path):
    raw = {"generate": {"frames": 10, "height": 100}, "data": {"references": {"cross_pair_ratio": 1.5}}}
    path = _write(tmp_path, raw)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "4k+1" in message and "data.references.cross_pair_ratio" in message


def test_vae_size_rules(tmp_path):
    with pytest.raises(ParamsError, match="multiple of 16"):
        load_params(_write(tmp_path, {"generate": {"height": 100}}))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_overrides_use_dotted_keys_and_are_validated(tmp_path):
    path = _write(tmp_path, {})
    assert load_params(path, {"generate.steps": 3}).generate.steps == 3
    with pytest.raises(ParamsError, match=r"generate\.steps"):
        load_params(path, {"generate.steps": 0})


def test_params_hash_tracks_every_knob(tmp_path):
    path = _write(tmp_path, {})
    assert params_hash(load_params(path)) == params_hash(load_params(path))
    assert params_hash(load_params(path)) != params_hash(load_params(path, {"model.rope.offset": 81}))


def test_every_command_takes_set_overrides_checked_by_the_schema(tmp_path):
    """`-S KEY=VALUE` (DVC's and Hydra's habit) anywhere on a `kaleido` command line, values as YAML, each key and
    value validated like params.yaml; the file itself is not changed."""
    import json

    from typer.testing import CliRunner

    from kaleido.cli import app

    path = _write(tmp_path, yaml.safe_load((REPO / "params.yaml").read_text()))
    runner = CliRunner()
    result = runner.invoke(app, ["params", "--json", "-S", "generate.steps=4", "--params", str(path),
                                 "--set=model.rope.variant=shift_h", "-S", "train.buckets=[[32, 48]]"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["generate"]["steps"] == 4 and shown["model"]["rope"]["variant"] == "shift_h"
    assert shown["train"]["buckets"] == [[32, 48]]
    assert yaml.safe_load(path.read_text())["generate"]["steps"] != 4
    for bad, words in ((["-S", "generate.stpes=4"], "unknown key 'generate.stpes'"),
                       (["-S", "generate.steps=-3"], "generate.steps"),
                       (["-S", "generate.steps"], "expected KEY=VALUE")):
        result = runner.invoke(app, ["params", "--params", str(path), *bad])
        assert result.exit_code == 2 and words in result.output, result.output
    # the next command starts without the previous one's items
    result = runner.invoke(app, ["params", "--json", "--params", str(path)])
    assert json.loads(result.stdout)["generate"]["steps"] != 4


def test_plan_for_the_cluster_from_a_cpu_machine(tmp_path):
    """`kaleido train --plan --device gpu --gpus 16` on a machine without a GPU: the bf16 per-GPU plan of the shipped
    14B job against train.gpu_memory_gb, not this machine's fp32 CPU plan."""
    from typer.testing import CliRunner

    from kaleido.cli import app

    path = _write(tmp_path, yaml.safe_load((REPO / "params.yaml").read_text()))
    shipped = ["-S", "model.arch=14B", "-S", "model.checkpoint=/cluster/wan2.1-14b", "-S", "train.frames=81",
               "-S", "train.buckets=[[480, 832]]", "-S", "train.pretrain.global_batch=256"]
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--stage", "pretrain", "--plan", "--params", str(path), "--device", "gpu",
                                 "--gpus", "16", *shipped])
    assert result.exit_code == 0, result.output
    assert "world size 16 (--gpus)" in result.output and "memory per rank (bf16" in result.output
    assert "budget train.gpu_memory_gb" in result.output and "plan: fits" in result.output
    cpu = runner.invoke(app, ["train", "--stage", "pretrain", "--plan", "--params", str(path), "--device", "cpu",
                              "--gpus", "16", *shipped])
    assert cpu.exit_code == 0 and "memory per rank (fp32" in cpu.output and "plan: ok (fp32 on a CPU" in cpu.output
    refused = runner.invoke(app, ["train", "--stage", "pretrain", "--params", str(path), "--gpus", "16"])
    assert refused.exit_code == 2 and "add --plan" in refused.output
