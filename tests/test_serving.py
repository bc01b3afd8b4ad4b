"""Every registered version is an MLflow Model: pyfunc load and predict, `kaleido serve` (MLflow's scoring app,
bounded) answering real HTTP requests, `kaleido generate --model models:/...`, all against the session's MLflow server
(tiny model); a version whose files differ or are gone is refused where it is promoted or loaded."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.config import load_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registered(tiny_assets, params_for, mlflow_server, tmp_path_factory):
    """A tiny version registered through the real path (MLflow Model folder, referenced assets), gated and promoted."""
    from kaleido.registry import Lineage, ModelRegistry
    from kaleido.serving import build_model

    folder = tmp_path_factory.mktemp("serving")
    name = f"kaleido-serve-{uuid.uuid4().hex[:8]}"
    params_path = params_for(folder / "params", tiny_assets, {
        "platform.mlflow_tracking_uri": mlflow_server, "platform.registered_model": name,
        "generate.steps": 2, "generate.frames": 5, "generate.height": 32, "generate.width": 48,
    })  # fmt: skip
    params = load_params(params_path)
    registry = ModelRegistry(mlflow_server, name)
    client = registry.client
    experiment = client.get_experiment_by_name("serving-tests")
    run = client.create_run(experiment.experiment_id if experiment else client.create_experiment("serving-tests"))
    export = folder / "export"  # named as the trainer names its export (MLflow keeps source basenames)
    shutil.copytree(tiny_assets / "transformer", export)
    model = build_model(export, params, folder / "model", client)
    version = registry.register(run.info.run_id, model, Lineage("g", "d", "p", run.info.run_id))
    registry.record_gate(version, passed=True, reasons={})
    registry.promote(version)
    reference = folder / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(reference)
    return {"name": name, "version": version, "params": params_path, "uri": mlflow_server, "ref": reference,
            "folder": folder, "registry": registry}


def _frames_of(video: bytes, tmp: Path) -> np.ndarray:
    from kaleido.model.media import read_video

    path = tmp / f"{uuid.uuid4().hex}.mp4"
    path.write_bytes(video)
    return read_video(path)


def test_pyfunc_loads_the_champion_and_returns_a_playable_video(registered, tmp_path, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    from kaleido.serving import encode_image

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    monkeypatch.setenv("KALEIDO_CACHE", str(tmp_path / "cache"))
    model = mlflow.pyfunc.load_model(f"models:/{registered['name']}@champion")
    rows = pd.DataFrame([{"prompt": "a cat walks", "references": [encode_image(registered["ref"])]}])
    out = model.predict(rows, params={"seed": 3})
    row = out.iloc[0]
    frames = _frames_of(row["video"], tmp_path)
    assert frames.shape == (5, 32, 48, 3) and row["frames"] == 5 and row["fps"] == 16 and row["seed"] == 3
    # the assets (VAE, text encoder, tokenizer) were referenced, uploaded once, and cached locally
    assert any((tmp_path / "cache" / "assets").iterdir())
    with pytest.raises(Exception, match=r"references\[0\]: not valid base64 and not an http\(s\) URL"):
        model.predict(pd.DataFrame([{"prompt": "a cat", "references": ["not an image!"]}]))
    with pytest.raises(Exception, match="URLs are off for this model"):
        model.predict(pd.DataFrame([{"prompt": "a cat", "references": ["https://example.invalid/cat.png"]}]))
    # request numbers go through the CLI's schema before any sampling
    for bad, message in [({"frames": 6}, "4k\\+1 frames"), ({"height": 40}, "multiple of 16"),
                         ({"steps": 5000}, "less than or equal to 1000"), ({"width": 1296}, "at most 1280 pixels"),
                         ({"guidance_scale": float("nan")}, "finite number")]:
        with pytest.raises(Exception, match=message):
            model.predict(rows, params=bad)


def test_every_version_is_an_mlflow_model_with_signature_and_example(registered, tmp_path):
    from kaleido.serving import ASSETS_EXPERIMENT, model_checkpoint

    folder = registered["registry"].download(registered["version"], tmp_path / "dl")
    meta = yaml.safe_load((folder / "MLmodel").read_text())
    assert "python_function" in meta["flavors"]
    signature = meta["signature"]
    inputs = {column["name"] for column in json.loads(signature["inputs"])}
    params = {p["name"]: p["default"] for p in json.loads(signature["params"])}
    assert inputs == {"prompt", "references"}
    expected = load_params(registered["params"]).generate
    assert params["steps"] == expected.steps == 2 and params["shift"] == expected.shift
    assert params["negative_prompt"] == expected.negative_prompt and set(params) == {
        "seed", "steps", "frames", "height", "width", "guidance_scale", "shift", "sampler", "negative_prompt"}
    assert (folder / "input_example.json").is_file() and model_checkpoint(folder) == folder / "artifacts" / "export"
    assert (model_checkpoint(folder) / "diffusion_pytorch_model.safetensors").is_file()
    config = meta["flavors"]["python_function"]["config"]
    assert set(config["assets"]) == {"vae", "text_encoder", "tokenizer"}  # referenced, not copied
    tags = registered["registry"].version_tags(registered["version"])
    assert tags["lineage.git_revision"] == "g" and tags["lineage.dvc_data_hash"] == "d"
    # a second version with the same assets reuses the uploaded ones
    client = registered["registry"].client
    assets = client.search_runs([client.get_experiment_by_name(ASSETS_EXPERIMENT).experiment_id])
    parts = [run.data.tags["asset.part"] for run in assets]
    assert sorted(parts) == sorted(set(parts))


def test_copied_assets_travel_inside_the_model(registered, tiny_assets, tmp_path):
    """platform.model_assets: copy: the VAE, text encoder and tokenizer live in the folder, which then generates
    with no registry at all; two different sources with one folder name are refused before anything is written."""
    import mlflow.pyfunc
    import pandas as pd

    from kaleido.serving import ServingError, build_model, encode_image, local_assets

    params = load_params(registered["params"], {"platform.model_assets": "copy"})
    folder = build_model(tiny_assets / "transformer", params, tmp_path / "model")
    assets = local_assets(folder)
    assert set(assets) == {"vae", "text_encoder", "tokenizer"}
    assert all(path.is_relative_to(folder) and path.exists() for path in assets.values())
    model = mlflow.pyfunc.load_model(str(folder))
    out = model.predict(pd.DataFrame([{"prompt": "a cat", "references": [encode_image(registered["ref"])]}]),
                        params={"seed": 1})
    assert _frames_of(out.iloc[0]["video"], tmp_path).shape == (5, 32, 48, 3)

    other = tmp_path / "elsewhere" / "vae"  # a different folder named like the transformer's source
    shutil.copytree(tiny_assets / "vae", other)
    clash = tmp_path / "weights" / "vae"
    shutil.copytree(tiny_assets / "transformer", clash)
    with pytest.raises(ServingError, match="share a folder name"):
        build_model(clash, load_params(registered["params"], {"platform.model_assets": "copy",
                                                              "model.vae": str(other)}), tmp_path / "clash")
    assert not (tmp_path / "clash").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, body: bytes | dict, content_type: str = "application/json", timeout: float = 120):
    """(status, parsed JSON or text, headers) of POST /invocations."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": content_type})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        text = error.read().decode()
        try:
            return error.code, json.loads(text), error.headers
        except ValueError:
            return error.code, text, error.headers


