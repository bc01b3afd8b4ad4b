"""The whole platform path as `make run` takes it, against the session's Prefect and MLflow servers.

One temporary git + DVC checkout of this working tree is shared by the tests of this module, which run in order:
a flow killed mid-curation; the full deployment run that resumes it, with a gate that must fail (the version is
rejected with reasons, no champion); the second full run with the normal gate, which reuses the cached work (no
new version, no new evaluation) and promotes the version to champion; the MLflow UI screenshot of that champion;
a worse candidate (too high a learning rate) that the gate refuses on the held-out validation loss; a failing
training step (no new model version).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import working_tree_files

from kaleido.config.schema import set_dotted

pytestmark = pytest.mark.slow

SOURCE = Path(__file__).resolve().parents[1]
MODEL = "kaleido-s2v"
SCREENSHOT = SOURCE / "artifacts" / "test" / "mlflow-champion.png"
OVERRIDES: dict[str, Any] = {  # the embedded default, smaller where it does not change the path
    "data.models.flux_fill": None,  # crop + segment references only: FLUX dominates curation time on a CPU
    "data.models.flux_redux": None,
    # random-weight tiny CLIP scores are noise: the paper's filter thresholds would reject every instance
    "data.filters": {"min_area": 0.0, "max_area": 1.0, "clip_min_score": -1.0, "min_sharpness": 0.0,
                     "min_brightness": 0.0, "max_brightness": 255.0},
    "train.pretrain.steps": 6,
    "train.checkpoint_every": 3,
    "eval.steps": 2,
    "eval.s2v.max_frames": 1,
}
FAILING_GATE = {"gate.floors.subject_consistency": 2.0}  # above the metric's [0, 1] range


@dataclass
class E2E:
    repo: Path
    env: dict[str, str]
    mlflow: str
    prefect: str
    notes: dict[str, Any] = field(default_factory=dict)

    def run(self, args: list[str], timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=self.repo, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode:
            raise AssertionError(f"{args} -> {result.returncode}\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
        return result

    def deployment(self, name: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run([_bin("prefect"), "deployment", "run", f"kaleido/{name}", *extra, "--watch"], check=check)

    def registry(self) -> Any:
        from kaleido.registry import ModelRegistry

        return ModelRegistry(self.mlflow, MODEL)

    def versions(self) -> list[str]:
        found = self.registry().client.search_model_versions(f"name='{MODEL}'")
        return sorted((str(v.version) for v in found), key=int)

    def set_params(self, overrides: dict[str, Any]) -> None:
        path = self.repo / "params.yaml"
        raw = yaml.safe_load(path.read_text())
        for dotted, value in overrides.items():
            set_dotted(raw, dotted, value)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def copy_checkout(dst: Path) -> Path:
    """The working tree's tracked and new (not ignored) files, as a fresh git repository: a 'fresh clone'."""
    for name in working_tree_files(SOURCE):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SOURCE / name, dst / name)
    _git(dst, "init", "-q")
    _git(dst, "add", "-A")
    _git(dst, "commit", "-qm", "fresh checkout")
    return dst


def _git(repo: Path, *args: str) -> None:
    identity = ["-c", "user.email=e2e@kaleido.test", "-c", "user.name=e2e"]
    subprocess.run(["git", *identity, *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str, prefect_server: str) -> Iterator[E2E]:
    from kaleido.platform.services import Service

    base = tmp_path_factory.mktemp("e2e")
    repo = copy_checkout(base / "repo")
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PREFECT_API_URL": prefect_server,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "KALEIDO_REPO": str(repo),
    }
    env.pop("KALEIDO_PARAMS", None)
    ctx = E2E(repo, env, mlflow_server, prefect_server)
    ctx.set_params({
        **OVERRIDES,
        "platform.mlflow_tracking_uri": mlflow_server,
        "platform.prefect_api_url": prefect_server,
        "platform.state_dir": str(base / "state"),
        "platform.dvc_remote": str(base / "dvc-remote"),
    })  # fmt: skip
    _git(repo, "commit", "-qam", "test settings")
    ctx.run([_bin("prefect"), "--no-prompt", "work-pool", "create", "local", "--type", "process"], check=False)
    ctx.run([_bin("prefect"), "--no-prompt", "deploy", "--all"])
    worker = Service(
        "prefect-worker", [_bin("prefect"), "worker", "start", "--pool", "local", "--type", "process"],
        base / "state", env={k: env[k] for k in ("PATH", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "KALEIDO_REPO")},
        cwd=repo,
    )  # fmt: skip
    worker.start()
    try:
        yield ctx
    finally:
        worker.stop()


