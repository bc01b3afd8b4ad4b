"""The Kubernetes training launcher: manifests checked against the Kubernetes schemas offline, and the
create / watch / log / delete logic run against a stand-in of the Kubernetes API on loopback that answers
the REST paths the official client calls."""

from __future__ import annotations

import io
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
import pytest
import yaml

from kaleido.config import Params, load_params
from kaleido.train import launch_kubernetes as lk

K8S_VERSION = "1.34"  # schemas bundled with kubernetes-validate; the oldest cluster version we support
REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
NS = "kaleido"


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    raw["train"]["kubernetes"].update(
        nodes=2,
        gpus_per_node=8,
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        active_deadline_seconds=7200,
    )
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _validate(manifest: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(manifest, K8S_VERSION, strict=True) == K8S_VERSION


def test_manifests_validate_and_wire_torchrun(params_file: Path) -> None:
    params = load_params(params_file)
    manifests = lk.render_training_manifests(params, "pretrain", True, params_file, run_id="ab12")
    for manifest in manifests:
        _validate(manifest)
    config_map, service, job = manifests
    name = job["metadata"]["name"]
    assert re.fullmatch(r"kaleido-pretrain-[0-9a-f]{6}-ab12", name)
    assert service["metadata"]["name"] == name and config_map["data"]["params.yaml"] == params_file.read_text()

    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["activeDeadlineSeconds"] == 7200
    assert [r["action"] for r in spec["podFailurePolicy"]["rules"]] == ["Ignore", "FailJob"]
    pod = spec["template"]["spec"]
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == name
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()

    container = pod["containers"][0]
    args = container["args"]
    assert container["command"] == ["torchrun"]

    def arg(flag: str) -> str:
        return args[args.index(flag) + 1]

    assert (arg("--nnodes"), arg("--nproc_per_node"), arg("--node_rank")) == ("2", "8", "$(JOB_COMPLETION_INDEX)")
    assert arg("--master_addr") == f"{name}-0.{name}" and arg("--master_port") == "29500"
    assert args[args.index("-m") :] == [
        "-m", "kaleido.train.worker", "--params", "/config/params.yaml", "--stage", "pretrain", "--resume",
    ]  # fmt: skip
    env = {e["name"]: e for e in container["env"]}
    assert env["MASTER_ADDR"]["value"] == f"{name}-0.{name}"
    # $(JOB_COMPLETION_INDEX) in args expands only from a variable the container declares
    assert "fieldRef" in env["JOB_COMPLETION_INDEX"]["valueFrom"]
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-credentials", "key": key}

    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 1000
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory" and mounts["shm"] == "/dev/shm"
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "kaleido-checkpoints"
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "kaleido-data", "readOnly": True}
    assert [mounts[k] for k in ("checkpoints", "params", "data")] == ["/config", "/config/params.yaml", "/config/data"]
    assert volumes["params"]["configMap"]["name"] == config_map["metadata"]["name"]

    # the validator is strict: a misspelt field fails
    container["resource"] = container.pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(job)


def test_names_are_unique_per_run_and_dns_safe(params_file: Path) -> None:
    params = load_params(params_file)
    names = {lk.render_training_manifests(params, "sft", False, params_file)[2]["metadata"]["name"] for _ in range(5)}
    assert len(names) == 5
    with pytest.raises(ValueError, match="lower-case"):
        lk.render_training_manifests(params, "Pre_Train", False, params_file)


def test_cpu_only_pods_have_no_gpu_limit(params_file: Path) -> None:
    params = load_params(params_file)
    params.train.kubernetes.gpus_per_node = 0
    job = lk.render_training_manifests(params, "sft", False, params_file)[2]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert container["args"][container["args"].index("--nproc_per_node") + 1] == "1"
    _validate(job)


