"""A real multi-node Ray cluster on loopback only, and the scenarios tests/test_ray_cluster.py asserts on.

Run INSIDE private namespaces (the test does it once per session):

    unshare --net --pid --fork --mount-proc --kill-child python tests/_ray_cluster.py WORKDIR

Why a network namespace: Ray 2.60 ignores `ray start --node-ip-address=127.0.0.1` (services.resolve_ip_for_localhost
replaces loopback by the host's IP), so its services would listen on the host's interface. In a namespace whose only
interface is `lo`, Ray picks 127.0.0.1 and every listener is on loopback (checked here with `ss -ltnH`). The PID
namespace makes this process PID 1: when it ends, every process it started ends with it; nodes are also stopped by
process group (never `ray stop`: other people's Ray processes run on the same machine).

The cluster: a head (1 CPU, no GPU), a worker node (1 CPU, 2 fake GPUs: Ray hands out CUDA_VISIBLE_DEVICES from
logical ids, no GPU is touched) whose `WORKDIR/private` is a tmpfs of its own (its local staging folders are not the
driver's), and for scenario d a third node that does not see `WORKDIR/shared` (a tmpfs over it in a private mount
namespace). moto's S3 server runs in this process, on 127.0.0.1. Models: the stand-ins of kaleido.data.synthetic
through data.models.factory (VLM, detector, segmenter, CLIP, FLUX Fill and Redux), in pool actors on Ray.

Prints one line `RAY_CLUSTER_RESULT <json>`: the listeners, the nodes and each scenario's findings (or its error).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARK = "RAY_CLUSTER_RESULT "
SOURCES = ["raw/m-03.mp4", "raw/m-05.mp4", "raw/m-07.mp4", "raw/m-11.mp4"]
GCS_PORT, DASHBOARD_PORT = 6391, 8291
OVERRIDES: dict[str, Any] = {
    "data.workers": 1,
    "data.shards": 4,
    "data.dataset_shards": 2,
    "data.grounding.frames_per_clip": 1,
    "data.models.factory": "kaleido.data.synthetic:stand_in_model",
    "data.models.device": "cpu",
    "data.models.face": None,
    "data.models.flux_fill": "stand-in/flux_fill",  # set: inpaint and redux enabled (the factory builds them)
    "data.models.flux_redux": "stand-in/flux_redux",
    "data.models.flux_base": "stand-in/flux_base",
    "data.caption.captioner": "vlm",
    "data.caption.vlm": "stand-in/vlm",
    "data.filters": {"min_area": 0.0, "max_area": 1.0, "clip_min_score": -1.0, "min_sharpness": 0.0,
                     "min_brightness": 0.0, "max_brightness": 255.0},
    "data.ingest.clip_min_seconds": 1.0,
    "data.ingest.clip_max_seconds": 4.0,
    "data.ingest.fps": 16,
    "data.cluster.gpus": "auto",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raw_params(root: str, **overrides: Any) -> dict[str, Any]:
    from kaleido.config.schema import set_dotted

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["root"] = root
    for dotted, value in {**OVERRIDES, **overrides}.items():
        set_dotted(raw, dotted, value)
    return raw


def params_of(raw: dict[str, Any], base: Path) -> Any:
    from kaleido.config.schema import validate_params

    return validate_params(raw, base_dir=base)


# ---- the cluster ------------------------------------------------------------------------------------------------


class Cluster:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.nodes: dict[str, subprocess.Popen] = {}
        self.address = f"127.0.0.1:{GCS_PORT}"

    def start_node(self, name: str, args: list[str], private: Path | None = None) -> None:
        """`ray start ... --block` in its own process group; `private`: a tmpfs over that folder for this node only
        (a private mount namespace)."""
        ray_start = [str(BIN / "ray"), "start", *args, "--disable-usage-stats", "--block"]
        command = ray_start
        if private is not None:
            private.mkdir(parents=True, exist_ok=True)
            script = f"mount -t tmpfs tmpfs {private} && exec {subprocess.list2cmdline(ray_start)}"
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        out = (self.workdir / f"{name}.log").open("w")
        self.nodes[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def wait_nodes(self, count: int, timeout: float = 120) -> list[dict[str, Any]]:
        import ray

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = [n for n in ray.nodes() if n["Alive"]]
            if len(alive) >= count:
                return alive
            for name, process in self.nodes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"ray node {name} exited: {(self.workdir / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"{count} Ray nodes did not come up in {timeout} s")

    def stop(self, name: str) -> None:
        process = self.nodes.pop(name)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        for name in list(self.nodes)[::-1]:
            self.stop(name)


def listeners() -> list[str]:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    return sorted({line.split()[3] for line in out.splitlines() if line.strip()})


def node_ids() -> dict[str, str]:
    """{"head" | "worker" | "isolated": node id} from the nodes' resources."""
    import ray

    found = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        resources = node["Resources"]
        name = "isolated" if "isolated" in resources else "worker" if resources.get("GPU") else "head"
        found[name] = node["NodeID"]
    return found


