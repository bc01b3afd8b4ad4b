"""Every command the README and docs show works as written on a fresh clone.

The commands come from the `bash` code blocks and the inline code spans of README.md and docs/*.md. Each one's
program must exist (ours from `.venv/bin`, or a named cluster tool), its sub-commands must exist and every option it
uses must be one the program accepts (kaleido, dvc and mlflow are asked in-process, prefect by `--help`, make by
`make -n`). The cheap ones run for real in a copy of the checkout: the README's generate block, and the serve
command's environment (uvicorn must be found without an activated venv).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from conftest import free_port, working_tree_files

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OURS = {"kaleido", "dvc", "prefect", "mlflow", "make", "python", "pytest"}
# programs of the cluster and the shell that the docs use around ours; not installed here, not checked
EXTERNAL = {"kubectl", "docker", "crane", "kustomize", "curl", "openssl", "printf", "cd", "sed", "mkdir", "secret",
            "rand", "export", "jq", "torchrun", "cp", "base64", "kill", "ss", "git", "ray", "nvidia-smi", "grep",
            "head", "tail", "less", "wc", "{", "}"}
SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def doc_commands() -> list[tuple[str, str]]:
    """(where, command) for each command line of the docs' bash blocks and each inline span naming one of ours."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for block in BLOCK.findall(text):
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    found.append((f"{path.name} (block)", line.strip()))
        prose = BLOCK.sub("", text)
        for span in SPAN.findall(prose):
            words = span.split()
            first = words[0] if words else ""
            while ASSIGNMENT.match(first) and len(words) > 1:
                words = words[1:]
                first = words[0]
            ours = Path(first).name in OURS - {"python", "pytest"} and len(words) > 1
            if ours or (first.startswith(".venv/bin/") and not first.endswith("/")):
                found.append((f"{path.name} (inline)", span))
    return found


