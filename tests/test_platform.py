"""The platform pieces that need no pipeline run: sample data, local services, dvc.yaml, prefect.yaml, Makefile."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def test_sample_data_copies_videos_and_captions_name_subjects(tmp_path: Path) -> None:
    from kaleido.data.caption import load_sidecar
    from kaleido.data.taxonomy import load_taxonomy
    from kaleido.platform.sample_data import write_sample_data

    written = write_sample_data(tmp_path)
    assert (tmp_path / "raw" / "bikes.mp4").stat().st_size > 100_000
    assert (tmp_path / "raw" / "bigbuckbunny.mp4").stat().st_size > 100_000
    captions, rejections = load_sidecar(tmp_path, "captions.jsonl")
    assert not rejections and captions is not None
    assert set(captions.by_key) == {"raw/bikes.mp4", "raw/bigbuckbunny.mp4", "raw/carphone_pristine.mp4"}
    taxonomy = load_taxonomy(None)
    categories = {m.category for text in captions.by_key.values() for m in taxonomy.match(text)}
    assert {"man", "bicycle", "rabbit", "phone", "car"} <= categories
    before = {name: path.stat().st_mtime_ns for name, path in written.items()}
    again = write_sample_data(tmp_path)  # a re-run rewrites nothing (DVC sees the same data)
    assert {name: path.stat().st_mtime_ns for name, path in again.items()} == before


def test_sample_data_command(tmp_path: Path, params_for) -> None:
    from typer.testing import CliRunner

    from kaleido.cli import app

    params = params_for(tmp_path, tmp_path / "unused-models", {"data.root": str(tmp_path / "data")})
    result = CliRunner().invoke(app, ["sample-data", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "captions.jsonl").is_file()
    from kaleido.platform.sample_data import SAMPLE_VIDEOS

    shown = CliRunner().invoke(app, ["sample-data", "--help"], env={"COLUMNS": "200"}).output
    assert all(name in shown for name in SAMPLE_VIDEOS), shown  # the help names every video it copies


def _http_service(tmp_path: Path, port: int):
    from kaleido.platform.services import Service

    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    return Service("web", command, tmp_path / "state", health_url=f"http://127.0.0.1:{port}/", cwd=tmp_path)


def test_service_start_reuse_stop(tmp_path: Path) -> None:
    from kaleido.platform.services import http_ok

    service = _http_service(tmp_path, free_port())
    pid = service.start()
    try:
        assert service.pid_file.read_text().strip() == str(pid)
        assert service.healthy() and http_ok(service.health_url or "")
        assert service.start() == pid  # healthy: reused, not started twice
    finally:
        assert service.stop()
    assert not service.pid_file.exists() and service.pid() is None
    assert not http_ok(service.health_url or "", timeout=0.5)
    assert not service.stop()  # nothing left to stop
    assert "start:" in service.log_file.read_text()


def test_service_that_exits_reports_its_log(tmp_path: Path) -> None:
    from kaleido.platform.services import Service, ServiceError

    command = [sys.executable, "-c", "import sys; print('bad config: port taken'); sys.exit(3)"]
    service = Service("broken", command, tmp_path, health_url=f"http://127.0.0.1:{free_port()}/")
    with pytest.raises(ServiceError, match=r"(?s)exited with code 3.*bad config: port taken"):
        service.start()
    assert not service.pid_file.exists()


def test_platform_services_from_params(tmp_path: Path, params_for) -> None:
    from kaleido.config import load_params
    from kaleido.platform.services import Platform

    path = params_for(tmp_path, tmp_path / "unused-models", {"platform.mlflow_tracking_uri": "http://127.0.0.1:5999",
                                              "platform.prefect_api_url": "http://127.0.0.1:4299/api"})
    platform = Platform.from_params(load_params(path))
    mlflow, server, worker = platform.services()
    assert platform.state_dir == (tmp_path / ".platform").resolve()
    assert "--port" in mlflow.command and "5999" in mlflow.command and "127.0.0.1" in mlflow.command
    assert mlflow.health_url == "http://127.0.0.1:5999/health"
    assert server.command[-1] == "4299" and server.env["PREFECT_API_URL"] == "http://127.0.0.1:4299/api"
    assert worker.command[-3:] == ["local", "--type", "process"] and worker.health_url is None
    assert platform.prefect_ui_url == "http://127.0.0.1:4299"
    status = platform.status()
    assert status["mlflow"]["pid"] is None and not status["prefect-server"]["healthy"]
    assert platform.down() == {"prefect-worker": False, "prefect-server": False, "mlflow": False}


def test_tracking_server_of_the_embedded_default_is_started_others_fail_fast(tmp_path: Path, params_for) -> None:
    """`kaleido registry show` (any command that records into MLflow) starts the loopback server of
    platform.mlflow_tracking_uri when it is down, and names the fix for a server that is not ours."""
    from typer.testing import CliRunner

    from kaleido.cli import app
    from kaleido.config import load_params
    from kaleido.platform.services import Platform, TrackingUnavailable, ensure_tracking_server, tracking_problem

    uri = f"http://127.0.0.1:{free_port()}"
    path = params_for(tmp_path, tmp_path / "unused-models", {"platform.mlflow_tracking_uri": uri,
                                                             "platform.state_dir": str(tmp_path / "state")})
    params = load_params(path)
    assert tracking_problem(str(tmp_path / "mlruns")) is None  # a file store needs no server
    assert tracking_problem(uri) is not None
    remote = "http://mlflow.invalid:5000"  # .invalid never resolves (RFC 2606)
    with pytest.raises(TrackingUnavailable, match=r"mlflow\.invalid.*kaleido platform up.*mlflow_tracking_uri"):
        ensure_tracking_server(params, remote)
    assert Platform.from_params(params).service("mlflow").pid() is None  # nothing started for someone else's URI

    bad_plan = CliRunner().invoke(app, ["train", "--stage", "pretrain", "--params", str(path)])  # no latents
    assert bad_plan.exit_code == 2 and "kaleido encode" in bad_plan.output, bad_plan.output
    assert Platform.from_params(params).service("mlflow").pid() is None  # a run that cannot train starts nothing

    cluster = params_for(tmp_path / "cluster", tmp_path / "unused-models", {"platform.mlflow_tracking_uri": remote})
    result = CliRunner().invoke(app, ["registry", "show", "--params", str(cluster)])
    assert result.exit_code == 2 and "does not answer" in result.output, result.output

    try:
        result = CliRunner().invoke(app, ["registry", "show", "--params", str(path)])
        assert result.exit_code == 0, result.output
        assert "starting the embedded server" in result.output
        assert tracking_problem(uri) is None
        assert (tmp_path / "state" / "mlflow" / "mlflow.db").is_file()
        again = CliRunner().invoke(app, ["registry", "show", "--params", str(path)])
        assert again.exit_code == 0 and "starting" not in again.output  # reused, not started twice
    finally:
        Platform.from_params(params).down()
    assert tracking_problem(uri) is not None


def _params_keys(raw: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        keys.add(dotted)
        if isinstance(value, dict):
            keys |= _params_keys(value, dotted + ".")
    return keys


def test_dvc_pipeline_names_real_params_and_chains_stages() -> None:
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = pipeline["stages"]
    assert list(stages) == ["assets", "ingest", "caption", "curate", "write-dataset", "data-stats", "encode", "train",
                            "evaluate"]
    known = _params_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    outs: dict[str, str] = {}
    for name, stage in stages.items():
        assert stage["cmd"].startswith("kaleido "), name
        for key in stage.get("params", []):
            assert key in known, f"{name}: params key {key} is not in params.yaml"
        for out in [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]:
            outs[next(iter(out)) if isinstance(out, dict) else out] = name
    for name, stage in stages.items():  # every dependency inside data/, artifacts/ or runs/ is some stage's out
        for dep in stage.get("deps", []):
            if dep.split("/")[0] in ("data", "artifacts", "runs"):
                assert any(dep == out or dep.startswith(out + "/") for out in outs), f"{name}: {dep} has no stage"
    assert outs["data/stats/stats.json"] == "data-stats"
    assert outs["runs/train/pretrain/metrics.json"] == "train"
    assert outs["runs/train/pretrain/loss.csv"] == "train"
    assert outs["runs/eval/pretrain/metrics.json"] == "evaluate"
    assert {plot: outs[plot] for plot in ("runs/eval/pretrain/cases.csv", "data/stats/categories.png")} == {
        "runs/eval/pretrain/cases.csv": "evaluate", "data/stats/categories.png": "data-stats"}
    assert next(iter(stages["evaluate"]["metrics"][0])) == "runs/eval/pretrain/summary.json"
    persisted = [next(iter(o)) for s in stages.values() for o in s.get("outs", []) if isinstance(o, dict)
                 and next(iter(o.values())).get("persist")]
    assert {"data/ingest", "data/caption", "data/curate"} <= set(persisted)


def test_prefect_deployments_point_at_the_kaleido_flow() -> None:
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == {"full", "curate", "train", "evaluate", "generate"}
    generate = deployments.pop("generate")  # asynchronous generation with a registered version: its own flow
    assert generate["entrypoint"] == "flows/generate_flow.py:generate" and generate["work_pool"]["name"] == "local"
    for name, deployment in deployments.items():
        assert deployment["entrypoint"] == "flows/kaleido_flow.py:kaleido_flow"
        assert deployment["parameters"] == {"part": name}
        assert deployment["work_pool"]["name"] == "local"
    from flows.generate_flow import generate
    from flows.kaleido_flow import kaleido_flow

    assert kaleido_flow.name == generate.name == "kaleido"  # so `prefect deployment run kaleido/generate`
    assert "k8s/work-pool-gpu.json" in (REPO / "prefect.yaml").read_text()
    assert json.loads((REPO / "k8s/work-pool-gpu.json").read_text())["job_configuration"]


def test_flow_tasks_cache_on_inputs_and_source() -> None:
    from prefect.cache_policies import INPUTS, TASK_SOURCE

    from flows import kaleido_flow as module

    assert module.evaluate.cache_policy == INPUTS + TASK_SOURCE and module.evaluate.persist_result
    assert module.register.cache_policy == (INPUTS - "data_version" - "params_hash" - "lock_file") + TASK_SOURCE
    assert module.curate.retries >= 1


def test_dvc_out_hash_reads_the_lock(tmp_path: Path) -> None:
    from flows.kaleido_flow import StepFailed, dvc_out_hash

    lock = {"schema": "2.0", "stages": {"write-dataset": {"cmd": "kaleido write-dataset", "outs": [
        {"path": "data/dataset", "md5": "0123abcd.dir", "size": 10, "nfiles": 2}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert dvc_out_hash(tmp_path, "write-dataset", "data/dataset") == "0123abcd.dir"
    with pytest.raises(StepFailed, match="no out"):
        dvc_out_hash(tmp_path, "write-dataset", "data/other")


def test_make_run_and_readme() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^run: setup\n\t.*kaleido platform run", makefile, re.M)
    assert re.search(r"^stop:\n\t.*kaleido platform down", makefile, re.M)
    assert "command -v chromium" in makefile
    readme = (REPO / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert first is not None and first.group(1).split("\n")[:-1] == ["make run", "make test"]


def test_make_run_installs_no_system_package() -> None:
    """`make run`'s whole recipe path (what `make -n -B` would execute) needs no root: no package manager, no sudo.
    The browser for the one UI screenshot test is on `make test`'s path only."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    managers = re.compile(r"\b(apt-get|apt|dpkg|dnf|yum|apk|brew|sudo|snap)\b")
    run = subprocess.run(["make", "-n", "-B", "run"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "kaleido platform run" in run and not managers.search(run), run
    test = subprocess.run(["make", "-n", "-B", "test"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "apt-get install" in test and "chromium" in test  # CI (root, Debian) still gets the browser


def test_platform_run_stops_only_the_services_it_started(tmp_path: Path, monkeypatch) -> None:
    """Services the user started (`kaleido platform up`) keep running after `kaleido platform run`, even when the run
    fails; the ones the run started stop; the last lines say which, and how to open the UIs."""
    import subprocess

    from kaleido.platform.services import Platform, Service, ServiceError

    state = tmp_path / "state"
    users = Service("mlflow", [sys.executable, "-m", "http.server", str(free_port()), "--bind", "127.0.0.1"], state)
    server = Service("prefect-server", [sys.executable, "-c", "import time; time.sleep(120)"], state)
    worker = Service("prefect-worker", [sys.executable, "-c", "import time; time.sleep(120)"], state)
    users.start()
    try:
        platform = Platform(tmp_path, state, "http://127.0.0.1:1", "http://127.0.0.1:1/api", "local")
        monkeypatch.setattr(platform, "services", lambda: [users, server, worker])
        monkeypatch.setattr(platform, "prefect", lambda *args, **kw: subprocess.CompletedProcess(args, 0, "", ""))
        monkeypatch.setattr(platform, "mark_crashed_runs", lambda: [])  # no Prefect API behind these stand-ins

        def deploy() -> None:
            assert server.pid() and worker.pid()  # started by the run
            raise ServiceError("deploy failed")

        monkeypatch.setattr(platform, "deploy", deploy)
        with pytest.raises(ServiceError, match="deploy failed"):
            platform.run_deployment(echo=lambda line: None)
        assert users.pid() is not None and server.pid() is None and worker.pid() is None
        note = platform.closing_note(["prefect-server", "prefect-worker"], keep=False)
        assert "mlflow keep running: you started them" in note and "kaleido platform up" in note
        assert "keep running (you started them)" in platform.closing_note([], keep=False)
    finally:
        users.stop()
        server.stop()
        worker.stop()


def test_platform_params_defaults() -> None:
    from kaleido.config import load_params

    params = load_params(REPO / "params.yaml")
    assert params.platform.work_pool == "local" and params.platform.registered_model == "kaleido-s2v"
    assert params.data.caption.sidecar == Path("captions.jsonl")
    assert all(str(ref).startswith("artifacts/samples/") for ref in params.platform.sample_refs)


def test_last_json_skips_leading_output() -> None:
    from flows.kaleido_flow import StepFailed, last_json

    assert last_json('warning: {x}\n{\n  "a": {"b": 1}\n}\n') == {"a": {"b": 1}}
    with pytest.raises(StepFailed):
        last_json("no json here")


def test_prefect_pull_step_reads_the_checkout_from_the_environment(tmp_path: Path, monkeypatch, prefect_server) -> None:
    """prefect.yaml's pull step as a flow run executes it (Prefect's own step runner): the directory comes from
    $KALEIDO_REPO of the run's environment, which is how a cluster pod lands in its /workspace."""
    import asyncio

    from prefect.deployments.steps.core import run_steps
    from prefect.settings import PREFECT_API_URL, temporary_settings

    pull = yaml.safe_load((REPO / "prefect.yaml").read_text())["pull"]
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    monkeypatch.setenv("KALEIDO_REPO", str(workspace))
    monkeypatch.chdir(tmp_path)
    # the session's server, even when Prefect read its settings before the fixture set PREFECT_API_URL
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        output = asyncio.run(run_steps(pull))  # monkeypatch gives the test's working directory back afterwards
    assert Path(output["directory"]) == workspace and Path.cwd() == workspace


def test_run_summary_rows_from_a_flow_result(tmp_path: Path) -> None:
    """The table `make run` ends with: data, training, validation loss, every metric with the gate's verdict."""
    import json

    from kaleido.platform.summary import markdown_rows, run_summary, to_markdown, to_text

    train = tmp_path / "runs/train/pretrain"
    train.mkdir(parents=True)
    (train / "metrics.json").write_text(json.dumps({"steps": 30, "first_loss": 2.31, "final_loss": 0.52,
                                                    "val_loss_base": 2.25, "val_loss": 0.61}))
    result = {
        "data_version": {"dvc_data_hash": "abc.dir", "git_revision": "0123456789abcdef"},
        "stats": {"clips": 11, "samples": 9, "cross_pair_samples": 3,
                  "rejections": {"by_reason": {"too_short": 2, "low_clip_score": 5}},
                  "validation": {"train_samples": 8, "val_samples": 1, "val_sources": ["raw/carphone_pristine.mp4"]}},
        "version": "2",
        "evaluation": {"overall": {"s2v_consistency": 0.41, "val_loss": 0.61}},
        "gate": {"passed": False, "reasons": {"s2v_consistency": "pass: floor ok (mean 0.41)",
                                              "val_loss": "fail: regression FAILED (mean diff vs baseline +0.4)"}},
        "sample": str(tmp_path / "sample.mp4"),
    }
    rows = run_summary(tmp_path, result, "http://127.0.0.1:4200", "http://127.0.0.1:5000", ["previous"])
    table = dict(rows)
    assert table["clips"] == "11 kept; 7 rejected (low_clip_score 5, too_short 2)"
    assert table["samples"].startswith("9: 8 train, 1 held out (sources: raw/carphone_pristine.mp4)")
    assert table["training"] == "30 steps, train loss 2.3100 -> 0.5200"
    assert table["validation loss"].startswith("2.2500 (base model) -> 0.6100 (trained)")
    # one held-out sample: reliance cannot be measured, and the table says so instead of leaving the row out
    assert table["reference reliance"].startswith("n/a: not measured (1 held-out sample(s)")
    assert table["eval val_loss"] == "0.6100  gate: fail: regression FAILED"
    assert table["gate"] == "FAIL on val_loss" and table["model version"] == "v2 (previous)"
    assert table["contact sheet"].endswith("sample.png") and table["MLflow UI"] == "http://127.0.0.1:5000"
    assert markdown_rows(to_markdown(rows)) == rows  # the Prefect artifact prints back as the same table
    assert to_text(rows).splitlines()[0].startswith("data version")


def _prefect_call(api: str, path: str, body: dict | None = None, method: str | None = None):
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{api}{path}", data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


def test_platform_up_marks_runs_whose_process_is_gone_crashed(prefect_server, tmp_path: Path) -> None:
    """The probe: after the main job was SIGKILLed mid-run, its Prefect flow runs stayed RUNNING forever. `kaleido
    platform up` (and `run`) now sets CRASHED on this platform's runs whose process is gone, and says so; a run whose
    process lives, one with no known process and another pool's are left alone."""
    import subprocess
    import sys
    import uuid

    from kaleido.platform.services import Platform

    pool, other = f"crash-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    platform = Platform(tmp_path, tmp_path / "state", "http://127.0.0.1:9", prefect_server, pool)
    flow = _prefect_call(prefect_server, "/flows/", {"name": f"kaleido-{pool}"})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "prefect.engine"])
    runs = {}
    for work_pool in (pool, other):
        _prefect_call(prefect_server, "/work_pools/", {"name": work_pool, "type": "process"})
    try:
        for name, work_pool, pid in [("gone", pool, gone.pid), ("alive", pool, alive.pid), ("unknown", pool, None),
                                     ("other pool", other, gone.pid)]:
            deployment = _prefect_call(prefect_server, "/deployments/", {
                "name": f"{name}-{uuid.uuid4().hex[:6]}", "flow_id": flow["id"], "work_pool_name": work_pool})
            run = _prefect_call(prefect_server, f"/deployments/{deployment['id']}/create_flow_run", {})
            _prefect_call(prefect_server, f"/flow_runs/{run['id']}/set_state",
                          {"state": {"type": "RUNNING", "name": "Running"}, "force": True})
            if pid is not None:
                _prefect_call(prefect_server, f"/flow_runs/{run['id']}", {"infrastructure_pid": str(pid)}, "PATCH")
            runs[name] = run
        task = _prefect_call(prefect_server, "/task_runs/", {
            "flow_run_id": runs["gone"]["id"], "task_key": "curate", "dynamic_key": "0", "name": "curate",
            "state": {"type": "RUNNING", "name": "Running"}})
        marked = platform.mark_crashed_runs()
        state = {name: _prefect_call(prefect_server, f"/flow_runs/{run['id']}")["state"]
                 for name, run in runs.items()}  # fmt: skip
    finally:
        alive.kill()
        alive.wait()
    assert marked == [f"{runs['gone']['name']} ({runs['gone']['id']})"]
    assert state["gone"]["type"] == "CRASHED" and f"pid {gone.pid}) is gone" in state["gone"]["message"]
    assert {state[name]["type"] for name in ("alive", "unknown", "other pool")} == {"RUNNING"}
    assert _prefect_call(prefect_server, f"/task_runs/{task['id']}")["state"]["type"] == "CRASHED"
    assert "now CRASHED: " + marked[0] in platform.describe_crashed(marked)
