"""Training commands: `kaleido encode` (latent cache) and `kaleido train --stage pretrain|sft`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kaleido.cli.app import ParamsOption, app, fail, read_params, require_tracking

if TYPE_CHECKING:
    from kaleido.config import Params

StageOption = Annotated[str, typer.Option("--stage", help="training stage: pretrain or sft")]


def _params_path(path: Path | None) -> Path:
    from kaleido.config import ParamsError, find_params_file

    try:
        return path if path is not None else find_params_file()
    except ParamsError as exc:
        fail(str(exc))
        raise  # unreachable, for type checkers


@app.command("encode")
def encode(
    params: ParamsOption = None,
    stage: StageOption = "pretrain",
    force: Annotated[bool, typer.Option("--force", help="re-encode every shard, not only new or changed ones")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Encode the training set once: VAE latents of clips and references, umT5 caption embeddings.

    Only the latent shards whose dataset tar changed are encoded; with train.encode_ranks > 1 the shards are split
    over that many torchrun processes (one per GPU), each a disjoint, resumable share."""
    from kaleido.train.plan import STAGES

    if stage not in STAGES:
        fail(f"--stage {stage}: unknown; choose one of {', '.join(STAGES)}")
    from kaleido.platform.files import exclusive_output
    from kaleido.platform.storage import StorageError
    from kaleido.train.encode import encode_output, run_encode

    path = _params_path(params)
    loaded = read_params(path)
    try:
        out, remote = encode_output(loaded, stage)
        with exclusive_output(out, "kaleido encode"):  # one writer per latent cache
            ranks = loaded.train.encode_ranks
            if ranks == 1:
                report = run_encode(loaded, stage, force=force, progress=not quiet)
                typer.echo(report.summary())
                return
            from kaleido.train.launch_local import launch_local

            if force:  # every shard's marker dropped: each rank re-encodes its share
                out.mkdir(parents=True, exist_ok=True)
                for marker in out.glob("*.done"):
                    marker.unlink()
                if remote is not None:
                    remote.remove([name for name in remote.listing("") if name.endswith(".done")])
            result = launch_local(path, stage, ranks, module="kaleido.train.encode_worker", progress=not quiet)
    except (FileNotFoundError, ValueError, StorageError) as exc:  # IntegrityError too (a ValueError)
        fail(str(exc))
        raise  # unreachable, for type checkers
    if result.operator_error:
        fail(result.operator_error)
    if result.returncode:
        fail(f"encode failed: {result.failure or f'torchrun exit code {result.returncode}'} (finished shards are "
             "kept: run it again to resume)", code=1)