def _finished_shards(repo: Path) -> dict[str, int]:
    return {str(p.parent.relative_to(repo)): p.stat().st_mtime_ns for p in (repo / "data/curate").glob("*/_SUCCESS")}


def test_killed_curation_is_resumable(e2e: E2E) -> None:
    """Kill the flow (its whole process group) once a curation shard has finished."""
    code = "from flows.kaleido_flow import kaleido_flow; kaleido_flow(part='curate')"
    log = (e2e.repo.parent / "killed-flow.log").open("w")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=e2e.repo, env=e2e.env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    try:
        while not _finished_shards(e2e.repo) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
    finished = _finished_shards(e2e.repo)
    assert finished, (e2e.repo.parent / "killed-flow.log").read_text()[-4000:]
    assert process.returncode == -signal.SIGKILL, "the flow ended before it could be killed"
    e2e.notes["killed_shards"] = finished


def test_first_run_resumes_curation_and_a_failing_gate_sets_no_champion(e2e: E2E) -> None:
    e2e.set_params(FAILING_GATE)
    started = time.monotonic()
    try:
        e2e.deployment("full")  # a rejection is a normal end of the flow
    finally:
        e2e.run(["git", "checkout", "--", "params.yaml"])
    e2e.notes["first_run_s"] = time.monotonic() - started
    # the shards that finished before the kill were not redone
    killed = e2e.notes.get("killed_shards", {})
    after = _finished_shards(e2e.repo)
    assert {name: after.get(name) for name in killed} == killed
    assert len(after) > len(killed)

    registry = e2e.registry()
    versions = e2e.versions()
    assert len(versions) == 1
    version = versions[0]
    assert registry.alias_version("champion") is None
    assert registry.gate_decision(version) == "failed"
    decision = json.loads((e2e.repo / f"runs/eval/{MODEL}-v{version}/gate.json").read_text())
    assert not decision["passed"] and "subject_consistency" in json.dumps(decision["reasons"])

    tags = registry.version_tags(version)
    lock = yaml.safe_load((e2e.repo / "dvc.lock").read_text())
    dataset = next(o for o in lock["stages"]["write-dataset"]["outs"] if o["path"] == "data/dataset")
    assert tags["lineage.dvc_data_hash"] == dataset["md5"]
    train = json.loads((e2e.repo / "runs/train/pretrain/metrics.json").read_text())
    assert tags["lineage.training_run_id"] == train["mlflow_run_id"]
    logged = {item.path for item in registry.client.list_artifacts(train["mlflow_run_id"], "lineage")}
    assert logged == {"lineage/dvc.lock"}  # every out's hash of the data version goes with the model version
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=e2e.repo, capture_output=True, text=True).stdout.strip()
    assert tags["lineage.git_revision"].split("-")[0] == head
    assert any((e2e.repo.parent / "dvc-remote").rglob("*"))  # the data version was pushed
    keys = {a["key"] for a in _prefect_post(e2e.prefect, "/artifacts/filter", {"limit": 200})}
    assert {"kaleido-data-stats", "kaleido-data-version", "kaleido-train-metrics", "kaleido-registered-version",
            "kaleido-eval-metrics", "kaleido-gate", "kaleido-promotion", "kaleido-summary"} <= keys
    # training measured the held-out loss of the base model and of the trained one; the evaluation carries it
    assert train["val_loss"] < train["val_loss_base"]
    evaluation = json.loads((e2e.repo / f"runs/eval/{MODEL}-v{version}/metrics.json").read_text())
    assert evaluation["overall"]["val_loss"] == pytest.approx(train["val_loss"])
    assert "val_loss" in decision["reasons"] and decision["reasons"]["val_loss"].startswith("pass: improvement ok")
    # the run's last screen: the summary table, printed back from the Prefect artifact
    from kaleido.platform.services import Platform
    from kaleido.platform.summary import SUMMARY_KEY, markdown_rows

    flow_run = _last_flow_run(e2e.prefect)
    platform = Platform(e2e.repo, e2e.repo.parent / "state", e2e.mlflow, e2e.prefect, "local")
    table = dict(markdown_rows(platform._artifact(flow_run, SUMMARY_KEY) or ""))
    assert table["gate"] == "FAIL on subject_consistency" and table["model version"] == f"v{version} (no alias)"
    assert "(base model) ->" in table["validation loss"] and "held out" in table["samples"]
    assert platform._follow(flow_run, lambda line: None) == "COMPLETED"
    e2e.notes["version"] = version


