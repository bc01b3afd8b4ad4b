"""The Kaleido flow: curate -> version the data -> train -> register -> evaluate -> gate -> promote or reject.

Every task is thin: it runs a DVC stage or a `kaleido` command, or one registry call, and publishes a Prefect
artifact. Resuming after a crash is layered: DVC skips stages whose deps, params and outs are unchanged (and the
data stages keep finished shards), and the registry/evaluation tasks are cached on their inputs and source
(`INPUTS + TASK_SOURCE`, persisted results), so a re-run neither registers nor evaluates the same training run
twice. Deployments (prefect.yaml): `kaleido/full`, and the parts `kaleido/curate`, `kaleido/train`,
`kaleido/evaluate`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

Part = Literal["full", "curate", "train", "evaluate"]
CACHED = INPUTS + TASK_SOURCE
# A model version is identified by its training run: lineage details (a dirty tree, say) must not register it twice
REGISTER_CACHE = (INPUTS - "data_version" - "params_hash" - "lock_file") + TASK_SOURCE
DATA_STAGE = "data-stats"  # the last DVC stage of curation (ingest, caption, curate, write-dataset before it)
TRAIN_STAGE = "train"
DATASET_OUT = "data/dataset"
TRAIN_OUTPUT = Path("runs/train/pretrain")


class StepFailed(RuntimeError):
    """A command of the flow failed; the message holds its tail."""


def _bin(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def stream_command(
    args: list[str], cwd: Path, on_line: Callable[[str, str], None], env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run `args`, handing each line of its stdout and stderr to `on_line(stream, line)` AS IT COMES (a long DVC
    stage's progress reaches the log while the stage runs, not when it ends). Returns (exit code, stdout, the
    last 400 lines of both streams in order)."""
    import queue
    import threading
    from collections import deque

    environment = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               bufsize=1, env=environment, errors="replace")  # fmt: skip
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()

    def pump(name: str, stream: Any) -> None:
        for line in stream:
            lines.put((name, line.rstrip("\n")))
        lines.put((name, None))

    readers = [threading.Thread(target=pump, args=(name, stream), daemon=True)
               for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))]  # fmt: skip
    for reader in readers:
        reader.start()
    stdout: list[str] = []
    tail: deque[str] = deque(maxlen=400)
    open_streams = len(readers)
    while open_streams:
        name, line = lines.get()
        if line is None:
            open_streams -= 1
            continue
        if name == "stdout":
            stdout.append(line)
        tail.append(line)
        on_line(name, line)
    code = process.wait()
    return code, "\n".join(stdout) + ("\n" if stdout else ""), "\n".join(tail)


def run_command(args: list[str], repo: Path, ok: tuple[int, ...] = (0,),
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a CLI in the repository, each output line into the task log as it comes (progress lines included: see
    kaleido.platform.progress); raise StepFailed on an unexpected exit code."""
    logger = get_run_logger()
    logger.info("$ %s", " ".join(args))

    def log_line(stream: str, line: str) -> None:
        if not line.strip():
            return
        if line.startswith("warning: "):  # the library's warnings (truncated prompts, adapted images) stand out
            logger.warning(line.removeprefix("warning: "))
        else:
            logger.info(line)

    code, stdout, output = stream_command(args, repo, log_line, env)
    if code not in ok:
        raise StepFailed(f"`{' '.join(args)}` exited with {code}:\n{output[-3000:]}")
    return subprocess.CompletedProcess(args, code, stdout, "")


def last_json(text: str) -> dict[str, Any]:
    """The last JSON object a command printed (libraries may print lines before it)."""
    starts = [i for i, char in enumerate(text) if char == "{" and (i == 0 or text[i - 1] == "\n")]
    for start in reversed(starts):
        try:
            value = json.loads(text[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise StepFailed(f"no JSON summary in the command's output:\n{text[-2000:]}")


def _params(repo: Path) -> Any:
    from kaleido.config import load_params

    return load_params(repo / "params.yaml")


def _mlflow_run_link(uri: str, run_id: str) -> str:
    import mlflow

    experiment = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    return f"{uri}/#/experiments/{experiment}/runs/{run_id}"


# ---- steps --------------------------------------------------------------------------------------------


@task(name="curate", retries=1, retry_delay_seconds=5)
def curate(repo: Path) -> dict[str, Any]:
    """The DVC data stages up to data-stats; a retry resumes at the first unfinished shard."""
    run_command([_bin("dvc"), "repro", DATA_STAGE], repo)
    stats = json.loads((repo / "data/stats/stats.json").read_text())
    rows = [{"key": key, "value": json.dumps(value)[:200]} for key, value in stats.items()]
    create_table_artifact(rows, key="kaleido-data-stats", description="data/stats/stats.json after curation")
    return stats


def dvc_out_hash(repo: Path, stage: str, out: str) -> str:
    """The md5 dvc.lock records for a stage's out (a folder's hash ends in .dir)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for entry in lock["stages"][stage]["outs"]:
        if entry["path"] == out:
            return str(entry["md5"])
    raise StepFailed(f"dvc.lock has no out {out} in stage {stage}; run `dvc repro {stage}`")