# ---- the data stages ---------------------------------------------------------------------------------------------


def stage_hashes(result: Any) -> dict[str, str | None]:
    return {o.name: o.content_hash for o in result.outcomes}


def run_stages(params: Any) -> dict[str, Any]:
    """ingest, caption (stand-in VLM), curate + pair (stand-in detector ... FLUX); shard hashes and manifests."""
    from kaleido.data.pipeline import DataLayout, data_root, run_caption, run_curation, run_ingest

    reports = {"ingest": run_ingest(params, progress=False), "caption": run_caption(params, progress=False),
               "curate": run_curation(params, progress=False)}
    root = data_root(params)
    layout = DataLayout(root)
    paired = sorted((root / "pair").glob("shard-*.json"))
    return {
        "hashes": {stage: stage_hashes(report.result) for stage, report in reports.items()},
        "pair": {p.stem: json.loads(p.read_text())["content_hash"] for p in paired},
        "manifests": {name: path.read_text() for name, path in (
            ("clips", layout.clips_manifest), ("captions", layout.captions_manifest),
            ("instances", layout.instances_manifest), ("samples", layout.samples_manifest))},
        "pairing": json.loads((root / "pair" / "pairing.json").read_text()),
        "nodes": sorted({o.node for report in reports.values() for o in report.result.outcomes if o.node}),
    }


def upload_sources(workdir: Path, uri: str) -> None:
    from kaleido.data.synthetic import write_sources
    from kaleido.platform.storage import Remote

    local = workdir / "sources"
    if not local.is_dir():
        write_sources(local, SOURCES, shots=2, frames_per_shot=24)
    remote = Remote(uri)
    remote.ensure_bucket()
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        remote.upload(path, path.relative_to(local).as_posix())


class PoolRecorder:
    """Wraps kaleido.data.pools.model_pools in this driver: before a stage's pools go, the batches each actor ran
    are recorded (proof that the shard tasks called the models through the pools)."""

    def __init__(self) -> None:
        import kaleido.data.pools as pools

        self.modules, self.original, self.calls = (pools,), pools.model_pools, []

    def __enter__(self) -> list[dict[str, Any]]:
        from contextlib import contextmanager

        import ray

        original, calls = self.original, self.calls

        @contextmanager
        def recording(*args: Any, **kwargs: Any) -> Any:
            with original(*args, **kwargs) as pools:
                yield pools
                for key, pool in (pools or {}).items():
                    calls.append({"key": key, "actors": len(pool.actors), "num_gpus": pool.spec.num_gpus,
                                  "batches": [ray.get(a.batch_sizes.remote()) for a in pool.actors]})

        for module in self.modules:
            module.model_pools = recording
        return calls

    def __exit__(self, *exc: object) -> None:
        for module in self.modules:
            module.model_pools = self.original


def scenario_equal(ctx: dict[str, Any]) -> dict[str, Any]:
    """(a) the stages on the cluster, data root on S3, against the local executor (this process, 1 worker)."""
    workdir = ctx["workdir"]
    upload_sources(workdir, "s3://kaleido-ray/local")
    upload_sources(workdir, "s3://kaleido-ray/ray")
    local_raw = raw_params("s3://kaleido-ray/local", **{"data.staging": str(workdir / "staging-local")})
    started = time.monotonic()
    local = run_stages(params_of(local_raw, workdir))
    ctx["local"] = local
    log(f"a: local executor {time.monotonic() - started:.0f} s")
    ray_raw = raw_params("s3://kaleido-ray/ray", **{"data.staging": str(workdir / "private" / "staging-ray"),
                                                    "data.ray_address": ctx["address"]})
    started = time.monotonic()
    with PoolRecorder() as pools:
        on_ray = run_stages(params_of(ray_raw, workdir))
    log(f"a: on Ray {time.monotonic() - started:.0f} s")
    with PoolRecorder() as again:  # every shard finished: skipped, and no pool is started (no model loaded)
        rerun = run_stages(params_of(ray_raw, workdir))
    return {"local": local, "ray": on_ray, "pools": pools, "rerun_pools": again,
            "rerun_same": rerun["hashes"] == on_ray["hashes"] and rerun["manifests"] == on_ray["manifests"]}