@app.command("train")
def train(
    stage: StageOption,
    params: ParamsOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the stage's latest checkpoint")] = False,
    apply_param_changes: Annotated[
        bool, typer.Option("--apply-param-changes", help="with --resume: continue with params.yaml's changed lr, "
                           "steps or checkpoint/validation cadence from the resumed step on (recorded in the run); "
                           "without it a changed params.yaml is refused, naming the keys"),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="check everything and print the plan (local) or manifests (kubernetes)")
    ] = False,
    memory_plan: Annotated[
        bool, typer.Option("--plan", help="print the estimated memory per rank and whether it fits "
                           "train.gpu_memory_gb; starts nothing (no data or server needed)"),
    ] = False,
    gpus: Annotated[
        int | None, typer.Option("--gpus", min=1, help="with --plan: plan for this many GPUs in all (default: the "
                                 "launcher's: train.kubernetes.nodes x gpus_per_node, or train.nproc_per_node)"),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="with --plan: gpu | cpu, where the plan runs (default: the "
                                 "launcher's: GPUs for kubernetes, this machine for local)"),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="with --plan: bf16 | fp32 (default: bf16 on GPUs, fp32 on a CPU)"),
    ] = None,
) -> None:
    """Train one stage with DeepSpeed (train.launcher: local torchrun, or a Kubernetes Job).

    Every launch first checks the plan, memory included: a plan estimated above train.gpu_memory_gb is refused
    with the options that would fit (`--plan` prints the table). `--plan --gpus 16 --device gpu` plans the cluster
    job from any machine (a laptop without a GPU included)."""
    from kaleido.cli.app import effective_params_file
    from kaleido.train.plan import STAGES, TrainPlanError, deepspeed_config, dump_plan, plan_training, world_size

    if stage not in STAGES:
        fail(f"--stage {stage}: unknown; choose one of {', '.join(STAGES)}")
    if (gpus, device, dtype) != (None, None, None) and not memory_plan:
        fail("--gpus, --device and --dtype describe the target of --plan; add --plan (a launch takes the layout "
             "from params.yaml: train.kubernetes.* or train.nproc_per_node, or -S KEY=VALUE)")
    path = _params_path(params)
    loaded = read_params(path)
    train_cfg = loaded.train
    if memory_plan:
        _print_memory_plan(loaded, stage, gpus, device, dtype)
        return
    path = effective_params_file(path)  # with -S items: the file the ranks or pods read
    if train_cfg.launcher == "kubernetes":
        try:
            # the cache, weights and tracking server live where the pods run: they check those themselves
            plan_training(loaded, stage, world_size(loaded), resume=resume, check_files=False, check_tracking=False)
        except TrainPlanError as exc:
            fail(str(exc))
        from kaleido.train.launch_kubernetes import launch_kubernetes

        raise typer.Exit(launch_kubernetes(loaded, stage, resume, dry_run, path, apply_changes=apply_param_changes))

    from kaleido.platform.services import is_embedded_tracking
    from kaleido.train.plan import tracking_uri

    # The embedded default's MLflow server is started below, after a good plan (a run that cannot train starts
    # nothing); any other server must answer now, and the plan lists it with every other problem.
    startable = is_embedded_tracking(loaded, tracking_uri(loaded))
    try:
        plan = plan_training(loaded, stage, world_size(loaded), resume=resume, check_tracking=not startable,
                             apply_changes=apply_param_changes)
    except TrainPlanError as exc:
        fail(str(exc))
        raise  # unreachable, for type checkers
    if startable and not dry_run:
        require_tracking(loaded, tracking_uri(loaded))
    from kaleido.train.launch_local import launch_local, torchrun_command

    if dry_run:  # stdout: the plan and DeepSpeed config as JSON (YAML too); the prose to stderr
        typer.echo(plan.describe(), err=True)
        typer.echo("command: " + " ".join(torchrun_command(path.resolve(), stage, plan.world_size, resume,
                                                           apply_changes=apply_param_changes)), err=True)
        typer.echo(dump_plan(plan, deepspeed_config(plan, loaded, bf16=_has_gpu())))
        return
    from kaleido.platform.files import exclusive_output

    with exclusive_output(Path(plan.output), "kaleido train"):  # two runs into one stage folder mix checkpoints
        result = launch_local(path, stage, plan.world_size, resume, apply_changes=apply_param_changes)
    if result.operator_error:  # a full disk, the MLflow server gone, a truncated file: the rank's own line, exit 2
        fail(result.operator_error)
    if result.returncode:
        fail(f"training stage {stage!r} failed: {result.failure or f'torchrun exit code {result.returncode}'}", code=1)
    summary = Path(plan.output) / "metrics.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        what = "LoRA adapter" if plan.lora_rank else "Wan weights"
        typer.echo(f"{stage}: final loss {data['final_loss']:.4f}; {what} at {data['export']}")


def _print_memory_plan(params: Params, stage: str, gpus: int | None, device: str | None, dtype: str | None) -> None:
    from kaleido.train.memory import estimate, shape_from_params, table, training_precision
    from kaleido.train.plan import TrainPlanError, model_config, plan_training, world_size, world_size_keys

    if device not in (None, "gpu", "cpu"):
        fail(f"--device {device}: choose gpu or cpu")
    if dtype not in (None, "bf16", "fp32"):
        fail(f"--dtype {dtype}: choose bf16 or fp32")
    launcher_device = "gpu" if training_precision(params) == "bf16" else "cpu"
    device = device or launcher_device
    precision = dtype or ("bf16" if device == "gpu" else "fp32")
    if device == "cpu" and precision == "bf16":
        fail("--device cpu --dtype bf16: the CPU path trains in fp32 (DeepSpeed's CPU accelerator); use --dtype fp32")
    world, keys = (gpus, "--gpus") if gpus else (world_size(params), world_size_keys(params))
    budget = params.train.gpu_memory_gb
    try:
        plan_training(params, stage, world, check_files=False, check_tracking=False, precision=precision,
                      world_source=keys)
    except TrainPlanError as exc:
        # a memory refusal comes with the table that explains it; a layout problem (batch, SP degree) makes a
        # table meaningless and shows none
        if exc.memory is not None:
            typer.echo(table(exc.memory, budget))
        fail(str(exc))
    config, source = model_config(params, stage)
    where = (f"{device} ({'the launcher' if device == launcher_device else '--device'}: train.launcher "
             f"{params.train.launcher})")
    typer.echo(f"model: {source} ({config.num_layers} blocks, dim {config.dim}); world size {world} ({keys}); "
               f"target {where}, {precision}")
    shape = shape_from_params(params, stage, world, config, precision=precision)
    on_gpu = device == "gpu"
    typer.echo(table(estimate(shape), budget if on_gpu else None))
    if not on_gpu:
        typer.echo("plan: ok (fp32 on a CPU: no GPU budget applies; `--device gpu` plans for GPUs, e.g. the "
                   "cluster's, from this machine)")
    else:
        typer.echo("plan: fits" if budget else "plan: ok (no train.gpu_memory_gb budget)")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@app.command("learnable-task")
