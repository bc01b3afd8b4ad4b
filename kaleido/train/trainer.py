"""The training loop of one worker: flow-matching steps, checkpoints that resume exactly, the Wan export.

Exact resume: everything random after start-up is drawn from state that the checkpoint carries, per
rank: the sampler position (epoch, cursor), the loss's generator (sigma, noise, text dropout) and the
global torch / Python RNGs. DeepSpeed's checkpoint holds weights, optimizer and LR schedule. A resumed
run therefore repeats the interrupted run's losses step for step (bit for bit on CPU).
"""

from __future__ import annotations

import json
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
from kaleido.train.data import BucketBatchSampler, collate, training_sampler
from kaleido.train.engine import DistContext
from kaleido.train.latents import LatentCache
from kaleido.train.plan import TrainPlan, checkpoint_dir, export_dir, stage_output, stage_preset, tracking_uri
from kaleido.train.tracking import Tracker, flatten, peak_memory_gb
from kaleido.train.validation import ValidationResult, ValidationSet

# Test hook: exit hard (no cleanup, like a kill) right after this optimizer step and its checkpoint.
EXIT_AFTER_STEP_ENV = "KALEIDO_TRAIN_EXIT_AFTER_STEP"
SIMULATED_CRASH_EXIT = 86
TAG_PREFIX = "step"


class ResumeError(RuntimeError):
    """The checkpoint does not fit this run (world size, sequence-parallel degree, stage)."""


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


def _prune_checkpoints(folder: Path, keep: int) -> None:
    tags = sorted(p for p in folder.glob(f"{TAG_PREFIX}*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class Trainer:
    def __init__(self, params: Params, plan: TrainPlan, ctx: DistContext, engine: Any, resume: bool):
        self.params = params
        self.plan = plan
        self.ctx = ctx
        self.engine = engine
        self.resume = resume
        self.cache = LatentCache(plan.latents)
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

    # -- checkpoints ------------------------------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> None:
        import torch.distributed as dist

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
        # LoRA: the frozen base comes from its own file at every start; only the adapter and its optimizer state
        # are saved
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"{TAG_PREFIX}{step:08d}", client_state=client,
                                    exclude_frozen_parameters=self.lora is not None)
        dist.barrier()  # every rank's shard is on disk before an old checkpoint goes
        if self.ctx.is_main:
            _prune_checkpoints(self.ckpt_dir, self.params.train.keep_checkpoints)

    def load_checkpoint(self) -> None:
        path, client = self.engine.load_checkpoint(str(self.ckpt_dir), load_module_strict=self.lora is None)
        if path is None or client is None:
            raise ResumeError(f"--resume: no loadable DeepSpeed checkpoint in {self.ckpt_dir}")
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

    # -- export ------------------------------------------------------------------------------------------

    def export(self, step: int) -> Path | None:
        """Consolidated weights (gathered first under ZeRO-3); rank 0 writes. Full fine-tuning: the DiT in the
        original Wan2.1 layout. LoRA: the adapter only, in the peft layout plus the diffusers
        (pytorch_lora_weights.safetensors) and Wan / ComfyUI (lora_wan.safetensors) layouts."""
        import deepspeed
        import torch.distributed as dist

        from kaleido.model.checkpoint import save_dit

        module = self.engine.module
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
            base = {"base": self.plan.init, "base_model": self.plan.base_model or ""}  # lineage of the version
            info: dict[str, Any] = {
                "stage": self.plan.stage, "step": step, "format": "wan", "path": str(target),
                "params_hash": params_hash(self.params), "mlflow_run_id": self.run_id, "config": module.cfg.to_dict(),
                **base,
            }  # fmt: skip
            if lora:
                from kaleido.model.lora import Adapter, save_adapter_layouts

                adapter = Adapter(state, lora.rank, lora.alpha, base)
                save_adapter_layouts(adapter, partial)
                info.update(format="lora", lora={"rank": lora.rank, "alpha": lora.alpha, "targets": adapter.targets,
                                                 "parameters": adapter.num_parameters()})
            else:
                save_dit(state, partial, "wan", module.cfg)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)  # the registry never sees half an export
            (self.output / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        dist.barrier()
        return target if self.ctx.is_main else None

    # -- validation ------------------------------------------------------------------------------------------

    def validate(self, step: int, tracker: Tracker) -> ValidationResult | None:
        """The held-out loss at `step` on every rank together (step 0: the model before any update)."""
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
        tracker.log_validation(step, result.metrics(), result.per_level)
        if self.ctx.is_main and step == 0:
            (self.output / "val_base.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
        return result

    # -- the loop ------------------------------------------------------------------------------------------

    def _tracker(self, progress: bool) -> Tracker:
        import torch.distributed as dist

        tracker = Tracker(self.ctx.is_main, self.output, self.plan.steps, self.start_step, self.resume, progress)
        uri = tracking_uri(self.params)
        if self.ctx.is_main and uri:
            flat = flatten(self.params.model_dump(mode="json"))
            flat.update(flatten(self.plan.to_dict(), "plan."))
            tags = {"stage": self.plan.stage, "params_hash": params_hash(self.params)}
            run = os.environ.get("KALEIDO_RUN", f"{self.plan.stage}-{time.strftime('%Y%m%d-%H%M%S')}")
            tags["kaleido_run"] = run
            self.run_id = tracker.start_mlflow(uri, self.params.train.experiment, run, flat, tags, self.run_id)
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
        every = self.params.train.validation.every
        exit_after = int(os.environ.get(EXIT_AFTER_STEP_ENV, "0") or 0)
        fm = self.params.flow_matching
        text_len = self.params.model.text_len
        patch = self.engine.module.cfg.patch_size
        sp = self.plan.sequence_parallel
        batches = iter(self.sampler)
        result = TrainResult(steps=self.plan.steps)
        status = "FAILED"
        try:
            for step in range(self.start_step + 1, self.plan.steps + 1):
                started = time.perf_counter()
                lr = float(self.engine.get_lr()[0])  # the LR this step's update uses
                loss_sum, tokens, samples = 0.0, 0, 0
                for _ in range(self.plan.grad_accum):
                    micro = collate(
                        self.cache, next(batches), self.null_context, text_len, patch, self.dtype, self.ctx.device
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
                if step % self.params.train.checkpoint_every == 0 or step == self.plan.steps:
                    self.save_checkpoint(step)
                tracker.log_step(step, metrics)
                if step == self.plan.steps or (every and step % every == 0):
                    last_validation = self.validate(step, tracker)
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
            status = "FINISHED"
            return result
        finally:
            tracker.finish(status)

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
            "plan": self.plan.to_dict(),
        }
        base_path = self.output / "val_base.json"
        if validation is not None and base_path.is_file():
            base = json.loads(base_path.read_text())
            summary.update({"val_loss_base": base["loss"], "val_loss": validation.loss,
                            "val_loss_change": validation.loss - base["loss"]})
            record = {
                "fingerprint": validation.fingerprint, "sigmas": self.params.train.validation.sigmas,
                "seed": self.params.train.validation.seed, "latents": self.plan.latents, "base": base,
                "text_len": self.params.model.text_len,
                "final": validation.to_json(), "init": self.plan.init, "step": self.plan.steps,
            }
            (self.output / "val_loss.json").write_text(json.dumps(record, indent=1) + "\n")
        (self.output / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