def test_second_run_reuses_cached_work_and_promotes(e2e: E2E) -> None:
    version = e2e.notes["version"]
    metrics = e2e.repo / f"runs/eval/{MODEL}-v{version}/metrics.json"
    before = metrics.stat().st_mtime_ns
    started = time.monotonic()
    e2e.deployment("full")
    elapsed = time.monotonic() - started
    assert e2e.versions() == [version]  # register was cached: one training run is one version
    assert metrics.stat().st_mtime_ns == before  # evaluate was cached
    registry = e2e.registry()
    assert registry.alias_version("champion") == version
    assert registry.gate_decision(version) == "passed"
    sample = e2e.repo / f"runs/platform/{MODEL}-v{version}/sample.mp4"
    assert sample.stat().st_size > 1000
    assert elapsed < e2e.notes.get("first_run_s", float("inf")) / 2
    e2e.notes["champion"] = version


def _last_flow_run(api: str) -> str:
    runs = _prefect_post(api, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
    return runs[0]["id"]


def _prefect_post(api: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(f"{api}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_mlflow_ui_shows_the_champion(e2e: E2E, tmp_path: Path) -> None:
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium: `make test` installs it as root (CI); `apt-get install chromium` to run this test")
    query = urllib.parse.urlencode({"name": MODEL, "alias": "champion"})
    with urllib.request.urlopen(f"{e2e.mlflow}/api/2.0/mlflow/registered-models/alias?{query}") as response:
        alias = json.loads(response.read())["model_version"]
    assert alias["version"] == e2e.notes.get("champion", alias["version"]) and "champion" in alias["aliases"]

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--screenshot={SCREENSHOT}", "--window-size=1400,900", "--virtual-time-budget=20000",
        f"{e2e.mlflow}/#/models/{MODEL}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert SCREENSHOT.is_file(), result.stderr[-3000:]
    assert SCREENSHOT.stat().st_size > 20_000
    image = Image.open(SCREENSHOT).convert("RGB")
    assert image.size == (1400, 900)
    colours = image.resize((350, 225)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "the page rendered as a (nearly) blank picture"


def test_generate_deployment_makes_a_video_with_the_champion(e2e: E2E, tmp_path: Path) -> None:
    """`prefect deployment run kaleido/generate -p prompt=... -p references=[...]`: a file under serve.reference_roots
    of the checkout and a base64 image, the champion by default; a playable video, its MLflow run and the Prefect
    artifact."""
    from PIL import Image

    from kaleido.model.media import read_video, read_video_metadata
    from kaleido.serving import encode_image

    champion = e2e.notes["champion"]
    rng = np.random.default_rng(4)
    (e2e.repo / "artifacts" / "uploads").mkdir(parents=True, exist_ok=True)  # ignored by git: the tree stays clean
    Image.fromarray(rng.integers(0, 255, (60, 40, 3), dtype=np.uint8)).save(e2e.repo / "artifacts/uploads/cat.png")
    Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(tmp_path / "ball.png")
    references = json.dumps(["artifacts/uploads/cat.png", encode_image(tmp_path / "ball.png")])
    e2e.deployment("generate", "-p", "prompt=A cat plays with a ball", "-p", f"references={references}",
                   "-p", "seed=11")
    run = _prefect_post(e2e.prefect, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})[0]
    assert run["state_type"] == "COMPLETED" and run["parameters"]["seed"] == 11
    video = e2e.repo / "artifacts" / "generated" / run["id"] / "video.mp4"
    frames = read_video(video)
    assert frames.shape == (9, 64, 96, 3) and frames.std() > 0  # params.yaml's generate size, not a blank video
    assert json.loads(read_video_metadata(video)["comment"])["seed"] == 11
    assert (video.with_suffix(".png")).is_file() and (video.parent / "references" / "reference-1.img").is_file()
    client = e2e.registry().client
    runs = client.search_runs([client.get_experiment_by_name("kaleido-generate").experiment_id],
                              filter_string=f"tags.`prefect.flow_run_id` = '{run['id']}'")
    assert len(runs) == 1 and runs[0].data.tags["kaleido.model"] == f"models:/{MODEL}/{champion}"
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {"video.mp4", "video.png", "request.json"}
    generated = [a for a in _prefect_post(e2e.prefect, "/artifacts/filter", {"limit": 200})
                 if a["key"] == "kaleido-generated" and a["flow_run_id"] == run["id"]]
    assert len(generated) == 1 and f"models:/{MODEL}/{champion}" in generated[0]["data"]
    # a reference outside serve.reference_roots: the run fails at once, its state naming which one (one line)
    failed = e2e.deployment("generate", "-p", "prompt=a cat", "-p", 'references=["/etc/passwd"]', check=False)
    assert failed.returncode != 0
    run = _prefect_post(e2e.prefect, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})[0]
    message = run["state"]["message"]
    assert run["state_type"] == "FAILED" and message.startswith("refused: references[0]: not an upload"), message
    assert "\n" not in message and "Traceback" not in message


def test_a_worse_candidate_is_refused_on_validation_loss(e2e: E2E) -> None:
    """A learning rate 50x too high: the new version's held-out loss rises past the champion's, the gate refuses it
    on val_loss (MLflow tags, the Prefect artifact, the CLI), and the champion stays."""
    champion = e2e.notes["champion"]
    e2e.set_params({"train.pretrain.lr": 0.05})
    try:
        e2e.deployment("full")
    finally:
        e2e.run(["git", "checkout", "--", "params.yaml"])
    registry = e2e.registry()
    candidate = e2e.versions()[-1]
    assert candidate != champion and registry.alias_version("champion") == champion
    assert registry.gate_decision(candidate) == "failed"
    reasons = json.loads(registry.version_tags(candidate)["gate.reasons"])
    assert reasons["val_loss"].startswith("fail: regression FAILED"), reasons
    gate = [a for a in _prefect_post(e2e.prefect, "/artifacts/filter", {"limit": 200}) if a["key"] == "kaleido-gate"]
    assert "**val_loss**: fail: regression FAILED" in max(gate, key=lambda a: a["created"])["data"]
    cli = e2e.run([_bin("kaleido"), "gate", "--candidate", f"models:/{MODEL}/{candidate}"], check=False)
    assert cli.returncode == 1 and "val_loss" in cli.stdout and "rise beyond tolerance" in cli.stdout, cli.stdout


def test_failing_training_registers_nothing(e2e: E2E) -> None:
    versions = e2e.versions()
    e2e.set_params({"train.sequence_parallel": 3})  # does not divide the 2 local ranks: `kaleido train` fails
    try:
        result = e2e.deployment("train", check=False)
    finally:
        e2e.run(["git", "checkout", "--", "params.yaml"])
    assert result.returncode != 0
    assert e2e.versions() == versions
    assert e2e.registry().alias_version("champion") == e2e.notes["champion"]


def test_dvc_repro_and_an_experiment_sweep(e2e: E2E) -> None:
    """`dvc repro` in the flow's checkout finishes the pipeline (the flow evaluates the registered version, so the
    DVC `evaluate` stage is what is left), then `dvc exp run -S` sweeps knobs (LoRA among them): the stages that
    read them run again, the ones before them are skipped, and `dvc exp show` lists the experiment with its params
    and metrics."""
    dvc = _bin("dvc")
    repro = e2e.run([dvc, "repro"])
    assert "Running stage 'evaluate'" in repro.stdout, repro.stdout[-3000:]
    assert "Data and pipelines are up to date" in e2e.run([dvc, "status"]).stdout
    metrics = json.loads(e2e.run([dvc, "metrics", "show", "--json"]).stdout)
    files = next(iter(metrics.values()))["data"]
    expected = {"runs/eval/pretrain/summary.json", "runs/train/pretrain/metrics.json", "data/stats/stats.json"}
    assert expected <= set(files)
    plots = json.loads(e2e.run([dvc, "plots", "show", "--json"]).stdout)
    expected = {"runs/train/pretrain/loss.csv", "runs/train/pretrain/val_loss.csv", "runs/eval/pretrain/cases.csv",
                "data/stats/categories.png"}
    assert expected <= set(plots["data"]), json.dumps(plots)[:2000]
    rows = plots["data"]["runs/eval/pretrain/cases.csv"][0]["content"]["data"]["values"]
    assert {row["id"] for row in rows} >= {"astronaut-waves"}  # one bar per eval case

    # a data knob and LoRA fine-tuning at once, as the README sweeps: in a temporary workspace (`--temp`, with the last
    # run's dvc.lock so finished stages are skipped), the experiment trains a rank-8 adapter on the frozen base and
    # the DVC evaluate stage scores base + adapter; the workspace, hence the next `make run`, is untouched
    params_before = (e2e.repo / "params.yaml").read_text()
    export_before = (e2e.repo / "runs/train/pretrain/export.json").read_text()
    sweep = e2e.run([dvc, "exp", "run", "--temp", "-C", "dvc.lock", "--name", "cross-pair-half",
                     "-S", "data.references.cross_pair_ratio=0.5", "-S", "train.pretrain.lora.enabled=true",
                     "-S", "train.pretrain.lora.rank=8", "-S", "train.pretrain.lr=0.002"])  # fmt: skip
    ran = {line.split("'")[1] for line in sweep.stdout.splitlines() if line.startswith("Running stage")}
    assert {"curate", "train", "evaluate"} <= ran, sweep.stdout[-3000:]
    assert not {"assets", "ingest", "caption"} & ran, sweep.stdout[-3000:]
    assert any(line.startswith("progress train pretrain: step") for line in (sweep.stdout + sweep.stderr).splitlines())
    assert (e2e.repo / "params.yaml").read_text() == params_before
    assert (e2e.repo / "runs/train/pretrain/export.json").read_text() == export_before
    shown = json.loads(e2e.run([dvc, "exp", "show", "--json"]).stdout)
    experiments = [exp for row in shown for exp in (row.get("experiments") or [])]
    names = {rev.get("name") for exp in experiments for rev in exp.get("revs", [])}
    # the sweep, and each registered version the flow saved as an experiment row
    assert {"cross-pair-half", f"{MODEL}-v{e2e.notes['champion']}"} <= names, json.dumps(shown)[:3000]
    # the held-out loss is a column of every experiment (train metrics.json: val_loss_base -> val_loss)
    revs = [rev for exp in experiments for rev in exp.get("revs", []) if rev.get("name") == "cross-pair-half"]
    train_metrics = revs[0]["data"]["metrics"]["runs/train/pretrain/metrics.json"]["data"]
    assert train_metrics["val_loss"] < train_metrics["val_loss_base"], train_metrics
    lora = revs[0]["data"]["params"]["params.yaml"]["data"]["train"]["pretrain"]["lora"]
    assert lora["enabled"] is True and lora["rank"] == 8, lora
    assert "runs/eval/pretrain/summary.json" in revs[0]["data"]["metrics"]
    table = e2e.run([_bin("kaleido"), "experiments", "--md"]).stdout
    header = table.splitlines()[0]
    assert "train.pretrain.lora.enabled" in header and "val_loss" in header and "model.arch" not in header, table