def _one_line_reason(answer) -> str:
    """A refusal's body: {"error_code", "message"}, the message one line of ours, no trace or server path."""
    assert isinstance(answer, dict) and set(answer) == {"error_code", "message"}, answer
    message = answer["message"]
    for leak in ("\n", "Traceback", 'File "', "/tmp/", "site-packages", "Failed to predict"):
        assert leak not in message, (leak, message)
    return message


def test_kaleido_serve_answers_with_a_video_and_refuses_every_bad_request_in_one_line(registered, tmp_path):
    """`kaleido serve` (prod's command): MLflow's scoring app behind our bounds. The probe's faults: frames=1000001
    accepted and generating after the client's 504 (13 GB), params MLflow dropped silently, refusals with MLflow's text
    and a stack trace, numbers as strings."""
    from kaleido.serving import encode_image

    port = _free_port()
    raw = yaml.safe_load(registered["params"].read_text())
    raw["serve"] = {**raw.get("serve", {}), "timeout_s": 4, "concurrency": 1, "retry_after_s": 7,
                    "max_request_bytes": 300_000}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "KALEIDO_CACHE": str(tmp_path / "cache")}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("kaleido")), "serve", "--model",
                               f"models:/{registered['name']}@champion", "--params", str(params), "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        else:
            raise AssertionError((tmp_path / "serve.log").read_text()[-3000:])
        ref = encode_image(registered["ref"])
        row = {"prompt": "a cat walks", "references": [ref]}
        status, answer, _ = _post(port, {"dataframe_records": [row], "params": {"seed": 5, "steps": 2}})
        assert status == 200, answer
        prediction = answer["predictions"][0]
        assert _frames_of(base64.b64decode(prediction["video"]), tmp_path).shape == (5, 32, 48, 3)
        numbers = {key: prediction[key] for key in ("frames", "fps", "width", "height", "seed")}
        assert numbers == {"frames": 5, "fps": 16, "width": 48, "height": 32, "seed": 5}
        assert all(type(value) is int for value in numbers.values())  # numbers, not strings

        # every refusal class: its status and our one-line reason, before any model work
        not_png = base64.b64encode(b"hello, not an image").decode()
        refusals = [
            ({"dataframe_records": [row], "params": {"frames": 1000001}}, 400, "serve.max_tokens"),
            ({"dataframe_records": [row], "params": {"num_inference_steps": 30, "num_frames": 9}}, 400,
             "num_inference_steps is called steps here"),
            ({"dataframe_records": [row], "params": {"frames": 6}}, 400, "frames=6: the Wan VAE needs 4k+1 frames"),
            ({"dataframe_records": [row], "params": {"steps": True}}, 400, "holds true/false where a number belongs"),
            ({"dataframe_records": [{**row, "prompt": "a\u0000cat"}]}, 400, "prompt: control character U+0000"),
            ({"dataframe_records": [{**row, "references": ["not an image!"]}]}, 400, "not valid base64 and not an"),
            ({"dataframe_records": [{**row, "references": [str(registered["ref"])]}]}, 400,
             "references[0]: looks like a file path; the server does not read local files"),
            # the trial: 60 rows each within the limits ran 19.8 s; all rows together are bounded
            ({"dataframe_records": [row] * 2, "params": {"steps": 1000, "frames": 81}}, 400,
             "2 rows (one video each) cost 528,000 token-steps in all"),
            ({"dataframe_records": [{**row, "foo": 1}]}, 400, "inputs ['foo']: not input fields of this model; a row "
             "takes prompt, references"),
            ({"dataframe_records": [{**row, "references": ref}]}, 400,
             "references must be a list of images (base64 or URL), got a string"),
            ({"dataframe_records": [row], "params": {"steps": "5"}}, 400,
             'params: steps="5": expected a whole number, got text'),
            ({"dataframe_records": [row], "params": {"frames": 8}}, 400, "params: frames=8: the Wan VAE"),
            ({"instances": {"prompt": "a cat"}}, 400, "instances must be a list of objects, one per video"),
            ({"dataframe_records": [{**row, "references": [not_png]}]}, 400, "references[0]: not a readable image"),
            ({"dataframe_records": [{**row, "references": ["https://example.invalid/x.png"]}]}, 400,
             "URLs are off for this model"),
            ({"rows": [row]}, 400, "exactly one of the input fields"),
            (b"{not json", 400, "not valid UTF-8 JSON"),
            ({"dataframe_records": [{**row, "references": [ref + "A" * 320_000]}]}, 413, "serve.max_request_bytes"),
        ]
        for body, code, words in refusals:
            started = time.monotonic()
            status, answer, _ = _post(port, body)
            assert status == code and words in _one_line_reason(answer), (body if isinstance(body, bytes) else
                                                                          body.get("params"), status, answer)
            assert time.monotonic() - started < 5  # refused at once, nothing generated
            assert "params: params" not in answer["message"]
        # every MLflow request format, rows with different numbers of references: one video per row
        two = [row, {"prompt": "a dog", "references": [ref, ref]}]
        for body, videos in [({"instances": two}, 2), ({"inputs": two}, 2), ({"inputs": row}, 1),
                             ({"inputs": {"prompt": ["a cat", "a dog"], "references": [[ref], [ref, ref]]}}, 2)]:
            status, answer = _post(port, {**body, "params": {"seed": 5}})[:2]
            assert status == 200 and len(answer["predictions"]) == videos, (list(body), status, answer)
        status, answer, _ = _post(port, b"prompt\na cat", content_type="text/csv")
        assert status == 415 and "application/json" in _one_line_reason(answer)

        # one generation at a time: the next request is refused with Retry-After, never queued; past
        # serve.timeout_s the request gets 504 and its generation stops within a step (the slot frees at once)
        import threading

        long_answer: list = []
        slow = threading.Thread(target=lambda: long_answer.append(
            _post(port, {"dataframe_records": [row], "params": {"steps": 1000, "frames": 81}})))
        slow.start()
        time.sleep(1.0)
        status, answer, headers = _post(port, {"dataframe_records": [row]})
        assert status == 503 and headers.get("Retry-After") == "7" and "serve.concurrency" in _one_line_reason(answer)
        slow.join(60)
        status, answer, _ = long_answer[0]
        assert status == 504 and "serve.timeout_s" in _one_line_reason(answer)
        # the slot frees once the generation has stopped, within a step, not after its 1000 steps
        freed = time.monotonic() + 10
        while (status := _post(port, {"dataframe_records": [row]})[0]) == 503 and time.monotonic() < freed:
            time.sleep(0.2)
        assert status == 200
        # a client that goes away: its generation stops too
        body = json.dumps({"dataframe_records": [row], "params": {"steps": 1000, "frames": 81}}).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            time.sleep(1.0)
        deadline = time.monotonic() + 30
        while (tmp_path / "serve.log").read_text().count("the generation stopped") < 2:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.2)
        said = (tmp_path / "serve.log").read_text()
        assert said.count("the generation stopped") == 2 and "the client left" in said and "Traceback" not in said
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def test_generate_cli_takes_a_registry_uri(registered, tmp_path, monkeypatch):
    monkeypatch.setenv("KALEIDO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "v.mp4"
    args = ["generate", "--model", f"models:/{registered['name']}@champion", "--prompt", "a cat walks", "--ref",
            str(registered["ref"]), "--out", str(out), "--params", str(registered["params"])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"model: models:/{registered['name']}/{registered['version']}" in result.output
    from kaleido.model.media import read_video

    assert read_video(out).shape == (5, 32, 48, 3)
    # the version is cached: a second run downloads nothing
    cached = sorted(p.name for p in (tmp_path / "cache" / "models").rglob("*") if p.is_dir())
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "downloading" not in again.output
    assert sorted(p.name for p in (tmp_path / "cache" / "models").rglob("*") if p.is_dir()) == cached
    bad = CliRunner().invoke(app, [*args[:2], f"models:/{registered['name']}@nobody", *args[3:]])
    assert bad.exit_code == 2 and "no version with alias 'nobody'" in bad.output


def test_a_recreated_model_is_not_served_from_a_stale_cache(registered, tiny_assets, tmp_path, monkeypatch):
    """Delete a registered model and register another under the same name: its "version 1" is a different model,
    and the cache (keyed by server, source and creation time) must not hand back the old weights."""
    from kaleido.model.tiny import build_tiny_assets
    from kaleido.registry import Lineage, ModelRegistry
    from kaleido.serving import build_model, model_checkpoint, resolve_model

    monkeypatch.setenv("KALEIDO_CACHE", str(tmp_path / "cache"))
    name = f"kaleido-recreated-{uuid.uuid4().hex[:8]}"
    params = load_params(registered["params"], {"platform.registered_model": name})
    registry = ModelRegistry(registered["uri"], name)
    client = registry.client
    experiment = client.get_experiment_by_name("serving-tests").experiment_id
    folders = []
    for seed in (0, 1):
        weights = build_tiny_assets(tmp_path / f"assets-{seed}", seed=seed) / "transformer"
        run = client.create_run(experiment)
        model = build_model(weights, params, tmp_path / f"model-{seed}", client)
        assert registry.register(run.info.run_id, model, Lineage("g", "d", "p", run.info.run_id)) == "1"
        folder, label = resolve_model(f"models:/{name}/1", registered["uri"])
        assert label == f"models:/{name}/1"
        folders.append(folder)
        if seed == 0:
            client.delete_registered_model(name)
    assert folders[0] != folders[1]
    first, second = (sorted(p.read_bytes() for p in model_checkpoint(f).rglob("*.safetensors")) for f in folders)
    assert first != second


def test_a_lora_version_references_its_base_and_generates_merged(registered, tiny_assets, tmp_path, monkeypatch):
    """A LoRA training export registers as adapter + referenced base (megabytes per version), with its lineage;
    pyfunc, `kaleido generate --model` and evaluation all load base + adapter merged."""
    import mlflow.pyfunc
    import pandas as pd

    from kaleido.eval.run import _load_pipeline
    from kaleido.eval.run import resolve_model as eval_resolve
    from kaleido.model import lora
    from kaleido.model.checkpoint import load_dit
    from kaleido.registry import Lineage
    from kaleido.serving import build_model, encode_image, model_weights
    from kaleido.train.plan import export_base

    base = load_dit(tiny_assets / "transformer")
    lora.add_lora(base, 2, 4.0, ["self_attn.q", "cross_attn.o"])
    with torch.no_grad():
        for name, p in base.named_parameters():
            if ".lora_" in name:
                p.fill_(0.03)
    adapter = lora.adapter_of(base, 2, 4.0)
    adapter.meta = {"base": str(tiny_assets / "transformer"), "base_model": f"models:/{registered['name']}/1"}
    run_dir = tmp_path / "pretrain"
    for layout in lora.LORA_LAYOUTS:
        lora.save_adapter(adapter, run_dir / "export", layout)
    (run_dir / "export.json").write_text(json.dumps({"path": str(run_dir / "export"), "format": "lora",
                                                     "base": adapter.meta["base"],
                                                     "base_model": adapter.meta["base_model"]}))
    params = load_params(registered["params"])
    registry = registered["registry"]
    client = registry.client
    run = client.create_run(client.get_experiment_by_name("serving-tests").experiment_id)
    model = build_model(run_dir / "export", params, tmp_path / "model", client)
    lineage = Lineage("g", "d", "p", run.info.run_id, base_model=export_base(run_dir / "export"), kind="lora")
    version = registry.register(run.info.run_id, model, lineage)
    tags = registry.version_tags(version)
    assert tags["lineage.base_model"] == f"models:/{registered['name']}/1" and tags["lineage.kind"] == "lora"

    folder = registry.download(version, tmp_path / "dl")
    config = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]["config"]
    assert config["lora"]["rank"] == 2 and config["lora"]["targets"] == ["cross_attn.o", "self_attn.q"]
    assert "transformer" in config["assets"] and not (folder / "artifacts" / "transformer").exists()
    size = sum(p.stat().st_size for p in (folder / "artifacts").rglob("*") if p.is_file())
    assert size < 200_000, size  # the adapter only; the base is referenced

    merged = lora.merge_lora(load_dit(tiny_assets / "transformer"), adapter).state_dict()
    key = "blocks.0.self_attn.q.weight"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{registered['name']}/{version}")
    pipe = pyfunc.unwrap_python_model().pipe
    torch.testing.assert_close(pipe.dit.state_dict()[key], merged[key])
    out = pyfunc.predict(pd.DataFrame([{"prompt": "a cat", "references": [encode_image(registered["ref"])]}]))
    assert _frames_of(out.iloc[0]["video"], tmp_path).shape == (5, 32, 48, 3)

    source = eval_resolve(f"models:/{registered['name']}/{version}", params)
    assert source.lora is not None and model_weights(source.model_folder)[1] == source.lora
    torch.testing.assert_close(_load_pipeline(params, source, "cpu").dit.state_dict()[key], merged[key])

    result = CliRunner().invoke(app, [
        "generate", "--prompt", "a cat", "--ref", str(registered["ref"]), "--out", str(tmp_path / "v.mp4"),
        "--model", f"models:/{registered['name']}/{version}", "--params", str(registered["params"]),
        "--lora", str(run_dir / "export" / "lora_wan.safetensors"),
    ])  # fmt: skip
    assert result.exit_code == 2 and "one adapter at a time" in result.output, result.output
    result = CliRunner().invoke(app, [
        "generate", "--prompt", "a cat", "--ref", str(registered["ref"]), "--out", str(tmp_path / "v.mp4"),
        "--model", f"models:/{registered['name']}/{version}", "--params", str(registered["params"]),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "v.mp4").is_file()

    # a registered version as the base of the next training: planned from its MLmodel alone (nothing downloaded);
    # a LoRA version as a base is refused before anything else
    from kaleido.train.plan import TrainPlanError, inspect_registry_init, model_config

    plan_params = params.model_copy(deep=True)
    plan_params.train.pretrain.init = Path(f"models:/{registered['name']}@champion")
    resolved, config = inspect_registry_init(plan_params, "pretrain")
    assert resolved == f"models:/{registered['name']}/{registered['version']}" and config["dit"]["dim"] == 64
    assert model_config(plan_params, "pretrain")[1] == resolved
    plan_params.train.pretrain.init = Path(f"models:/{registered['name']}/{version}")
    with pytest.raises(TrainPlanError, match="is a LoRA version; start from its base"):
        inspect_registry_init(plan_params, "pretrain")
    # the worker downloads it once into the model cache (locked: the ranks of a node share one download)
    from kaleido.model.checkpoint import read_config
    from kaleido.train.plan import resolve_registry_init

    plan_params.train.pretrain.init = Path(f"models:/{registered['name']}@champion")
    weights, resolved = resolve_registry_init(plan_params, "pretrain")
    assert resolved.endswith(f"/{registered['version']}") and read_config(weights).dim == 64


def test_a_version_whose_files_differ_or_are_gone_is_refused_by_load_serve_and_promote(registered, tmp_path,
                                                                                          monkeypatch):
    """Every file of a version is sealed in its MLmodel (size + sha256). The probe: a version whose artifacts were
    deleted was promoted (exit 0) and loading it gave a raw traceback. Now a corrupted local copy is refused where it
    is loaded (CLI, pyfunc), and promotion refuses a version whose stored files are gone, naming the file."""
    import mlflow.pyfunc
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from kaleido.platform.integrity import IntegrityError
    from kaleido.registry import Lineage, RegistryError
    from kaleido.serving import ServingError, build_model, resolve_model, verify_model_folder

    monkeypatch.setenv("KALEIDO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    registry = registered["registry"]
    client = registry.client
    run = client.create_run(client.get_experiment_by_name("serving-tests").experiment_id)
    export = tmp_path / "export"
    shutil.copytree(registered["folder"] / "export", export)
    model = build_model(export, load_params(registered["params"]), tmp_path / "model", client)
    sealed = yaml.safe_load((model / "MLmodel").read_text())["flavors"]["python_function"]["config"]["files"]
    weights = "artifacts/export/diffusion_pytorch_model.safetensors"
    assert weights in sealed and len(sealed[weights]["sha256"]) == 64 and "MLmodel" not in sealed
    version = registry.register(run.info.run_id, model, Lineage("g", "d", "p", run.info.run_id))
    registry.record_gate(version, passed=True, reasons={})

    # a copy whose bytes changed after download (same size: a bad disk, a tampered cache)
    folder, _ = resolve_model(f"models:/{registered['name']}/{version}", registered["uri"])
    target = folder / weights
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ServingError, match=f"{weights} has sha256 .*its seal records"):
        resolve_model(f"models:/{registered['name']}/{version}", registered["uri"])
    with pytest.raises(IntegrityError, match=r"diffusion_pytorch_model\.safetensors has sha256"):
        mlflow.pyfunc.load_model(str(folder))
    result = CliRunner().invoke(app, ["generate", "--model", f"models:/{registered['name']}/{version}", "--prompt",
                                      "a cat", "--out", str(tmp_path / "v.mp4"), "--params", str(registered["params"])])
    assert result.exit_code == 2 and "its seal records" in result.output and "Traceback" not in result.output

    # the registry's copy loses its weights: promotion is refused naming the file, a download names it too
    source = client.get_model_version(registry.name, version).source
    get_artifact_repository(source).delete_artifacts(weights)
    with pytest.raises(RegistryError, match=f"cannot be promoted: .*/{weights} is missing"):
        registry.promote(version)
    assert registry.alias_version("champion") == registered["version"]
    promote = CliRunner().invoke(app, ["registry", "promote", version, "--params", str(registered["params"])])
    assert promote.exit_code == 1 and f"{weights} is missing" in promote.output, promote.output
    with pytest.raises(IntegrityError, match=f"{weights} is missing"):
        registry.download(version, tmp_path / "dl")
    verify_model_folder(registry.download(registered["version"], tmp_path / "champion"))  # the champion is whole