@task(name="version-data", retries=2, retry_delay_seconds=5)
def version_data(repo: Path) -> dict[str, str]:
    """Commit the data stages' outs to the DVC cache and push them; the data version is (dataset hash, git)."""
    from kaleido.registry import git_revision

    params = _params(repo)
    remote = params.platform.dvc_remote
    if "://" not in remote:
        remote = str((repo / remote).resolve())
    from kaleido.platform.storage import dvc_remote_commands

    run_command([_bin("dvc"), "commit", "--force", "--with-deps", DATA_STAGE], repo)
    for command in dvc_remote_commands(_bin("dvc"), "kaleido", remote, params):  # endpoint, verify on pull
        run_command(command, repo)
    run_command([_bin("dvc"), "push", "--remote", "kaleido", "--with-deps", DATA_STAGE], repo)
    version = {"dvc_data_hash": dvc_out_hash(repo, "write-dataset", DATASET_OUT), "git_revision": git_revision(repo)}
    create_markdown_artifact(
        f"## Data version\n\n| | |\n|---|---|\n| dataset (`{DATASET_OUT}`) | `{version['dvc_data_hash']}` |\n"
        f"| git revision | `{version['git_revision']}` |\n| DVC remote | `{remote}` |\n",
        key="kaleido-data-version", description="the data version the model trains on",
    )  # fmt: skip
    return version


@task(name="train")
def train(repo: Path) -> dict[str, Any]:
    """The DVC encode + train stages (train.launcher decides where); nothing is registered here."""
    run_command([_bin("dvc"), "repro", TRAIN_STAGE], repo)
    metrics = json.loads((repo / TRAIN_OUTPUT / "metrics.json").read_text())
    params = _params(repo)
    rows = [{k: metrics.get(k) for k in ("stage", "steps", "final_loss", "mean_loss_last_10", "mlflow_run_id")}]
    create_table_artifact(rows, key="kaleido-train-metrics", description=f"{TRAIN_OUTPUT}/metrics.json")
    if metrics.get("mlflow_run_id") and params.platform.mlflow_tracking_uri:
        create_link_artifact(
            _mlflow_run_link(params.platform.mlflow_tracking_uri, metrics["mlflow_run_id"]),
            link_text="MLflow training run", key="kaleido-train-run",
        )  # fmt: skip
    return metrics


@task(name="register", retries=2, retry_delay_seconds=5, cache_policy=REGISTER_CACHE, persist_result=True)
def register(tracking_uri: str, model_name: str, run_id: str, export: str, data_version: dict[str, str],
             params_hash: str, lock_file: str) -> str:
    """One model version per training run (cached on the run id: a re-run does not register it twice), packaged as
    an MLflow Model (kaleido.serving: pyfunc, `mlflow models serve`). dvc.lock goes with it: the flow does not commit
    to the user's git history, the registry keeps the record."""
    import tempfile

    from kaleido.model.lora import is_adapter
    from kaleido.registry import Lineage, ModelRegistry
    from kaleido.serving import build_model
    from kaleido.train.plan import export_base

    registry = ModelRegistry(tracking_uri, model_name)
    lineage = Lineage(data_version["git_revision"], data_version["dvc_data_hash"], params_hash, run_id,
                      base_model=export_base(Path(export)), kind="lora" if is_adapter(export) else "full")
    params = _params(Path(lock_file).parent)
    # params a resume applied mid-run (--apply-param-changes): the version says which and from which step
    info = Path(export).with_name("export.json")
    changes = json.loads(info.read_text()).get("param_changes") if info.is_file() else None
    extra = {"lineage.param_changes": json.dumps(changes)} if changes else None
    with tempfile.TemporaryDirectory(prefix="kaleido-model-") as staging:
        model = build_model(Path(export), params, Path(staging) / "model", registry.client)
        version = registry.register(run_id, model, lineage, extra_tags=extra, lineage_files=(Path(lock_file),))
    create_markdown_artifact(
        f"## Registered {model_name} version {version}\n\n"
        + "\n".join(f"- {key}: `{value}`" for key, value in lineage.tags().items())
        + f"\n\n[MLflow model]({tracking_uri}/#/models/{model_name}/versions/{version})\n",
        key="kaleido-registered-version",
    )  # fmt: skip
    return version


