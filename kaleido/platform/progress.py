"""Progress of every long step, in one shape: stage, N of M units, rate, ETA, and fields such as the loss.

On a terminal it is a rich progress bar (stderr). Anywhere else (a pipe: DVC, torchrun, the Prefect flow, a log
file) it is ONE LINE per interval, so a reader that takes whole lines sees the step move while it runs:

    progress train pretrain: step 12/30 (40%), 1.32 step/s, ETA 0:00:14, loss 0.5123

The line starts with `progress `, which the flow and `kaleido platform run` look for (`is_progress_line`).
`KALEIDO_PROGRESS` picks the form: `auto` (default: bar on a TTY, lines otherwise), `lines`, `bar` or `off`;
`KALEIDO_PROGRESS_INTERVAL` the seconds between lines (default 10; the first and the last line always print).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

PREFIX = "progress "
DEFAULT_INTERVAL_S = 10.0
T = TypeVar("T")


def is_progress_line(line: str) -> bool:
    """True for a line `Progress` printed (the flow's log and `make run`'s screen pick them out)."""
    return line.startswith(PREFIX)


def format_duration(seconds: float) -> str:
    """H:MM:SS of a non-negative number of seconds; `?` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _format_field(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.3e}"
    return str(value)


def _mode() -> str:
    mode = os.environ.get("KALEIDO_PROGRESS", "auto").strip().lower()
    return mode if mode in ("auto", "lines", "bar", "off") else "auto"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("KALEIDO_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


class Progress:
    """N of `total` units of one stage. `update(n, **fields)` after each unit; `close()` (or `with`) at the end.

    `update(n, skipped=True)` counts finished work found from an earlier run (a resumed stage): it moves the count
    but not the rate, so the ETA reflects the work still to do. `fields` (loss=0.51, case="cat-01") follow the
    counts. `write(text)` prints a line of its own without breaking the bar. Disabled, every method is a no-op.
    """

    def __init__(
        self,
        stage: str,
        total: int | None,
        unit: str = "item",
        *,
        enabled: bool = True,
        initial: int = 0,
        stream: TextIO | None = None,
        interval: float | None = None,
        mode: str | None = None,
    ) -> None:
        self.stage, self.total, self.unit = stage, total, unit
        self.count = initial
        self.fields: dict[str, Any] = {}
        self.stream = stream if stream is not None else sys.stderr
        self.interval = _interval() if interval is None else interval
        mode = mode or _mode()
        if not enabled or mode == "off":
            mode = "off"
        elif mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self._counted = 0  # units done in this run (not skipped): the rate's numerator
        self._started = time.monotonic()
        self._last_line = -math.inf
        self._last_text = ""
        self._closed = False
        self._bar: Any = None
        if mode == "bar":
            self._start_bar()
        elif mode == "lines":
            self._emit()

    # ---- rich bar on a terminal ---------------------------------------------------------------------------

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[extra]}"),
            console=Console(file=self.stream), transient=False,
        )  # fmt: skip
        self._bar.start()
        self._task = self._bar.add_task(self.stage, total=self.total, completed=self.count, extra="")

    # ---- the numbers ----------------------------------------------------------------------------------------

    @property
    def rate(self) -> float:
        """Units per second done in this run (skipped units excluded); 0 before the first."""
        elapsed = time.monotonic() - self._started
        return self._counted / elapsed if elapsed > 0 and self._counted else 0.0

    @property
    def eta_s(self) -> float:
        """Seconds left at the current rate; inf when unknown."""
        if self.total is None or not self.rate:
            return math.inf if self.total is None or self.count < self.total else 0.0
        return max(0, self.total - self.count) / self.rate

    def line(self) -> str:
        """The text of one progress line (see the module docstring)."""
        if self.total:
            counts = f"{self.unit} {self.count}/{self.total} ({100 * self.count / self.total:.0f}%)"
        else:
            counts = f"{self.unit} {self.count}" + (f"/{self.total}" if self.total is not None else "")
        parts = [counts]
        rate = self.rate
        if rate:
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
        if self.total is not None and self.count < self.total:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        elif self.total is not None:
            parts.append(f"done in {format_duration(time.monotonic() - self._started)}")
        parts += [f"{key} {_format_field(value)}" for key, value in self.fields.items()]
        return f"{PREFIX}{self.stage}: " + ", ".join(parts)

    def _emit(self, unless_same: bool = False) -> None:
        text = self.line()
        if unless_same and text.split(", ")[:1] == self._last_text.split(", ")[:1]:
            return  # the counts were printed last already
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last_line, self._last_text = time.monotonic(), text

    # ---- updates ----------------------------------------------------------------------------------------------

    def update(self, n: int = 1, *, skipped: bool = False, **fields: Any) -> None:
        """`n` more units done (`skipped`: found finished); `fields` replace the shown values of those keys."""
        if self.mode == "off" or self._closed:
            return
        self.count += n
        if not skipped:
            self._counted += n
        self.fields.update(fields)
        if self._bar is not None:
            extra = "  ".join(f"{key} {_format_field(value)}" for key, value in self.fields.items())
            self._bar.update(self._task, completed=self.count, extra=extra)
        elif time.monotonic() - self._last_line >= self.interval:
            self._emit()

    def set(self, **fields: Any) -> None:
        """Change the shown fields without counting a unit."""
        self.update(0, **fields)

    def write(self, text: str) -> None:
        """A line of its own (a validation loss, a note), above the bar on a terminal."""
        if self.mode == "off":
            return
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Stop the bar, or print the last line (always: a reader sees where the stage ended)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.stop()
        elif self.mode == "lines":
            self._emit(unless_same=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], stage: str, total: int | None = None, unit: str = "item", *, enabled: bool = True,
          **kwargs: Any) -> Iterator[T]:
    """Iterate `items`, counting each one (`Progress`); the line or bar closes when the loop ends."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(stage, total, unit, enabled=enabled, **kwargs) as progress:
        for item in items:
            yield item
            progress.update(1)
