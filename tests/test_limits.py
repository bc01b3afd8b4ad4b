"""Bounded and confined, without servers: the one cost model and its limits, text fields, strict numbers in the
schema, the generate deployment's confined inputs, a cancelled generation, lock folders through a link, the release
step's digests. (The served endpoint itself: tests/test_serving.py; resume and checkpoint seals: test_train.py.)"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from kaleido.config import ParamsError, load_params
from kaleido.request_limits import LimitError, Limits, RequestCost, check_cost, check_request, check_text

REPO = Path(__file__).resolve().parents[1]


def _png(width: int = 30, height: int = 40, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer,
                                                                                                          "PNG")
    return buffer.getvalue()


# ---- the cost model ------------------------------------------------------------------------------------------


def test_cost_model_at_the_shipped_sizes():
    """Token counts from Wan2.1's geometry (VAE stride 4x8x8, patch 1x2x2; REFERENCE: 480x832 -> 32,760 tokens and
    720x1280 -> 75,600 tokens at 81 frames), each reference one more latent frame (the shipped Kaleido)."""
    assert RequestCost(81, 480, 832, 50, 0, True).tokens == 32_760
    assert RequestCost(81, 720, 1280, 50, 0, True).tokens == 75_600
    shipped = RequestCost(81, 720, 1280, 50, 3, True)
    assert shipped.tokens == 75_600 + 3 * 3_600 and shipped.token_steps == 86_400 * 50 * 2
    from kaleido.config.schema import ServeConfig
    from kaleido.model.vae import TEMPORAL_STRIDE

    assert TEMPORAL_STRIDE == 4
    defaults = Limits.from_params(load_params(REPO / "k8s/overlays/prod/params.yaml"))
    assert defaults == Limits.from_config({}) and defaults.max_tokens == ServeConfig().max_tokens
    check_cost(shipped, defaults)  # the shipped 720p request fits the shipped limits
    check_cost(RequestCost(81, 512, 896, 50, 3, True), defaults)  # and the shipped sampling config


def test_the_probe_request_is_refused_naming_the_limit():
    limits = Limits.from_params(load_params(REPO / "params.yaml"))
    with pytest.raises(LimitError, match=r"1000001 frames at 64x96 = 6,000,024 tokens per step.*serve\.max_tokens"):
        check_request(limits, "a cat", "", 1_000_001, 64, 96, 8, 6.0, 0)
    with pytest.raises(LimitError, match=r"serve\.max_token_steps is 400,000"):
        check_request(limits, "a cat", "", 33, 64, 96, 1000, 6.0, 3)  # 288 tokens per step, too many steps
    # guidance 1 runs one branch: half the token-steps
    assert check_request(limits, "a cat", "", 9, 64, 96, 500, 1.0, 0).token_steps == 72 * 500
    with pytest.raises(LimitError, match=r"prompt: 10,001 characters, the limit is 10,000 \(serve\.max_prompt_chars\)"):
        check_request(limits, "x" * 10_001, "", 9, 64, 96, 8, 6.0, 0)


@pytest.mark.parametrize("text, where", [("a\x00cat", "U+0000 at position 1"), ("a cat\x1b[2J", "U+001B"),
                                         ("\x7f", "U+007F"), ("a\x85b", "U+0085")])
def test_control_characters_are_refused_in_text(text, where):
    with pytest.raises(LimitError, match=f"prompt: control character {where.replace('+', '[+]')}"):
        check_text("prompt", text)


def test_plain_text_passes_and_single_line_fields_refuse_line_breaks():
    assert check_text("prompt", "a cat\nand a dog\t(小猫)") == "a cat\nand a dog\t(小猫)"
    with pytest.raises(LimitError, match="no line breaks"):
        check_text("model", "models:/x\n@champion", multiline=False)
    with pytest.raises(LimitError, match="expected text, got int"):
        check_text("prompt", 3)


# ---- strict numbers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [("train.micro_batch", True), ("generate.steps", False),
                                        ("generate.guidance_scale", True), ("train.buckets", [[True, 64]]),
                                        ("gate.tolerances", {"aesthetic": True}), ("serve.max_tokens", True)])
def test_a_bool_is_never_a_number(key, value):
    with pytest.raises(ParamsError, match=f"{key}.*holds true/false where a number belongs"):
        load_params(REPO / "params.yaml", {key: value})


def test_bool_fields_still_take_bools():
    params = load_params(REPO / "params.yaml", {"generate.release_encoders": True, "serve.allow_remote_references":
                                                True, "train.activation_checkpointing": False})
    assert params.generate.release_encoders is True and params.train.activation_checkpointing is False


# ---- the served model's request check (no server) -------------------------------------------------------------


CONFIG = {"defaults": {"seed": 0, "steps": 2, "frames": 5, "height": 32, "width": 48, "guidance_scale": 6.0,
                       "shift": 7.0, "sampler": "euler", "negative_prompt": "", "fps": 16},
          "rope_variant": "shift_wh", "rope_offset": 80, "max_references": 3, "limits": {
              "max_tokens": 4096, "max_token_steps": 400_000, "max_prompt_chars": 100, "max_image_bytes": 10_000}}


def test_check_rows_refuses_before_any_model_work():
    from kaleido.serve_requests import check_rows
    from kaleido.serving import ServingError

    ref = base64.b64encode(_png()).decode()
    settings, rows = check_rows(CONFIG, [{"prompt": "a cat", "references": [ref]}], {"seed": 3})
    assert settings["seed"] == 3 and rows[0][1][0] == _png()
    refusals = [
        ({"num_inference_steps": 5, "num_frames": 9}, ServingError, r"params \['num_frames', 'num_inference_steps'\]: "
         r"not settings of this model \(num_frames is called frames here; num_inference_steps is called steps"),
        ({"frames": 1_000_001}, LimitError, r"serve\.max_tokens"),
        ({"steps": True}, ServingError, "holds true/false where a number belongs"),
    ]
    for params, kind, message in refusals:
        with pytest.raises(kind, match=message):
            check_rows(CONFIG, [{"prompt": "a cat", "references": [ref]}], params)
    with pytest.raises(LimitError, match=r"references\[0\]: [0-9,]+ bytes, the limit is 10,000"):
        check_rows(CONFIG, [{"prompt": "a cat", "references": [base64.b64encode(_png(120, 120)).decode()]}], None)
    with pytest.raises(ServingError, match="4 references, the model takes at most 3"):
        check_rows(CONFIG, [{"prompt": "a cat", "references": [ref] * 4}], None)
    with pytest.raises(LimitError, match=r"row 1: prompt: control character U\+0000"):
        check_rows(CONFIG, [{"prompt": "a cat"}, {"prompt": "a\x00cat"}], None)


def test_a_request_is_bounded_by_the_cost_of_all_its_rows():
    """serve.max_token_steps bounds one request's time, whatever its number of rows (the trial: 60 rows, 200 after
    19.8 s, each row within the limit)."""
    from kaleido.serve_requests import check_rows

    ref = base64.b64encode(_png()).decode()
    params = {"steps": 1000, "frames": 81}  # (21 + 1) x 6 tokens x 1000 steps x 2 = 264,000 token-steps a row
    check_rows(CONFIG, [{"prompt": "a cat", "references": [ref]}], params)
    with pytest.raises(LimitError, match=r"request too large: 60 rows \(one video each\) cost 15,840,000 "
                       r"token-steps in all .*serve\.max_token_steps is 400,000 per request, all rows together\. "
                       r"Send at most 1 of"):
        check_rows(CONFIG, [{"prompt": "a cat", "references": [ref]}] * 60, params)
    with pytest.raises(LimitError, match="2 rows"):
        check_rows(CONFIG, [{"prompt": "a cat", "references": [ref]}] * 2, params)


def test_every_field_of_a_request_is_known_and_of_its_type():
    """Unknown input fields are refused like unknown params (MLflow drops them with a server-side warning); params
    and references of the wrong JSON type get our line, not MLflow's conversion text; no doubled prefix."""
    from kaleido.serve_requests import check_rows
    from kaleido.serving import ServingError

    ref = base64.b64encode(_png()).decode()
    row = {"prompt": "a cat", "references": [ref]}
    refusals = [
        ([{**row, "foo": 1}], None,
         r"^inputs \['foo'\]: not input fields of this model; a row takes prompt, references$"),
        ([row, {**row, "images": [ref], "seed": 3}], None,
         r"inputs \['images', 'seed'\]: .*images is called references here; seed is a setting: send it in params"),
        ([{**row, "references": ref}], None, r"references must be a list of images \(base64 or URL\), got a string"),
        ([{**row, "references": [3]}], None, r"references\[0\]: expected a base64 image string .*got a whole number"),
        ([row], {"steps": "5"}, r'^params: steps="5": expected a whole number, got text \(send 5 without quotes\)$'),
        ([row], {"steps": 5.0, "sampler": 1, "guidance_scale": "x"}, r"steps=5\.0: expected a whole number, got a "
         r'number .*; sampler=1: expected text, got a whole number; guidance_scale="x": expected a number, got text'),
        ([row], {"frames": 8}, r"^params: frames=8: the Wan VAE needs 4k\+1 frames"),
        ([{**row, "references": ["artifacts/samples/cat.png"]}], None, r"references\[0\]: looks like a file path; the "
         "server does not read local files: send the image file's bytes base64-encoded"),
        ([{**row, "references": ["not an image!"]}], None,
         r"references\[0\]: not valid base64 and not an http\(s\) URL"),
        (["a cat"], None, r"row 0: expected an object with prompt and references, got text"),
    ]
    for rows, params, message in refusals:
        with pytest.raises(ServingError, match=message):
            check_rows(CONFIG, rows, params)
    assert check_rows(CONFIG, [row], {"guidance_scale": 5})[0]["guidance_scale"] == 5.0  # an int is a number


