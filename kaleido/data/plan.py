"""The curation planner: GPU memory per model pool, actors per GPU, throughput, GPU-hours and wall time.

`kaleido curate --plan` prints it; every launch of a model stage (`kaleido caption` with a VLM, `kaleido curate`)
calls `check_launch` first and refuses a plan that does not fit the GPUs it will get, naming the changes that fit.

How a plan is made (each figure says where it comes from):
- Memory per actor = the pool's parameters (kaleido.data.footprint: meta-device builds) x bytes of its dtype
  + a working-memory allowance at its batch (activations, the CUDA context: ASSUMED, listed in WORKSPACE_GB; a GPU
  run checks them with `make gpu-check`).
- Actors per GPU = how many fit in `data.cluster.gpu_memory_gb` x 0.9 (allocator fragmentation), at most
  MAX_ACTORS_PER_GPU; a Ray actor asks for `num_gpus` = 1 / that.
- Seconds per call on one H100: PUBLIC figures where there are some (FLUX, SAM-H), estimates otherwise; each row
  of CALL_SECONDS says which. Calls per clip follow the params (frames grounded, subjects, the sample mix).
- Two layouts are compared: `pools` (Ray: one actor pool per model, each stage's pools sharing the GPUs, FLUX only
  for the reference types the samples use: what the code does since two-phase curation, kaleido.data.generated) and
  `worker per GPU` as the issue measured it (the whole model set in each worker, every type built for every subject
  and a plate for every clip, the GPU idle while the worker decodes and filters on the CPU).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from kaleido.config import ParamsError
from kaleido.config.schema import Params
from kaleido.data.footprint import Component, model_components
from kaleido.model.memory import GB

USABLE = 0.9  # of a GPU's memory: the allocator's fragmentation and the driver's reserve
MAX_ACTORS_PER_GPU = 4  # more small actors on one GPU only contend for the same SMs
# Bounds of a plan's GPUs: 100k GPUs is past the largest clusters built; one GPU's memory from 1 GB to 4 TB (the
# largest accelerators hold under 300 GB): past them a figure is a typo, and NaN or infinity would crash int().
MAX_GPUS = 100_000
MIN_GPU_MEMORY_GB, MAX_GPU_MEMORY_GB = 1.0, 4096.0

# Working memory per actor at its batch, GB, on top of the weights: activations + the CUDA context (~0.5 GB per
# process). ASSUMED from the shapes (no GPU was lent to measure them): FLUX at 1024^2 keeps ~4.6k tokens x 3072
# wide per block live; SAM-H encodes 1024^2 images (64x64x1280 per block); the VLM's KV cache for a batch of
# 4-frame prompts.
WORKSPACE_GB = {"vlm": 6.0, "grounding_dino": 2.0, "sam": 2.5, "clip": 1.0, "face": 0.8, "flux_fill": 5.0,
                "flux_redux": 4.0}


@dataclass(frozen=True)
class CallCost:
    seconds: float  # on one H100, per call, at the reference size below
    per: str  # what one call is
    source: str  # "public: ..." or "estimate: ..."


# FLUX.1-dev: ~6 s per 1024^2 image at 28 steps on an RTX 4090, about 2x faster on an H100 (public figures,
# /work/shared/REFERENCE.md 7): 3 s at 4096 image tokens and 28 steps, scaled linearly in tokens and steps.
FLUX_SECONDS_1024_28 = 3.0
CALL_SECONDS: dict[str, CallCost] = {
    "vlm": CallCost(1.5, "clip (4 frames, 128 new tokens)",
                    "estimate: 7B decode at ~85 tokens/s (batch 1, bf16, H100 memory bandwidth) + prefill"),
    "grounding_dino": CallCost(0.12, "frame", "estimate: ~8 frames/s for Swin-B at 800x1333 (batch 1, fp32)"),
    "sam": CallCost(0.15, "frame (ViT-H image encoder at 1024^2)",
                    "public: SAM paper, ~0.15 s per image for the ViT-H encoder (A100)"),
    "clip": CallCost(0.002, "crop (224^2)", "estimate: 4.4 GFLOPs per ViT-B/32 image at ~5 % of TF32 peak"),
    "face": CallCost(0.01, "human crop (640^2 detector)", "estimate: det_10g, ~10 GFLOPs, ONNX Runtime CUDA"),
    "flux_fill": CallCost(FLUX_SECONDS_1024_28, "image at 1024^2, 28 steps",
                          "public: ~6 s per 1024^2 FLUX.1 image on an RTX 4090, ~2x on an H100"),
    "flux_redux": CallCost(FLUX_SECONDS_1024_28, "image at 1024^2, 28 steps",
                           "public: as FLUX.1 Fill (the base FLUX.1-dev draws the variation)"),
}
SAM_ENCODER_PARAMETERS = {"vit_b": 89.7e6, "vit_l": 308.3e6, "vit_h": 632.2e6, "tiny": 0.15e6}
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# the stage run each pool serves: pools of one stage share the GPUs, stages run one after the other (`kaleido
# curate` is two: curate, then pair, where FLUX builds only the references the samples use)
STAGE_OF = {"vlm": "caption", "flux_fill": "pair", "flux_redux": "pair"}
STAGES = ("caption", "curate", "pair")
TITLES = {"vlm": "captioning VLM", "grounding_dino": "Grounding DINO", "sam": "SAM", "clip": "CLIP",
          "face": "face detector", "flux_fill": "FLUX.1 Fill", "flux_redux": "FLUX.1 Redux + dev"}


class CurationPlanError(ParamsError):
    """A curation plan that cannot run on the GPUs it gets; the message names the keys and the changes that fit."""


@dataclass(frozen=True)
class Workload:
    """What a run processes. Assumptions a user can change on the command line (`kaleido curate --plan --help`)."""

    clips: int = 2_000_000  # clips entering curation (the paper: ~2M pretraining pairs)
    subjects_per_clip: float = 2.0  # kept subjects (at most data.references.max_references)
    instances_per_frame: float = 3.0  # grounded boxes per frame that reach the CLIP filter
    human_share: float = 0.3  # of instances: the face check runs on humans only
    yield_share: float = 0.8  # clips that keep at least one subject (FLUX runs for them only)
    cpu_seconds_per_clip: float | None = None  # decode + filters + writes on one core; None: not measured

    def __post_init__(self) -> None:
        # a NaN or an infinity reaches int() / round() as a traceback, a negative count as a plan that "fits"
        for name, low, high in WORKLOAD_RANGES:
            value = getattr(self, name)
            if value is not None and not in_range(value, low, high):
                raise ValueError(f"Workload.{name} is {value!r}: {range_text(low, high)}")


# Bounds of each Workload figure: (name, lowest, highest). MAX_CLIPS: 5,000x the paper's 2M; past it a figure is
# a typo, not a plan (10^20 clips printed 10^20 GPU-hours with exit 0). A kept clip keeps at least one subject.
MAX_CLIPS = 10**10
WORKLOAD_RANGES = (("clips", 1, MAX_CLIPS), ("subjects_per_clip", 1.0, 1e3), ("instances_per_frame", 0.0, 1e3),
                   ("human_share", 0.0, 1.0), ("yield_share", 0.0, 1.0), ("cpu_seconds_per_clip", 0.0, 1e5))


def in_range(value: float, low: float, high: float) -> bool:
    """True for a finite number in [low, high] (NaN and the infinities are never in range)."""
    if isinstance(value, int):  # an int past 1e308 makes isfinite() raise OverflowError
        return low <= value <= high
    return math.isfinite(value) and low <= value <= high


def range_text(low: float, high: float) -> str:
    """The allowed range, for an error message."""
    return f"must be a finite number from {_number(low)} to {_number(high)}"


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() and abs(value) < 1e15 else f"{value:.3g}"


@dataclass
class PoolPlan:
    """One model's pool: memory, sharing, calls, GPU time."""

    key: str
    components: tuple[Component, ...]
    memory_gb: float
    actors_per_gpu: int
    calls_per_clip_pools: float
    calls_per_clip_worker: float
    seconds_per_call: float
    cost: CallCost
    actors: int = 0

    @property
    def num_gpus(self) -> float:
        """What each Ray actor of this pool requests."""
        return 1.0 / self.actors_per_gpu if self.actors_per_gpu else 1.0

    @property
    def weights_gb(self) -> float:
        return sum(c.bytes for c in self.components) / GB


