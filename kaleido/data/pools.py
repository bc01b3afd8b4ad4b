"""Per-model actor pools on Ray: each model loaded once per actor, on the GPU share the planner gives it.

When `data.ray_address` is set, a model stage (caption with a VLM, curate, pair) starts one pool of Ray actors per
model it uses (`model_pools`) before its shards and tears them down after them:
- an actor (`ModelActor`) builds its model once (kaleido.data.models.build_model, data.models.factory included), with
  `num_gpus` = the planner's per-actor share (kaleido.data.plan: 1 / actors per GPU, fractional for small models;
  Ray sets its CUDA_VISIBLE_DEVICES), `num_cpus` 0 (the shard tasks hold the CPUs); the actor counts are the
  planner's for the GPUs the run gets, capped by the shards that can call them at once. Models on the CPU (a
  CPU-only cluster, data.models.device cpu): num_gpus 0, one actor per model;
- requests are batched per model: the actor is async, gathers concurrent calls for up to `BATCH_WAIT_S` or
  `MAX_BATCH` items and runs them as one batch on its model thread (`Batcher`). CLIP scores a batch in one forward
  pass (ClipScorer.category_scores); Grounding DINO (per-image prompts), SAM (per-image embeddings and boxes), the
  face detector, FLUX (per-item masks, prompts and seeds) and the VLM run the items of a batch one by one: the batch
  then only saves the round trips;
- shard tasks (num_cpus 1, no GPU) call the models through proxies (`PoolProxy` subclasses) that implement the same
  protocols as the local models (kaleido.vision: Detector, Segmenter, CategoryScorer, FaceDetector, Inpainter,
  Variator; kaleido.data.caption.Captioner), so `curate_clip`, the pair stage's FLUX step and the captioner run the
  same code locally and on Ray. A proxy sends each call to the next actor of its pool;
- a model error (bad input) comes back as that exception and rejects the one item, as locally. A dead actor is
  restarted by Ray (`MAX_RESTARTS`, its calls retried `MAX_TASK_RETRIES` times); when an actor stays dead the call
  goes to the pool's other actors, and when none answers the proxy raises ModelUnavailable, which fails the shard
  (never a silent rejection).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kaleido.config.schema import Params
from kaleido.data.models import ModelUnavailable

log = logging.getLogger("kaleido.data")

MAX_BATCH = {"clip": 64}  # items per batch; other models: DEFAULT_BATCH
DEFAULT_BATCH = 8
BATCH_WAIT_S = 0.005  # how long a lone request waits for company
MAX_RESTARTS = 3  # Ray restarts a dead actor this often (it reloads its model)
MAX_TASK_RETRIES = 3  # a call that hit a dead actor is retried on the restarted one
BATCH_METHODS = {"category_score": "category_scores"}  # method -> the model's batch method, when it has one
METHODS = {"vlm": "caption", "grounding_dino": "detect", "sam": "segment", "clip": "category_score",
           "face": "frontal_face_score", "flux_fill": "inpaint", "flux_redux": "vary"}


@dataclass(frozen=True)
class PoolSpec:
    """One model's pool: how many actors, what each asks of Ray, how it batches."""

    key: str
    actors: int
    num_gpus: float
    max_batch: int
    wait_s: float = BATCH_WAIT_S


def pool_specs(params: Params, keys: Sequence[str], *, gpus: int, concurrency: int) -> list[PoolSpec]:
    """The pools of `keys` for a cluster of `gpus` GPUs whose shard tasks make at most `concurrency` calls at once.

    With models on the GPU: the planner's actors per pool and GPU share (kaleido.data.plan.plan_curation, layout
    "ray pools"), each pool capped at `concurrency` actors. On the CPU (device cpu, or auto without a GPU): one
    actor per model, no GPU. Raises CurationPlanError (from the planner) when the pools do not fit.
    """
    from kaleido.data.plan import check_launch, plan_curation

    device = params.data.models.device
    batch = {key: MAX_BATCH.get(key, DEFAULT_BATCH) for key in keys}
    if device == "cpu" or (device == "auto" and gpus == 0):
        return [PoolSpec(key, 1, 0.0, batch[key]) for key in keys]
    check_launch(params, stage="model pools", gpus=gpus)
    plan = {pool.key: pool for pool in plan_curation(params, gpus=gpus, layout="ray pools").pools}
    return [PoolSpec(key, max(1, min(plan[key].actors, concurrency)), plan[key].num_gpus, batch[key])
            for key in keys]


# ---- batching (plain asyncio: runs and is tested without Ray) ------------------------------------------------


