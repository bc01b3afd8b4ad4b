"""The training loop of one worker: flow-matching steps, checkpoints that resume exactly, the Wan export.

Exact resume: everything random after start-up is drawn from state that the checkpoint carries, per
rank: the sampler position (epoch, cursor), the loss's generator (sigma, noise, text dropout) and the
global torch / Python RNGs. DeepSpeed's checkpoint holds weights, optimizer and LR schedule. A resumed
run therefore repeats the interrupted run's losses step for step (bit for bit on CPU).

Failures an operator fixes (docs/operations.md, "When things fail"):
- the MLflow server stops answering: the step is finished, recorded in loss.csv, checkpointed, and every rank
  stops (TrackingStopped); `--resume` reopens the run and uploads the steps it missed. Why stop rather than train
  on untracked: the run's record is what registration and the gate read, an operator has to act on the outage
  anyway, and a checkpoint at the failing step makes stopping cost only the restart;
- a checkpoint that cannot be written (full disk): CheckpointWriteError naming the tag folder; the previous
  checkpoint stays intact (its completeness marker, kaleido/train/checkpoints.py);
- a newest checkpoint that is not intact (a file cut short, or bytes that differ from the sha256 its marker
  recorded): the resume starts from the newest intact one and says so.

A resume is honest about params (kaleido.train.checkpoints.resume_problem): a params.yaml edited since the
checkpoint is refused naming the keys; with --apply-param-changes the stage's lr and steps and the cadence keys
take effect from the resumed step (the optimizer's learning rates are rescaled, the schedule keeps its shape), and
the change is printed, recorded in every later checkpoint marker, the MLflow run (a tag and `changed_at_step_N.*`
params: MLflow params cannot be overwritten), export.json and metrics.json, which the registry's lineage reads.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kaleido.config import Params, params_hash
from kaleido.model.flow_matching import flow_matching_loss
from kaleido.platform.files import is_disk_full, named_os_errors, write_text_atomic
from kaleido.train.checkpoints import (
    MARKER_NAME,
    checkpoint_tags,
    describe_changes,
    hash_share,
    read_marker,
    resume_changes,
    resume_point,
    run_params,
    tag_name,
    verify_share,
    write_marker,
)
from kaleido.train.data import BucketBatchSampler, Prefetcher, collate, training_sampler
from kaleido.train.engine import DistContext
from kaleido.train.latents import LatentCache
from kaleido.train.plan import TrainPlan, checkpoint_dir, export_dir, stage_output, stage_preset, tracking_uri
from kaleido.train.tracking import RUN_RECORD, Tracker, flatten, mark_left_behind, peak_memory_gb
from kaleido.train.validation import ValidationResult, ValidationSet

# Test hook: exit hard (no cleanup, like a kill) right after this optimizer step and its checkpoint.
EXIT_AFTER_STEP_ENV = "KALEIDO_TRAIN_EXIT_AFTER_STEP"
SIMULATED_CRASH_EXIT = 86

log = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    """The checkpoint does not fit this run (world size, sequence-parallel degree, stage), or none is intact."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (errno, strerror, filename = its tag folder); the previous one is intact.

    `previous` names the newest intact checkpoint left, if any."""

    def __init__(self, code: int, why: str, tag_dir: Path, previous: str | None):
        super().__init__(code, why, str(tag_dir))
        self.previous = previous


class TrackingStopped(RuntimeError):
    """Every rank stopped after a checkpoint because the MLflow server stopped answering (rank 0 knows the details;
    its message names the server, the step, the checkpoint and how to resume)."""


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    export: Path | None = None
    run_id: str | None = None


def _loss_generator_seed(seed: int, dp_rank: int) -> int:
    # per data-parallel rank, so the ranks of one sequence-parallel group draw the SAME noise
    return (seed * 1_000_003 + dp_rank * 7919 + 12345) % 2**63


def _rank_state(sampler: BucketBatchSampler, generator: torch.Generator) -> dict[str, Any]:
    return {
        "sampler": sampler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python_rng": random.getstate(),
    }


def _restore_rank_state(state: dict[str, Any], sampler: BucketBatchSampler, generator: torch.Generator) -> None:
    sampler.load_state_dict(state["sampler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    random.setstate(state["python_rng"])


def _prune_checkpoints(folder: Path, keep: int, newest: str) -> None:
    """Keep the `keep` newest checkpoints up to `newest` (just written); a later tag is a leftover of a timeline that
    was abandoned by resuming from an earlier checkpoint."""
    tags = checkpoint_tags(folder)
    stale = [tag for tag in tags if tag.name > newest]
    kept = [tag for tag in tags if tag.name <= newest]
    for old in stale + kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class Trainer:
    def __init__(self, params: Params, plan: TrainPlan, ctx: DistContext, engine: Any, resume: bool,
                 apply_changes: bool = False):
        self.params = params
        self.apply_changes = apply_changes
        self.param_changes: list[dict[str, Any]] = []  # [{"step", "changes": {key: [old, new]}}], oldest first
        self.plan = plan
        self.ctx = ctx
        self.engine = engine
        self.resume = resume
        self.cache = LatentCache(plan.latents, params)  # a folder or s3://; shards checked against the index
        self.null_context = self.cache.null_context()
        # only the train split is trained on; the val split (whole held-out source videos) is only evaluated
        self.sampler = training_sampler(self.cache, plan.micro_batch, ctx.dp_rank, ctx.dp_size, params.train.seed)
        settings = params.train.validation
        validation = ValidationSet(self.cache, settings.sigmas, settings.max_samples, settings.seed)
        self.validation = validation if len(validation) else None
        self.generator = torch.Generator().manual_seed(_loss_generator_seed(params.train.seed, ctx.dp_rank))
        self.dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
        self.ckpt_dir = checkpoint_dir(params, plan.stage)
        self.output = stage_output(params, plan.stage)
        self.start_step = 0
        self.run_id: str | None = None
        lora = stage_preset(params, plan.stage).lora
        self.lora = lora if lora.enabled else None  # LoRA fine-tuning: the base stays frozen
        self.samples = None  # held-out samples while training (train.samples.every), drawn by rank 0
        if params.train.samples.every and ctx.is_main:
            from kaleido.train.samples import TrainingSamples

            self.samples = TrainingSamples(params, self.cache, self.output, ctx.device)

    # -- checkpoints ------------------------------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> None:
        """A DeepSpeed checkpoint of every rank, then its completeness marker (rank 0), then pruning.

        CheckpointWriteError when the disk is full; the partial folder is removed and the previous checkpoint, which
        is never pruned before a new one is complete, stays the one a resume starts from."""
        import torch.distributed as dist

        tag = tag_name(step)
        tag_dir = self.ckpt_dir / tag
        if self.ctx.is_main and tag_dir.exists():
            shutil.rmtree(tag_dir)  # a leftover of an abandoned timeline: its old marker must not vouch for new files
        dist.barrier()
        states: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(states, _rank_state(self.sampler, self.generator))
        client = {
            "step": step,
            "stage": self.plan.stage,
            "world_size": self.ctx.world_size,
            "sequence_parallel": self.plan.sequence_parallel,
            "ranks": states,
            "mlflow_run_id": self.run_id,
            "params_hash": params_hash(self.params),
        }
        try:
            # LoRA: the frozen base comes from its own file at every start; only the adapter and its optimizer
            # state are saved
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client,
                                        exclude_frozen_parameters=self.lora is not None)
        except (OSError, RuntimeError) as exc:
            # torch's writer reports ENOSPC as "[enforce fail at inline_container.cc] ... file write failed"
            if not is_disk_full(exc):
                raise
            shutil.rmtree(tag_dir, ignore_errors=True)  # room for the resume; a partial tag is never resumed from
            raise CheckpointWriteError(errno.ENOSPC, os.strerror(errno.ENOSPC), tag_dir,
                                       resume_point(self.ckpt_dir).tag) from exc
        dist.barrier()  # every rank's shard is on disk before the marker vouches for them and an old checkpoint goes
        hashes = self._hash_share(tag_dir)
        if self.ctx.is_main:
            with named_os_errors(tag_dir / MARKER_NAME):
                write_marker(tag_dir, step, hashes, run_params(self.params), self.param_changes)
            _prune_checkpoints(self.ckpt_dir, self.params.train.keep_checkpoints, tag)

    def _hash_share(self, tag_dir: Path) -> dict[str, str]:
        """{relative name: sha256} of every file of a just-written tag, hashed by the ranks in parallel."""
        import torch.distributed as dist

        parts: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(parts, hash_share(tag_dir, self.ctx.rank, self.ctx.world_size))
        return {name: digest for part in parts for name, digest in part.items()}

    def _verify_tag(self, tag: str) -> str | None:
        """Why the tag's files differ from their recorded sha256s (the ranks check a share each), or None."""
        import torch.distributed as dist

        found: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(found, verify_share(self.ckpt_dir / tag, self.ctx.rank, self.ctx.world_size))
        return next((item for item in found if item), None)

    def load_checkpoint(self) -> None:
        """Restore the newest intact checkpoint (a newer one that is not intact is skipped, with a warning)."""
        corrupted: dict[str, str] = {}
        point = resume_point(self.ckpt_dir)
        while point.tag is not None and (problem := self._verify_tag(point.tag)) is not None:
            corrupted[point.tag] = problem
            point = resume_point(self.ckpt_dir, corrupted)
        if point.tag is None:
            raise ResumeError(f"--resume: no intact DeepSpeed checkpoint in {self.ckpt_dir}"
                              + (f" ({point.describe_skipped()})" if point.skipped else "")
                              + "; start without --resume")
        if point.skipped and self.ctx.is_main:
            log.warning("resuming from %s, the newest intact checkpoint in %s: skipped %s", point.tag, self.ckpt_dir,
                        point.describe_skipped())
        path, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=point.tag,
                                                   load_module_strict=self.lora is None)
        if path is None or client is None:
            raise ResumeError(f"--resume: no loadable DeepSpeed checkpoint in {self.ckpt_dir / point.tag}")
        for key, mine in (("stage", self.plan.stage), ("world_size", self.ctx.world_size),
                          ("sequence_parallel", self.plan.sequence_parallel)):  # fmt: skip
            if client.get(key) != mine:
                raise ResumeError(
                    f"--resume: the checkpoint in {self.ckpt_dir} was written with {key}={client.get(key)}, "
                    f"this run has {key}={mine}; resume with the same train.nproc_per_node / "
                    "train.sequence_parallel, or start without --resume"
                )
        _restore_rank_state(client["ranks"][self.ctx.rank], self.sampler, self.generator)
        self.start_step = int(client["step"])
        self.run_id = client.get("mlflow_run_id")
        self._apply_param_changes(read_marker(self.ckpt_dir / point.tag))

    def _apply_param_changes(self, marker: dict[str, Any]) -> None:
        """Carry the run's change history on; apply this resume's changes (the plan refused any that may not be
        applied, or any at all without --apply-param-changes)."""
        self.param_changes = list(marker.get("changes") or [])
        recorded = marker.get("params")
        if recorded is None:
            return  # a checkpoint written before params were recorded: nothing to compare
        changes = resume_changes(recorded, run_params(self.params), self.plan.stage)
        if not changes:
            return
        if not self.apply_changes:  # the plan checks this first; a worker started by hand must not slip past
            raise ResumeError(f"--resume: params changed since the checkpoint: {describe_changes(changes)}; pass "
                              "--apply-param-changes to apply them, or put them back")
        lr_key = f"train.{self.plan.stage}.lr"
        if lr_key in changes:
            old, new = changes[lr_key]
            scale = float(new) / float(old)
            scheduler = self.engine.lr_scheduler
            # every group keeps its ratio to the base lr, and the schedule its shape: only the base moves
            for group in scheduler.optimizer.param_groups:
                group["lr"] *= scale
                if "initial_lr" in group:
                    group["initial_lr"] *= scale
            scheduler.base_lrs = [base * scale for base in scheduler.base_lrs]
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        self.param_changes.append({"step": self.start_step,
                                   "changes": {key: [old, new] for key, (old, new) in changes.items()}})
        if self.ctx.is_main:
            print(f"resumed at step {self.start_step} with changed params (applied from step {self.start_step + 1}): "
                  f"{describe_changes(changes)}", flush=True)

    # -- export ------------------------------------------------------------------------------------------

    def export(self, step: int) -> Path | None:
        """Consolidated weights (gathered first under ZeRO-3); rank 0 writes. Full fine-tuning: the DiT in the
        original Wan2.1 layout. LoRA: the adapter only, in the peft layout plus the diffusers
        (pytorch_lora_weights.safetensors) and Wan / ComfyUI (lora_wan.safetensors) layouts."""
        import deepspeed
        import torch.distributed as dist

        from kaleido.model.checkpoint import save_dit
        from kaleido.model.settings import ModelSettings

        module = self.engine.module
        settings = ModelSettings.from_params(self.params)  # what this model was trained with, carried with it
        lora = self.lora
        # LoRA: gather the adapter only; the base is the init file, unchanged
        wanted = [p for p in module.parameters() if p.requires_grad] if lora else list(module.parameters())

        def snapshot() -> dict[str, torch.Tensor]:
            if lora:
                from kaleido.model.lora import adapter_of

                return adapter_of(module, lora.rank, lora.alpha).state
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

        state: dict[str, torch.Tensor] = {}
        if self.plan.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(wanted, modifier_rank=None):
                if self.ctx.is_main:
                    state = snapshot()
        elif self.ctx.is_main:
            state = snapshot()
        target = export_dir(self.params, self.plan.stage)
        if self.ctx.is_main:
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            # lineage of the version; paths relative (the export beside this file, the base to the repository), so a
            # copied or cloned run folder still names its own files
            base = {"base": _portable(self.plan.init, self.params.base_dir), "base_model": self.plan.base_model or ""}
            info: dict[str, Any] = {
                "stage": self.plan.stage, "step": step, "format": "wan",
                "path": os.path.relpath(target, self.output),
                "params_hash": params_hash(self.params), "mlflow_run_id": self.run_id, "config": module.cfg.to_dict(),
                "model_settings": settings.to_dict(), "param_changes": self.param_changes, **base,
            }  # fmt: skip
            try:
                if lora:
                    from kaleido.model.lora import Adapter, save_adapter_layouts

                    adapter = Adapter(state, lora.rank, lora.alpha,
                                      {**base, "model_settings": json.dumps(settings.to_dict())})
                    save_adapter_layouts(adapter, partial)
                    info.update(format="lora", lora={"rank": lora.rank, "alpha": lora.alpha,
                                                     "targets": adapter.targets,
                                                     "parameters": adapter.num_parameters()})
                else:
                    save_dit(state, partial, "wan", module.cfg, settings=settings)
            except Exception as exc:  # safetensors' writer reports a full disk as its own error, naming no path
                if not is_disk_full(exc) and "No space left on device" not in str(exc):
                    raise
                shutil.rmtree(partial, ignore_errors=True)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial)) from exc
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)  # the registry never sees half an export
            from kaleido.platform.integrity import folder_manifest

            info["files"] = folder_manifest(target)  # the seal its readers check (kaleido.train.plan.verify_export)
            write_text_atomic(self.output / "export.json", json.dumps(info, indent=2) + "\n")
        dist.barrier()
        return target if self.ctx.is_main else None

    # -- validation ------------------------------------------------------------------------------------------

    def validate(self, step: int, tracker: Tracker, record: bool = True) -> ValidationResult | None:
        """The held-out loss at `step` on every rank together (step 0: the model before any update).

        record=False computes it without logging (a resume after the last step: the same numbers are on record)."""
        import torch.distributed as dist

        if self.validation is None:
            return None

        def gather(obj: Any) -> list[Any]:
            parts: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(parts, obj)
            return parts

        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            result = self.validation.evaluate(
                module, self.params.model.text_len, self.dtype, self.ctx.device, self.ctx.dp_rank, self.ctx.dp_size,
                gather,
            )
        finally:
            module.train(was_training)
        if record:
            tracker.log_validation(step, result.metrics(), result.per_level)
        if self.ctx.is_main and step == 0:
            write_text_atomic(self.output / "val_base.json", json.dumps(result.to_json(), indent=1) + "\n")
        return result

    # -- the loop ------------------------------------------------------------------------------------------

    def _tracker(self, progress: bool) -> Tracker:
        import torch.distributed as dist

        tracker = Tracker(self.ctx.is_main, self.output, self.plan.steps, self.start_step, self.resume, progress)
        uri = tracking_uri(self.params)
        if self.ctx.is_main and uri:
            # a fresh start: the run an outage or a kill left RUNNING is marked FAILED now (a resume continues it)
            mark_left_behind(uri, self.output / RUN_RECORD, f"training of stage {self.plan.stage}", keep=self.run_id)
            flat = flatten(self.params.model_dump(mode="json"))
            flat.update(flatten(self.plan.to_dict(), "plan."))
            tags = {"stage": self.plan.stage, "params_hash": params_hash(self.params)}
            run = os.environ.get("KALEIDO_RUN", f"{self.plan.stage}-{time.strftime('%Y%m%d-%H%M%S')}")
            tags["kaleido_run"] = run
            self.run_id = tracker.start_mlflow(uri, self.params.train.experiment, run, flat, tags, self.run_id)
            if self.resume and self.param_changes and self.param_changes[-1]["step"] == self.start_step:
                tracker.record_param_changes(self.param_changes)
        shared = [self.run_id]
        dist.broadcast_object_list(shared, src=0)  # every rank's checkpoint carries the run id
        self.run_id = shared[0]
        return tracker

    def train(self, progress: bool = True) -> TrainResult:
        import torch.distributed as dist

        if self.resume:
            self.load_checkpoint()
        else:
            # A fresh run owns its checkpoint folder: an older run's `latest` must never be resumed into it,
            # and its higher step numbers would outlive this run's checkpoints when pruning.
            if self.ctx.is_main and self.ckpt_dir.exists():
                print(f"fresh run: removing the previous checkpoints in {self.ckpt_dir}", flush=True)
                shutil.rmtree(self.ckpt_dir)
            dist.barrier()
        tracker = self._tracker(progress)
        if self.ctx.is_main and self.validation is None:
            print(f"no validation samples in {self.plan.latents} (the data has one source video, or "
                  "data.validation.share is 0): training without val/loss", flush=True)
        last_validation = self.validate(0, tracker) if not self.resume else None
        if self.resume and self.start_step >= self.plan.steps:
            # resumed after the last step (an outage stopped the final upload): the summary needs the final
            # held-out loss, which is deterministic and already on record
            last_validation = self.validate(self.plan.steps, tracker, record=False)
        every = self.params.train.validation.every
        exit_after = int(os.environ.get(EXIT_AFTER_STEP_ENV, "0") or 0)
        fm = self.params.flow_matching
        text_len = self.params.model.text_len
        patch = self.engine.module.cfg.patch_size
        sp = self.plan.sequence_parallel
        loader = Prefetcher(self.cache, self.sampler)  # this rank's shards, read ahead in a background thread
        result = TrainResult(steps=self.plan.steps)
        status = "FAILED"
        try:
            for step in range(self.start_step + 1, self.plan.steps + 1):
                started = time.perf_counter()
                lr = float(self.engine.get_lr()[0])  # the LR this step's update uses
                loss_sum, tokens, samples = 0.0, 0, 0
                for _ in range(self.plan.grad_accum):
                    indices, items = loader.next()
                    micro = collate(
                        self.cache, indices, self.null_context, text_len, patch, self.dtype, self.ctx.device, items
                    )
                    loss, _ = flow_matching_loss(self.engine, micro.batch, fm, self.generator)
                    self.engine.backward(loss)
                    self.engine.step()
                    loss_sum += float(loss.detach())
                    size = micro.batch.latents.shape[0]
                    tokens += micro.tokens * size
                    samples += size
                grad_norm = self.engine.get_global_grad_norm()
                # ranks of one sequence-parallel group saw the same samples: count them once
                totals = torch.tensor(
                    [loss_sum / self.plan.grad_accum, tokens / sp, samples / sp],
                    dtype=torch.float64, device=self.ctx.device,
                )  # fmt: skip
                dist.all_reduce(totals)
                totals = totals.cpu()
                elapsed = time.perf_counter() - started
                mean_loss = float(totals[0]) / self.ctx.world_size
                metrics = {
                    "loss": mean_loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "tokens_per_s": float(totals[1]) / elapsed,
                    "samples_per_s": float(totals[2]) / elapsed,
                    "step_time_s": elapsed,
                    "peak_memory_gb": peak_memory_gb(self.ctx.device),
                }
                result.losses.append(mean_loss)
                saved = step % self.params.train.checkpoint_every == 0 or step == self.plan.steps
                if saved:
                    self.save_checkpoint(step)
                tracker.log_step(step, metrics)
                if step == self.plan.steps or (every and step % every == 0):
                    last_validation = self.validate(step, tracker)
                if self.samples is not None and self.samples.due(step):
                    tracker.log_samples(step, self.samples.generate(self.engine.module, step))
                if self._tracking_lost(tracker):
                    if not saved:
                        self.save_checkpoint(step)  # nothing trained so far is lost
                    raise self._tracking_stopped(tracker, step)
                if step == exit_after:
                    dist.barrier()
                    os._exit(SIMULATED_CRASH_EXIT)  # no cleanup: what a kill leaves behind
            result.export = self.export(self.plan.steps)
            result.run_id = self.run_id
            if self.ctx.is_main:
                self._write_summary(result, last_validation)
                tracker.log_artifacts(
                    [self.output / name for name in ("loss.csv", "metrics.json", "export.json", "val_loss.csv",
                                                     "val_loss.json")],
                    {"export_path": str(result.export)},
                )
            if self._tracking_lost(tracker):
                raise self._tracking_stopped(tracker, self.plan.steps, finished=True)
            status = "FINISHED"
            return result
        finally:
            loader.close()
            tracker.finish(status)

    def _tracking_lost(self, tracker: Tracker) -> bool:
        """Whether rank 0's tracker lost the MLflow server, agreed by every rank (they checkpoint and stop
        together: a checkpoint is a collective)."""
        import torch.distributed as dist

        flag = torch.tensor([1.0 if tracker.down is not None else 0.0], device=self.ctx.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _tracking_stopped(self, tracker: Tracker, step: int, finished: bool = False) -> TrackingStopped:
        """The stop's message (rank 0 has the details): the server, the step, what is safe, how to resume."""
        down = tracker.down
        if down is None:  # another rank: rank 0 prints the message
            return TrackingStopped("the MLflow server stopped answering (rank 0 reports it)")
        resume = f"kaleido train --stage {self.plan.stage} --resume"
        if finished:
            export = export_dir(self.params, self.plan.stage)
            what = f"training finished ({self.plan.steps} steps, export at {export}) but the run's end was not recorded"
        else:
            what = (f"training stopped after step {step}: checkpoint {self.ckpt_dir / tag_name(step)} and "
                    f"{self.output / 'loss.csv'} hold every step so far")
        return TrackingStopped(
            f"the MLflow server at {down.uri} stopped answering ({down.what}: {down.why}); {what}. Once the server "
            f"answers again, `{resume}` continues MLflow run {tracker.run_id} and uploads the steps it missed"
        )

    def _write_summary(self, result: TrainResult, validation: ValidationResult | None) -> None:
        """metrics.json (DVC's metrics: train loss first -> last, val loss base -> final) and val_loss.json."""
        from kaleido.train.tracking import read_loss_curve

        rows = read_loss_curve(self.output / "loss.csv")
        tail = [row["loss"] for row in rows[-10:]]
        summary: dict[str, Any] = {
            "stage": self.plan.stage,
            "steps": self.plan.steps,
            "first_loss": rows[0]["loss"] if rows else None,
            "final_loss": rows[-1]["loss"] if rows else None,
            "mean_loss_last_10": sum(tail) / len(tail) if tail else None,
            "mean_tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows) if rows else None,
            "export": str(result.export),
            "mlflow_run_id": self.run_id,
            "param_changes": self.param_changes,  # params applied mid-run by a resume, with their step
            "plan": self.plan.to_dict(),
        }
        base_path = self.output / "val_base.json"
        if validation is not None and base_path.is_file():
            base = json.loads(base_path.read_text())
            summary.update({"val_loss_base": base["loss"], "val_loss": validation.loss,
                            "val_loss_change": validation.loss - base["loss"],
                            "reference_reliance_base": base.get("reference_reliance"),
                            "reference_reliance": validation.reference_reliance if validation.shuffled else None})
            record = {
                "fingerprint": validation.fingerprint, "sigmas": self.params.train.validation.sigmas,
                "seed": self.params.train.validation.seed, "latents": self.plan.latents, "base": base,
                "text_len": self.params.model.text_len,
                "final": validation.to_json(), "init": self.plan.init, "step": self.plan.steps,
            }
            write_text_atomic(self.output / "val_loss.json", json.dumps(record, indent=1) + "\n")
        write_text_atomic(self.output / "metrics.json", json.dumps(summary, indent=2) + "\n")


def _portable(path: str, base_dir: Path) -> str:
    """`path` relative to the repository (params.yaml's folder) when it lies inside it, else as given."""
    if not path or "://" in path or path.startswith("models:"):
        return path  # models:/name/3, s3://...
    resolved = Path(path).resolve()
    return os.path.relpath(resolved, base_dir) if resolved.is_relative_to(base_dir.resolve()) else path