def learnable_task(
    out: Annotated[Path, typer.Option("--out", help="work folder: data, latents, runs, report.json")] = Path(
        "artifacts/learnable"),
    steps: Annotated[int | None, typer.Option(help="optimizer steps of each training (batch 8); default 600 "
                                                   "(colour), 1200 (slots)", min=1)] = None,
    ablations: Annotated[bool, typer.Option("--ablations", help="colour task: also train with R-RoPE `none`")] = False,
    task: Annotated[str, typer.Option(help="colour: one reference decides the subject's colour; slots: three "
                                           "references decide the colour of each slot (Tables 2/3 in miniature)")
                    ] = "colour",
    variants: Annotated[str, typer.Option(help="slots: R-RoPE variants to train, comma-separated")] = (
        "none,shift_w,shift_h,shift_wh,time_fixed_neg"),
    seeds: Annotated[str, typer.Option(help="slots: training seeds, comma-separated")] = "0,1",
    pretrain_steps: Annotated[int, typer.Option(help="slots: text-to-video steps first (0: none)", min=0)] = 0,
    cross_pairing: Annotated[bool, typer.Option("--cross-pairing", help="slots: also Table 3 (backgrounds, "
                                                                         "with / without cross-paired references)")
                             ] = False,
    params: ParamsOption = None,
) -> None:
    """Show that training makes the tiny model follow its references (CPU tasks with held-out samples)."""
    if task not in ("colour", "slots"):
        fail(f"--task {task}: use colour or slots")
    from kaleido.model.rope import ROPE_VARIANTS

    chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
    unknown = [v for v in chosen if v not in ROPE_VARIANTS]
    if unknown or not chosen:
        fail(f"--variants {variants!r}: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; choose "
             f"from {', '.join(ROPE_VARIANTS)}")
    try:
        chosen_seeds = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        fail(f"--seeds {seeds!r}: comma-separated integers, e.g. 0,1,2")
    # an option of the other task is refused, not silently ignored
    defaults = {"variants": "none,shift_w,shift_h,shift_wh,time_fixed_neg", "seeds": "0,1"}
    misplaced = ([f"--{k}" for k, v in (("variants", variants), ("seeds", seeds)) if v != defaults[k]]
                 + (["--pretrain-steps"] if pretrain_steps else []) + (["--cross-pairing"] if cross_pairing else [])
                 if task == "colour" else (["--ablations"] if ablations else []))
    if misplaced:
        fail(f"{', '.join(misplaced)}: not an option of --task {task}; "
             f"use --task {'slots' if task == 'colour' else 'colour'} for it")
    loaded = read_params(params)
    assets = {}
    for key in ("checkpoint", "vae", "text_encoder", "tokenizer"):
        path = loaded.resolve(getattr(loaded.model, key))
        if path is None or not path.exists():
            fail(f"model.{key}: {path} does not exist; run `kaleido init-tiny` first (the task uses the tiny assets)")
        assets[key] = str(path)
    try:
        if task == "slots":
            from kaleido.train.multi_subject import TrainSettings, run_table

            table = run_table(out, assets, chosen, chosen_seeds,
                              TrainSettings(steps=steps or 1200),
                              pretrain_steps, cross_pairing=cross_pairing, echo=typer.echo)
            typer.echo(table.markdown())
            typer.echo(f"report: {out / 'report.json'}")
            return
        from kaleido.train.learnable_task import run_learnable_task

        report = run_learnable_task(out, assets, steps or 600, ablations, echo=typer.echo)
    except typer.Exit:  # a refusal already said (click's Exit is a RuntimeError)
        raise
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
        raise  # unreachable, for type checkers
    typer.echo(report.table())
    typer.echo(f"report: {out / 'report.json'}")