def test_dry_run_prints_multi_document_yaml(params_file: Path) -> None:
    out = io.StringIO()
    code = lk.launch_kubernetes(load_params(params_file), "sft", False, True, params_file, out=out)
    docs = list(yaml.safe_load_all(out.getvalue()))
    assert code == 0 and [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    assert docs[0]["data"]["params.yaml"] == params_file.read_text()
    for doc in docs:
        _validate(doc)


# ---------------------------------------------------------------------------------------------------------
# Kubernetes API stand-in


@dataclass
class Scenario:
    """What the cluster reports on the n-th read of the Job: its status and its pods."""

    steps: Callable[[str, int], tuple[dict[str, Any], list[dict[str, Any]]]]
    logs: dict[int, str] = field(default_factory=dict)
    events: Callable[[str], list[dict[str, Any]]] = lambda name: []
    unavailable: int = 0  # the first reads of the Job answer 503


@dataclass
class StandIn:
    scenario: Scenario
    requests: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    job_reads: int = 0
    job: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


_COLLECTION = re.compile(
    r"/(?:api/v1|apis/batch/v1)/namespaces/(?P<ns>[^/]+)/(?P<kind>jobs|services|configmaps|pods|events)"
)


def _handler(state: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self) -> tuple[str, str, str | None, str | None, dict[str, list[str]]]:
            url = urlsplit(self.path)
            match = _COLLECTION.match(url.path)
            assert match and match["ns"] == NS, self.path
            rest = url.path[match.end() :].strip("/").split("/") if url.path[match.end() :] else []
            name = rest[0] if rest else None
            sub = rest[1] if len(rest) > 1 else None
            return match["kind"], url.path, name, sub, parse_qs(url.query)

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length)) if length else {}

        def do_POST(self) -> None:
            kind, path, _, _, _ = self._route()
            body = self._body()
            with state.lock:
                state.requests.append(("POST", path, body))
                body["metadata"]["uid"] = str(uuid.uuid4())
                state.objects[(kind, body["metadata"]["name"])] = body
                if kind == "jobs":
                    state.job = body["metadata"]["name"]
            self._send(201, body)

        def do_DELETE(self) -> None:
            kind, path, name, _, query = self._route()
            body = {**self._body(), **{key: values[0] for key, values in query.items()}}
            with state.lock:
                state.requests.append(("DELETE", path, body))
                found = state.objects.pop((kind, name or ""), None)
                if found is not None and body.get("propagationPolicy") in ("Background", "Foreground"):
                    # the garbage collector: dependents (ownerReferences to this uid) go with their owner
                    uid = found["metadata"]["uid"]
                    for key, obj in list(state.objects.items()):
                        if any(ref["uid"] == uid for ref in obj["metadata"].get("ownerReferences", [])):
                            del state.objects[key]
            if found is None:
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})
            elif kind == "services":  # the API answers a Service DELETE with the deleted object
                self._send(200, found)
            else:
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        def do_GET(self) -> None:
            kind, path, name, sub, query = self._route()
            with state.lock:
                state.requests.append(("GET", path, {k: v[0] for k, v in query.items()}))
                job_name = state.job
                reads = state.job_reads
            if kind == "jobs" and state.scenario.unavailable:
                state.scenario.unavailable -= 1
                self._send(503, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503})
            elif kind == "jobs":
                status, _ = state.scenario.steps(job_name, reads)
                with state.lock:
                    state.job_reads += 1
                self._send(200, {**state.objects[("jobs", name or "")], "status": status})
            elif kind == "pods" and sub == "log":
                assert query == {"container": ["trainer"], "follow": ["true"]}, query
                rank = int(name.split("-")[-2])  # pod names are <job>-<index>-<suffix>
                self._send(200, state.scenario.logs.get(rank, "").encode(), "text/plain")
            elif kind == "pods":
                _, pods = state.scenario.steps(job_name, max(reads - 1, 0))
                selected = query.get("labelSelector") == [f"app.kubernetes.io/instance={job_name}"]
                items = pods if selected else []
                self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
            elif kind == "events":
                items = state.scenario.events(job_name)
                self._send(200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items})
            else:
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})

    return Handler


@pytest.fixture
def cluster() -> Iterator[Callable[[Scenario], tuple[StandIn, Any]]]:
    from kubernetes import client

    servers: list[ThreadingHTTPServer] = []
    clients: list[Any] = []

    def start(scenario: Scenario) -> tuple[StandIn, Any]:
        state = StandIn(scenario)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        api = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}"))
        clients.append(api)
        return state, api

    yield start
    for api in clients:
        api.close()
    for server in servers:
        server.shutdown()
        server.server_close()


def _pod(job: str, rank: int, state: dict[str, Any], phase: str, **status: Any) -> dict[str, Any]:
    container = {"name": "trainer", "image": "kaleido:0.1.0", "imageID": "", "ready": phase == "Running"}
    return {
        "metadata": {
            "name": f"{job}-{rank}-x{rank}z9q",
            "namespace": NS,
            "labels": {"app.kubernetes.io/instance": job},
            "annotations": {"batch.kubernetes.io/job-completion-index": str(rank)},
        },
        "status": {"phase": phase, "containerStatuses": [{**container, "restartCount": 0, "state": state}], **status},
    }


