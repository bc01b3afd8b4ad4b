"""Local services of the embedded default: an MLflow server, a Prefect server and a Prefect process worker.

Each service is a process group started in its own session, with its pid in <state>/pids/<name>.pid and its
output in <state>/logs/<name>.log; `start` waits until the service answers (or fails with the log's tail),
`stop` ends the group (SIGTERM, then SIGKILL). A service whose pid file names a live, healthy process is
reused, so `make run` twice does not start a second server. Everything binds to the loopback interface.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kaleido.config.schema import Params
from kaleido.platform.summary import SUMMARY_KEY, markdown_rows, to_text


class ServiceError(RuntimeError):
    """A service did not start, or a platform step failed; the message says which and where its log is."""


class TrackingUnavailable(ServiceError):
    """The MLflow tracking server a command needs does not answer, and it is not ours to start."""


def _bin(name: str) -> str:
    """A console script of this environment (next to the running Python), else from PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0): reap it if it is ours
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def flow_process_alive(pid: int) -> bool:
    """Whether `pid` is still a Prefect flow-run process (a process worker runs `python -m prefect.engine`); a pid
    the system gave to another program since counts as gone."""
    if not _alive(pid):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return True  # no /proc (not Linux): trust the pid
    return b"prefect" in command


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (OSError, ValueError):
        return False


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def tracking_problem(uri: str, timeout: float = 3.0) -> str | None:
    """Why the MLflow tracking URI cannot take records now, or None when it can.

    A file or database store (`./mlruns`, `sqlite:///...`) needs no server; an http(s) server must answer /health.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status == 200:
                return None
            return f"{url} answered {response.status}"
    except (OSError, ValueError) as exc:
        return f"{url}: {getattr(exc, 'reason', exc)}"


def is_embedded_tracking(params: Params, uri: str) -> bool:
    """`uri` is the embedded default's own server (platform.mlflow_tracking_uri on loopback): ours to start."""
    own = params.platform.mlflow_tracking_uri.strip().rstrip("/")
    return bool(own) and uri.strip().rstrip("/") == own and urlparse(own).hostname in LOOPBACK_HOSTS


def ensure_tracking_server(params: Params, uri: str | None = None, echo: Callable[[str], Any] = print) -> None:
    """Make sure the tracking server `uri` (default platform.mlflow_tracking_uri) answers before work starts.

    The embedded default's own server (platform.mlflow_tracking_uri on loopback) is started when it is down, as
    `kaleido platform up` starts it, and left running: a bare `dvc repro` or `kaleido train` on a fresh clone then
    records into the same store the MLflow UI shows; `kaleido platform down` stops it. Any other server is not
    ours to start: TrackingUnavailable names it and the ways out. An empty URI means "do not track".
    """
    uri = (params.platform.mlflow_tracking_uri if uri is None else uri).strip()
    if not uri:
        return
    problem = tracking_problem(uri)
    if problem is None:
        return
    if is_embedded_tracking(params, uri):
        service = Platform.from_params(params).service("mlflow")
        echo(f"MLflow does not answer at {uri}; starting the embedded server (log {service.log_file}) ...")
        service.start()
        echo(f"MLflow is up at {uri}; it keeps running for the UI (`kaleido platform down` stops it)")
        return
    raise TrackingUnavailable(
        f"the MLflow tracking server at {uri} does not answer ({problem}). Start it (the cluster: see "
        f"docs/operations.md; this machine: `kaleido platform up`), point platform.mlflow_tracking_uri or "
        f"$MLFLOW_TRACKING_URI at a running one, or set platform.mlflow_tracking_uri: \"\" to run without MLflow"
    )


