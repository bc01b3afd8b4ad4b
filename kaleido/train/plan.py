"""Where a training stage reads and writes, the sizes it derives, and the checks made BEFORE any launch.

Every check that can fail on a params combination runs here, in the launching process, so a bad
combination costs no process start, no model load and no cluster time. The worker runs the same
checks at start-up (a pod started by hand gets the same message).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kaleido.config import Params, ParamsError
from kaleido.config.schema import StagePreset

if TYPE_CHECKING:
    from kaleido.model.dit import DiTConfig

Stage = Literal["pretrain", "sft"]
STAGES: tuple[str, ...] = ("pretrain", "sft")


class TrainPlanError(ParamsError):
    """A params combination that cannot train; the message names the params.yaml keys involved.

    memory: the memory estimate (kaleido.train.memory.MemoryEstimate) when the refusal is about memory, so a
    caller can show the table that explains it; None for any other problem."""

    def __init__(self, message: str, memory: Any = None):
        super().__init__(message)
        self.memory = memory


def stage_preset(params: Params, stage: str) -> StagePreset:
    if stage not in STAGES:
        raise TrainPlanError(f"unknown training stage {stage!r}; choose one of {', '.join(STAGES)}")
    return getattr(params.train, stage)


def _resolved(params: Params, path: Path) -> Path:
    resolved = params.resolve(path)
    assert resolved is not None  # a Path in, a Path out
    return resolved


def _location(params: Params, value: str) -> Path | str:
    """A folder from params.yaml, resolved; an object-storage URI (s3://...) as it is."""
    from kaleido.platform.storage import is_remote

    return value if is_remote(value) else _resolved(params, Path(value))


def stage_dataset(params: Params, stage: str) -> Path | str:
    """The stage's training tar shards: train.<stage>.dataset, else train.dataset (a folder, or an s3:// URI)."""
    return _location(params, stage_preset(params, stage).dataset or params.train.dataset)


def stage_latents(params: Params, stage: str) -> Path | str:
    """The stage's latent cache: train.<stage>.latents, else train.latents (a folder, or an s3:// URI)."""
    return _location(params, stage_preset(params, stage).latents or params.train.latents)


def stage_output(params: Params, stage: str) -> Path:
    """<train.output_dir>/<stage>: checkpoints/, export/, loss.csv, metrics.json."""
    return _resolved(params, params.train.output_dir) / stage


def checkpoint_dir(params: Params, stage: str) -> Path:
    return stage_output(params, stage) / "checkpoints"


def export_dir(params: Params, stage: str) -> Path:
    """Consolidated weights in the original Wan2.1 layout (what the registry picks up)."""
    return stage_output(params, stage) / "export"


def registry_init(params: Params, stage: str) -> str | None:
    """train.<stage>.init when it is a registry reference (models:/<name>@<alias> or /<version>), else None."""
    init = stage_preset(params, stage).init
    return str(init) if init is not None and str(init).startswith("models:/") else None


def inspect_registry_init(params: Params, stage: str) -> tuple[str, dict[str, Any]]:
    """(models:/<name>/<version>, the version's model_config) of a registry init, reading only its MLmodel (no
    weights): what a launcher needs to plan a cluster job whose pods download the weights themselves.

    TrainPlanError when the registry does not answer, has no such version, or the version is a LoRA adapter
    (train on top of its merged checkpoint instead: `kaleido merge-lora`)."""
    import tempfile

    import mlflow.artifacts
    import yaml

    from kaleido.registry import RegistryError, find_version

    ref = registry_init(params, stage)
    assert ref is not None
    uri = tracking_uri(params)
    if not uri:
        raise TrainPlanError(f"train.{stage}.init={ref}: a registry reference needs platform.mlflow_tracking_uri")
    try:
        registry, version, record = find_version(ref, uri)
        name, source = registry.name, record.source
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/MLmodel", dst_path=tmp,
                                                       tracking_uri=uri)
            meta = yaml.safe_load(Path(path).read_text()) or {}
    except RegistryError as exc:
        raise TrainPlanError(f"train.{stage}.init: {exc}") from None
    except Exception as exc:  # MLflow's own: unknown model, unreachable server, no MLmodel
        raise TrainPlanError(f"train.{stage}.init={ref}: cannot read it from the registry at {uri}: "
                             f"{str(exc)[:300]}") from None
    config = meta.get("flavors", {}).get("python_function", {}).get("config") or {}
    if config.get("lora"):
        raise TrainPlanError(f"train.{stage}.init={ref} is a LoRA version; start from its base or a merged "
                             "checkpoint (`kaleido merge-lora`)")
    return f"models:/{name}/{version}", config


