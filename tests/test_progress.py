"""Live progress: the line format, its interval, the loss while training, and lines reaching the Prefect log while
the step that prints them still runs."""

from __future__ import annotations

import io
import json
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest


def test_progress_lines_count_rate_eta_and_fields() -> None:
    from kaleido.platform.progress import Progress, is_progress_line

    out = io.StringIO()
    with Progress("train pretrain", 4, "step", stream=out, interval=0.0, mode="lines") as progress:
        progress.update(1, skipped=True)  # a resumed run: counted, not in the rate
        assert progress.rate == 0.0
        time.sleep(0.05)
        progress.update(1, loss=0.51234, lr="1.00e-04")
        progress.update(2, loss=0.25)
    lines = out.getvalue().splitlines()
    assert all(is_progress_line(line) for line in lines)
    assert lines[0] == "progress train pretrain: step 0/4 (0%), ETA ?"
    assert lines[1] == "progress train pretrain: step 1/4 (25%), ETA ?"
    assert lines[2].startswith("progress train pretrain: step 2/4 (50%), ") and ", ETA 0:00:0" in lines[2]
    assert lines[2].endswith("loss 0.5123, lr 1.00e-04")
    assert lines[3].startswith("progress train pretrain: step 4/4 (100%)") and "done in" in lines[3]
    assert lines[3].endswith("loss 0.2500, lr 1.00e-04")
    assert len(lines) == 4  # close() does not repeat the last counts


def test_progress_prints_one_line_per_interval_and_always_the_last() -> None:
    from kaleido.platform.progress import Progress

    out = io.StringIO()
    with Progress("ingest", 100, "video", stream=out, interval=3600.0, mode="lines") as progress:
        for _ in range(100):
            progress.update(1)
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["progress ingest: video 0/100 (0%)",
                                                      "progress ingest: video 100/100 (100%)"]
    quiet = io.StringIO()
    with Progress("ingest", 3, stream=quiet, enabled=False) as progress:
        progress.update(3)
        progress.write("not shown")
    assert quiet.getvalue() == ""


def test_progress_bar_on_a_terminal() -> None:
    from kaleido.platform.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    with Progress("encode", 2, "shard", stream=out, interval=0.0) as progress:
        assert progress.mode == "bar"
        progress.update(2, samples=7)
    assert "encode" in out.getvalue() and "2/2" in out.getvalue() and "samples 7" in out.getvalue()


def test_flow_log_shows_progress_lines_while_the_step_runs(tmp_path: Path, prefect_server: str) -> None:
    """run_command streams a step's output into the Prefect task log as it comes: the child prints a progress line and
    then waits until that line can be read back from the Prefect API. Were the output logged at the end (as before),
    the child would give up after 60 s and fail the step."""
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.kaleido_flow import run_command

    token = f"stage-{time.monotonic_ns()}"
    seen = tmp_path / "seen"
    child = textwrap.dedent(f"""
        import pathlib, sys, time
        from kaleido.platform.progress import Progress
        progress = Progress({token!r}, 2, "shard", interval=0.0, mode="lines")
        progress.update(1, loss=0.5)
        deadline = time.monotonic() + 60
        while not pathlib.Path({str(seen)!r}).exists():
            if time.monotonic() > deadline:
                sys.exit(3)
            time.sleep(0.1)
        progress.update(1)
        progress.close()
        print('{{"done": true}}')
    """)

    def watch() -> None:
        body = json.dumps({"sort": "TIMESTAMP_DESC", "limit": 50}).encode()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            request = urllib.request.Request(f"{prefect_server}/logs/filter", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=10) as response:
                messages = [row["message"] for row in json.loads(response.read())]
            if any(m.startswith(f"progress {token}: shard 1/2") for m in messages):
                seen.touch()
                return
            time.sleep(0.3)

    @flow(name="progress-probe")
    def probe() -> str:
        return run_command([sys.executable, "-c", child], tmp_path).stdout

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        stdout = probe()
    watcher.join(timeout=5)
    assert seen.exists() and json.loads(stdout) == {"done": True}


def test_stream_command_keeps_stdout_apart_and_order(tmp_path: Path) -> None:
    from flows.kaleido_flow import stream_command

    script = "import sys\nprint('out 1', flush=True)\nprint('err 1', file=sys.stderr, flush=True)\nprint('{}')\n"
    got: list[tuple[str, str]] = []
    code, stdout, tail = stream_command([sys.executable, "-c", script], tmp_path, lambda s, line: got.append((s, line)))
    assert code == 0 and stdout == "out 1\n{}\n"
    assert ("stderr", "err 1") in got and ("stdout", "out 1") in got and "err 1" in tail


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"), (float("inf"), "?")])
def test_format_duration(seconds: float, text: str) -> None:
    from kaleido.platform.progress import format_duration

    assert format_duration(seconds) == text