def test_every_mlflow_request_format_gives_the_same_rows():
    from kaleido.serve_requests import request_rows
    from kaleido.serving import ServingError

    a, b = {"prompt": "a cat", "references": ["A"]}, {"prompt": "a dog", "references": ["B", "C"]}
    for request in [{"dataframe_records": [a, b]}, {"instances": [a, b]}, {"inputs": [a, b]},
                    {"inputs": {"prompt": ["a cat", "a dog"], "references": [["A"], ["B", "C"]]}},
                    {"dataframe_split": {"columns": ["prompt", "references"], "data": [["a cat", ["A"]],
                                                                                       ["a dog", ["B", "C"]]]}}]:
        assert request_rows({**request, "params": {"seed": 1}}) == [a, b], request
    assert request_rows({"inputs": a}) == request_rows({"inputs": {"prompt": ["a cat"], "references": [["A"]]}}) == [a]
    for request, message in [({"rows": [a]}, r"exactly one of the input fields .*got \['rows'\]"),
                             ({"instances": [a], "inputs": [a]}, "exactly one of the input fields"),
                             ({"instances": a}, r"instances must be a list of objects, one per video"),
                             ({"inputs": {"prompt": ["a", "b"], "references": [["A"]]}}, "lengths \\[1, 2\\]"),
                             ({"dataframe_split": {"columns": ["prompt"], "data": [["a", "b"]]}}, r"data\[0\] must")]:
        with pytest.raises(ServingError, match=message):
            request_rows(request)