def _killer(stage_dir: Path, found: dict[str, Any], stop: threading.Event) -> None:
    """Kill -9 the first Ray worker seen running a shard task (its title is ray::run_shard_task)."""
    while not stop.is_set():
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::run_shard_task") and list(stage_dir.glob(".shard-*.tmp")):
                os.kill(int(proc.name), signal.SIGKILL)
                found.update({"pid": int(proc.name), "title": title})
                return
        time.sleep(0.02)


def scenario_killed_worker(ctx: dict[str, Any]) -> dict[str, Any]:
    """(c) a Ray worker process killed mid-stage costs only its shard; a re-run redoes only it."""
    from kaleido.data.pipeline import run_ingest
    from kaleido.data.shards import StageFailed
    from kaleido.data.synthetic import write_sources

    root = ctx["workdir"] / "shared" / "c-root"
    write_sources(root, SOURCES, shots=2, frames_per_shot=24)
    params = params_of(raw_params(str(root), **{"data.ray_address": ctx["address"]}), ctx["workdir"])
    found: dict[str, Any] = {}
    stop = threading.Event()
    killer = threading.Thread(target=_killer, args=(root / "ingest", found, stop), daemon=True)
    killer.start()
    first: dict[str, Any] = {}
    try:
        run_ingest(params, progress=False)
        first["raised"] = None
    except StageFailed as exc:
        first = {"raised": str(exc), "statuses": {o.name: o.status for o in exc.result.outcomes},
                 "errors": {o.name: o.error for o in exc.result.failed}}
    finally:
        stop.set()
        killer.join()
    rerun = run_ingest(params, progress=False)
    return {"killed": found, "first": first, "rerun": {o.name: o.status for o in rerun.result.outcomes},
            "hashes": stage_hashes(rerun.result)}


def scenario_job(ctx: dict[str, Any]) -> dict[str, Any]:
    """(b) `kaleido ingest` with data.ray_submit: submitted as a Ray job, its log printed as it comes, the exit
    status the job's; then a command that fails on the cluster exits non-zero."""
    workdir = ctx["workdir"]
    upload_sources(workdir, "s3://kaleido-ray/job")
    raw = raw_params("s3://kaleido-ray/job", **{"data.staging": str(workdir / "staging-job"),
                                                "data.ray_address": "auto",
                                                "data.ray_submit": f"http://127.0.0.1:{DASHBOARD_PORT}"})
    params_file = workdir / "job" / "params.yaml"
    params_file.parent.mkdir(parents=True, exist_ok=True)
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "KALEIDO_PROGRESS": "lines"}
    runs = {}
    for name, argv in (("ingest", ["ingest", "--params", str(params_file), "--quiet"]),
                       ("curate_too_early", ["curate", "--params", str(params_file), "--quiet"])):
        started = time.monotonic()
        done = subprocess.run([str(BIN / "kaleido"), *argv], capture_output=True, text=True, env=env,
                              cwd=params_file.parent, timeout=240)
        runs[name] = {"code": done.returncode, "stdout": done.stdout[-6000:], "stderr": done.stderr[-3000:],
                      "seconds": round(time.monotonic() - started, 1)}
        log(f"b: kaleido {name} as a Ray job: exit {done.returncode} in {runs[name]['seconds']} s")
    from kaleido.platform.storage import Remote

    remote = Remote("s3://kaleido-ray/job")
    markers = {key.split("/")[1].removesuffix(".json"): json.loads(remote.read_bytes(key) or b"{}")["content_hash"]
               for key in sorted(remote.listing("ingest")) if key.endswith(".json") and "/shard-" in key}
    return {"runs": runs, "hashes": markers}


