"""A bounded, self-stopping load test of `kaleido serve` on loopback: requests, refusals, latency and the server's
peak memory under a mix of good, oversized, bad and long requests from concurrent clients.

    .venv/bin/python benchmarks/serve_load.py [--clients 6] [--requests 150] [--seconds 120] [--json out.json]

It builds the tiny random-weight model as an MLflow Model folder (model_assets: copy, so no registry is needed),
starts `kaleido serve` on 127.0.0.1 with params.yaml's serve.* limits (timeout lowered to --timeout so that long
requests meet it), and sends --requests requests from --clients threads, stopping at whichever of --requests or
--seconds comes first; a client that gets 503 sends the same request again a second later. The mix (by request
index): good (9x64x96, 8 steps, one reference), the probe's frames=1000001, an unknown param, a NUL in the prompt,
and a long one (257 frames, 120 steps: under the cost limits, over the timeout). The server's resident memory (its
whole process tree) is sampled every 50 ms. Prints one JSON object: the final status per kind, the 503s answered
on the way, seconds to the final answer, idle and peak RSS. The stated bound: the peak stays within idle +
serve.concurrency x the memory the largest request the limits admit adds, measured first with one such request
alone on a server without the timeout (serve.max_tokens at the default size, 2 steps: memory does not grow with
steps). The servers run with MALLOC_ARENA_MAX=2, as the prod Deployment does: with glibc's default of 8 arenas per
core, the threads MLflow's app runs requests on kept ~130 MB more after the load (measured).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(seed: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def build_model(folder: Path, timeout: float, concurrency: int) -> tuple[Path, Path]:
    """(MLflow Model folder, params.yaml) of the tiny model with the repository's serve limits."""
    from kaleido.config import load_params
    from kaleido.model.tiny import build_tiny_assets
    from kaleido.serving import build_model as package

    assets = build_tiny_assets(folder / "assets", seed=0)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for part in ("checkpoint", "vae", "text_encoder", "tokenizer"):
        raw["model"][part] = str(assets / ("transformer" if part == "checkpoint" else part))
    raw["platform"]["model_assets"] = "copy"
    raw["serve"].update(timeout_s=timeout, concurrency=concurrency)
    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    return package(assets / "transformer", load_params(params), folder / "model"), params


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


REQUESTS = {  # kind -> (share out of 20, body builder)
    "good": 12, "frames=1000001": 3, "unknown param": 2, "NUL in prompt": 1, "long (timeout)": 2,
}


def body(kind: str, ref: str) -> dict:
    row = {"prompt": "a cat plays with a ball", "references": [ref]}
    return {
        "good": {"dataframe_records": [row], "params": {"steps": 8}},
        "frames=1000001": {"dataframe_records": [row], "params": {"frames": 1000001}},
        "unknown param": {"dataframe_records": [row], "params": {"num_inference_steps": 30}},
        "NUL in prompt": {"dataframe_records": [{**row, "prompt": "a\u0000cat"}]},
        "long (timeout)": {"dataframe_records": [row], "params": {"steps": 120, "frames": 257}},
    }[kind]