# ---- the kaleido/generate deployment's inputs -------------------------------------------------------------------


@pytest.fixture()
def checkout(tmp_path, monkeypatch):
    """A checkout with params.yaml, a sample under artifacts/samples, a secret outside, and a link out of a root."""
    repo = tmp_path / "repo"
    (repo / "artifacts" / "samples").mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    (repo / "artifacts" / "samples" / "cat.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png(seed=1))
    (repo / "artifacts" / "samples" / "escape.png").symlink_to(tmp_path / "secret.png")
    monkeypatch.setenv("KALEIDO_REPO", str(repo))
    return repo


def _refusal(**kwargs):
    from flows.generate_flow import generate

    state = generate.fn(**{"prompt": "a cat", **kwargs})
    assert state.is_failed(), state
    assert "\n" not in state.message and "Traceback" not in state.message
    return state.message


def test_deployment_paths_are_confined_and_refused_alike(checkout, tmp_path):
    """The probe: an absolute path and `../..` outside the checkout were read, and /etc/passwd's error told that the
    file exists. Now every path outside serve.reference_roots gets one message, whether or not it exists."""
    outside = [str(tmp_path / "secret.png"), "/etc/passwd", "/no/such/file.png", "../../../secret.png",
               "artifacts/samples/../../params.yaml", "artifacts/samples/escape.png", "~/x.png", "params.yaml",
               "artifacts/samples"]
    messages = {_refusal(references=[value]) for value in outside}
    assert len(messages) == 1, messages
    (message,) = messages
    assert message.startswith("refused: references[0]: not an upload and not a file under serve.reference_roots")
    assert "passwd" not in message and "exist" not in message


def test_deployment_accepts_uploads_and_files_under_the_roots(checkout):
    from flows.generate_flow import check_inputs, stage_reference

    params = load_params(checkout / "params.yaml")
    upload = base64.b64encode(_png(seed=2)).decode()
    checked = check_inputs(params, checkout, "a cat", ["artifacts/samples/cat.png", upload,
                                                       f"data:image/png;base64,{upload}"], "", {})
    assert checked[0] == (checkout / "artifacts/samples/cat.png").resolve() and checked[1] == checked[2] == _png(seed=2)
    staged = stage_reference(checked[1], checkout / "out", 1)
    assert staged.read_bytes() == _png(seed=2)
    with pytest.raises(Exception, match=r"references\[0\]: artifacts/samples/dog.png: no such file under"):
        check_inputs(params, checkout, "a cat", ["artifacts/samples/dog.png"], "", {})
    with pytest.raises(Exception, match="URLs are off for this deployment"):
        check_inputs(params, checkout, "a cat", ["https://example.invalid/cat.png"], "", {})


def test_deployment_refuses_other_checkouts_control_characters_and_oversized_requests(checkout, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(REPO / "params.yaml", other / "params.yaml")
    assert _refusal(repo=str(other)).startswith(f"refused: repo={str(other)!r}: this deployment runs in its own")
    assert _refusal(prompt="a\x00cat").startswith("refused: prompt: control character U+0000 at position 1")
    assert "negative_prompt: control character" in _refusal(negative_prompt="no\x07")
    assert "model: control character" in _refusal(model="models:/x\x00@champion")
    assert "serve.max_tokens" in _refusal(frames=1_000_001)
    with pytest.raises(Exception):  # noqa: B017 - Prefect's own validation: frames must be an int
        _refusal(frames="many")


# ---- cancellation between denoising steps -----------------------------------------------------------------------


def test_a_cancelled_generation_stops_at_the_next_step(tiny_assets, params_for, tmp_path):
    from kaleido.model.generate import GenerationCancelled, S2VPipeline

    pipe = S2VPipeline.from_params(load_params(params_for(tmp_path, tiny_assets)), device="cpu")
    asked = []

    def cancel() -> bool:
        asked.append(len(asked))
        return len(asked) > 3  # before the encoders, steps 1 and 2; then stop

    with pytest.raises(GenerationCancelled, match="stopped after 2 of 50 denoising steps"):
        pipe("a cat", [], frames=5, height=32, width=48, steps=50, progress=False, cancel=cancel)
    assert len(asked) == 4


# ---- lock folders are never used through a link ----------------------------------------------------------------


def test_a_linked_lock_folder_is_refused_and_nothing_is_created_through_it(tmp_path):
    from kaleido.platform.files import LockFolderLinked, OutputBusy, exclusive_output

    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    (data / ".locks").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(LockFolderLinked, match=r"\.locks is a symbolic link .* never through a link"), \
            exclusive_output(data / "ingest", "kaleido ingest"):
        pass
    assert issubclass(LockFolderLinked, OutputBusy) and not list(elsewhere.iterdir())
    (data / ".locks").unlink()
    (data / ".locks").mkdir()
    (data / ".locks" / "ingest.lock").symlink_to(elsewhere / "victim")
    with pytest.raises(LockFolderLinked, match=r"ingest\.lock is a symbolic link"), \
            exclusive_output(data / "ingest", "kaleido ingest"):
        pass
    assert not (elsewhere / "victim").exists()


# ---- the release step's digests -----------------------------------------------------------------------------------


def test_release_pins_every_digest_and_the_check_refuses_placeholders(tmp_path):
    from typer.testing import CliRunner

    from kaleido.cli import app
    from kaleido.platform.release import PLACEHOLDER, unpinned

    overlay = tmp_path / "prod"
    shutil.copytree(REPO / "k8s/overlays/prod", overlay)
    runner = CliRunner()
    refused = runner.invoke(app, ["release", "check", "--overlay", str(overlay)])
    assert refused.exit_code == 2 and "kustomization.yaml: kaleido" in refused.output
    assert len(unpinned(REPO / "k8s/overlays/prod")) == 6  # the repository ships the UNRELEASED marker
    bad = runner.invoke(app, ["release", "pin", "--overlay", str(overlay), "--image", f"kaleido={PLACEHOLDER}"])
    assert bad.exit_code == 2 and "UNRELEASED marker" in bad.output
    names = ["ghcr.io/mlflow/mlflow", "postgres", "prefecthq/prefect", "kaleido"]
    digests = {name: "sha256:" + f"{i + 1:x}" * 64 for i, name in enumerate(names)}
    args = [arg for name, digest in digests.items() for arg in ("--image", f"{name}={digest}")]
    pinned = runner.invoke(app, ["release", "pin", "--overlay", str(overlay), *args])
    assert pinned.exit_code == 0, pinned.output
    assert runner.invoke(app, ["release", "check", "--overlay", str(overlay)]).exit_code == 0
    images = {entry["name"]: entry["digest"] for entry in yaml.safe_load((overlay / "kustomization.yaml").read_text())
              ["images"]}  # fmt: skip
    assert images == digests
    kaleido = f"registry.example.com/kaleido@{digests['kaleido']}"
    assert load_params(overlay / "params.yaml").train.kubernetes.image == kaleido
    pool = json.loads((overlay / "work-pool-gpu.json").read_text())
    assert pool["variables"]["properties"]["image"]["default"] == kaleido
    assert "# Images by digest" in (overlay / "kustomization.yaml").read_text()  # comments stay


# ---- a training export is read as training sealed it ----------------------------------------------------------------


def test_a_training_export_is_checked_against_its_seal(tiny_assets, params_for, tmp_path):
    from kaleido.platform.integrity import IntegrityError, folder_manifest
    from kaleido.serving import ServingError, build_model
    from kaleido.train.plan import _check_weights, verify_export

    export = tmp_path / "runs" / "pretrain" / "export"
    shutil.copytree(tiny_assets / "transformer", export)
    info = {"path": str(export), "format": "wan", "files": folder_manifest(export)}
    (export.parent / "export.json").write_text(json.dumps(info))
    verify_export(export)
    assert _check_weights(export, "train.sft.init") == []
    weights = next(export.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a tensor byte: the header still describes the file
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"training export file {weights} has sha256 .* train the stage again"):
        verify_export(export)
    assert "has sha256" in _check_weights(export, "train.sft.init")[0]  # sft refuses it before any launch
    params = load_params(params_for(tmp_path / "p", tiny_assets, {"platform.model_assets": "copy"}))
    with pytest.raises(ServingError, match=f"cannot package {export}: training export file"):
        build_model(export, params, tmp_path / "model")


def test_mlflow_error_bodies_become_our_one_line_reason():
    """What kaleido serve makes of MLflow's error responses: a model's refusal without MLflow's wrapper (which quotes
    the whole request), and a fault of the server without its stack trace (logged there instead)."""
    from kaleido.serve_app import _reason

    wrapped = {"error_code": "INVALID_PARAMETER_VALUE",
               "message": "Failed to predict data '   prompt references\n0  a cat  [iVBOR...]'. \nError: frames=6: ..."}
    assert _reason(400, json.dumps(wrapped).encode()) == ("INVALID_PARAMETER_VALUE", "frames=6: ...")
    fault = {"error_code": "BAD_REQUEST", "message": "Encountered an unexpected error while evaluating the model.",
             "stack_trace": 'Traceback (most recent call last):\n  File "/srv/x.py", line 3, in f\n'
                            "torch.OutOfMemoryError: CUDA out of memory"}
    code, message = _reason(400, json.dumps(fault).encode())
    assert code == "INTERNAL_ERROR" and message == ("the server failed on this request (torch.OutOfMemoryError); its "
                                                    "log has the details")
    assert _reason(415, b"This predictor only supports ...") == ("BAD_REQUEST", "This predictor only supports ...")


def test_the_cli_applies_the_same_limits_before_any_model_loads(tmp_path):
    from typer.testing import CliRunner

    from kaleido.cli import app

    base = ["generate", "--params", str(REPO / "params.yaml"), "--out", str(tmp_path / "v.mp4")]
    result = CliRunner().invoke(app, [*base, "--prompt", "a cat", "--frames", "1000001"])
    assert result.exit_code == 2 and "serve.max_tokens" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, [*base, "--prompt", "a\x01cat"])
    assert result.exit_code == 2 and "prompt: control character U+0001" in result.output
    assert not (tmp_path / "v.mp4").exists()


def test_serve_says_in_seconds_when_the_tracking_server_is_down(tmp_path, monkeypatch):
    """The trial: `kaleido serve --model models:/...` with MLflow down printed nothing for 4-5 minutes (MLflow's
    retries), then MLflow's text. Now: the tracking URI named, how to fix it, at once."""
    import socket
    import time

    from typer.testing import CliRunner

    from kaleido.cli import app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    started = time.monotonic()
    result = CliRunner().invoke(app, ["serve", "--model", "models:/kaleido-s2v@champion", "--params",
                                      str(REPO / "params.yaml"), "--port", "5011"])
    assert time.monotonic() - started < 20
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"the MLflow server at {dead} ($MLFLOW_TRACKING_URI) does not answer" in result.output
    assert "is the tracking server up?" in result.output and "kaleido platform up" in result.output
