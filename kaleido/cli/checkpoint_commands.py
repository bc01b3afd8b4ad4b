"""`kaleido convert-checkpoint`, `inspect-checkpoint` and `merge-lora`: DiT weights across Wan2.1, diffusers and SAT,
and LoRA adapters across the peft, diffusers and Wan / ComfyUI layouts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kaleido.cli.app import app, fail

if TYPE_CHECKING:
    from kaleido.model.dit import DiTConfig

ArchOption = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="DiT config (tiny, mid, 1.3B, 14B) when the checkpoint has no config.json and its head count "
        "cannot be inferred",
    ),
]


def _arch_config(arch: str | None) -> DiTConfig | None:
    if arch is None:
        return None
    from kaleido.model.dit import dit_config

    try:
        return dit_config(arch)
    except ValueError as exc:
        fail(f"--arch {arch}: {exc}")
        raise  # unreachable, for type checkers


def _human(count: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(count) < 1000:
            return f"{count:.3g}{unit}"
        count /= 1000
    return f"{count:.3g}T"


@app.command("convert-checkpoint")
def convert_checkpoint_command(
    src: Annotated[Path, typer.Argument(help="checkpoint file or folder (wan, diffusers or sat; auto-detected)")],
    dst: Annotated[Path, typer.Argument(help="where to write (a folder; a .safetensors file for --to wan)")],
    to: Annotated[str, typer.Option("--to", help="output format: wan, diffusers or sat")],
    shard_size: Annotated[
        str, typer.Option("--shard-size", help="largest safetensors shard for wan / diffusers, e.g. 5GB, 500MB")
    ] = "5GB",
    arch: ArchOption = None,
) -> None:
    """Convert DiT weights between the Wan2.1, diffusers and official Kaleido (SAT) layouts, or a LoRA adapter
    between the peft, diffusers and Wan / ComfyUI layouts (--to peft | diffusers | wan)."""
    from kaleido.model.checkpoint import FORMATS, CheckpointError, convert_checkpoint, detect_format, parse_size
    from kaleido.model.lora import LORA_LAYOUTS, LoraError, adapter_summary, is_adapter, load_adapter, save_adapter

    if is_adapter(src):
        if to not in LORA_LAYOUTS:
            fail(f"--to {to}: a LoRA adapter converts to one of {', '.join(LORA_LAYOUTS)} (merge it into a full "
                 "checkpoint with `kaleido merge-lora`)")
        try:
            adapter, layout = load_adapter(src)
            written = save_adapter(adapter, dst, to)
        except (LoraError, OSError) as exc:
            fail(str(exc))
            raise  # unreachable, for type checkers
        typer.echo(adapter_summary(adapter, layout))
        typer.echo(f"converted {src} ({layout}) -> {written} ({to})")
        return

    if to not in FORMATS:
        fail(f"--to {to}: unknown format; choose one of {', '.join(FORMATS)}")
    try:
        max_bytes = parse_size(shard_size)
    except ValueError as exc:
        fail(f"--shard-size: {exc}")
        raise  # unreachable, for type checkers
    if max_bytes <= 0:
        fail(f"--shard-size {shard_size}: must be positive, e.g. 5GB")
    config = _arch_config(arch)
    try:
        source_format = detect_format(src)
        written = convert_checkpoint(src, dst, to, max_shard_bytes=max_bytes, config=config)
    except (CheckpointError, OSError) as exc:
        fail(str(exc))
        raise  # unreachable, for type checkers
    typer.echo(f"converted {src} ({source_format}) -> {dst} ({to}): {len(written)} files")
    for path in written:
        typer.echo(f"  {path}")


@app.command("inspect-checkpoint")
def inspect_checkpoint_command(
    path: Annotated[Path, typer.Argument(help="checkpoint file or folder (wan, diffusers or sat)")],
    arch: ArchOption = None,
) -> None:
    """Print a DiT checkpoint's format, config and parameter count (reads headers only), or a LoRA adapter's
    layout, rank, alpha and targets."""
    from kaleido.model.checkpoint import CheckpointError, inspect_checkpoint, read_settings
    from kaleido.model.lora import LoraError, adapter_file, adapter_summary, is_adapter, load_adapter

    if is_adapter(path):
        try:
            adapter, layout = load_adapter(path)
        except LoraError as exc:
            fail(str(exc))
            raise  # unreachable, for type checkers
        typer.echo(f"path: {adapter_file(path)}")
        typer.echo(adapter_summary(adapter, layout))
        for key, value in adapter.meta.items():
            typer.echo(f"{key}: {value}")
        return

    config = _arch_config(arch)
    try:
        info = inspect_checkpoint(path, config=config)
    except (CheckpointError, OSError) as exc:
        fail(str(exc))
        raise  # unreachable, for type checkers
    typer.echo(f"path: {info.path}")
    typer.echo(f"format: {info.format}")
    typer.echo(f"files: {len(info.files)}")
    for file in info.files:
        typer.echo(f"  {file}")
    typer.echo(f"config ({info.config_source}):")
    for key, value in info.config.to_dict().items():
        typer.echo(f"  {key}: {value}")
    try:
        settings = read_settings(path)
    except ValueError as exc:
        fail(str(exc))
        raise  # unreachable, for type checkers
    if settings is None:
        typer.echo("trained with: not recorded (params.yaml's model.rope / model.text_len apply)")
    else:
        typer.echo("trained with: " + ", ".join(f"{k} {v}" for k, v in settings.to_dict().items()))
    typer.echo(f"parameters: {info.num_parameters} ({_human(info.num_parameters)})")
    typer.echo("dtypes: " + ", ".join(f"{name} ({count} tensors)" for name, count in info.dtypes.items()))
    if info.extras:
        typer.echo("also in the file (not loaded): " + ", ".join(info.extras))


@app.command("merge-lora")
def merge_lora_command(
    base: Annotated[Path, typer.Argument(help="base DiT checkpoint (wan, diffusers or sat; auto-detected)")],
    adapter: Annotated[Path, typer.Argument(help="LoRA adapter: peft folder, diffusers or Wan/ComfyUI .safetensors")],
    dst: Annotated[Path, typer.Argument(help="where to write the merged checkpoint (a folder)")],
    to: Annotated[str, typer.Option("--to", help="output format: wan, diffusers or sat")] = "wan",
    scale: Annotated[float, typer.Option("--scale", help="multiplier on the adapter's alpha / rank")] = 1.0,
    arch: ArchOption = None,
) -> None:
    """Fold a LoRA adapter into its base: a full checkpoint in any of the three DiT formats (W += scale *
    alpha / rank * B @ A, by peft)."""
    from kaleido.model.checkpoint import (
        FORMATS,
        CheckpointError,
        inspect_checkpoint,
        load_dit,
        read_settings,
        read_shapes,
        save_dit,
    )
    from kaleido.model.lora import LoraError, adapter_summary, check_fits, load_adapter

    if to not in FORMATS:
        fail(f"--to {to}: unknown format; choose one of {', '.join(FORMATS)}")
    config = _arch_config(arch)
    try:  # everything checked from headers before the base is read
        info = inspect_checkpoint(base, config=config)
        lora, layout = load_adapter(adapter)
        check_fits(lora, read_shapes(base), f"the base {base}")
        if dst.resolve() in {info.path.resolve(), *(f.resolve().parent for f in info.files)}:
            fail(f"{dst}: the destination holds the base checkpoint; write to another path")
        typer.echo(adapter_summary(lora, layout))
        model = load_dit(base, config=info.config, lora=lora, lora_scale=scale)  # the base's own dtypes
        # the merged weights keep the record of what they were trained with (the adapter's, else the base's)
        written = save_dit(model.state_dict(), dst, to, model.cfg, settings=read_settings(base, lora))
    except (CheckpointError, LoraError, OSError, ValueError) as exc:
        fail(str(exc))
        raise  # unreachable, for type checkers
    typer.echo(f"merged {adapter} (scale {scale:g}) into {base} -> {dst} ({to}): {len(written)} files")