def scenario_isolated_node(ctx: dict[str, Any]) -> dict[str, Any]:
    """(d) a node that does not see the shared data root: the work forced onto it fails the stage with a clear
    error (before: exit 0 with the clips of the other nodes only)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from kaleido.data.pipeline import run_ingest
    from kaleido.data.shards import StageFailed
    from kaleido.data.synthetic import write_sources

    cluster: Cluster = ctx["cluster"]
    shared = ctx["workdir"] / "shared"
    cluster.start_node("isolated", ["--address", cluster.address, "--num-cpus", "1", "--num-gpus", "0",
                                    "--resources", json.dumps({"isolated": 1})], private=shared)
    cluster.wait_nodes(3)
    ids = node_ids()
    ctx["listeners_with_isolated"] = listeners()

    @ray.remote(num_cpus=1)
    class Blocker:  # holds a node's only CPU, so the shard tasks can only go to the isolated node
        def ready(self) -> bool:
            return True

    blockers = [Blocker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(ids[name], soft=False)).remote()
                for name in ("head", "worker")]
    ray.get([b.ready.remote() for b in blockers])
    root = shared / "d-root"
    write_sources(root, SOURCES, shots=1, frames_per_shot=20)
    params = params_of(raw_params(str(root), **{"data.ray_address": ctx["address"]}), ctx["workdir"])
    out: dict[str, Any] = {"isolated_node": ids["isolated"]}
    try:
        report = run_ingest(params, progress=False)
        out["raised"] = None
        out["clips"] = report.counts.get("clips")
    except StageFailed as exc:
        out["raised"] = str(exc)
        out["nodes"] = sorted({o.node or "" for o in exc.result.failed})
    out["manifest_exists"] = (root / "manifests" / "clips.jsonl").exists()
    for blocker in blockers:
        ray.kill(blocker)
    cluster.stop("isolated")
    return out


def scenario_gpu_placement(ctx: dict[str, Any]) -> dict[str, Any]:
    """(e) pool actors on the fake-GPU node get CUDA_VISIBLE_DEVICES as the planner's num_gpus says: prod's model
    sizes (published architectures), the stand-in models loaded, the cluster's 2 GPUs."""
    from kaleido.data.pools import model_pools

    prod = yaml.safe_load((REPO / "k8s" / "overlays" / "prod" / "params.yaml").read_text())
    from kaleido.config.schema import set_dotted

    for dotted, value in {"data.ray_address": ctx["address"], "data.cluster.gpus": "auto",
                          "data.models.factory": "kaleido.data.synthetic:stand_in_model",
                          "data.models.face": None, "data.root": str(ctx["workdir"] / "shared" / "e-root"),
                          "data.staging": None}.items():
        set_dotted(prod, dotted, value)
    params = params_of(prod, ctx["workdir"] / "prod")
    out = {}
    for stage, keys in (("curate", ["grounding_dino", "sam", "clip"]), ("pair", ["flux_fill", "flux_redux"])):
        with model_pools(params, keys, specs=list(range(8))) as pools:
            assert pools is not None
            out[stage] = {key: {"num_gpus": pool.spec.num_gpus, "actors": [
                {"cuda_visible_devices": info["cuda_visible_devices"], "gpu_ids": info["gpu_ids"],
                 "node_id": info["node_id"]} for info in pool.info]} for key, pool in pools.items()}
    out["worker_node"] = node_ids()["worker"]
    return out


def scenario_actor_restart(ctx: dict[str, Any]) -> dict[str, Any]:
    """(f) a pool actor that dies is restarted and the call retried; a pool whose actors stay dead fails the call
    with ModelUnavailable (the shard then fails), never a per-item rejection."""
    import numpy as np
    import ray

    from kaleido.data.models import ModelUnavailable
    from kaleido.data.pools import model_pools

    params = params_of(raw_params(str(ctx["workdir"] / "shared" / "f-root"),
                                  **{"data.ray_address": ctx["address"]}), ctx["workdir"])
    image = np.zeros((64, 96, 3), np.uint8)
    out: dict[str, Any] = {}
    with model_pools(params, ["grounding_dino"], specs=[0]) as pools:
        assert pools is not None
        pool = pools["grounding_dino"]
        proxy = pool.proxy()
        out["before"] = [d.box for d in proxy.detect(image, ["cat", "dog"])]
        pid = ray.get(pool.actors[0].ready.remote())["pid"]
        os.kill(pid, signal.SIGKILL)  # the actor's process dies (an OOM kill, a lost GPU)
        out["after_kill"] = [d.box for d in proxy.detect(image, ["cat", "dog"])]
        out["restarted_pid_differs"] = ray.get(pool.actors[0].ready.remote())["pid"] != pid
        ray.kill(pool.actors[0], no_restart=True)
        try:
            proxy.detect(image, ["cat"])
            out["dead_pool"] = None
        except ModelUnavailable as exc:
            out["dead_pool"] = f"ModelUnavailable: {exc}"
    return out