@dataclass
class CurationPlan:
    gpus: int
    gpu_memory_gb: float
    layout: str  # "ray pools" | "worker per GPU" | "cpu"
    workload: Workload
    pools: list[PoolPlan] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    gpus_from: str = "data.cluster.gpus"  # where the GPU count came from, for the messages
    memory_from: str = "data.cluster.gpu_memory_gb"  # where one GPU's memory came from

    def gpu_seconds_per_clip(self, layout: str) -> float:
        """GPU-seconds of model calls per clip (calls x seconds per call, summed over the pools)."""
        attr = "calls_per_clip_pools" if layout == "pools" else "calls_per_clip_worker"
        return sum(getattr(p, attr) * p.seconds_per_call for p in self.pools)

    def held_cpu_seconds_per_clip(self, layout: str) -> float:
        """Seconds per clip a GPU is held but idle: a worker per GPU decodes and filters on the CPU while it holds
        its GPU; pools run the CPU stages beside the GPUs (streaming), so nothing is held for them."""
        return 0.0 if layout == "pools" else (self.workload.cpu_seconds_per_clip or 0.0)

    def held_seconds_per_clip(self, layout: str) -> float:
        """GPU-seconds held per clip: model calls + the CPU time a worker holds its GPU through."""
        return self.gpu_seconds_per_clip(layout) + self.held_cpu_seconds_per_clip(layout)

    def gpu_hours(self, layout: str) -> float:
        """GPU-hours held for the whole workload: clips x held GPU-seconds per clip / 3600."""
        return self.workload.clips * self.held_seconds_per_clip(layout) / 3600

    def wall_hours(self, layout: str) -> float | None:
        """Wall-clock hours with every GPU busy (GPU-hours / GPUs); None without GPUs."""
        return self.gpu_hours(layout) / self.gpus if self.gpus else None

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpus": self.gpus, "gpu_memory_gb": self.gpu_memory_gb, "layout": self.layout,
            "workload": self.workload.__dict__, "fits": self.fits, "problems": self.problems, "fixes": self.fixes,
            "pools": [{
                "model": p.key, "memory_gb": round(p.memory_gb, 2), "weights_gb": round(p.weights_gb, 2),
                "actors_per_gpu": p.actors_per_gpu, "num_gpus": round(p.num_gpus, 4), "actors": p.actors,
                "calls_per_clip": round(p.calls_per_clip_pools, 3), "seconds_per_call": round(p.seconds_per_call, 4),
                "throughput_source": p.cost.source,
                "components": [{"name": c.name, "parameters": c.parameters, "dtype": c.dtype, "source": c.source}
                               for c in p.components],
            } for p in self.pools],
            "gpu_seconds_per_clip": {name: {
                "model_calls": round(self.gpu_seconds_per_clip(layout), 4),
                "held_for_cpu_stages": round(self.held_cpu_seconds_per_clip(layout), 4),
                "total": round(self.held_seconds_per_clip(layout), 4)} for name, layout in JSON_LAYOUTS},
            "gpu_hours": {name: round(self.gpu_hours(layout), 1) for name, layout in JSON_LAYOUTS},
            "wall_hours": {name: _rounded(self.wall_hours(layout)) for name, layout in JSON_LAYOUTS},
        }


