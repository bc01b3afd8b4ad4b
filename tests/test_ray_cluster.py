"""The data stages on a real multi-node Ray cluster, loopback only (tests/_ray_cluster.py, run once per session in
private network, PID and mount namespaces): results byte-identical to the local executor with the data root on the
S3 server, the stages as Ray jobs, a killed worker, a node without the shared root, GPU placement of the model
pools (fake device ids), pool actor restarts, and data.ray_address "local".

Needs `unshare --net` (root or user namespaces; CI runs as root); skipped with the reason where it is not allowed.
About 1.5-3 minutes on 2 cores (one cluster for every scenario)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

HARNESS = Path(__file__).with_name("_ray_cluster.py")
REPO = HARNESS.parents[1]


def _namespaces_allowed() -> str | None:
    """None when private network / PID / mount namespaces can be made here, else why not."""
    for tool in ("unshare", "ip", "ss"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c",
                            "ip link set lo up && mount -t tmpfs tmpfs /mnt"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`unshare --net --pid --mount-proc` is not permitted here: {probe.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the harness once: a head and a worker node (and, for one scenario, a third without the shared root)."""
    reason = _namespaces_allowed()
    if reason is not None:
        pytest.skip(f"no private namespaces for a loopback-only Ray cluster: {reason}")
    workdir = tmp_path_factory.mktemp("ray-cluster")
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}".rstrip(":")}
    done = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, str(HARNESS),
         str(workdir)], capture_output=True, text=True, env=env, timeout=900,
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RAY_CLUSTER_RESULT ")), None)
    assert line is not None, f"the harness printed no result (exit {done.returncode}):\n{done.stderr[-5000:]}"
    results = json.loads(line.removeprefix("RAY_CLUSTER_RESULT "))
    assert "error" not in results, results["error"]
    results["log"] = done.stderr
    return results


def _scenario(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    found = cluster[name]
    assert "error" not in found, found["error"]
    return found


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    return host in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]")


def test_every_ray_and_s3_listener_is_on_loopback(cluster: dict[str, Any]) -> None:
    for key in ("listeners", "listeners_with_isolated", "listeners_end"):
        listening = cluster[key]
        assert listening and all(_loopback(a) for a in listening), (key, listening)
    ports = {a.rsplit(":", 1)[1] for a in cluster["listeners"]}
    assert {"6391", "8291", "9323"} <= ports  # GCS, dashboard / job API, the S3 server
    assert len(cluster["nodes"]) == 2 and {n["ip"] for n in cluster["nodes"]} == {"127.0.0.1"}
    assert sorted(n["resources"].get("GPU", 0) for n in cluster["nodes"]) == [0, 2]


def test_stages_on_two_nodes_equal_the_local_executor_with_the_root_on_s3(cluster: dict[str, Any]) -> None:
    found = _scenario(cluster, "equal")
    local, ray = found["local"], found["ray"]
    assert local["hashes"] == ray["hashes"]  # every ingest, caption and curate shard, byte for byte
    assert local["pair"] == ray["pair"] and local["manifests"] == ray["manifests"]
    assert all(local["manifests"].values()) and json.loads(local["manifests"]["samples"].splitlines()[0])
    assert len(ray["nodes"]) == 2  # both nodes ran shards (the worker's staging folder is its own tmpfs)
    # the shard tasks called every model through its pool actors (one each: models on the CPU)
    pools = {p["key"]: p for p in found["pools"]}
    assert set(pools) == {"vlm", "grounding_dino", "sam", "clip", "flux_fill", "flux_redux"}
    assert all(p["actors"] == 1 and p["num_gpus"] == 0 for p in pools.values())
    served = {key: sum(sum(sizes) for actor in p["batches"] for sizes in actor.values()) for key, p in pools.items()}
    flux = ray["pairing"]["flux_calls"]
    assert served["flux_fill"] == flux["inpaint"] + flux["plate"] > 0 and served["flux_redux"] == flux["redux"]
    assert served["vlm"] == len(local["manifests"]["captions"].splitlines())
    assert served["grounding_dino"] == served["sam"] > 0 and served["clip"] > 0
    # a re-run: every shard skipped, no pool started (no model loaded for nothing), the same bytes
    assert found["rerun_pools"] == [] and found["rerun_same"]