@dataclass
class Service:
    name: str
    command: list[str]
    state_dir: Path
    health_url: str | None = None  # None: alive is healthy (the worker has no endpoint)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    start_timeout: float = 180.0

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "pids" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def healthy(self) -> bool:
        return self.pid() is not None and (self.health_url is None or http_ok(self.health_url))

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> int:
        """Start (or reuse) the service and wait until it answers; returns its pid."""
        pid = self.pid()
        if pid is not None and self.healthy():
            return pid
        if pid is not None:  # running but not answering: a stale or hung instance
            self.stop()
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("a") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(self.command)}\n")
            log.flush()
            process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.cwd, env={**os.environ, **self.env}, start_new_session=True,
            )  # fmt: skip
        self.pid_file.write_text(f"{process.pid}\n")
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise ServiceError(
                    f"{self.name} exited with code {process.returncode} while starting; log {self.log_file}:\n"
                    f"{self.log_tail()}"
                )
            if self.health_url is None or http_ok(self.health_url):
                return process.pid
            time.sleep(0.5)
        self.stop()
        raise ServiceError(
            f"{self.name} did not answer at {self.health_url} within {self.start_timeout:.0f} s; log {self.log_file}:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout: float = 20.0) -> bool:
        """Stop the service's process group; False when it was not running."""
        pid = self.pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            if not _alive(pid):
                return True
        return not _alive(pid)


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


@dataclass
class Platform:
    """The three local services of one checkout, and the end-to-end deployment run."""

    repo: Path
    state_dir: Path
    mlflow_uri: str
    prefect_api_url: str
    work_pool: str

    @classmethod
    def from_params(cls, params: Params) -> Platform:
        state = params.resolve(params.platform.state_dir)
        assert state is not None
        return cls(
            repo=params.base_dir, state_dir=state, mlflow_uri=params.platform.mlflow_tracking_uri,
            prefect_api_url=params.platform.prefect_api_url, work_pool=params.platform.work_pool,
        )  # fmt: skip

    @property
    def prefect_ui_url(self) -> str:
        return self.prefect_api_url.removesuffix("/api")

    def prefect_env(self) -> dict[str, str]:
        """Every Prefect call of this platform talks to its own server, with its home under the state folder."""
        return {
            "PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_HOME": str(self.state_dir / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "KALEIDO_REPO": str(self.repo),  # prefect.yaml's pull step: where flow runs work
            "KALEIDO_CACHE": str(self.state_dir / "cache"),  # registered versions and their assets, downloaded once
            # DVC stages call `kaleido`: this environment's scripts come first
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }

    def services(self) -> list[Service]:
        mlflow_host, mlflow_port = _host_port(self.mlflow_uri, 5000)
        prefect_host, prefect_port = _host_port(self.prefect_api_url, 4200)
        store = self.state_dir / "mlflow"
        store.mkdir(parents=True, exist_ok=True)
        mlflow = Service(
            "mlflow",
            [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
             "--artifacts-destination", str(store / "artifacts"), "--host", mlflow_host,
             "--port", str(mlflow_port), "--workers", "1"],
            self.state_dir, health_url=f"{self.mlflow_uri}/health", cwd=store,
            # no job-runner processes: tracking, the registry and the UI do not use them
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # fmt: skip
        prefect = Service(
            "prefect-server",
            [_bin("prefect"), "server", "start", "--host", prefect_host, "--port", str(prefect_port)],
            self.state_dir, health_url=f"{self.prefect_api_url}/health", env=self.prefect_env(),
        )  # fmt: skip
        worker = Service(
            "prefect-worker",
            [_bin("prefect"), "worker", "start", "--pool", self.work_pool, "--type", "process"],
            self.state_dir, env=self.prefect_env(), cwd=self.repo,
        )  # fmt: skip
        return [mlflow, prefect, worker]

    def service(self, name: str) -> Service:
        return next(s for s in self.services() if s.name == name)

    def prefect(self, *args: str, check: bool = True, timeout: float | None = 300) -> subprocess.CompletedProcess:
        """Run the prefect CLI against this platform's server."""
        result = subprocess.run(
            [_bin("prefect"), *args], cwd=self.repo, env={**os.environ, **self.prefect_env()},
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and result.returncode:
            output = f"{result.stdout}\n{result.stderr}"
            raise ServiceError(f"prefect {' '.join(args)} failed ({result.returncode}):\n{output}")
        return result

    def up(self) -> tuple[list[str], list[str]]:
        """Start the services that are not up yet. Returns (the names of those it started: the others were running
        and `kaleido platform run` leaves them running; the flow runs found RUNNING whose process is gone, now
        CRASHED)."""
        mlflow, server, worker = self.services()
        running = {service.name for service in (mlflow, server, worker) if service.healthy()}
        mlflow.start()
        server.start()
        crashed = self.mark_crashed_runs()
        # the pool must exist before its worker polls it; `create` fails harmlessly when it does
        self.prefect("--no-prompt", "work-pool", "create", self.work_pool, "--type", "process", check=False)
        worker.start()
        return [service.name for service in (mlflow, server, worker) if service.name not in running], crashed

    def mark_crashed_runs(self) -> list[str]:
        """Set Prefect's CRASHED state on this platform's flow runs (and their task runs) that are RUNNING,
        PENDING or CANCELLING although their process is gone (a killed `make run`, a killed worker): Prefect itself
        only learns of a crash from the process that crashed. Runs of other work pools, and runs whose process is
        not known (no infrastructure pid), are left alone. Returns `name (id)` of each run marked."""
        active = {"type": {"any_": ["RUNNING", "PENDING", "CANCELLING"]}}
        runs = self._api("/flow_runs/filter", {"flow_runs": {"state": active},
                                               "work_pools": {"name": {"any_": [self.work_pool]}}})
        marked = []
        for run in runs:
            pid = str(run.get("infrastructure_pid") or "")
            if not pid.isdigit() or flow_process_alive(int(pid)):
                continue
            why = f"its process (pid {pid}) is gone; marked CRASHED by `kaleido platform up`"
            state = {"type": "CRASHED", "name": "Crashed", "message": why}
            self._api(f"/flow_runs/{run['id']}/set_state", {"state": state, "force": True})
            tasks = self._api("/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}},
                                                    "task_runs": {"state": active}})
            for task in tasks:
                self._api(f"/task_runs/{task['id']}/set_state", {"state": state, "force": True})
            marked.append(f"{run['name']} ({run['id']})")
        return marked

    def describe_crashed(self, crashed: list[str]) -> str:
        if not crashed:
            return ""
        return (f"{len(crashed)} flow run(s) left RUNNING by a process that is gone, now CRASHED: "
                + ", ".join(crashed))

    def deploy(self) -> None:
        self.prefect("--no-prompt", "deploy", "--all")

    def down(self) -> dict[str, bool]:
        # worker first: it must not pick up runs from a server that is going away
        return {service.name: service.stop() for service in reversed(self.services())}

    def status(self) -> dict[str, Any]:
        return {
            service.name: {"pid": service.pid(), "healthy": service.healthy(), "log": str(service.log_file)}
            for service in self.services()
        } | {"prefect_ui": self.prefect_ui_url, "mlflow_ui": self.mlflow_uri}

    def describe(self) -> str:
        return (
            f"Prefect UI: {self.prefect_ui_url}   (flow runs, task runs, artifacts)\n"
            f"MLflow UI:  {self.mlflow_uri}   (runs; Models -> kaleido-s2v: versions and the champion alias)\n"
            f"logs:       {self.state_dir / 'logs'}"
        )

    def run_deployment(self, deployment: str = "full", keep: bool = False, echo: Callable[[str], Any] = print) -> int:
        """up, deploy, run `kaleido/<deployment>`; one progress line per task on screen, Prefect's own output and the
        flow run's log in <state_dir>/logs/run-<deployment>.log, then the run's summary table. Returns 0 when the
        flow run completed."""
        started = time.monotonic()
        ours: list[str] = []  # the services this run started: the only ones it stops
        try:
            from kaleido.platform.experiments import drift_warning

            drift = drift_warning(self.repo)
            if drift:
                echo(f"WARNING: {drift}")
            ours, crashed = self.up()
            echo(f"services up in {time.monotonic() - started:.0f} s\n{self.describe()}")
            if crashed:
                echo(self.describe_crashed(crashed))
            self.deploy()
            log = self.state_dir / "logs" / f"run-{deployment}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            created = self.prefect("deployment", "run", f"kaleido/{deployment}")
            log.write_text(created.stdout + created.stderr)
            match = re.search(r"UUID:\s*([0-9a-f-]{36})", created.stdout)
            if match is None:
                raise ServiceError(f"prefect deployment run printed no flow run id:\n{created.stdout[-2000:]}")
            flow_run = match.group(1)
            echo(f"flow run {flow_run}: one line per task below; Prefect's log: {log}")
            state = self._follow(flow_run, echo)
            with log.open("a") as handle:
                handle.write(self._flow_run_log(flow_run))
            summary = self._artifact(flow_run, SUMMARY_KEY)
            echo("")
            echo(to_text(markdown_rows(summary)) if summary else f"(no summary: the flow run ended {state})")
            if crashed:  # the summary says what this run found left behind
                echo(self.describe_crashed(crashed))
            echo(f"\nkaleido/{deployment}: {state} after {time.monotonic() - started:.0f} s (log: {log})")
            echo(self.closing_note(ours, keep))
            return 0 if state == "COMPLETED" else 1
        finally:
            if not keep:
                for service in reversed(self.services()):  # worker first, as in `down`
                    if service.name in ours:
                        service.stop()

    def closing_note(self, started: list[str], keep: bool) -> str:
        """The last lines of `kaleido platform run`: where the UIs are, and whether they still answer."""
        if keep or not started:
            who = "you started them" if not started else "--keep"
            return f"The services keep running ({who}); `kaleido platform down` stops them.\n{self.describe()}"
        others = [s.name for s in self.services() if s.name not in started]
        kept = f" ({', '.join(others)} keep running: you started them)" if others else ""
        return (f"Stopping the services this run started: {', '.join(started)}{kept}. To open the UIs above, start "
                "them again on the same stores with `.venv/bin/kaleido platform up` (`make run KEEP=1` leaves them "
                "running); `.venv/bin/kaleido platform down` stops them.")

    def _api(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """One Prefect REST call (GET without a body, POST with one) against this platform's server."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.prefect_api_url}{path}", data=data,
                                         method="POST" if data is not None else "GET",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def _follow(self, flow_run: str, echo: Callable[[str], Any], poll: float = 2.0) -> str:
        """Print each task run once when it finishes (name, state, seconds); return the flow run's final state."""
        terminal = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
        reported: set[str] = set()
        progress = _ProgressLines(self, flow_run)
        while True:
            for line in progress.new():  # a long task's progress, as its subprocess prints it
                echo(f"    {line}")
            state = self._api(f"/flow_runs/{flow_run}")["state"]["type"]
            tasks = self._api("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run]}},
                                                    "sort": "EXPECTED_START_TIME_ASC"})
            for task in tasks:
                kind = (task.get("state") or {}).get("type")
                if task["id"] in reported or kind not in terminal:
                    continue
                reported.add(task["id"])
                mark = {"COMPLETED": "ok"}.get(kind, kind)
                seconds = float(task.get("total_run_time") or 0.0)
                echo(f"  {task['name']:<28} {mark:<10} {seconds:6.0f} s")
            if state in terminal:
                return state
            time.sleep(poll)

    def _flow_run_log(self, flow_run: str) -> str:
        rows = self._api("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run]}}, "sort": "TIMESTAMP_ASC",
                                          "limit": 200})
        return "".join(f"{row.get('timestamp', '')} {row.get('message', '')}\n" for row in rows)

    def _artifact(self, flow_run: str, key: str) -> str | None:
        found = self._api("/artifacts/filter", {"artifacts": {"key": {"any_": [key]},
                                                              "flow_run_id": {"any_": [flow_run]}}})
        return str(found[-1]["data"]) if found else None


class _ProgressLines:
    """The progress lines (kaleido.platform.progress) of a flow run's log that were not shown yet."""

    def __init__(self, platform: Platform, flow_run: str) -> None:
        self.platform, self.flow_run = platform, flow_run
        self.after: str | None = None
        self.seen: set[str] = set()

    def new(self) -> list[str]:
        from kaleido.platform.progress import is_progress_line

        query: dict[str, Any] = {"flow_run_id": {"any_": [self.flow_run]}}
        if self.after:
            query["timestamp"] = {"after_": self.after}
        try:
            rows = self.platform._api("/logs/filter", {"logs": query, "sort": "TIMESTAMP_ASC", "limit": 200})
        except (OSError, ValueError):  # the screen's extra: a hiccup of the API must not end the watch
            return []
        lines = []
        for row in rows:
            if row.get("id") in self.seen:
                continue
            self.seen.add(row.get("id"))
            self.after = row.get("timestamp") or self.after
            message = str(row.get("message", ""))
            if is_progress_line(message):
                lines.append(message)
        return lines
