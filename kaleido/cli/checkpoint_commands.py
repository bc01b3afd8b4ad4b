"""`kaleido convert-checkpoint` and `kaleido inspect-checkpoint`: DiT weights across Wan2.1, diffusers and SAT."""

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
    """Convert DiT weights between the Wan2.1, diffusers and official Kaleido (SAT) layouts."""
    from kaleido.model.checkpoint import FORMATS, CheckpointError, convert_checkpoint, detect_format, parse_size

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
    """Print a DiT checkpoint's format, config and parameter count (reads headers only)."""
    from kaleido.model.checkpoint import CheckpointError, inspect_checkpoint

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
    typer.echo(f"parameters: {info.num_parameters} ({_human(info.num_parameters)})")
    typer.echo("dtypes: " + ", ".join(f"{name} ({count} tensors)" for name, count in info.dtypes.items()))
    if info.extras:
        typer.echo("also in the file (not loaded): " + ", ".join(info.extras))
