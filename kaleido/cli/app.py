"""The typer application and the options every command shares."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from typer.core import TyperGroup

from kaleido.config import Params, ParamsError, load_params


class _DeepSpeedLogsToStderr(importlib.abc.MetaPathFinder):
    """DeepSpeed logs to STDOUT (its logger's handler is made on sys.stdout) from its import on ("Setting accelerator
    to CPU ..."), and a command's stdout may be data: `kaleido train --dry-run > job.yaml` must hold manifests only.
    The first import of `deepspeed` in a CLI process runs with stdout sent to stderr, so its handler writes there."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "deepspeed":
            return None
        sys.meta_path.remove(self)  # once: the import below, and every later one, is the normal machinery
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_quietly(module: Any) -> None:
            with contextlib.redirect_stdout(sys.stderr):
                exec_module(module)

        spec.loader.exec_module = exec_quietly  # type: ignore[method-assign]
        return spec


if "deepspeed" not in sys.modules and not any(isinstance(f, _DeepSpeedLogsToStderr) for f in sys.meta_path):
    sys.meta_path.insert(0, _DeepSpeedLogsToStderr())

SET_OPTIONS = ("-S", "--set")
_SET: list[str] = []  # the -S KEY=VALUE items of the command line being run (KaleidoGroup.parse_args)


class KaleidoGroup(TyperGroup):
    """The root command: takes `-S KEY=VALUE` / `--set KEY=VALUE` out of the command line, wherever it stands, for
    `read_params` (every command reads params.yaml through it), as DVC's `exp run -S` and Hydra users expect."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        _SET.clear()
        rest: list[str] = []
        index = 0
        while index < len(args):
            arg = args[index]
            if arg == "--":
                rest += args[index:]
                break
            if arg in SET_OPTIONS:
                if index + 1 >= len(args):
                    raise typer.BadParameter("needs KEY=VALUE, e.g. -S train.pretrain.lr=2e-5", param_hint=arg)
                _SET.append(args[index + 1])
                index += 2
                continue
            if arg.startswith("--set="):
                _SET.append(arg.removeprefix("--set="))
            elif arg.startswith("-S") and len(arg) > 2 and "=" in arg:
                _SET.append(arg[2:])
            else:
                rest.append(arg)
            index += 1
        return super().parse_args(ctx, rest)


def set_overrides() -> dict[str, Any]:
    """The command line's -S items as {dotted key: value}; values are YAML (`2e-5`, `true`, `[480, 832]`, `null`)."""
    overrides: dict[str, Any] = {}
    for item in _SET:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or " " in key.strip():
            fail(f"-S {item!r}: expected KEY=VALUE with a dotted params.yaml key, e.g. -S train.pretrain.lr=2e-5")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        overrides[key.strip()] = value
    return overrides


class KaleidoTyper(typer.Typer):
    """The typer app, with the platform's expected failures turned into `error: ...` and exit 2.

    A second runner on a busy output folder, a full disk, an unreadable file: each is an operator's
    situation, not a bug, so it gets one line naming the path and the way out instead of a traceback.
    """

    def __call__(self, *args: object, **kwargs: object) -> object:
        from kaleido.platform.files import OutputBusy, describe_os_error, is_disk_full
        from kaleido.platform.storage import StorageError

        try:
            return super().__call__(*args, **kwargs)
        except (OutputBusy, StorageError) as exc:  # StorageError: any command that touches object storage
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise SystemExit(2) from None
        except (OSError, RuntimeError) as exc:
            if not (isinstance(exc, OSError) and exc.filename) and not is_disk_full(exc):
                raise
            typer.secho(f"error: {describe_os_error(exc)}", fg=typer.colors.RED, err=True)
            raise SystemExit(2) from None


app = KaleidoTyper(
    name="kaleido",
    cls=KaleidoGroup,
    help="Kaleido subject-to-video platform: curate, train, evaluate, generate. Every command that reads params.yaml "
    "takes `-S KEY=VALUE` (repeatable) to override one key for that run, validated like the file.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsOption = Annotated[
    Path | None,
    typer.Option("--params", help="params.yaml to read (default: $KALEIDO_PARAMS or the nearest params.yaml); "
                 "`-S KEY=VALUE` overrides one of its keys"),
]


def fail(message: str, code: int = 2) -> None:
    """Print a one-paragraph error (what, and how to fix it) and exit non-zero."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def read_params(path: Path | None, overrides: dict[str, object] | None = None) -> Params:
    """params.yaml with the command line's `-S KEY=VALUE` items, then the command's own `overrides` (dotted keys;
    None values are skipped), validated by the schema so a bad key or number fails here, before any model loads,
    with the key and its allowed range."""
    given = {**set_overrides(), **{key: value for key, value in (overrides or {}).items() if value is not None}}
    try:
        return load_params(path, given)
    except ParamsError as exc:
        fail(str(exc) + (f" (with -S {', '.join(_SET)})" if _SET else ""))
        raise  # unreachable, for type checkers


def effective_params_file(path: Path) -> Path:
    """`path` itself, or with -S items a copy beside it that holds them (`.params-S-<hash>.yaml`): what processes
    that read params.yaml by name (torchrun ranks, a training pod's ConfigMap) must see. Beside the original, so
    relative paths resolve the same."""
    overrides = set_overrides()
    if not overrides:
        return path
    import hashlib

    from kaleido.config.schema import set_dotted

    raw = yaml.safe_load(path.read_text()) or {}
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    text = f"# {path.name} with -S {' -S '.join(_SET)} (written by kaleido)\n" + yaml.safe_dump(raw, sort_keys=False)
    copy = path.with_name(f".params-S-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml")
    if not copy.is_file() or copy.read_text() != text:
        copy.write_text(text)
    return copy


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