@task(name="save-experiment")
def save_experiment(repo: Path, model_name: str, version: str) -> str | None:
    """The run as DVC experiment `<model>-v<N>` (kaleido.platform.experiments: a row of `dvc exp show` with its params,
    dvc.lock and metrics; the branch and the workspace untouched). Outside git, or when DVC refuses, a warning."""
    from kaleido.platform.experiments import experiment_name, identity_env, save_command

    logger = get_run_logger()
    if not (repo / ".git").exists():
        logger.warning("%s is not a git checkout: no DVC experiment row for this run", repo)
        return None
    name = experiment_name(model_name, version)
    try:
        run_command(save_command(_bin("dvc"), repo, name, (DATA_STAGE, TRAIN_STAGE)), repo, env=identity_env(repo))
    except StepFailed as exc:  # a record for `dvc exp show`, not the model: the run goes on
        logger.warning("dvc exp save failed; `dvc exp show` will not list this run: %s", exc)
        return None
    return name


@task(name="evaluate", retries=1, retry_delay_seconds=5, cache_policy=CACHED, persist_result=True)
def evaluate(repo: Path, tracking_uri: str, model_name: str, version: str) -> dict[str, Any]:
    """`kaleido evaluate` on the registered version (per-case results resume inside the output folder)."""
    out = repo / "runs/eval" / f"{model_name}-v{version}"
    result = run_command(
        [_bin("kaleido"), "evaluate", "--model", f"models:/{model_name}/{version}", "--out", str(out)], repo
    )
    summary = last_json(result.stdout)
    overall = summary.get("overall") or {}
    create_table_artifact(
        [{"metric": key, "value": value} for key, value in overall.items()],
        key="kaleido-eval-metrics", description=f"{model_name} v{version}: overall means over the eval set",
    )  # fmt: skip
    if summary.get("mlflow_run_id"):
        create_link_artifact(
            _mlflow_run_link(tracking_uri, summary["mlflow_run_id"]), link_text="MLflow evaluation run",
            key="kaleido-eval-run",
        )  # fmt: skip
    return summary


@task(name="gate")
def gate(repo: Path, model_name: str, version: str) -> dict[str, Any]:
    """`kaleido gate` against the champion; it records the decision on the version's tags."""
    out = repo / "runs/eval" / f"{model_name}-v{version}" / "gate.json"
    run_command(
        [_bin("kaleido"), "gate", "--candidate", f"models:/{model_name}/{version}", "--out", str(out)], repo, ok=(0, 1)
    )
    decision = json.loads(out.read_text())
    reasons = decision.get("reasons") or {}
    create_markdown_artifact(
        f"## Gate: {'PASS' if decision.get('passed') else 'FAIL'} ({model_name} v{version})\n\n"
        + "\n".join(f"- **{metric}**: {reason}" for metric, reason in reasons.items())
        + f"\n\nrule: {decision.get('rule', '')}\n",
        key="kaleido-gate",
    )  # fmt: skip
    return decision


@task(name="promote", retries=2, retry_delay_seconds=5)
def promote(tracking_uri: str, model_name: str, version: str, decision: dict[str, Any]) -> dict[str, Any]:
    """Make the version `champion` only if its gate passed (the registry checks the recorded tag again)."""
    from kaleido.registry import CHAMPION, ModelRegistry

    registry = ModelRegistry(tracking_uri, model_name)
    if decision.get("passed"):
        replaced = registry.promote(version)
        outcome = {"promoted": True, "champion": version, "previous": replaced}
        text = f"## {model_name} v{version} is `champion`\n\nreplaced: {replaced or 'none'}\n"
    else:
        outcome = {"promoted": False, "champion": registry.alias_version(CHAMPION), "reasons": decision.get("reasons")}
        lines = [f"- **{metric}**: {reason}" for metric, reason in (decision.get("reasons") or {}).items()]
        text = f"## {model_name} v{version} rejected\n\nchampion stays {outcome['champion'] or 'unset'}\n\n"
        text += "\n".join(lines)
    create_markdown_artifact(text, key="kaleido-promotion")
    return outcome