def post(port: int, payload: dict, timeout: float) -> tuple[int, float, str]:
    data = json.dumps(payload).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status, time.perf_counter() - started, ""
    except urllib.error.HTTPError as error:
        return error.code, time.perf_counter() - started, json.loads(error.read()).get("message", "")[:80]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=120.0, help="stop sending after this long")
    parser.add_argument("--timeout", type=float, default=10.0, help="serve.timeout_s of the server")
    parser.add_argument("--concurrency", type=int, default=1, help="serve.concurrency of the server")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kaleido-serve-load-"))
    servers: list[subprocess.Popen] = []

    def start(params: Path, name: str) -> tuple[subprocess.Popen, int]:
        port = _free_port()
        log = (work / f"{name}.log").open("w")
        server = subprocess.Popen([str(Path(sys.executable).with_name("kaleido")), "serve", "--model", str(model),
                                   "--params", str(params), "--port", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "KALEIDO_CACHE": str(work / "cache"),
                                       "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")})  # fmt: skip
        servers.append(server)
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    return server, port
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((work / f"{name}.log").read_text()[-3000:]) from None
                time.sleep(0.3)

    try:
        model, params = build_model(work, args.timeout, args.concurrency)
        ref = _png(0)

        def measured(server: subprocess.Popen, run: Callable[[], Any]) -> tuple[Any, int]:
            """run() while sampling the server's memory every 50 ms; (its result, peak bytes)."""
            peak, done = [tree_rss(server.pid)], threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], tree_rss(server.pid))
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                return run(), peak[0]
            finally:
                done.set()
                sampler.join()

        # 1. the bound: the largest request the limits admit, alone, to the end (a server of its own without the
        # timeout; frames from serve.max_tokens at the default size, 2 steps: memory does not grow with steps)
        from kaleido.config import load_params
        from kaleido.request_limits import RequestCost

        loaded = load_params(params)
        g, limit = loaded.generate, loaded.serve.max_tokens
        per_frame = RequestCost(1, g.height, g.width, 1, 0, False).tokens_per_frame
        frames = 4 * (limit // per_frame - 2) + 1  # latent frames + the one reference within max_tokens
        largest = RequestCost(frames, g.height, g.width, 2, 1, True)
        patient = work / "patient.yaml"
        raw = yaml.safe_load(params.read_text())
        raw["serve"]["timeout_s"] = 3600
        patient.write_text(yaml.safe_dump(raw))
        server, port = start(patient, "bound")
        post(port, body("good", ref), 120)  # warm: the first generation allocates what the next ones reuse
        alone_idle = tree_rss(server.pid)
        (alone_status, alone_seconds, _), alone_peak = measured(server, lambda: post(port, {
            "dataframe_records": [{"prompt": "a cat", "references": [ref]}],
            "params": {"frames": frames, "steps": 2}}, 3600))  # fmt: skip
        os.killpg(server.pid, 15)
        server.wait(timeout=30)

        # 2. the load, on a server with serve.timeout_s = --timeout
        server, port = start(params, "serve")
        post(port, body("good", ref), 120)
        idle = tree_rss(server.pid)
        bound = idle + args.concurrency * max(alone_peak - alone_idle, 0)

        # every client sends its request again after a 503 (as Retry-After asks, at most 1 s later)
        kinds = [kind for kind, share in REQUESTS.items() for _ in range(share)]
        results: list[tuple[str, int, float, int]] = []  # kind, final status, seconds to it, 503s before it
        lock = threading.Lock()
        counter = iter(range(args.requests))
        stop_at = time.monotonic() + args.seconds

        def client() -> None:
            while time.monotonic() < stop_at:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                kind, busy, started = kinds[index % len(kinds)], 0, time.monotonic()
                while True:
                    status, _, _ = post(port, body(kind, ref), args.timeout + 60)
                    if status != 503 or time.monotonic() > stop_at:
                        break
                    busy += 1
                    time.sleep(1.0)
                with lock:
                    results.append((kind, status, time.monotonic() - started, busy))

        def load() -> float:
            started = time.monotonic()
            clients = [threading.Thread(target=client) for _ in range(args.clients)]
            for thread in clients:
                thread.start()
            for thread in clients:
                thread.join()
            return time.monotonic() - started

        elapsed, peak = measured(server, load)
        time.sleep(1.0)
        after = tree_rss(server.pid)
        counts: dict[str, dict[str, int]] = {}
        latency: dict[str, list[float]] = {}
        for kind, status, seconds, _ in results:
            counts.setdefault(kind, {}).setdefault(str(status), 0)
            counts[kind][str(status)] += 1
            latency.setdefault(str(status), []).append(seconds)
        said = (work / "serve.log").read_text()
        report = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"), "clients": args.clients, "requests": len(results),
            "answers_503": sum(busy for *_, busy in results), "seconds": round(elapsed, 1),
            "timeout_s": args.timeout, "concurrency": args.concurrency, "final_status": counts,
            "seconds_to_final_answer": {status: {"p50": round(float(np.percentile(v, 50)), 2),
                                                 "p95": round(float(np.percentile(v, 95)), 2),
                                                 "max": round(max(v), 2)}
                                        for status, v in sorted(latency.items())},
            "rss_mb": {"idle": round(idle / 2**20), "peak_under_load": round(peak / 2**20),
                       "after": round(after / 2**20),
                       "largest_admitted_adds": round((alone_peak - alone_idle) / 2**20),
                       "bound": round(bound / 2**20)},
            "largest_admitted": {"request": largest.describe(), "status": alone_status,
                                 "seconds": round(alone_seconds, 1)},
            "peak_within_bound": peak <= bound,
            "generations_stopped": said.count("the generation stopped"),
            "tracebacks_in_log": said.count("Traceback"),
        }
        print(json.dumps(report, indent=1))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
    finally:
        for server in servers:
            if server.poll() is None:
                os.killpg(server.pid, 15)
                server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