def resolve_registry_init(params: Params, stage: str) -> tuple[Path, str]:
    """(local DiT weights, models:/<name>/<version>) of a registry init, downloaded once into the model cache
    (every process of a node shares one download: kaleido.serving.resolve_model locks it)."""
    from kaleido.serving import ServingError, model_checkpoint, resolve_model

    resolved, _ = inspect_registry_init(params, stage)  # a LoRA version fails here, before any download
    try:
        folder, resolved = resolve_model(resolved, tracking_uri(params))
        return model_checkpoint(folder), resolved
    except ServingError as exc:
        raise TrainPlanError(f"train.{stage}.init: {exc}") from None


def stage_init(params: Params, stage: str) -> tuple[Path, str]:
    """The weights a stage starts from and the key that names them (for messages)."""
    preset = stage_preset(params, stage)
    if registry_init(params, stage):
        path, resolved = resolve_registry_init(params, stage)
        return path, f"train.{stage}.init ({resolved})"
    if preset.init is not None:
        return _resolved(params, preset.init), f"train.{stage}.init"
    if stage == "sft":  # SFT continues from the pretrain result
        return export_dir(params, "pretrain"), "train.sft.init (default: the pretrain export)"
    if params.model.checkpoint is None:
        raise TrainPlanError("model.checkpoint is not set: pretraining starts from a Wan2.1 checkpoint")
    return _resolved(params, params.model.checkpoint), "model.checkpoint"


def export_base(export: Path) -> str:
    """What a training export started from, for the registry's lineage: the registered version it was trained
    on (models:/<name>/<version>) or the init path; "" when the export carries no record (export.json)."""
    info_path = Path(export).parent / "export.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    if (info_path.parent / info.get("path", "")).resolve() != Path(export).resolve():  # relative to export.json
        return ""  # the record belongs to another export
    return str(info.get("base_model") or info.get("base") or "")


def verify_export(export: Path) -> None:
    """Check a training export against the seal its export.json recorded (every file's size and sha256; a verdict
    is cached per file). IntegrityError naming the file; nothing to check for an export without a seal."""
    from kaleido.platform.integrity import verify_manifest

    info_path = Path(export).parent / "export.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if Path(info.get("path", "")).resolve() != Path(export).resolve() or not info.get("files"):
        return  # not this export's record, or written before exports were sealed
    verify_manifest(export, info["files"], what="training export file",
                    fix=f"it changed after training wrote it ({info_path} records the bytes): train the stage again")


def tracking_uri(params: Params, environ: dict[str, str] | None = None) -> str:
    """MLFLOW_TRACKING_URI from the environment (pods get the in-cluster address), else platform.mlflow_tracking_uri.

    An empty string disables tracking.
    """
    import os

    env = os.environ if environ is None else environ
    return env.get("MLFLOW_TRACKING_URI", params.platform.mlflow_tracking_uri).strip()


def world_size(params: Params) -> int:
    """Ranks of a launch: train.kubernetes.nodes x gpus_per_node on the cluster, else train.nproc_per_node."""
    k8s = params.train.kubernetes
    if params.train.launcher == "kubernetes":
        return k8s.nodes * max(k8s.gpus_per_node, 1)
    return params.train.nproc_per_node


def world_size_keys(params: Params) -> str:
    """The params.yaml keys that set the number of ranks, for messages."""
    if params.train.launcher == "kubernetes":
        return "train.kubernetes.nodes x train.kubernetes.gpus_per_node"
    return "train.nproc_per_node"


def model_config(params: Params, stage: str, registry: tuple[str, dict[str, Any]] | None = None,
                 ) -> tuple[DiTConfig, str]:
    """The DiT config a stage trains: the init checkpoint's own config when it has one, else model.arch's.

    Mirrors how the worker loads the weights (and S2VPipeline.from_params), so the checks see the real model.
    registry: inspect_registry_init's answer when the caller has it already (one registry read, not two).
    """
    from kaleido.model.checkpoint import CheckpointError, read_config
    from kaleido.model.dit import DiTConfig, dit_config

    if registry_init(params, stage):  # the version's own config, without downloading its weights
        resolved, config = registry or inspect_registry_init(params, stage)
        if config.get("dit"):
            return DiTConfig(**{**config["dit"], "patch_size": tuple(config["dit"]["patch_size"])}), resolved
    init_path, init_key = stage_init(params, stage)
    if init_path.exists():
        try:
            found = read_config(init_path)
        except (CheckpointError, OSError, ValueError):
            found = None
        if found is not None:
            source = f"the config of {init_key}"
            if found != dit_config(params.model.arch):
                # the launch trains what the checkpoint holds; say so rather than plan model.arch silently
                source += (f", not model.arch={params.model.arch} (the weights decide the model; to plan "
                           f"{params.model.arch}, point {init_key} at {params.model.arch} weights, as "
                           "k8s/overlays/prod/params.yaml does)")
            return found, source
    return dit_config(params.model.arch), f"model.arch={params.model.arch}"