@task(name="generate-sample", retries=1)
def generate_sample(repo: Path, tracking_uri: str, model_name: str) -> str | None:
    """A video from the champion (the sample prompt and references), to look at; None without a champion.
    `kaleido generate --model models:/<name>@champion` resolves, caches and loads the registered version."""
    from kaleido.registry import CHAMPION, ModelRegistry

    params = _params(repo)
    version = ModelRegistry(tracking_uri, model_name).alias_version(CHAMPION)
    if version is None:
        return None
    video = repo / "runs/platform" / f"{model_name}-v{version}" / "sample.mp4"
    refs = [arg for ref in params.platform.sample_refs for arg in ("--ref", str(params.resolve(ref)))]
    run_command(
        [_bin("kaleido"), "generate", "--model", f"models:/{model_name}/{version}", "--prompt",
         params.platform.sample_prompt, *refs, "--out", str(video)], repo,
    )  # fmt: skip
    create_markdown_artifact(
        f"## Sample from {model_name}@champion (v{version})\n\n`{video}`\n\nprompt: {params.platform.sample_prompt}\n",
        key="kaleido-sample",
    )  # fmt: skip
    return str(video)


def _latest_version(tracking_uri: str, model_name: str) -> str:
    from kaleido.registry import ModelRegistry

    versions = ModelRegistry(tracking_uri, model_name).client.search_model_versions(f"name='{model_name}'")
    if not versions:
        raise StepFailed(f"{model_name} has no versions; run the train part first")
    return str(max(int(v.version) for v in versions))


# ---- the flow -----------------------------------------------------------------------------------------


@flow(name="kaleido", log_prints=True)
def kaleido_flow(part: Part = "full", repo: str | None = None, version: str | None = None) -> dict[str, Any]:
    """Run the platform's steps; `part` picks curate (+ data version), train (+ register), evaluate (+ gate and
    promotion of `version`, default the newest) or all of them. Returns what happened, gate reasons included."""
    root = Path(repo or os.environ.get("KALEIDO_REPO") or Path.cwd()).resolve()
    params = _params(root)
    from kaleido.config.schema import params_hash

    uri, name = params.platform.mlflow_tracking_uri, params.platform.registered_model
    result: dict[str, Any] = {"repo": str(root), "part": part}
    from kaleido.platform.experiments import drift_warning

    drift = drift_warning(root)  # a `dvc exp run` left its params in the workspace: said, not done silently
    if drift:
        get_run_logger().warning(drift)
    if part in ("full", "curate", "train"):
        result["stats"] = curate(root)
        result["data_version"] = version_data(root)
    if part in ("full", "train"):
        metrics = train(root)
        export = str((root / metrics["export"]) if not Path(metrics["export"]).is_absolute() else metrics["export"])
        # the params the training ran with (export.json), not today's file
        trained = json.loads((root / TRAIN_OUTPUT / "export.json").read_text()).get("params_hash")
        version = register(uri, name, metrics["mlflow_run_id"], export, result["data_version"],
                           trained or params_hash(params), str(root / "dvc.lock"))
        result["version"] = version
        result["experiment"] = save_experiment(root, name, version)
    if part in ("full", "evaluate"):
        version = version or _latest_version(uri, name)
        result["version"] = version
        result["evaluation"] = evaluate(root, uri, name, version)
        decision = gate(root, name, version)
        result["gate"] = {"passed": decision.get("passed"), "reasons": decision.get("reasons")}
        result["promotion"] = promote(uri, name, version, decision)
        result["sample"] = generate_sample(root, uri, name)
        if not decision.get("passed"):
            print(f"{name} v{version} rejected by the gate: {json.dumps(decision.get('reasons'), indent=2)}")
    publish_summary(root, params, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("stats", "evaluation")}, indent=2, default=str))
    return result


def publish_summary(root: Path, params: Any, result: dict[str, Any]) -> None:
    """The run's summary table (kaleido.platform.summary) as the Prefect artifact `make run` prints last."""
    from kaleido.platform.summary import SUMMARY_KEY, run_summary, to_markdown, to_text
    from kaleido.registry import ModelRegistry

    uri, name = params.platform.mlflow_tracking_uri, params.platform.registered_model
    aliases = []
    if result.get("version") and uri:
        registry = ModelRegistry(uri, name)
        aliases = [alias for alias in ("champion", "previous") if registry.alias_version(alias) == result["version"]]
    rows = run_summary(root, result, params.platform.prefect_api_url.removesuffix("/api"), uri, aliases)
    create_markdown_artifact(to_markdown(rows), key=SUMMARY_KEY, description="the run's outcome in one table")
    print(to_text(rows))


if __name__ == "__main__":
    kaleido_flow(sys.argv[1] if len(sys.argv) > 1 else "full")  # type: ignore[arg-type]
