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
