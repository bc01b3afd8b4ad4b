"""Eval-set folders: the built-in set, and a validator that reports every problem clearly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.eval.evalset import BUILTIN_CASES, CATEGORIES, EvalSetError, init_builtin, load_eval_set


@pytest.fixture
def builtin(tmp_path: Path) -> Path:
    init_builtin(tmp_path / "set")
    return tmp_path / "set"


def _write(folder: Path, cases: list[dict]) -> None:
    (folder / "evalset.yaml").write_text(yaml.safe_dump({"name": "t", "cases": cases}))


def test_builtin_set_loads(builtin: Path) -> None:
    evalset = load_eval_set(builtin)
    assert [case.id for case in evalset.cases] == [case["id"] for case in BUILTIN_CASES]
    assert set(evalset.categories()) <= set(CATEGORIES) and evalset.categories()["multi-subject"] == 1
    pair = evalset.cases[-1]
    assert pair.subjects == ("astronaut", "cat") and all(path.is_file() for path in pair.references)
    assert evalset.fingerprint() == load_eval_set(builtin).fingerprint()
    with pytest.raises(EvalSetError, match="already exists"):
        init_builtin(builtin)


def test_case_fingerprint_follows_the_reference_content(builtin: Path) -> None:
    before = load_eval_set(builtin).cases[0].fingerprint()
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(builtin / "images" / "astronaut.png")
    assert load_eval_set(builtin).cases[0].fingerprint() != before


def test_validator_lists_every_problem(builtin: Path, tmp_path: Path) -> None:
    (builtin / "images" / "broken.png").write_bytes(b"not an image")
    outside = tmp_path / "outside.png"
    outside.write_bytes((builtin / "images" / "coffee.png").read_bytes())
    os.symlink(outside, builtin / "images" / "link.png")
    good = {"prompt": "p", "category": "object", "references": ["images/coffee.png"]}
    _write(builtin, [
        {**good, "id": "missing", "references": ["images/nope.png"]},
        {**good, "id": "badcat", "category": "vehicle"},
        {**good, "id": "toomany", "references": ["images/coffee.png"] * 4},
        {**good, "id": "escape", "references": ["../outside.png"]},
        {**good, "id": "absolute", "references": [str(outside)]},
        {**good, "id": "symlink", "references": ["images/link.png"]},
        {**good, "id": "broken", "references": ["images/broken.png"]},
        {**good, "id": "pair", "category": "multi-subject"},
        {**good, "id": "dup"},
        {**good, "id": "dup"},
        {**good, "id": "bad id!"},
        {**good, "id": "extra", "colour": "red", "seed": -1},
        {**good, "id": "terms", "references": ["images/coffee.png"], "subjects": ["cup", "saucer"]},
    ])
    with pytest.raises(EvalSetError) as info:
        load_eval_set(builtin, max_references=3)
    message = str(info.value)
    for expected in (
        "case 'missing' (#1): reference 'images/nope.png' not found",
        "unknown category 'vehicle'; use one of human, animal, cartoon, object, multi-subject",
        "4 references, the model takes at most 3",
        "'../outside.png' resolves to",
        "is absolute; write it relative",
        "'images/link.png' resolves to",  # a symlink out of the folder is an escape too
        "reference 'images/broken.png' ",  # then its full path, and:
        "broken.png: not a readable image",
        "a multi-subject case needs at least 2 references",
        "a multi-subject case must name its subjects",
        "case id 'dup' is used 2 times",
        "id 'bad id!' must be 1-64 letters",
        "unknown keys ['colour']",
        "seed -1 must be a non-negative integer",
        "2 subjects for 1 references",
    ):
        assert expected in message, expected
    assert message.count("\n  ") == 14 and "14 problem(s)" in message  # one line per problem


def test_missing_folder_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(EvalSetError, match="kaleido eval-set init"):
        load_eval_set(tmp_path)
    (tmp_path / "evalset.yaml").write_text("cases: [")
    with pytest.raises(EvalSetError, match="not valid YAML"):
        load_eval_set(tmp_path)
    (tmp_path / "evalset.yaml").write_text("cases: []")
    with pytest.raises(EvalSetError, match="non-empty 'cases'"):
        load_eval_set(tmp_path)


def test_cli_init_and_check(tmp_path: Path) -> None:
    runner = CliRunner()
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    result = runner.invoke(app, ["eval-set", "init", str(tmp_path / "set")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval-set", "check", str(tmp_path / "set"), "--params", str(params)])
    assert result.exit_code == 0 and "5 cases" in result.output and "multi-subject 1" in result.output
    _write(tmp_path / "set", [{"id": "x", "prompt": "p", "category": "robot", "references": ["images/rocket.png"]}])
    result = runner.invoke(app, ["eval-set", "check", str(tmp_path / "set"), "--params", str(params)])
    assert result.exit_code == 2 and "unknown category 'robot'" in result.output