RUNNING = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}


def _exited(code: int, reason: str, at: str) -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "reason": reason, "finishedAt": at}}


def _success(job: str, n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if n == 0:  # rank 1 waits for a GPU node
        unschedulable = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        }
        pending = _pod(job, 1, {"waiting": {"reason": "ContainerCreating"}}, "Pending", conditions=[unschedulable])
        return {"active": 2}, [_pod(job, 0, RUNNING, "Running"), pending]
    if n == 1:
        return {"active": 2}, [_pod(job, r, RUNNING, "Running") for r in (0, 1)]
    done = {"type": "Complete", "status": "True"}
    pods = [_pod(job, r, _exited(0, "Completed", "2026-01-01T01:00:00Z"), "Succeeded") for r in (0, 1)]
    return {"succeeded": 2, "conditions": [done]}, pods


def _oom(job: str, n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if n == 0:
        return {"active": 2}, [_pod(job, r, RUNNING, "Running") for r in (0, 1)]
    failed = {
        "type": "Failed",
        "status": "True",
        "reason": "PodFailurePolicy",
        "message": f"Container trainer for pod {NS}/{job}-1-x1z9q failed with exit code 137 matching FailJob rule",
    }
    pods = [
        _pod(job, 0, _exited(1, "Error", "2026-01-01T00:10:07Z"), "Failed"),
        _pod(job, 1, _exited(137, "OOMKilled", "2026-01-01T00:10:00Z"), "Failed"),
    ]
    return {"failed": 2, "conditions": [failed]}, pods


def _image_pull(job: str, n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    waiting = {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "kaleido:0.1.0"'}}
    return {"active": 2}, [_pod(job, r, waiting, "Pending") for r in (0, 1)]


def _warning(job: str) -> list[dict[str, Any]]:
    return [
        {
            "metadata": {"name": "e1", "namespace": NS},
            "involvedObject": {"kind": "Pod", "name": f"{job}-1-x1z9q", "namespace": NS},
            "type": "Warning",
            "reason": "OOMKilling",
            "message": "Memory cgroup out of memory: Killed process 4242 (python)",
        },
        {
            "metadata": {"name": "e2", "namespace": NS},
            "involvedObject": {"kind": "Pod", "name": "someone-else", "namespace": NS},
            "type": "Warning",
            "reason": "BackOff",
            "message": "unrelated",
        },
    ]


def _launch(params: Params, path: Path, api: Any, **kwargs: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = lk.launch_kubernetes(
        params, "pretrain", False, False, path, api_client=api, poll_seconds=0.01, out=out, err=err, **kwargs
    )
    return code, out.getvalue(), err.getvalue()


def _deleted(state: StandIn) -> list[str]:
    return [path for method, path, _ in state.requests if method == "DELETE"]


def test_success_streams_logs_and_cleans_up(params_file: Path, cluster: Any) -> None:
    logs = {0: "rank0 step 1 loss 0.50\nrank0 step 2 loss 0.40\n", 1: "rank1 ready"}
    state, api = cluster(Scenario(_success, logs, unavailable=2))
    code, out, err = _launch(load_params(params_file), params_file, api)
    assert code == 0, err
    job = state.job
    assert "Kubernetes API unavailable (503); retrying (2/12)" in err
    assert "[0] rank0 step 1 loss 0.50\n[0] rank0 step 2 loss 0.40\n" in out and "[1] rank1 ready\n" in out
    assert "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in err
    assert f"job/{job} succeeded" in err

    posts = {path.rsplit("/", 1)[1]: body for method, path, body in state.requests if method == "POST"}
    assert list(posts) == ["jobs", "services", "configmaps"]  # the Job first: the others name it their owner
    _validate(posts["jobs"])
    for kind in ("services", "configmaps"):
        (owner,) = posts[kind]["metadata"]["ownerReferences"]
        assert owner["kind"] == "Job" and owner["name"] == job and owner["uid"]
    # only the Job: its Service and ConfigMap go with it (owner references), so the flow's service account needs no
    # delete right on Services or ConfigMaps (k8s/base/flow-runner.yaml)
    assert _deleted(state) == [f"/apis/batch/v1/namespaces/{NS}/jobs/{job}"]
    delete_job = next(body for method, path, body in state.requests if method == "DELETE" and "/jobs/" in path)
    assert delete_job["propagationPolicy"] == "Background"
    assert not state.objects
    assert f"deleted job/{job}; its pods, service and params go with it" in err


def test_failed_pod_reports_reason_and_exit_code(params_file: Path, cluster: Any) -> None:
    state, api = cluster(Scenario(_oom, {0: "rank0 starting", 1: "rank1 starting"}, _warning))
    code, out, err = _launch(load_params(params_file), params_file, api)
    job = state.job
    assert code == 137  # the rank that died first, not the ones it took down
    assert f"error: training job/{job} failed" in err
    assert f"pod/{job}-1-x1z9q (node rank 1): container trainer OOMKilled (exit code 137)" in err
    assert "job: PodFailurePolicy" in err and "OOMKilling: Memory cgroup out of memory" in err
    assert "unrelated" not in err and "hint: raise train.kubernetes.memory" in err
    assert "[1] rank1 starting" in out
    assert len(_deleted(state)) == 1 and not state.objects


def test_image_pull_backoff_fails_fast(params_file: Path, cluster: Any) -> None:
    state, api = cluster(Scenario(_image_pull))
    code, _, err = _launch(load_params(params_file), params_file, api)
    assert code == 1
    assert 'container trainer ImagePullBackOff: Back-off pulling image "kaleido:0.1.0"' in err
    assert state.job_reads == 1 and len(_deleted(state)) == 1 and not state.objects


def test_keep_leaves_the_objects(params_file: Path, cluster: Any) -> None:
    state, api = cluster(Scenario(_success))
    code, _, err = _launch(load_params(params_file), params_file, api, keep=True)
    assert code == 0 and not _deleted(state)
    assert f"kept job/{state.job}" in err and len(state.objects) == 3


def test_ctrl_c_deletes_the_job(params_file: Path, cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lk, "time", SimpleNamespace(sleep=interrupt, monotonic=time.monotonic))
    state, api = cluster(Scenario(_success))
    code, _, err = _launch(load_params(params_file), params_file, api)
    assert code == 130 and "interrupted" in err
    assert len(_deleted(state)) == 1 and not state.objects


_CALL = re.compile(
    r"/(?:api/v1|apis/(?P<group>batch)/v1)/namespaces/[^/]+/(?P<resource>[a-z]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[a-z]+))?"
)


def _rbac_requests(state: StandIn) -> set[tuple[str, str, str]]:
    """(verb, API group, resource) of every call the launcher made, as RBAC authorizes them."""
    calls = set()
    for method, path, _ in state.requests:
        match = _CALL.fullmatch(path)
        assert match, path
        verb = {"POST": "create", "DELETE": "delete"}.get(method) or ("get" if match["name"] else "list")
        resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
        calls.add((verb, match["group"] or "", resource))
    return calls


def test_the_flow_role_grants_exactly_the_launchers_calls(params_file: Path, cluster: Any) -> None:
    """k8s/base/flow-runner.yaml's Role (flow-run pods launch training) allows every call of a run that succeeds and
    of one that fails (events are read then), and nothing else."""
    calls: set[tuple[str, str, str]] = set()
    for scenario in (Scenario(_success, {0: "rank0"}), Scenario(_oom, {1: "rank1"}, _warning)):
        state, api = cluster(scenario)
        _launch(load_params(params_file), params_file, api)
        calls |= _rbac_requests(state)
    manifests = yaml.safe_load_all((REPO_PARAMS.parent / "k8s" / "base" / "flow-runner.yaml").read_text())
    role = next(doc for doc in manifests if doc["kind"] == "Role")
    granted = {(verb, group, resource) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}  # fmt: skip
    assert calls == granted
    assert ("delete", "", "services") not in calls and ("delete", "", "configmaps") not in calls


def test_cli_dry_run_stdout_is_only_the_manifests(params_file: Path) -> None:
    """`kaleido train --dry-run > job.yaml && kubectl apply -f job.yaml`: stdout parses as YAML (DeepSpeed's
    accelerator warning and every note go to stderr), and -S overrides reach the ConfigMap the pods read."""
    import subprocess
    import sys

    command = [str(Path(sys.executable).with_name("kaleido")), "train", "--stage", "pretrain", "--dry-run",
               "--params", str(params_file), "-S", "train.launcher=kubernetes", "-S", "train.pretrain.global_batch=32"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=params_file.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"], result.stdout[:500]
    shipped = yaml.safe_load(docs[0]["data"]["params.yaml"])
    assert shipped["train"]["launcher"] == "kubernetes" and shipped["train"]["pretrain"]["global_batch"] == 32
    assert yaml.safe_load(params_file.read_text())["train"]["launcher"] == "local"  # the user's file is untouched
