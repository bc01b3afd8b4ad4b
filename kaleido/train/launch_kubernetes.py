"""Multi-node training on Kubernetes without an operator: an Indexed Job plus a headless Service.

Each of the Job's `nodes` pods runs `torchrun` with node rank = its completion index; the headless Service
gives every pod the DNS name `<job>-<index>.<service>`, so rank 0 is reachable at `<job>-0.<job>`.

Pod layout: the checkpoints PVC is mounted at /config (the folder of params.yaml), the run's params.yaml
is mounted over it from a ConfigMap, and the data PVC where `data.root` points. Relative paths in
params.yaml therefore resolve in the pod exactly as in the repository, and everything a run writes
next to params.yaml lands on the checkpoints PVC.
"""

from __future__ import annotations

import posixpath
import re
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from kaleido.config.schema import KubernetesConfig, Params, params_hash

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

POD_PARAMS_DIR = "/config"
POD_PARAMS = f"{POD_PARAMS_DIR}/params.yaml"
CONTAINER = "trainer"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
INSTANCE_LABEL = "app.kubernetes.io/instance"
_INDEX_FIELD = f"metadata.annotations['{INDEX_ANNOTATION}']"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Job names stay short: pod hostnames are `<job>-<index>` and must fit a 63-character DNS label.
_MAX_NAME = 52
# Waiting reasons that never clear by themselves: fail fast instead of waiting for a deadline.
_FATAL_WAITING = {"ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError"}
# Consecutive failed polls (API server restarts, 5xx, 429) before the launcher gives up on the run.
_MAX_POLL_FAILURES = 12
_HINTS = {
    "OOMKilled": "raise train.kubernetes.memory or lower train.micro_batch",
    "ImagePullBackOff": "check train.kubernetes.image and the cluster's pull access to it",
    "InvalidImageName": "check train.kubernetes.image",
    "CreateContainerConfigError": "a Secret or ConfigMap the pod reads is missing (docs/operations.md: secrets)",
    "Unschedulable": "no node fits: check nodes, gpus_per_node, node_selector and tolerations",
}


def run_name(params: Params, stage: str, run_id: str | None = None) -> str:
    """`kaleido-<stage>-<params hash>-<run id>`: DNS-safe, the same params show the same middle part."""
    run_id = run_id if run_id is not None else secrets.token_hex(2)
    name = f"kaleido-{stage}-{params_hash(params)[:6]}-{run_id}"
    if not _DNS_LABEL.fullmatch(name) or len(name) > _MAX_NAME:
        raise ValueError(
            f"stage {stage!r} / run id {run_id!r} give the Kubernetes name {name!r}; use lower-case letters, "
            f"digits and '-' (at most {_MAX_NAME} characters in all)"
        )
    return name


def _pod_path(path: Path) -> str:
    """Where a params.yaml path points inside the pod (relative paths resolve against /config)."""
    text = path.as_posix()
    return posixpath.normpath(text if text.startswith("/") else f"{POD_PARAMS_DIR}/{text}")


def render_training_manifests(
    params: Params, stage: str, resume: bool, params_path: Path, *, run_id: str | None = None,
    module: str = "kaleido.train.worker",
    apply_changes: bool = False,
) -> list[dict[str, Any]]:
    """The ConfigMap (params.yaml), headless Service and Indexed Job of one training run, in apply order.

    `run_id` makes the names unique per run (default: random); pass it to get reproducible names. `module`: what
    torchrun runs on every rank: the training worker, or `kaleido.train.encode_worker` (the latent cache encoded
    across the Job's GPUs, each rank a disjoint, resumable share of the shards).
    """
    k8s = params.train.kubernetes
    name = run_name(params, stage, run_id)
    params_text = Path(params_path).read_text()
    from kaleido.platform.storage import is_remote

    # an s3:// data root needs no volume: the pods read it through their staging folder (the data claim stays)
    data_path = _pod_path(Path("data-staging") if is_remote(params.data.root) else Path(params.data.root))
    if data_path in ("/", POD_PARAMS_DIR) or POD_PARAMS_DIR.startswith(data_path + "/"):
        raise ValueError(f"data.root={params.data.root} is {data_path} in the pod; it must be a folder of its own")

    labels = {
        "app.kubernetes.io/name": "kaleido",
        "app.kubernetes.io/component": "encode" if module.endswith("encode_worker") else "train",
        INSTANCE_LABEL: name,
        "app.kubernetes.io/managed-by": "kaleido",
        "kaleido/stage": stage,
    }
    meta = {"name": name, "namespace": k8s.namespace, "labels": labels}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**meta, "name": f"{name}-params"},
        # Immutable: the file a run started with is the file it keeps (and the kubelet stops watching it).
        "immutable": True,
        "data": {"params.yaml": params_text},
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "selector": {INSTANCE_LABEL: name},
            # Ranks look each other up while starting, before any pod reports Ready.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "torchrun", "port": k8s.master_port, "targetPort": k8s.master_port}],
        },
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            **meta,
            "annotations": {
                "kaleido/params-hash": params_hash(params),
                "kaleido/params-file": str(params_path),
                "kaleido/resume": str(resume).lower(),
            },
        },
        "spec": _job_spec(k8s, name, stage, resume, labels, data_path, module, apply_changes),
    }
    return [config_map, service, job]


