"""`train.launcher: local`: torchrun on this machine, N worker processes (GPUs, or CPU ranks on gloo).

The launcher streams torchrun's output as it comes and returns its exit code. When a rank fails,
torchrun stops the others and prints a summary with the failed rank's traceback (the worker is wrapped
in torch's `@record`); the launcher turns that into one line naming the rank and its error. A rank that
stopped on an operator's situation (exit code 2: a full disk, the MLflow server gone, a truncated file)
printed its own `error:` line; the launcher hands that line on as it is (`operator_error`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def torchrun_command(
    params_path: Path, stage: str, nproc: int, resume: bool, progress: bool = True,
    module: str = "kaleido.train.worker", apply_changes: bool = False,
) -> list[str]:
    """torchrun with `nproc` processes of `module` (the training worker; `kaleido.train.encode_worker` for encode);
    apply_changes: a resume applies the edited params (--apply-param-changes)."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc_per_node", str(nproc),
        "-m", module, "--params", str(params_path), "--stage", stage,
    ]  # fmt: skip
    if resume:
        command.append("--resume")
        if apply_changes:
            command.append("--apply-param-changes")
    if not progress:
        command.append("--no-progress")
    return command


@dataclass
class LaunchResult:
    returncode: int
    failure: str | None  # "rank R: <error>" when a rank failed
    operator_error: str | None = None  # the failed rank's own `error:` line (without the prefix) when it exited 2


_ROOT_CAUSE = re.compile(r"rank\s*:\s*(\d+)")
_EXIT_CODE = re.compile(r"exitcode\s*:\s*(-?\d+)")
_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+(?:Error|Exception|Exit)|error):? .*")


def summarize_failure(lines: list[str]) -> str | None:
    """'rank R (exit code C): <last error line>' from torchrun's failure summary, or None."""
    text = "\n".join(lines)
    start = text.rfind("Root Cause")
    if start < 0:
        return None
    summary = text[start:]
    rank = _ROOT_CAUSE.search(summary)
    code = _EXIT_CODE.search(summary)
    errors = [line.strip() for line in summary.splitlines() if _ERROR_LINE.match(line)]
    if not errors:  # a rank that printed its own "error: ..." line and exited (no traceback)
        errors = [line.strip() for line in lines if line.strip().startswith("error:")]
    where = f"rank {rank.group(1)}" if rank else "a rank"
    exit_text = f" (exit code {code.group(1)})" if code else ""
    return f"{where}{exit_text}: {errors[-1] if errors else 'see the output above'}"


def operator_error(lines: list[str]) -> str | None:
    """The `error:` line of a rank that stopped on an operator's situation (exit code 2), else None.

    Any failed rank of torchrun's summary counts, not only its "root cause": when one rank exits 2, torchrun stops
    the others, and the first failure it observed may be another rank's SIGTERM."""
    from kaleido.train.worker import OPERATOR_EXIT

    text = "\n".join(lines)
    errors = [line.strip() for line in lines if line.strip().startswith("error: ")]  # only worker._error prints these
    starts = [index for index in (text.find("Failures:"), text.find("Root Cause")) if index >= 0]
    if not starts:
        # no summary: torchrun's agent itself failed while collecting the ranks (it can read a rank's error file
        # while that rank is still writing it: JSONDecodeError); a rank's own `error:` line still says why
        return errors[-1].removeprefix("error: ") if errors else None
    codes = {int(code) for code in _EXIT_CODE.findall(text[min(starts):])}
    if OPERATOR_EXIT not in codes:
        return None
    return errors[-1].removeprefix("error: ") if errors else None


def launch_local(
    params_path: Path,
    stage: str,
    nproc: int,
    resume: bool = False,
    *,
    echo: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
    progress: bool = True,
    module: str = "kaleido.train.worker",
    apply_changes: bool = False,
) -> LaunchResult:
    """Run torchrun with `nproc` workers; stream its output through `echo`; return code and failure line."""
    echo = echo or (lambda line: print(line, end="", flush=True))
    environment = {**os.environ, **(env or {})}
    environment.setdefault("PYTHONUNBUFFERED", "1")
    # one thread per rank unless told otherwise: N ranks share this machine's cores
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = torchrun_command(params_path.resolve(), stage, nproc, resume, progress, module, apply_changes)
    tail: deque[str] = deque(maxlen=400)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=environment
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            echo(line)
            tail.append(line.rstrip("\n"))
        code = process.wait()
    if not code:
        return LaunchResult(code, None)
    return LaunchResult(code, summarize_failure(list(tail)), operator_error(list(tail)))