@dataclass(frozen=True)
class TrainPlan:
    stage: str
    world_size: int
    sequence_parallel: int
    data_parallel: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    steps: int
    lr: float
    zero_stage: int
    latents: str
    output: str
    init: str
    lora_rank: int = 0  # 0: full fine-tuning
    base_model: str | None = None  # models:/<name>/<version> when the stage starts from a registered version

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"{self.stage}: {self.steps} steps, lr {self.lr:g}, global batch {self.global_batch} = micro batch "
            f"{self.micro_batch} x grad accumulation {self.grad_accum} x data parallel {self.data_parallel} "
            f"(world {self.world_size}, sequence parallel {self.sequence_parallel}), ZeRO-{self.zero_stage}"
            + (f", LoRA rank {self.lora_rank} (base frozen)" if self.lora_rank else ", full fine-tuning")
        )


def _check_tracking(uri: str) -> list[str]:
    """An http(s) tracking server must answer now: a run must not train for hours and lose its record."""
    from kaleido.platform.services import tracking_problem

    problem = tracking_problem(uri)
    if problem is None:
        return []
    return [
        f"platform.mlflow_tracking_uri={uri!r} (or $MLFLOW_TRACKING_URI) does not answer ({problem}); "
        "start the server (`kaleido platform up`) or set platform.mlflow_tracking_uri: \"\" to train untracked"
    ]


