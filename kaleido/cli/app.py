"""The typer application and the options every command shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kaleido.config import Params, ParamsError, load_params

app = typer.Typer(
    name="kaleido",
    help="Kaleido subject-to-video platform: curate, train, evaluate, generate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsOption = Annotated[
    Path | None,
    typer.Option("--params", help="params.yaml to read (default: $KALEIDO_PARAMS or the nearest params.yaml)"),
]


def fail(message: str, code: int = 2) -> None:
    """Print a one-paragraph error (what, and how to fix it) and exit non-zero."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def read_params(path: Path | None) -> Params:
    try:
        return load_params(path)
    except ParamsError as exc:
        fail(str(exc))
        raise  # unreachable, for type checkers


def require_tracking(params: Params, uri: str | None = None) -> None:
    """The MLflow server a command records into must answer; the embedded default's own is started if down."""
    from kaleido.platform.services import ServiceError, ensure_tracking_server

    try:
        ensure_tracking_server(params, uri, echo=lambda line: typer.echo(line, err=True))
    except ServiceError as exc:
        fail(str(exc))


@app.callback()
def main() -> None:
    """Kaleido subject-to-video platform: curate, train, evaluate, generate."""
