"""The typer application and the options every command shares."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from kaleido.config import Params, ParamsError, load_params


class KaleidoTyper(typer.Typer):
    """The typer app, with the platform's expected failures turned into `error: ...` and exit 2.

    A second runner on a busy output folder, a full disk, an unreadable file: each is an operator's
    situation, not a bug, so it gets one line naming the path and the way out instead of a traceback.
    """

    def __call__(self, *args: object, **kwargs: object) -> object:
        from kaleido.platform.files import OutputBusy, describe_os_error, is_disk_full

        try:
            return super().__call__(*args, **kwargs)
        except OutputBusy as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise SystemExit(2) from None
        except (OSError, RuntimeError) as exc:
            if not (isinstance(exc, OSError) and exc.filename) and not is_disk_full(exc):
                raise
            typer.secho(f"error: {describe_os_error(exc)}", fg=typer.colors.RED, err=True)
            raise SystemExit(2) from None


app = KaleidoTyper(
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


def read_params(path: Path | None, overrides: dict[str, object] | None = None) -> Params:
    """params.yaml with command-line `overrides` (dotted keys; None values are skipped), validated by the schema
    so a bad number fails here, before any model loads, with the key and its allowed range."""
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    try:
        return load_params(path, given)
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


class _WarningLines(logging.Handler):
    """The library's warnings (logger "kaleido"), one `warning: ...` line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.secho(f"warning: {record.getMessage()}", fg=typer.colors.YELLOW, err=True)


def show_library_warnings() -> None:
    """Route warnings of the kaleido.* loggers to stderr (once per process)."""
    logger = logging.getLogger("kaleido")
    if not any(isinstance(handler, _WarningLines) for handler in logger.handlers):
        logger.addHandler(_WarningLines(level=logging.WARNING))


@app.callback()
def main() -> None:
    """Kaleido subject-to-video platform: curate, train, evaluate, generate."""
    show_library_warnings()