def segments(command: str) -> list[list[str]]:
    """The simple commands of a line (split at && || | ;), each without its leading VAR=value words."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote in prose: nothing to run
        return []
    parts: list[list[str]] = [[]]
    for token in tokens:
        if token in ("&&", "||", "|", ";", "&"):
            parts.append([])
        else:
            parts[-1].append(token)
    result = []
    for part in parts:
        if part and (part[0].endswith("()") or "$(" in part[0]):
            continue  # a shell function's definition, or a variable set from a command substitution
        while part and ASSIGNMENT.match(part[0]):
            part = part[1:]
        if part:
            result.append(part)
    return result


def option_names(tokens: list[str]) -> list[str]:
    """The options a command line uses (`--x=1` -> `--x`; `[--resume]` and `--to a|b` placeholders unwrapped)."""
    names = []
    for token in tokens:
        for piece in token.strip("[]").split("|"):
            piece = piece.strip("[]")
            if piece.startswith("-") and len(piece) > 1 and not piece[1:2].isdigit():
                names.append(piece.split("=", 1)[0])
    return names


def leading_words(tokens: list[str]) -> list[str]:
    """The words before the first option: sub-commands (and maybe positional arguments)."""
    words = []
    for token in tokens:
        if token.startswith(("-", "[")):
            break
        words.append(token)
    return words


# ---- each program's own account of its commands and options -------------------------------------------------


@cache
def _kaleido_root():
    import typer

    from kaleido.cli import app

    return typer.main.get_command(app)


def kaleido_problem(tokens: list[str]) -> str | None:
    command = _kaleido_root()
    for word in leading_words(tokens):
        if not hasattr(command, "commands"):  # a leaf: the rest are arguments
            break
        names = word.split("/")
        missing = [name for name in names if name not in command.commands]
        if missing:
            return f"kaleido has no command {' '.join(missing)}"
        command = command.commands[names[0]]
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
    known |= {"-S", "--set"}  # every command's params.yaml overrides (kaleido.cli.app.KaleidoGroup)
    unknown = [name for name in option_names(tokens) if name not in known]
    return f"kaleido {command.name}: unknown option(s) {unknown}" if unknown else None


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def dvc_problem(tokens: list[str]) -> str | None:
    from dvc.cli.parser import get_main_parser

    parser = get_main_parser()
    for word in leading_words(tokens):
        choices = _subparsers(parser)
        if not choices:
            break
        if word not in choices:
            return f"dvc has no command {word}"
        parser = choices[word]
    unknown = [name for name in option_names(tokens) if name not in parser._option_string_actions]
    return f"dvc {parser.prog}: unknown option(s) {unknown}" if unknown else None


def mlflow_problem(tokens: list[str]) -> str | None:
    import click
    from mlflow.cli import cli

    command: click.Command = cli
    for word in leading_words(tokens):
        if not isinstance(command, click.Group):
            break
        if word not in command.commands:
            return f"mlflow has no command {word}"
        command = command.commands[word]
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
    unknown = [name for name in option_names(tokens) if name not in known]
    return f"mlflow {command.name}: unknown option(s) {unknown}" if unknown else None


@cache
def _prefect_help(path: tuple[str, ...]) -> tuple[int, str]:
    result = subprocess.run([str(Path(sys.executable).with_name("prefect")), *path, "--help"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    return result.returncode, result.stdout + result.stderr


def prefect_problem(tokens: list[str]) -> str | None:
    globals_ = [t for t in tokens[: next((i for i, t in enumerate(tokens) if not t.startswith("-")), 0)]]
    rest = tokens[len(globals_):]
    words = [w for w in leading_words(rest) if re.fullmatch(r"[a-z][a-z-]*", w)]  # sub-commands, not arguments
    code, text = _prefect_help(tuple(words))
    if code:
        return f"prefect {' '.join(words)}: {text[-300:]}"
    _root_code, root_text = _prefect_help(())
    unknown = [name for name in option_names(rest) if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)]
    unknown += [name for name in globals_ if name not in root_text]
    return f"prefect {' '.join(words)}: unknown option(s) {unknown}" if unknown else None


def make_problem(tokens: list[str]) -> str | None:
    targets = [t for t in tokens if not t.startswith("-") and "=" not in t]
    result = subprocess.run(["make", "-n", *targets], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "MAKEFLAGS": ""})  # fmt: skip
    return None if result.returncode == 0 else f"make {' '.join(targets)}: {result.stderr.strip()[-300:]}"


def python_problem(tokens: list[str]) -> str | None:
    script = next((t for t in tokens if t.endswith(".py")), None)
    if tokens[:1] == ["-m"] or script is None:
        return None
    source = REPO / script
    if not source.is_file():
        return f"{script} does not exist"
    text = source.read_text()
    unknown = [name for name in option_names(tokens) if f'"{name}"' not in text]
    return f"{script}: unknown option(s) {unknown}" if unknown else None


def problem(where: str, tokens: list[str]) -> str | None:
    program = tokens[0]
    name = Path(program).name
    if program.startswith(".venv/bin/"):
        if not Path(sys.executable).with_name(name).exists():
            return f"{program} is not installed in the environment"
    elif program.startswith((".cache/", "/")):
        return None  # an environment of its own (the manifest linter's), made by its make target
    if name in EXTERNAL:
        return None
    checks = {"kaleido": kaleido_problem, "dvc": dvc_problem, "mlflow": mlflow_problem, "prefect": prefect_problem,
              "make": make_problem, "python": python_problem}
    if name == "pytest":
        return None
    if name not in checks:
        return f"unknown program {program!r}" if "block" in where else None
    return checks[name](tokens[1:])


def test_doc_commands_exist_with_their_options() -> None:
    commands = doc_commands()
    assert len(commands) > 40, commands  # the extraction found the docs' commands
    problems = []
    for where, command in commands:
        for tokens in segments(command):
            found = problem(where, tokens)
            if found:
                problems.append(f"{where}: `{command}` -> {found}")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_wrong_command() -> None:
    assert kaleido_problem(["train", "--stage", "pretrain", "--plan"]) is None
    assert "unknown option" in kaleido_problem(["train", "--stages", "pretrain"])
    assert "no command" in kaleido_problem(["platfrom", "up"])
    assert dvc_problem(["exp", "run", "-S", "a=1", "--temp"]) is None
    assert "unknown option" in dvc_problem(["exp", "show", "--colums"])
    assert "unknown option" in mlflow_problem(["models", "serve", "--prot", "5001"])
    assert problem("README.md (block)", ["kaliedo", "train"]) is not None
    assert segments("A=1 .venv/bin/dvc repro && kaleido x | grep y  # note") == [
        [".venv/bin/dvc", "repro"], ["kaleido", "x"], ["grep", "y"]]


# ---- the cheap ones, for real ---------------------------------------------------------------------------------


def _fresh_clone(dst: Path) -> Path:
    for name in working_tree_files(REPO):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dst / name)
    (dst / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return dst


def _bare_env() -> dict[str, str]:
    """This environment as a new shell has it: the venv's folder NOT on PATH (nobody activated it)."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    return {**os.environ, "PATH": path or "/usr/bin:/bin", "PYTHONPATH": str(REPO)}


def _readme_block(containing: str) -> str:
    for block in BLOCK.findall((REPO / "README.md").read_text()):
        if containing in block:
            return block
    raise AssertionError(f"the README has no bash block with {containing!r}")


@pytest.mark.slow
def test_readme_generate_block_runs_as_written(tmp_path: Path) -> None:
    """init-tiny, samples, generate: exactly the README's lines, in a fresh copy of the checkout (~30 s)."""
    clone = _fresh_clone(tmp_path / "clone")
    block = _readme_block("kaleido init-tiny")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=clone, env=_bare_env(),
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (clone / "artifacts/generated/sample.mp4").stat().st_size > 1000


def test_readme_serve_command_finds_its_server(tmp_path: Path) -> None:
    """The README's `kaleido serve` line as written, in a shell without the venv on PATH (the probe's `uvicorn: not
    found`), on a pyfunc model that is not a Kaleido version: the command runs and refuses it in one line, exit 2.
    Serving a real version (/ping, /invocations) is tests/test_serving.py's."""
    import mlflow.pyfunc

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    model = tmp_path / "model"
    mlflow.pyfunc.save_model(str(model), python_model=Echo())
    line = next(line for line in _readme_block("kaleido serve").replace("\\\n", " ").splitlines()
                if "kaleido serve" in line)  # fmt: skip
    line = re.sub(r"--model \S+", f"--model {model} --params {REPO / 'params.yaml'}", line)
    line = re.sub(r"--port \d+", f"--port {free_port()}", line)
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / ".venv").symlink_to(Path(sys.executable).parent.parent)
    result = subprocess.run(["bash", "-c", line], cwd=clone, env=_bare_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not a Kaleido version" in result.stderr and "Traceback" not in result.stderr, result.stderr
