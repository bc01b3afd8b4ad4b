"""Where a benchmark's figures come from: machine, date, commit, command (docs/benchmarks.md asks for all four).

Every script in benchmarks/ runs as `python benchmarks/<name>.py`, so this folder is on sys.path."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def provenance() -> dict[str, Any]:
    """{machine, date, commit, command, load_avg}: the header of a benchmark's printed and JSON figures."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{sys.version.split()[0]}",
        "date": time.strftime("%Y-%m-%d"), "commit": commit, "command": " ".join(sys.argv),
        "load_avg": round(os.getloadavg()[0], 1),
    }