JSON_LAYOUTS = (("pools", "pools"), ("worker_per_gpu", "worker"))  # (the JSON's name, the layout argument)


def _rounded(hours: float | None) -> float | None:
    return None if hours is None else round(hours, 1)


# ---- which pools a params file uses, and how often each is called -------------------------------------------


def pool_keys(params: Params) -> list[str]:
    """The GPU model pools of the configured curation (caption VLM first), in pipeline order."""
    m = params.data.models
    keys = ["vlm"] if params.data.caption.captioner == "vlm" else []
    keys += ["grounding_dino", "sam", "clip"]
    keys += [key for key, path in (("face", m.face), ("flux_fill", m.flux_fill), ("flux_redux", m.flux_redux))
             if path is not None]
    return keys


def mix_shares(params: Params) -> dict[str, float]:
    """Share of samples of each reference type (data.references.sample_mix over the enabled types)."""
    from kaleido.data.pairing import effective_mix

    m = params.data.models
    enabled = ["crop", "segment"] + ["inpaint"] * (m.flux_fill is not None) + ["redux"] * (m.flux_redux is not None)
    return effective_mix(params.data.references.sample_mix, enabled)


def _flux_seconds(height: int, width: int, steps: int) -> float:
    tokens = (height // 16) * (width // 16)
    return FLUX_SECONDS_1024_28 * tokens / 4096 * steps / 28


def seconds_per_call(params: Params, key: str) -> float:
    """One call of pool `key` on one H100 at this params file's sizes (CALL_SECONDS scaled)."""
    refs, ingest = params.data.references, params.data.ingest
    if key == "flux_fill":  # whole frames, scaled down to flux_max_side
        from kaleido.vision.flux import processing_size

        h, w = processing_size(ingest.height, ingest.width, 16, refs.flux_max_side)
        return _flux_seconds(h, w, refs.inpaint_steps)
    if key == "flux_redux":
        return _flux_seconds(refs.redux_size, refs.redux_size, refs.redux_steps)
    if key == "sam":  # the encoder's compute grows with its parameters at the fixed 1024^2 input
        scale = SAM_ENCODER_PARAMETERS[params.data.models.sam_type] / SAM_ENCODER_PARAMETERS["vit_h"]
        return CALL_SECONDS["sam"].seconds * scale
    return CALL_SECONDS[key].seconds


def calls_per_clip(params: Params, key: str, work: Workload, only_needed_types: bool) -> float:
    """Calls of pool `key` per clip entering curation (an expected value over the workload's assumptions).

    only_needed_types: what the code does (kaleido.data.generated.FluxBuilder): FLUX Fill paints an inpaint
    reference per subject of a NON-cross inpaint sample (a cross-paired one is composited on a donor plate instead)
    and one plate per DISTINCT donor clip that cross pairs draw in a dataset shard; Redux a variation per subject of
    a redux sample, cross-paired or not. Plates (`donor_share`): the cross-paired subjects of non-redux samples make
    d = cross ratio x (1 - redux share) x subjects draws per kept clip over the dataset shard's kept clips; a clip
    drawn at least once costs one plate, so plates per clip = yield x donor_share(d).
    Otherwise (a worker that builds everything, as before the two phases): every kept subject gets every type and
    every kept clip a plate.
    """
    frames = params.data.grounding.frames_per_clip
    per_kept = min(work.subjects_per_clip, params.data.references.max_references)
    subjects = per_kept * work.yield_share
    instances = frames * work.instances_per_frame
    shares = mix_shares(params)
    cross = params.data.references.cross_pair_ratio
    if key == "vlm":
        return 1.0
    if key in ("grounding_dino", "sam"):
        return float(frames)
    if key == "clip":
        return instances
    if key == "face":
        return instances * work.human_share
    if key == "flux_fill":
        if not only_needed_types:
            return subjects + work.yield_share  # an inpaint reference per subject + a plate per clip
        draws = cross * (1.0 - shares.get("redux", 0.0)) * per_kept
        return subjects * shares.get("inpaint", 0.0) * (1.0 - cross) + work.yield_share * donor_share(draws)
    if key == "flux_redux":
        return subjects * (shares.get("redux", 0.0) if only_needed_types else 1.0)
    raise KeyError(key)


def donor_share(draws_per_clip: float) -> float:
    """The expected share of a dataset shard's clips that cross pairs draw as donors at least once, for d draws per
    clip (kaleido.data.pairing.DonorIndex).

    Draws are consistent hashing: a draw takes the first source after it on a ring of the shard's sources, then the
    first plate after a second draw among that source's clips, so a clip is drawn with probability proportional to
    the arc before its source's point times the arc before its own point. Arcs between n uniform points on a circle
    are n-scaled ~ Exp(1); with X, Y ~ Exp(1) a clip is missed by m = d n draws with probability
    E[exp(-d X Y)] = E_X[1 / (1 + d X)] (large n), so the share drawn is 1 - E_X[1 / (1 + d X)] (about 0.34 at
    d = 0.72, where uniform draws would give 1 - exp(-d) = 0.51; measured by tests/test_curation_plan.py on the
    pair stage itself: 0.35 at 2k clips).
    """
    import numpy as np

    if draws_per_clip <= 0:
        return 0.0
    x = np.linspace(0.0, 60.0, 60_001)  # E_X over Exp(1); the tail past 60 is below 1e-26
    return float(1.0 - np.trapezoid(np.exp(-x) / (1.0 + draws_per_clip * x), x))


# ---- the plan -----------------------------------------------------------------------------------------------


def visible_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES when set (ids or UUIDs), else torch's count."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [part.strip() for part in visible.split(",") if part.strip() and part.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def plan_curation(params: Params, *, gpus: int | None = None, gpu_memory_gb: float | None = None,
                  workload: Workload | None = None, layout: str | None = None, gpus_from: str | None = None,
                  memory_from: str | None = None) -> CurationPlan:
    """The plan for `params` on `gpus` GPUs of `gpu_memory_gb` (defaults: data.cluster), problems and fixes named.

    layout: "ray pools" when data.ray_address is set, "worker per GPU" for local workers on GPUs, "cpu" when the
    models run on the CPU (no GPU budget applies). gpus_from / memory_from: where a given `gpus` / `gpu_memory_gb`
    came from (an option, the Ray cluster), named by the messages; the defaults name data.cluster's keys.
    """
    cluster = params.data.cluster
    work = workload or Workload()
    if gpus is not None:
        count, gpus_from = gpus, gpus_from or "the GPU count given"
    elif isinstance(cluster.gpus, int):
        count, gpus_from = cluster.gpus, "data.cluster.gpus"
    else:
        count, gpus_from = len(visible_gpus()), "the visible GPUs (data.cluster.gpus: auto, CUDA_VISIBLE_DEVICES)"
    memory = float(gpu_memory_gb if gpu_memory_gb is not None else cluster.gpu_memory_gb)
    memory_from = (memory_from or "the GPU memory given") if gpu_memory_gb is not None else "data.cluster.gpu_memory_gb"
    # a NaN or an infinity would reach int() below as a traceback; a negative count would "fit"
    if not 0 <= count <= MAX_GPUS:
        raise CurationPlanError(f"{gpus_from} is {count}: must be a GPU count from 0 to {MAX_GPUS:,}")
    if not in_range(memory, MIN_GPU_MEMORY_GB, MAX_GPU_MEMORY_GB):
        raise CurationPlanError(f"{memory_from} is {memory:g}: {range_text(MIN_GPU_MEMORY_GB, MAX_GPU_MEMORY_GB)} "
                                "(GB of one GPU; an H100 has 80)")
    if layout is None:
        on_cpu = params.data.models.device == "cpu" or (params.data.models.device == "auto" and count == 0)
        layout = "cpu" if on_cpu else ("ray pools" if params.data.ray_address else "worker per GPU")
    plan = CurationPlan(count, memory, layout, work, gpus_from=gpus_from, memory_from=memory_from)
    for key in pool_keys(params):
        parts = model_components(params, key)
        need = sum(c.bytes for c in parts) / GB + WORKSPACE_GB[key]
        per_gpu = max(0, min(MAX_ACTORS_PER_GPU, int(memory * USABLE // need)))
        plan.pools.append(PoolPlan(
            key, parts, need, per_gpu, calls_per_clip(params, key, work, only_needed_types=True),
            calls_per_clip(params, key, work, only_needed_types=False), seconds_per_call(params, key),
            CALL_SECONDS[key],
        ))
    if layout != "cpu":
        _check(plan, params)
    return plan


def smallest_gpu_gb(memory_gb: float) -> int:
    """The smallest whole GPU memory (GB) that holds `memory_gb` after the USABLE share."""
    return math.ceil(memory_gb / USABLE)


# what to set to run without a pool whose model holds on no GPU (the optional models only)
WITHOUT = {"vlm": "data.caption.captioner: sidecar (captions from a file, no VLM)",
           "face": "data.models.face: null (no face check)",
           "flux_fill": "data.models.flux_fill: null (no inpaint references or plates)",
           "flux_redux": "data.models.flux_redux: null (no redux references)"}


def _check(plan: CurationPlan, params: Params) -> None:
    """Fill plan.problems / plan.fixes for the GPUs the plan gets; size the pools. Every problem comes with at
    least one change that fits."""
    budget = plan.gpu_memory_gb * USABLE
    too_big = [p for p in plan.pools if p.actors_per_gpu == 0]
    for pool in too_big:
        plan.problems.append(f"{TITLES[pool.key]} needs about {pool.memory_gb:.1f} GB per actor, more than one GPU "
                             f"holds ({plan.gpu_memory_gb:g} GB x {USABLE}: {plan.memory_from})")
        if pool.key.startswith("flux") and params.data.models.flux_dtype == "float32":
            half = (pool.weights_gb / 2) + WORKSPACE_GB[pool.key]
            plan.fixes.append(f"data.models.flux_dtype: bfloat16 (about {half:.1f} GB)")
        if pool.key in WITHOUT:
            plan.fixes.append(WITHOUT[pool.key])
    if too_big:  # the planner places whole actors, one per GPU at most: a bigger GPU is what holds each
        sizes = ", ".join(f"{TITLES[p.key]} {smallest_gpu_gb(p.memory_gb)} GB" for p in too_big)
        plan.fixes.append(f"GPUs of at least {max(smallest_gpu_gb(p.memory_gb) for p in too_big)} GB "
                          f"(data.cluster.gpu_memory_gb, --gpu-memory-gb; per model: {sizes})")
    if plan.gpus == 0:
        plan.problems.append(f"no GPU: data.models.device is {params.data.models.device!r}, which needs a GPU, but "
                             f"{plan.gpus_from} is 0")
        plan.fixes.append(f"data.models.device: cpu (slow), or give the run GPUs ({plan.gpus_from})")
        return
    if plan.layout == "worker per GPU":
        whole = sum(p.memory_gb for p in plan.pools if p.key != "vlm")
        caption = next((p.memory_gb for p in plan.pools if p.key == "vlm"), 0.0)
        if max(whole, caption) > budget:
            plan.problems.append(
                f"each local worker loads the whole curation set on its GPU: about {whole:.1f} GB (caption VLM: "
                f"{caption:.1f} GB), more than one GPU holds ({plan.gpu_memory_gb:g} GB x {USABLE}: "
                f"{plan.memory_from})")
            plan.fixes.append("run on Ray (data.ray_address): one pool per model, each on GPUs of its own")
            plan.fixes.append(f"local workers on GPUs of at least {smallest_gpu_gb(max(whole, caption))} GB "
                              "(data.cluster.gpu_memory_gb, --gpu-memory-gb)")
        workers = params.data.workers
        if workers > plan.gpus:
            plan.problems.append(f"data.workers is {workers} but the run gets {plan.gpus} GPU(s) ({plan.gpus_from}): "
                                 "local workers get one GPU each (each loads every model)")
            plan.fixes.append(f"data.workers: {plan.gpus}")
        return
    # Ray pools: at least one actor per pool of a stage; the rest of the GPUs in proportion to each pool's GPU time
    minimum = max(sum(p.num_gpus for p in plan.pools if p.actors_per_gpu and STAGE_OF.get(p.key, "curate") == stage)
                  for stage in STAGES)
    if minimum > plan.gpus + 1e-9:
        plan.problems.append(f"one actor of every model pool needs {minimum:.2f} GPUs; {plan.gpus_from} is "
                             f"{plan.gpus}")
        plan.fixes.append(f"data.cluster.gpus: {math.ceil(minimum)} (or more GPU workers in the RayCluster)")
    _size_pools(plan)


def _size_pools(plan: CurationPlan) -> None:
    """Actors per pool: each stage's pools share every GPU in proportion to their GPU-seconds per clip (so they
    finish together), at least one actor each. Stages run one after the other (caption, curate, pair): the VLM
    gets every GPU, then the curate pools, then FLUX."""
    usable = [p for p in plan.pools if p.actors_per_gpu]
    for stage in {STAGE_OF.get(p.key, "curate") for p in usable}:
        pools = [p for p in usable if STAGE_OF.get(p.key, "curate") == stage]
        total = sum(p.calls_per_clip_pools * p.seconds_per_call for p in pools) or 1.0
        for pool in pools:
            share = plan.gpus * pool.calls_per_clip_pools * pool.seconds_per_call / total
            pool.actors = max(1, math.floor(share / pool.num_gpus))


def describe(plan: CurationPlan) -> str:
    """The table `kaleido curate --plan` prints."""
    work = plan.workload
    lines = [f"curation plan: {work.clips:,} clips, {plan.gpus} GPU(s) of {plan.gpu_memory_gb:g} GB, layout: "
             f"{plan.layout}",
             f"  assumptions: {work.subjects_per_clip:g} subjects/clip, {work.instances_per_frame:g} instances/frame, "
             f"{work.human_share:.0%} humans, {work.yield_share:.0%} of clips keep a subject",
             f"  {'model':<20}{'stage':>8}{'params':>9}{'dtype':>10}{'GB/actor':>10}{'per GPU':>9}{'num_gpus':>9}"
             f"{'actors':>8}{'calls/clip':>11}{'s/call':>8}  throughput source"]
    for pool in plan.pools:
        params_b = sum(c.parameters for c in pool.components) / 1e9
        dtypes = "/".join(sorted({SHORT_DTYPES[c.dtype] for c in pool.components}))
        lines.append(f"  {TITLES[pool.key]:<20}{STAGE_OF.get(pool.key, 'curate'):>8}{params_b:>8.2f}B{dtypes:>10}"
                     f"{pool.memory_gb:>10.1f}"
                     f"{pool.actors_per_gpu:>9}{pool.num_gpus:>9.3f}{pool.actors or '-':>8}"
                     f"{pool.calls_per_clip_pools:>11.2f}{pool.seconds_per_call:>8.3f}  {pool.cost.source}")
    lines.append("  parameter counts:")
    for pool in plan.pools:
        for c in pool.components:
            lines.append(f"    {c.name:<26}{c.parameters / 1e6:>10.1f}M {c.dtype:<9} {c.source}")
    cpu = work.cpu_seconds_per_clip
    lines.append(f"  CPU stages: {cpu:.2f} CPU-s per clip (measured, kaleido/data/cpu_costs.json)" if cpu is not None
                 else "  CPU stages: not measured (run benchmarks/curation_scale.py --write-costs)")
    lines.append("  stages run one after the other (caption, curate, then pair: FLUX); a stage's pools share the GPUs")
    lines.append("  GPU-hours = clips x GPU-s held per clip / 3600; wall = GPU-hours / GPUs (every GPU busy)")
    for layout, name in (("pools", "ray pools, only the types the mix uses"),
                         ("worker", "a worker per GPU building every type (the issue's baseline)")):
        lines.append(f"  {name}: {_figures(plan, layout)}")
    if plan.layout == "cpu":
        lines.append("plan: ok (models on the CPU: no GPU budget applies)")
    elif plan.fits:
        lines.append("plan: fits")
    else:
        lines.append("plan: does NOT fit:\n  - " + "\n  - ".join(plan.problems))
        if plan.fixes:
            lines.append("changes that fit:\n  - " + "\n  - ".join(dict.fromkeys(plan.fixes)))
    return "\n".join(lines)


def _figures(plan: CurationPlan, layout: str) -> str:
    """One layout's row: model-call seconds, the CPU time a GPU is held through (shown, never folded in silently),
    GPU-hours and wall time."""
    calls, held = plan.gpu_seconds_per_clip(layout), plan.held_cpu_seconds_per_clip(layout)
    if layout == "pools":
        seconds = f"{calls:.2f} GPU-s/clip of model calls (CPU stages run beside, on CPU pods)"
    else:
        seconds = (f"{calls:.2f} GPU-s/clip of model calls + {held:.2f} s/clip held while the worker runs the CPU "
                   f"stages = {calls + held:.2f} GPU-s/clip held")
    wall = plan.wall_hours(layout)
    when = (f", {wall:,.1f} h wall ({wall / 24:,.1f} days) on {plan.gpus} GPUs" if wall is not None
            else ", no wall time without GPUs")
    return f"{seconds}, {plan.gpu_hours(layout):,.0f} GPU-hours{when}"


def check_launch(params: Params, *, stage: str, gpus: int | None = None, gpus_from: str | None = None) -> CurationPlan:
    """Refuse (CurationPlanError) a model stage whose plan does not fit the GPUs this launch gets.

    gpus: what the launch found (the Ray cluster's GPU total, or the visible local GPUs); None: discover locally.
    gpus_from: where `gpus` came from, for the messages. A run whose models are on the CPU passes at once (no model
    is built).
    """
    device = params.data.models.device
    if gpus is None:
        gpus, gpus_from = len(visible_gpus()), "the visible GPUs (CUDA_VISIBLE_DEVICES)"
    if device == "cpu" or (device == "auto" and gpus == 0):
        return CurationPlan(gpus, params.data.cluster.gpu_memory_gb, "cpu", Workload())
    found = gpus
    plan = plan_curation(params, gpus=found, gpus_from=gpus_from)
    if not plan.fits:
        fixes = ("; changes that fit: " + "; ".join(dict.fromkeys(plan.fixes))) if plan.fixes else ""
        raise CurationPlanError(f"{stage}: the curation plan does not fit the {found} GPU(s) this run gets: "
                                + "; ".join(plan.problems) + fixes + " (`kaleido curate --plan` prints the table)")
    return plan


CPU_COSTS = "cpu_costs.json"  # beside this module: benchmarks/curation_scale.py --write-costs writes it


def measured_cpu_seconds(path: str | os.PathLike[str] | None = None) -> float | None:
    """CPU-seconds per clip of the CPU stages (ingest's decode / shot detection / cut / encode, pairing, the
    dataset writer), as measured by benchmarks/curation_scale.py on one core; None when never measured."""
    import json
    from pathlib import Path

    file = Path(path) if path is not None else Path(__file__).with_name(CPU_COSTS)
    try:
        stages = json.loads(file.read_text())["stages"]
        return float(sum(float(row["cpu_s_per_clip"]) for row in stages.values()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def launch_devices(params: Params, stage: str) -> tuple[str, ...]:
    """Check a model stage's plan against what this launch gets and return the GPU ids for its local workers.

    Local workers on GPUs: the visible ids (one worker each, kaleido.data.shards.run_shards). On Ray the cluster
    places its own actors (its GPU total is checked); on the CPU: (). Raises CurationPlanError.
    """
    if params.data.ray_address:
        from kaleido.data.ray_cluster import cluster_gpus

        # an autoscaling cluster may hold no GPU node yet: data.cluster.gpus says what it grows to
        configured = params.data.cluster.gpus
        if isinstance(configured, int):
            check_launch(params, stage=stage, gpus=configured, gpus_from="data.cluster.gpus")
        else:
            check_launch(params, stage=stage, gpus=cluster_gpus(params), gpus_from="the Ray cluster's GPU total")
        return ()
    plan = check_launch(params, stage=stage)
    return () if plan.layout == "cpu" else tuple(visible_gpus())
