"""Shared fixtures: the tiny random-weight model assets, built once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with transformer/, vae/, text_encoder/, tokenizer/ (kaleido.model.tiny, seed 0)."""
    from kaleido.model.tiny import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("tiny_assets"), seed=0)


def _write_params(folder: Path, assets: Path, overrides: dict[str, Any] | None = None) -> Path:
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    for part in ("checkpoint", "vae", "text_encoder", "tokenizer"):
        raw["model"][part] = str(assets / ("transformer" if part == "checkpoint" else part))
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def params_for() -> Callable[..., Path]:
    """`params_for(tmp_path, assets, {"generate.steps": 2})` -> a params.yaml using the tiny assets."""
    return _write_params