def plan_training(
    params: Params,
    stage: str,
    world_size: int,
    *,
    resume: bool = False,
    check_files: bool = True,
    check_tracking: bool = True,
    precision: str | None = None,
    apply_changes: bool = False,
    world_source: str | None = None,
) -> TrainPlan:
    """Derive the batch geometry of a stage on `world_size` ranks; raise TrainPlanError listing EVERY problem.

    world_source: what set `world_size`, for messages (default: the params keys; `--gpus` for a plan).

    check_files: the latent cache, init weights and (with resume) a checkpoint must exist here; False
    when they live on storage only the training pods see (Kubernetes). precision: the target's bf16 | fp32 for
    the memory check (default: the launcher's; `kaleido train --plan --device gpu` plans GPUs from a CPU machine).
    With resume, the run's recorded params must equal these (kaleido.train.checkpoints.resume_problem), or differ
    only in keys `apply_changes` may apply.
    """
    train = params.train
    preset = stage_preset(params, stage)
    problems: list[str] = []
    sp = train.sequence_parallel
    registry = inspect_registry_init(params, stage) if registry_init(params, stage) else None
    base_model = registry[0] if registry else None
    config, config_source = model_config(params, stage, registry)
    heads = config.num_heads
    if heads % sp:
        # a valid degree divides the heads AND the world size
        divisors = [d for d in range(1, heads + 1) if heads % d == 0 and world_size % d == 0]
        problems.append(
            f"train.sequence_parallel={sp} does not divide the model's {heads} attention heads ({config_source}); "
            f"use one of {divisors} (dividing the heads and the world size {world_size})"
        )
    if world_size % sp:
        problems.append(
            f"train.sequence_parallel={sp} does not divide the world size {world_size} "
            f"({world_source or world_size_keys(params)}): every rank must belong to one sequence-parallel group"
        )
    if train.samples.every and (train.zero_stage == 3 or sp > 1):
        problems.append(
            f"train.samples.every={train.samples.every}: samples are drawn by rank 0 alone, which cannot run a model "
            f"partitioned by ZeRO-3 (train.zero_stage={train.zero_stage}) or split by sequence parallelism "
            f"(train.sequence_parallel={sp}); set train.samples.every: 0 for this run"
        )
    if train.zero_stage not in (1, 2, 3):
        problems.append(f"train.zero_stage={train.zero_stage}: DeepSpeed ZeRO stage must be 1, 2 or 3")
    dp = max(world_size // sp, 1)
    per_step = train.micro_batch * dp
    if preset.global_batch % per_step:
        problems.append(
            f"train.{stage}.global_batch={preset.global_batch} is not divisible by train.micro_batch="
            f"{train.micro_batch} x data-parallel size {dp} (= {world_size} ranks "
            f"({world_source or world_size_keys(params)}) / "
            f"train.sequence_parallel={sp}) = {per_step}; use a multiple of {per_step}"
        )
    grad_accum = max(preset.global_batch // per_step, 1)
    latents = stage_latents(params, stage)
    if base_model and not check_files:  # the pods download it (the launcher only plans)
        init_path, init_key = Path(base_model), f"train.{stage}.init ({base_model})"
    else:
        init_path, init_key = stage_init(params, stage)
    if check_files:
        problems += _check_cache(params, stage, latents, dp, config.text_dim)
        if not init_path.exists():
            hint = " (run `kaleido train --stage pretrain` first)" if stage == "sft" else ""
            problems.append(f"{init_key}: {init_path} does not exist{hint}")
        else:
            problems += _check_weights(init_path, init_key)
        if resume:
            from kaleido.train.checkpoints import resume_point, resume_problem

            changed = resume_problem(checkpoint_dir(params, stage), params, stage, apply_changes)
            if changed:
                problems.append(changed)
            point = resume_point(checkpoint_dir(params, stage))
            if point.tag is None:
                what = "no DeepSpeed checkpoint"
                if point.skipped:
                    what = f"no intact DeepSpeed checkpoint (not intact: {point.describe_skipped()})"
                problems.append(
                    f"--resume: {what} under {checkpoint_dir(params, stage)} (train.output_dir={train.output_dir}); "
                    "start without --resume"
                )
    refused = None
    if not problems:  # the memory estimate needs a valid layout
        from kaleido.train.memory import memory_problem

        memory, refused = memory_problem(params, stage, world_size, config, precision)
        if memory:
            problems.append(memory)
    if check_tracking:
        problems += _check_tracking(tracking_uri(params))
    if problems:
        raise TrainPlanError(f"cannot train stage {stage!r}:\n  " + "\n  ".join(problems),
                             memory=refused if len(problems) == 1 else None)
    return TrainPlan(
        stage=stage,
        world_size=world_size,
        sequence_parallel=sp,
        data_parallel=dp,
        micro_batch=train.micro_batch,
        grad_accum=grad_accum,
        global_batch=preset.global_batch,
        steps=preset.steps,
        lr=preset.lr,
        zero_stage=train.zero_stage,
        latents=str(latents),
        output=str(stage_output(params, stage)),
        init=str(init_path),
        lora_rank=preset.lora.rank if preset.lora.enabled else 0,
        base_model=base_model,
    )


def _check_weights(path: Path, key: str) -> list[str]:
    """The init weights' safetensors files are whole (headers against sizes): a truncated download fails here,
    naming the file, not in every rank after the launch."""
    from kaleido.model.checkpoint import CheckpointError, check_weight_files
    from kaleido.platform.integrity import IntegrityError

    try:
        check_weight_files(path)
        verify_export(path)  # an earlier stage's export (sft's init): its sealed bytes
    except (CheckpointError, IntegrityError) as exc:
        return [f"{key}: {exc}"]
    return []


def _check_cache(params: Params, stage: str, latents: Path | str, dp: int, text_dim: int) -> list[str]:
    """The cache exists, was encoded from this stage's dataset for this model, and feeds every data-parallel rank.

    Cheap checks only (the index, file presence and sizes against the index's seals, safetensors headers); the
    sha256 of each shard is checked by the rank that reads it (LatentCache.ensure_shard)."""
    from kaleido.platform.storage import Remote, StorageError, is_remote
    from kaleido.train.data import steps_per_epoch
    from kaleido.train.latents import CachedSample, CacheError, read_index

    key = f"train.{stage}.latents" if stage_preset(params, stage).latents else "train.latents"
    try:
        index = read_index(latents, params)
    except CacheError as exc:
        return [f"{key}: {exc}"]
    except StorageError as exc:
        return [f"{key}: {exc}"]
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{key}: latent cache {latents} is unreadable ({exc}); re-run `kaleido encode --force`"]
    problems = []
    dataset = str(stage_dataset(params, stage))
    if index.get("dataset") != dataset:
        problems.append(
            f"{key}: the cache at {latents} was encoded from {index.get('dataset')}, but the stage reads {dataset}; "
            f"run `kaleido encode --stage {stage}` or give train.{stage}.latents a folder of its own"
        )
    if int(index.get("text_dim", -1)) != text_dim:
        problems.append(
            f"{key}: cached text embeddings are {index.get('text_dim')}-wide, the DiT takes {text_dim}; "
            "re-encode with the model.text_encoder that belongs to the checkpoint"
        )
    samples = [CachedSample.from_json(row) for row in index.get("samples", [])]
    seals = index.get("shards") or {}
    if is_remote(latents):
        listing = Remote(str(latents), params).listing("")
        sizes = {name: size for name, size in listing.items()}
    else:
        folder = Path(latents)
        sizes = {f"{s.shard}.safetensors": (folder / f"{s.shard}.safetensors").stat().st_size
                 for s in samples if (folder / f"{s.shard}.safetensors").is_file()}
    missing = sorted({s.shard for s in samples if f"{s.shard}.safetensors" not in sizes})
    if missing:
        problems.append(f"{key}: shard files missing in {latents}: {', '.join(missing[:5])}; re-run `kaleido encode`")
    for shard, seal in sorted(seals.items()):
        size = sizes.get(f"{shard}.safetensors")
        if seal and size is not None and size != seal["size"]:
            problems.append(f"{key}: latent shard {latents}/{shard}.safetensors is {size} bytes, the cache's index "
                            f"records {seal['size']} (truncated or replaced); re-run `kaleido encode`")
    if not is_remote(latents):
        from kaleido.train.latents import NULL_CONTEXT_NAME, check_cache_file

        # a truncated shard fails here, naming the file, not in a rank after every model has loaded
        present = sorted({s.shard for s in samples} - set(missing))
        for file in [Path(latents) / NULL_CONTEXT_NAME, *(Path(latents) / f"{shard}.safetensors" for shard in present)]:
            if file.is_file():
                try:
                    check_cache_file(file)
                except CacheError as exc:
                    problems.append(f"{key}: {exc}")
    train = [s for s in samples if s.split == "train"]
    batches = steps_per_epoch(samples, params.train.micro_batch, dp)
    if batches < 1:
        problems.append(
            f"{key}: {len(train)} cached training samples ({len(samples) - len(train)} more are held out for "
            f"validation) give no full micro-batch of train.micro_batch={params.train.micro_batch} per epoch on "
            f"every one of the {dp} data-parallel ranks (one bucket per micro-batch; each rank reads its own shards "
            "when there are at least as many shards as ranks); add data or lower train.micro_batch / the world size"
        )
    return problems


def deepspeed_config(plan: TrainPlan, params: Params, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config of a plan. DeepSpeed sees every rank as data-parallel (it is not told about the
    sequence-parallel groups), so its batch size counts every rank; the Ulysses gather's backward makes the
    gradient average over all ranks equal the data-parallel average (see sequence_parallel.py)."""
    train = params.train
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.micro_batch * plan.grad_accum * plan.world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {**zero_config(plan.zero_stage, train.offload_optimizer, train.offload_parameters),
                              "reduce_bucket_size": train.reduce_bucket_size,
                              "allgather_bucket_size": train.reduce_bucket_size},
        # The optimizer is a torch.optim.AdamW instance (client optimizer): a config "optimizer" block would
        # select DeepSpeed's FusedAdam, whose JIT build costs minutes and needs a CUDA toolchain.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offload with the torch AdamW (see zero_config)
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # our own progress bar and tracking report progress
        "wall_clock_breakdown": False,
    }


def zero_config(stage: int, offload_optimizer: bool, offload_parameters: bool) -> dict[str, Any]:
    """DeepSpeed's zero_optimization block. Offload keeps the client torch AdamW (it steps on the CPU copies);
    DeepSpeedCPUAdam would be faster but needs a C++ toolchain to JIT-build (`zero_force_ds_cpu_optimizer`
    off lets DeepSpeed accept the torch optimizer)."""
    config: dict[str, Any] = {"stage": stage}
    if offload_optimizer:
        config["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if offload_parameters:
        config["offload_param"] = {"device": "cpu", "pin_memory": False}
    return config


def dump_plan(plan: TrainPlan, ds_config: dict[str, Any]) -> str:
    return json.dumps({"plan": plan.to_dict(), "deepspeed": ds_config}, indent=2)
