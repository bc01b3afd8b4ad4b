"""The Ray cluster the data stages run on (params.yaml `data.ray_address`): connect once, know its GPUs, run shards.

`data.ray_address`: "local" starts a Ray instance inside this process's machine (loopback only); "auto" joins
the cluster this process runs in (a Ray job's driver on a KubeRay head); anything else is a cluster address
(`host:6379`, or `ray://host:10001` for Ray Client).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kaleido.config.schema import Params


def connect(params: Params) -> Any:
    """`ray` connected to data.ray_address (a no-op when already connected); returns the module."""
    import ray

    if not ray.is_initialized():
        address = params.data.ray_address
        if address == "local":
            # the node on loopback: Ray binds to the host's interface unless its node IP is given
            ray.init(num_cpus=params.data.workers, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
        else:
            ray.init(address=address, log_to_driver=False)
    return ray


def cluster_gpus(params: Params) -> int:
    """GPUs the Ray cluster has now (its autoscaler may add more: KubeRay's maxReplicas is what --plan assumes)."""
    ray = connect(params)
    return int(ray.cluster_resources().get("GPU", 0))


# ---- shards as Ray tasks (kaleido.data.shards.run_shards with data.ray_address) --------------------------------

RUN_MARKER = ".ray-run-"  # <stage>/.ray-run-<nonce>: written by the driver, read by every task of that run
FIX_SHARED_ROOT = ("mount the data root at the same path on every Ray node (a ReadWriteMany volume: "
                   "k8s/overlays/prod/raycluster.yaml) or use an s3:// data.root")


def node_label() -> str:
    """This Ray worker's node: IP, node id (short) and host name (nodes on one machine share an IP)."""
    import socket

    import ray

    context = ray.get_runtime_context()
    return f"{ray.util.get_node_ip_address()} (node {context.get_node_id()[:12]}, host {socket.gethostname()})"


def root_problem(stage_dir: Path, params: Params, marker: str, nonce: str) -> str | None:
    """What keeps this process from the driver's data root, or None: a local root must show the run's marker file
    at the driver's path (a shared filesystem); an s3:// root must answer with the marker object."""
    from kaleido.data import shard_store

    root = stage_dir.parent
    relative = f"{stage_dir.name}/{marker}"
    if shard_store.remote_for(root) is not None or str(params.data.root).startswith("s3://"):
        shard_store.bind_params(root, params)
        uri = str(params.data.root)
        try:
            data = shard_store.remote_for(root).read_bytes(relative)
        except Exception as exc:  # credentials, endpoint, network: whatever the client says
            return (f"cannot read the data root {uri} ({type(exc).__name__}: {exc}); give every Ray node the "
                    "object-store endpoint and credentials (docs/operations.md, object-store credentials)")
        if data is None or data.decode(errors="replace") != nonce:
            return (f"does not see this run's marker {uri}/{relative} (another bucket or endpoint?); give every Ray "
                    "node the same object-store endpoint (AWS_ENDPOINT_URL) as the driver")
        return None
    path = stage_dir / marker
    try:
        seen = path.read_text()
    except OSError:
        seen = None
    if seen != nonce:
        return (f"does not see the data root {root}: {path}, written by the driver for this run, is "
                f"{'missing' if seen is None else 'another run'} here; {FIX_SHARED_ROOT}")
    return None


def run_shard_task(stage: str, spec: Any, fn: Any, params: Params, stage_dir: Path, expected: str,
                   proxies: dict[str, Any], marker: str, nonce: str) -> Any:
    """One shard as a Ray task: check the data root (`root_problem`), then run it with the stage's model pools
    installed (kaleido.data.models.shard_model answers with their proxies). Returns a ShardOutcome naming the node."""
    from kaleido.data.models import installed_pools
    from kaleido.data.shards import ShardOutcome, _execute_pinned

    node = node_label()
    problem = root_problem(stage_dir, params, marker, nonce)
    if problem is not None:
        return ShardOutcome(spec.name, "failed", error=f"node {node} {problem}", node=node)
    with installed_pools(proxies):
        outcome = _execute_pinned(stage, spec, fn, params, stage_dir, expected)
    outcome.node = node
    return outcome


def _visible(stage_dir: Path, name: str, content_hash: str | None) -> bool:
    """Whether the driver sees the finished shard `name` with this content hash: its folder or pack (a shared
    root), else its remote marker (an s3:// root; a stale local copy from an earlier run is dropped first, so
    nothing later reads it)."""
    from kaleido.data import shard_store

    shard_dir = stage_dir / name
    local = shard_store.folder_marker(shard_dir) or shard_store.read_pack_marker(shard_dir)
    if local is not None and local.get("content_hash") == content_hash:
        return True
    remote = shard_store.remote_for(stage_dir.parent)
    if remote is None:
        return False
    shard_store.drop_local_copy(shard_dir)
    found = shard_store.shard_marker(shard_dir)
    return found is not None and found.get("content_hash") == content_hash


def _task_error(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: the Ray worker running this shard died or was lost ({lines[-1] if lines else ''})"


def run_on_ray(stage: str, pending: Sequence[tuple[Any, str]], fn: Any, params: Params, stage_dir: Path,
               finished: Callable[[Any, Any], None], pools: Mapping[str, Any] | None = None) -> None:
    """Run the pending shards as Ray tasks (num_cpus 1, no GPU, no retry: a lost worker fails its shard only and a
    re-run redoes it). The driver writes this run's marker first (`root_problem`) and counts a shard done only
    when it sees its output (`_visible`)."""
    from kaleido.data import shard_store
    from kaleido.data.shards import ShardOutcome

    ray = connect(params)
    root = stage_dir.parent
    nonce = uuid.uuid4().hex
    marker = f"{RUN_MARKER}{nonce}"
    remote = shard_store.remote_for(root)
    if remote is not None:
        remote.write_bytes(f"{stage_dir.name}/{marker}", nonce.encode())
    else:
        (stage_dir / marker).write_text(nonce)
    proxies = {key: pool.proxy() for key, pool in (pools or {}).items()}
    task = ray.remote(num_cpus=1, num_gpus=0, max_retries=0)(run_shard_task)
    try:
        refs = {task.remote(stage, spec, fn, params, stage_dir, expected, proxies, marker, nonce): spec
                for spec, expected in pending}
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for ref in done:
                spec = refs[ref]
                try:
                    outcome = ray.get(ref)
                except Exception as exc:  # a crashed or lost Ray worker fails this shard only
                    outcome = ShardOutcome(spec.name, "failed", error=_task_error(exc))
                if outcome.status == "done" and not _visible(stage_dir, outcome.name, outcome.content_hash):
                    outcome = ShardOutcome(
                        spec.name, "failed", node=outcome.node,
                        error=f"{spec.name} finished on node {outcome.node}, but the driver does not see its output "
                              f"at {stage_dir / spec.name}; {FIX_SHARED_ROOT}")
                finished(spec, outcome)
    finally:
        if remote is not None:
            remote.remove([f"{stage_dir.name}/{marker}"])
        else:
            (stage_dir / marker).unlink(missing_ok=True)