def test_a_data_command_runs_as_a_ray_job_with_its_log_and_exit_status(cluster: dict[str, Any]) -> None:
    found = _scenario(cluster, "job")
    ingest, failing = found["runs"]["ingest"], found["runs"]["curate_too_early"]
    assert ingest["code"] == 0, ingest
    assert "submitted Ray job kaleido-ingest-" in ingest["stdout"]
    assert "ingest: 2 shards run" in ingest["stdout"]  # the job's own output, streamed back
    assert found["hashes"] == _scenario(cluster, "equal")["local"]["hashes"]["ingest"]
    assert failing["code"] != 0 and "run `kaleido caption` first" in failing["stdout"]
    assert "FAILED" in failing["stderr"] + failing["stdout"]


def test_a_worker_killed_mid_stage_costs_only_its_shard(cluster: dict[str, Any]) -> None:
    found = _scenario(cluster, "killed_worker")
    assert found["killed"]["title"].startswith("ray::run_shard_task")
    first = found["first"]
    failed = [name for name, status in first["statuses"].items() if status == "failed"]
    assert len(failed) == 1 and set(first["statuses"].values()) == {"done", "failed"}, first
    assert "died" in first["errors"][failed[0]] and "run the stage again" in first["raised"]
    assert found["rerun"] == {name: "done" if name in failed else "skipped" for name in first["statuses"]}
    assert found["hashes"] == _scenario(cluster, "equal")["local"]["hashes"]["ingest"]  # same bytes after all


def test_a_node_without_the_shared_root_fails_the_stage_loudly(cluster: dict[str, Any]) -> None:
    found = _scenario(cluster, "isolated_node")
    raised = found["raised"]
    assert raised is not None, f"the stage exited 0 with {found.get('clips')} clips"
    assert "does not see the data root" in raised and found["isolated_node"][:12] in raised
    assert "ReadWriteMany" in raised and "s3://" in raised  # the fix
    assert not found["manifest_exists"]  # nothing merged


def test_pool_actors_get_the_gpus_the_planner_gives_them(cluster: dict[str, Any]) -> None:
    found = _scenario(cluster, "gpu_placement")
    worker = found["worker_node"]
    for stage in ("curate", "pair"):
        use: dict[str, float] = {}
        for pool in found[stage].values():
            for actor in pool["actors"]:
                assert actor["node_id"] == worker  # the only node with GPUs
                device = actor["cuda_visible_devices"]
                assert device in ("0", "1") and actor["gpu_ids"] == [device]
                use[device] = use.get(device, 0) + pool["num_gpus"]
        assert all(total <= 1.0 + 1e-9 for total in use.values()), (stage, use)
    curate = found["curate"]
    assert {pool["num_gpus"] for pool in curate.values()} == {0.25}  # prod sizes: small models share a GPU
    assert sum(len(pool["actors"]) for pool in curate.values()) >= 5  # fractional actors packed on 2 GPUs
    fill, redux = found["pair"]["flux_fill"], found["pair"]["flux_redux"]
    assert fill["num_gpus"] == 1.0 and redux["num_gpus"] == 0.5
    assert fill["actors"][0]["cuda_visible_devices"] != redux["actors"][0]["cuda_visible_devices"]


def test_a_dead_pool_actor_is_restarted_or_fails_the_call_loudly(cluster: dict[str, Any]) -> None:
    found = _scenario(cluster, "actor_restart")
    assert found["before"] == found["after_kill"] and found["restarted_pid_differs"]
    assert found["dead_pool"].startswith("ModelUnavailable: the grounding_dino pool has no live actor")


def test_a_local_ray_started_by_the_command_matches_the_local_executor(cluster: dict[str, Any]) -> None:
    found = _scenario(cluster, "local_address")
    assert found["code"] == 0, found["stderr"]
    assert found["hashes"] == _scenario(cluster, "equal")["local"]["hashes"]["ingest"]