class Batcher:
    """Gathers concurrent `submit` calls into batches of at most `max_batch`, waiting at most `wait_s` for a batch
    to fill, and runs each batch through `run_batch(items) -> results` (one result or exception per item, in
    order) on a single worker thread (the model's), so the event loop keeps accepting requests meanwhile."""

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch: int, wait_s: float) -> None:
        self.run_batch, self.max_batch, self.wait_s = run_batch, max(1, max_batch), wait_s
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batches: list[int] = []  # size of every batch run (for tests and logs)

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.wait_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            self.batches.append(len(batch))
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._thread, self.run_batch, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
        except Exception as exc:  # the batch as a whole failed: every caller gets the error
            results = [exc] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


def run_batch(model: Any, method: str, items: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
    """Run a batch of calls `(args, kwargs)` of `method` on `model`: through its batch method when it has one
    (BATCH_METHODS), else one by one; one result or exception per item."""
    batch_method = getattr(model, BATCH_METHODS.get(method, ""), None)
    if batch_method is not None and all(not kwargs for _, kwargs in items):
        try:
            return list(batch_method(*zip(*(args for args, _ in items), strict=True)))
        except Exception:  # fall back to one by one: each item gets its own result or error
            pass
    out: list[Any] = []
    for args, kwargs in items:
        try:
            out.append(getattr(model, method)(*args, **kwargs))
        except Exception as exc:
            out.append(exc)
    return out


# ---- the actor -----------------------------------------------------------------------------------------------


class ModelActor:
    """One model, loaded once; `call` queues a request into the method's Batcher. Decorated with ray.remote by
    `_actor_class` (Ray is imported only where pools are used)."""

    def __init__(self, key: str, params: Params, max_batch: int, wait_s: float) -> None:
        from kaleido.data.models import build_model

        self.key, self.max_batch, self.wait_s = key, max_batch, wait_s
        self._threads = _pin_threads()
        self.model = build_model(key, params.data, params)
        load = getattr(self.model, "load", None)  # a lazy model (the VLM) loads now: a failure shows at pool start
        if callable(load):
            load()
        self.batchers: dict[str, Batcher] = {}

    def ready(self) -> dict[str, Any]:
        """Where this actor runs and what it loaded (the proxies copy the model's name and caption source)."""
        import ray

        from kaleido.vision import describe

        context = ray.get_runtime_context()
        return {"key": self.key, "pid": os.getpid(), "node_id": context.get_node_id(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "gpu_ids": [str(i) for i in context.get_accelerator_ids().get("GPU", [])],
                "name": describe(self.model), "source": getattr(self.model, "source", None)}

    def batch_sizes(self) -> dict[str, list[int]]:
        return {method: list(batcher.batches) for method, batcher in self.batchers.items()}

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        batcher = self.batchers.get(method)
        if batcher is None:
            model = self.model
            batcher = self.batchers[method] = Batcher(lambda items: run_batch(model, method, items), self.max_batch,
                                                      self.wait_s)
        return await batcher.submit((args, kwargs))


def _pin_threads() -> Any:
    """The shard workers' thread set-up (kaleido.platform.workers.pinned_threads) for the actor's whole life: model
    floats on the CPU then match a local worker's."""
    from kaleido.platform.workers import pinned_threads

    threads = pinned_threads()
    threads.__enter__()
    return threads


# ---- the proxies a shard task calls ---------------------------------------------------------------------------


class PoolProxy:
    """Sends calls to a pool's actors (the next one each call); the model's own errors come back as they were."""

    def __init__(self, key: str, actors: Sequence[Any], info: dict[str, Any]) -> None:
        self.key, self.actors = key, list(actors)
        self.name = str(info.get("name") or key)
        self.source = info.get("source")
        self._next: int | None = None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray
        from ray.exceptions import RayActorError, RayError, RayTaskError

        errors = []
        if self._next is None:  # each task process starts at its own actor, then goes round
            self._next = os.getpid() % max(1, len(self.actors))
        start = self._next
        self._next += 1
        for attempt in range(len(self.actors)):
            actor = self.actors[(start + attempt) % len(self.actors)]
            try:
                return ray.get(actor.call.remote(method, args, kwargs))
            except RayTaskError as exc:  # the model raised: the same exception the local model would
                cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else None
                if cause is not None:
                    raise cause from None
                raise
            except RayActorError as exc:  # dead past its restarts (Ray retried the call already): try another
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            except RayError as exc:  # lost objects, Ray's own OOM killer...: not a model answer, never a rejection
                raise ModelUnavailable(f"the {self.key} pool's call failed in Ray ({type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0] if str(exc) else ''}); the shard fails and a "
                                       "re-run redoes it") from None
        raise ModelUnavailable(f"the {self.key} pool has no live actor ({len(self.actors)} tried: "
                               f"{'; '.join(errors)}); the shard fails and a re-run redoes it")


class DetectorProxy(PoolProxy):
    def detect(self, image: Any, terms: Sequence[str]) -> Any:
        return self._call("detect", image, list(terms))


class SegmenterProxy(PoolProxy):
    def segment(self, image: Any, boxes: Sequence[Any]) -> Any:
        return self._call("segment", image, list(boxes))


class ScorerProxy(PoolProxy):
    def category_score(self, image: Any, category: str) -> float:
        return self._call("category_score", image, category)


class FaceProxy(PoolProxy):
    def frontal_face_score(self, image: Any) -> float | None:
        return self._call("frontal_face_score", image)


class InpainterProxy(PoolProxy):
    def inpaint(self, image: Any, mask: Any, prompt: str, seed: int = 0) -> Any:
        return self._call("inpaint", image, mask, prompt, seed=seed)


class VariatorProxy(PoolProxy):
    def vary(self, image: Any, seed: int = 0) -> Any:
        return self._call("vary", image, seed=seed)


class CaptionerProxy(PoolProxy):
    def caption(self, clip: Any, frames: Any) -> str | None:
        return self._call("caption", clip, frames)


PROXIES: dict[str, type[PoolProxy]] = {
    "vlm": CaptionerProxy, "grounding_dino": DetectorProxy, "sam": SegmenterProxy, "clip": ScorerProxy,
    "face": FaceProxy, "flux_fill": InpainterProxy, "flux_redux": VariatorProxy,
}


# ---- the pools of a stage run --------------------------------------------------------------------------------


@dataclass
class Pool:
    spec: PoolSpec
    actors: list[Any]
    info: list[dict[str, Any]]

    def proxy(self) -> PoolProxy:
        return PROXIES[self.spec.key](self.spec.key, self.actors, self.info[0] if self.info else {})


def start_pool(ray: Any, spec: PoolSpec, params: Params) -> list[Any]:
    """Start the actors of one pool (not waiting for them to load)."""
    actor_class = ray.remote(ModelActor).options(
        num_cpus=0, num_gpus=spec.num_gpus, max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
        max_concurrency=1000,
    )
    return [actor_class.remote(spec.key, params, spec.max_batch, spec.wait_s) for _ in range(spec.actors)]


def _cluster_gpus(ray: Any, params: Params) -> int:
    configured = params.data.cluster.gpus
    return configured if isinstance(configured, int) else int(ray.cluster_resources().get("GPU", 0))


@contextmanager
def model_pools(params: Params, keys: Sequence[str], specs: Sequence[Any] = ()) -> Iterator[dict[str, Pool] | None]:
    """The actor pools of a stage run on Ray: started (and loaded) on entry, killed on exit; yields {key: Pool}, or
    None when the stage runs locally (no data.ray_address), uses no model or has no shard to run (`specs`)."""
    if not params.data.ray_address or not keys or not specs:
        yield None
        return
    from kaleido.data.ray_cluster import connect

    ray = connect(params)
    gpus = _cluster_gpus(ray, params)
    concurrency = max(1, min(len(specs), int(ray.cluster_resources().get("CPU", 1))))
    pools: dict[str, Pool] = {}
    try:
        for spec in pool_specs(params, keys, gpus=gpus, concurrency=concurrency):
            pools[spec.key] = Pool(spec, start_pool(ray, spec, params), [])
        _wait_ready(ray, pools)
        for pool in pools.values():
            devices = sorted({str(i.get("cuda_visible_devices")) for i in pool.info})
            print(f"pool {pool.spec.key}: {len(pool.actors)} actor(s) x {pool.spec.num_gpus:g} GPU "
                  f"({pool.info[0]['name']}), batches of up to {pool.spec.max_batch}; CUDA_VISIBLE_DEVICES "
                  f"{', '.join(devices)}", file=sys.stderr, flush=True)
        yield pools
    finally:
        for pool in pools.values():
            for actor in pool.actors:
                ray.kill(actor, no_restart=True)


def _wait_ready(ray: Any, pools: dict[str, Pool], report_every_s: float = 30.0) -> None:
    """Wait for every actor to load its model, saying what it waits for (a pool the cluster cannot place yet waits
    for the autoscaler: without the line it would look like a hang). An actor that fails to load raises."""
    waiting = {actor.ready.remote(): pool for pool in pools.values() for actor in pool.actors}
    started = time.monotonic()
    last = started
    while waiting:
        done, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=5.0)
        for ref in done:
            pool = waiting.pop(ref)
            try:
                pool.info.append(ray.get(ref))
            except Exception as exc:
                raise RuntimeError(f"the {pool.spec.key} pool's actor failed to load its model: {exc}") from None
        if waiting and time.monotonic() - last >= report_every_s:
            last = time.monotonic()
            keys = sorted({pool.spec.key for pool in waiting.values()})
            log.warning("waiting %.0f s for %d pool actor(s) of %s to start (cluster resources free: %s)",
                        last - started, len(waiting), ", ".join(keys), ray.available_resources())