def _job_spec(
    k8s: KubernetesConfig, name: str, stage: str, resume: bool, labels: dict[str, str], data_path: str,
    module: str = "kaleido.train.worker",
    apply_changes: bool = False,
) -> dict[str, Any]:
    master_addr = f"{name}-0.{name}"
    nproc = max(k8s.gpus_per_node, 1)
    args = [
        "--nnodes", str(k8s.nodes),
        "--nproc_per_node", str(nproc),
        "--node_rank", "$(JOB_COMPLETION_INDEX)",
        "--master_addr", master_addr,
        "--master_port", str(k8s.master_port),
        "-m", module,
        "--params", POD_PARAMS,
        "--stage", stage,
    ]  # fmt: skip
    if resume:
        args.append("--resume")
        if apply_changes:
            args.append("--apply-param-changes")

    def secret(key: str) -> dict[str, Any]:
        return {"name": key, "valueFrom": {"secretKeyRef": {"name": k8s.mlflow_secret, "key": key}}}

    env = [
        # Declared first (the Job controller would append it last) so that NODE_RANK below and the args
        # can reference $(JOB_COMPLETION_INDEX).
        {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": _INDEX_FIELD}}},
        {"name": "NODE_RANK", "value": "$(JOB_COMPLETION_INDEX)"},
        {"name": "NNODES", "value": str(k8s.nodes)},
        {"name": "NPROC_PER_NODE", "value": str(nproc)},
        {"name": "MASTER_ADDR", "value": master_addr},
        {"name": "MASTER_PORT", "value": str(k8s.master_port)},
        {"name": "KALEIDO_PARAMS", "value": POD_PARAMS},
        {"name": "KALEIDO_RUN", "value": name},
        {"name": "MLFLOW_TRACKING_URI", "value": k8s.mlflow_tracking_uri},
        secret("MLFLOW_TRACKING_USERNAME"),
        secret("MLFLOW_TRACKING_PASSWORD"),
        # The root filesystem is read-only: caches (torch, triton, DeepSpeed ops) go to /tmp.
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]  # fmt: skip
    quantities: dict[str, Any] = {"cpu": k8s.cpu, "memory": k8s.memory}
    if k8s.gpus_per_node:
        quantities["nvidia.com/gpu"] = str(k8s.gpus_per_node)  # the client types quantities as strings
    container = {
        "name": CONTAINER,
        "image": k8s.image,
        "imagePullPolicy": k8s.image_pull_policy,
        "command": ["torchrun"],
        "args": args,
        "workingDir": POD_PARAMS_DIR,
        "env": env,
        # s3:// data roots and latent caches: the bucket's credentials, by reference (absent Secret: none needed)
        "envFrom": [{"secretRef": {"name": k8s.object_store_secret, "optional": True}}],
        "ports": [{"name": "torchrun", "containerPort": k8s.master_port}],
        # requests == limits: Guaranteed QoS, the last class the kubelet evicts under memory pressure.
        "resources": {"requests": dict(quantities), "limits": dict(quantities)},
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "checkpoints", "mountPath": POD_PARAMS_DIR},
            {"name": "params", "mountPath": POD_PARAMS, "subPath": "params.yaml", "readOnly": True},
            {"name": "data", "mountPath": data_path, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # With the headless Service of the same name this gives each pod the DNS name <job>-<index>.<job>.
        "subdomain": name,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": k8s.run_as_user,
            "runAsGroup": k8s.run_as_user,
            "fsGroup": k8s.run_as_user,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": k8s.checkpoints_claim}},
            {"name": "params", "configMap": {"name": f"{name}-params"}},
            {"name": "data", "persistentVolumeClaim": {"claimName": k8s.data_claim, "readOnly": True}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}},
        ],
    }
    if k8s.node_selector:
        pod_spec["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in k8s.tolerations]
    if k8s.service_account:
        pod_spec["serviceAccountName"] = k8s.service_account
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": k8s.nodes,
        "parallelism": k8s.nodes,
        "backoffLimit": k8s.backoff_limit,
        "ttlSecondsAfterFinished": k8s.ttl_seconds_after_finished,
        "podFailurePolicy": {
            "rules": [
                # Preemption, node drain, eviction: not the code's fault, never counted against backoffLimit.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # A crashed rank leaves the others hanging in a collective: fail the whole Job now.
                {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn", "values": [0]}},
            ]
        },
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if k8s.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = k8s.active_deadline_seconds
    return spec


def launch_kubernetes(
    params: Params,
    stage: str,
    resume: bool,
    dry_run: bool,
    params_path: Path,
    *,
    keep: bool = False,
    api_client: ApiClient | None = None,
    poll_seconds: float = 5.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
    apply_changes: bool = False,
) -> int:
    """Run one training stage on the cluster and return its exit code (0: the Job succeeded).

    dry_run: print the manifests as multi-document YAML and touch no cluster. Otherwise create them,
    stream every pod's log (prefixed by node rank), report why a pod failed, and delete the run's
    objects at the end or on Ctrl-C unless `keep`. `api_client` defaults to the in-cluster config,
    else the kubeconfig.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    manifests = render_training_manifests(params, stage, resume, params_path, apply_changes=apply_changes)
    if dry_run:
        out.write(yaml.dump_all(manifests, Dumper=_BlockDumper, sort_keys=False))
        return 0
    if api_client is None:
        try:
            api_client = _default_api_client()
        except Exception as exc:  # ConfigException, or a broken kubeconfig file
            err.write(f"error: no Kubernetes credentials ({exc}); set KUBECONFIG or run inside the cluster\n")
            return 2
    return _TrainingRun(api_client, manifests, poll_seconds, keep, out, err).run()


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the params.yaml in the ConfigMap) as `|` blocks, readable in --dry-run output."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        return self.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_BlockDumper.add_representer(str, _BlockDumper.represent_str)


def _default_api_client() -> ApiClient:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class _TrainingRun:
    def __init__(
        self,
        api_client: ApiClient,
        manifests: list[dict[str, Any]],
        poll_seconds: float,
        keep: bool,
        out: TextIO,
        err: TextIO,
    ) -> None:
        from kubernetes import client

        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        by_kind = {m["kind"]: m for m in manifests}
        self.config_map, self.service, self.job = by_kind["ConfigMap"], by_kind["Service"], by_kind["Job"]
        self.name = self.job["metadata"]["name"]
        self.namespace = self.job["metadata"]["namespace"]
        self.poll_seconds = poll_seconds
        self.keep = keep
        self.out, self.err = out, err
        self.lock = threading.Lock()
        self.log_threads: dict[str, threading.Thread] = {}
        self.reported: set[str] = set()
        self.created: list[str] = []
        self.poll_failures = 0

    def say(self, message: str) -> None:
        with self.lock:
            self.err.write(f"{message}\n")
            self.err.flush()

    def run(self) -> int:
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            self._create()
            return self._watch()
        except KeyboardInterrupt:
            self.say(f"interrupted: stopping job/{self.name}")
            return 130
        except ApiException as exc:
            self.say(f"error: Kubernetes API: {exc.status} {exc.reason}: {_api_message(exc)}")
            return 1
        except HTTPError as exc:
            self.say(f"error: Kubernetes API unreachable: {exc}")
            return 1
        finally:
            self._finish()

    def _create(self) -> None:
        job = self.batch.create_namespaced_job(self.namespace, self.job)
        self.created.append("job")
        # Owned by the Job: when its TTL removes it (or the launcher dies first), these go with it.
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": self.name, "uid": job.metadata.uid}
        for kind, body, create in (
            ("service", self.service, self.core.create_namespaced_service),
            ("configmap", self.config_map, self.core.create_namespaced_config_map),
        ):
            create(self.namespace, {**body, "metadata": {**body["metadata"], "ownerReferences": [owner]}})
            self.created.append(kind)
        nodes = self.job["spec"]["completions"]
        self.say(f"created job/{self.name} ({nodes} pod(s)) and service/{self.name} in namespace {self.namespace}")

    def _poll(self) -> tuple[Any, list[Any]] | None:
        """The Job and its pods; None after a transient API error (a runs-for-days watch must outlive them)."""
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            job = self.batch.read_namespaced_job(self.name, self.namespace)
            selector = f"{INSTANCE_LABEL}={self.name}"
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        except (ApiException, HTTPError) as exc:
            status = getattr(exc, "status", None)
            self.poll_failures += 1
            if (status is not None and status < 500 and status != 429) or self.poll_failures > _MAX_POLL_FAILURES:
                raise
            tries = f"{self.poll_failures}/{_MAX_POLL_FAILURES}"
            self.say(f"Kubernetes API unavailable ({status or exc}); retrying ({tries})")
            return None
        self.poll_failures = 0
        return job, pods

    def _watch(self) -> int:
        while True:
            polled = self._poll()
            if polled is None:
                time.sleep(self.poll_seconds)
                continue
            job, pods = polled
            for pod in pods:
                self._follow_logs(pod)
                self._report_pending(pod)
            done = _finished(job)
            fatal = _fatal_waiting(pods)
            if done == "Complete":
                self._join_logs()
                self.say(f"job/{self.name} succeeded")
                return 0
            if done == "Failed" or fatal:
                self._join_logs()
                reasons, code = self._diagnose(job, pods)
                self.say(f"error: training job/{self.name} failed:\n  " + "\n  ".join(reasons))
                return code
            time.sleep(self.poll_seconds)

    def _follow_logs(self, pod: Any) -> None:
        name = pod.metadata.name
        started = any(
            s.name == CONTAINER and (s.state.running or s.state.terminated)
            for s in (pod.status.container_statuses or [])
        )
        if name in self.log_threads or not started:
            return
        rank = _rank(pod)
        thread = threading.Thread(target=self._stream_log, args=(name, rank), daemon=True)
        self.log_threads[name] = thread
        thread.start()

    def _stream_log(self, pod_name: str, rank: int) -> None:
        try:
            response = self.core.read_namespaced_pod_log(
                pod_name, self.namespace, container=CONTAINER, follow=True, _preload_content=False
            )
            pending = b""
            for chunk in response.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                self._print_lines(rank, lines)
            self._print_lines(rank, [pending] if pending else [])
            response.release_conn()
        except Exception as exc:  # a broken log stream must not stop the watch
            self.say(f"log of pod/{pod_name} ended early: {exc}")

    def _print_lines(self, rank: int, lines: list[bytes]) -> None:
        if not lines:
            return
        with self.lock:
            for line in lines:
                self.out.write(f"[{rank}] {line.decode(errors='replace')}\n")
            self.out.flush()

    def _join_logs(self) -> None:
        # The last lines (a traceback) matter most; a rank still being torn down may not end its stream.
        deadline = time.monotonic() + 15
        for thread in self.log_threads.values():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _report_pending(self, pod: Any) -> None:
        """Say once why a pod is not scheduled (not fatal: an autoscaler may still add a GPU node)."""
        for condition in pod.status.conditions or []:
            key = f"{pod.metadata.name}/{condition.reason}"
            if condition.type == "PodScheduled" and condition.status == "False" and key not in self.reported:
                self.reported.add(key)
                self.say(f"waiting: pod/{pod.metadata.name} is {condition.reason}: {condition.message}")

    def _diagnose(self, job: Any, pods: list[Any]) -> tuple[list[str], int]:
        """Why the run failed, and the exit code of the rank that died first (1 when none exited)."""
        reasons = [
            f"job: {c.reason}: {c.message}"
            for c in (job.status.conditions or [])
            if c.type == "Failed" and c.status == "True"
        ]
        first: tuple[Any, int] | None = None
        for pod in sorted(pods, key=_rank):
            rank = _rank(pod)
            where = f"pod/{pod.metadata.name} (node rank {rank})"
            if pod.status.reason:
                reasons.append(f"{where}: {pod.status.reason}: {pod.status.message or ''}".rstrip(": "))
            for status in pod.status.container_statuses or []:
                done, waiting = status.state.terminated, status.state.waiting
                if done and done.exit_code != 0:
                    detail = f": {done.message.strip()}" if done.message else ""
                    reasons.append(
                        f"{where}: container {status.name} {done.reason} (exit code {done.exit_code}){detail}"
                    )
                    when = done.finished_at
                    if first is None or (when is not None and (first[0] is None or when < first[0])):
                        first = (when, done.exit_code)
                if waiting and waiting.reason:
                    reasons.append(f"{where}: container {status.name} {waiting.reason}: {waiting.message or ''}")
            for condition in pod.status.conditions or []:
                if condition.type == "PodScheduled" and condition.status == "False":
                    reasons.append(f"{where}: {condition.reason}: {condition.message}")
        reasons += self._warning_events({self.name, *(p.metadata.name for p in pods)})
        hints = [f"hint: {hint}" for reason, hint in _HINTS.items() if any(f" {reason}" in r for r in reasons)]
        return (reasons or ["no reason reported (see kubectl describe job)"]) + hints, first[1] if first else 1

    def _warning_events(self, names: set[str]) -> list[str]:
        from kubernetes.client.rest import ApiException

        try:
            events = self.core.list_namespaced_event(self.namespace, field_selector="type=Warning").items
        except ApiException as exc:  # events are a bonus: RBAC may not allow reading them
            return [f"events not readable: {exc.status} {exc.reason}"]
        return [
            f"event {e.involved_object.kind.lower()}/{e.involved_object.name}: {e.reason}: {e.message}"
            for e in events
            if e.type == "Warning" and e.involved_object.name in names
        ]

    def _finish(self) -> None:
        if self.keep or not self.created:
            if self.created:
                self.say(
                    f"kept job/{self.name}; remove it with: kubectl -n {self.namespace} delete "
                    f"job,service,configmap -l {INSTANCE_LABEL}={self.name}"
                )
            return
        from kubernetes.client.rest import ApiException

        # Only the Job: the Service and the params ConfigMap name it as their owner, so the garbage collector
        # removes them with its pods (Background: the Job goes at once). The flow's service account therefore
        # needs no delete right on Services or ConfigMaps (k8s/base/flow-runner.yaml), which keeps `mlflow` and
        # `kaleido-params` out of its reach.
        try:
            self.batch.delete_namespaced_job(self.name, self.namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                self.say(f"could not delete job/{self.name}: {exc.status} {exc.reason}")
                return
        except Exception as exc:  # unreachable API: say so, and let the Job's TTL clean up
            self.say(f"could not delete job/{self.name}: {exc}")
            return
        self.say(f"deleted job/{self.name}; its pods, service and params go with it")


def _finished(job: Any) -> str | None:
    for condition in (job.status.conditions if job.status else None) or []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return condition.type
    return None


def _rank(pod: Any) -> int:
    """The pod's node rank (its completion index); -1 when the annotation is missing."""
    value = (pod.metadata.annotations or {}).get(INDEX_ANNOTATION, "")
    return int(value) if value.isdigit() else -1


def _fatal_waiting(pods: list[Any]) -> bool:
    return any(
        s.state.waiting and s.state.waiting.reason in _FATAL_WAITING
        for pod in pods
        for s in (pod.status.container_statuses or [])
    )


def _api_message(exc: Any) -> str:
    import json

    try:
        return json.loads(exc.body).get("message", exc.body)
    except (TypeError, ValueError):
        return str(exc.body)