def scenario_local_address(ctx: dict[str, Any]) -> dict[str, Any]:
    """(g) data.ray_address "local" (a Ray started by the command itself): the same ingest as the local executor."""
    root = ctx["workdir"] / "shared" / "g-root"
    from kaleido.data.synthetic import write_sources

    write_sources(root, SOURCES, shots=2, frames_per_shot=24)
    raw = raw_params(str(root), **{"data.ray_address": "local", "data.workers": 2})
    script = ("import json, sys; from kaleido.config.schema import validate_params; "
              "from kaleido.data.pipeline import run_ingest; "
              "from pathlib import Path; "
              f"r = run_ingest(validate_params(json.loads(sys.argv[1]), base_dir=Path({str(root.parent)!r})), "
              "progress=False); print('HASHES ' + json.dumps({o.name: o.content_hash for o in r.result.outcomes}))")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(raw)], capture_output=True, text=True,
                          timeout=240)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("HASHES ")), None)
    return {"code": done.returncode, "hashes": json.loads(line[7:]) if line else None,
            "stderr": done.stderr[-2000:]}


SCENARIOS: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = [
    ("gpu_placement", scenario_gpu_placement),
    ("actor_restart", scenario_actor_restart),
    ("equal", scenario_equal),
    ("killed_worker", scenario_killed_worker),
    ("job", scenario_job),
    ("isolated_node", scenario_isolated_node),
    ("local_address", scenario_local_address),
]


def main(workdir: Path, only: set[str]) -> None:
    import logging
    import secrets

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per S3 request
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "shared").mkdir(exist_ok=True)
    (workdir / "private").mkdir(exist_ok=True)
    s3_port = 9323
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}".rstrip(":"),
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),  # Ray 2.60's head turns token auth on
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "kaleido-test",
        "AWS_SECRET_ACCESS_KEY": "kaleido-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
        "KALEIDO_CACHE": str(workdir / "cache"),
    }
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    server.start()
    cluster = Cluster(workdir, env)
    # a short path: Ray's Unix sockets live under its temp dir, and a socket path is limited to ~107 bytes
    ray_tmp = tempfile.mkdtemp(prefix="kray-", dir="/tmp")
    results: dict[str, Any] = {}
    started = time.monotonic()
    try:
        cluster.start_node("head", ["--head", "--port", str(GCS_PORT), "--dashboard-host", "127.0.0.1",
                                    "--dashboard-port", str(DASHBOARD_PORT), "--include-dashboard", "true",
                                    "--temp-dir", ray_tmp, "--num-cpus", "1", "--num-gpus", "0"])
        deadline = time.monotonic() + 120
        while subprocess.run([str(BIN / "ray"), "status", "--address", cluster.address], capture_output=True,
                             env=env).returncode != 0:
            if time.monotonic() > deadline or cluster.nodes["head"].poll() is not None:
                raise RuntimeError(f"the Ray head did not start: {(workdir / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
        cluster.start_node("worker", ["--address", cluster.address, "--num-cpus", "1", "--num-gpus", "2"],
                           private=workdir / "private")
        import ray

        ray.init(address=cluster.address, log_to_driver=False)
        nodes = cluster.wait_nodes(2)
        log(f"cluster up: {len(nodes)} nodes in {time.monotonic() - started:.0f} s")
        results["listeners"] = listeners()
        results["nodes"] = [{"id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
                            for n in nodes]
        ctx: dict[str, Any] = {"workdir": workdir, "cluster": cluster, "address": cluster.address}
        for name, scenario in SCENARIOS:
            if only and name not in only:
                continue
            begun = time.monotonic()
            try:
                results[name] = scenario(ctx)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            results[name]["seconds"] = round(time.monotonic() - begun, 1)
            log(f"scenario {name}: {results[name]['seconds']} s{' ERROR' if 'error' in results[name] else ''}")
        results["listeners_with_isolated"] = ctx.get("listeners_with_isolated", [])
        results["listeners_end"] = listeners()
    except Exception:
        results["error"] = traceback.format_exc()
    finally:
        results["seconds"] = round(time.monotonic() - started, 1)
        try:
            import ray

            ray.shutdown()
        except Exception:
            pass
        cluster.stop_all()
        server.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(MARK + json.dumps(results, default=str), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), set(sys.argv[2:]))
