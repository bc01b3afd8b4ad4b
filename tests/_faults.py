"""Fault injection for the tests/test_faults_*.py files: a private MLflow server to kill, a small full disk.

Real faults where the machine allows them: an `mlflow server` process killed with SIGKILL (its whole process group,
as an OOM kill or a lost node would), a tmpfs of a few MB mounted over an output folder (needs root or
CAP_SYS_ADMIN). Where no tmpfs can be mounted, `small_disk` says so and the tests inject ENOSPC instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A private `mlflow server` (sqlite store, proxied artifacts under `folder`): start, kill, start again on the
    same port and store (the same runs come back)."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 180) -> str:
        command = [
            str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
            "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = (self.folder / "server.log").open("a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        cwd=self.folder, env=env)  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{(self.folder / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.uri
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer in {timeout} s")
            time.sleep(0.3)

    def kill(self) -> float:
        """SIGKILL the server's process group (no goodbye to its clients); returns the monotonic time of the kill."""
        assert self.process is not None
        killed = time.monotonic()
        with suppress(ProcessLookupError):  # it died already
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        return killed

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


@contextmanager
def small_disk(folder: Path, size: str) -> Iterator[bool]:
    """Mount a tmpfs of `size` (e.g. "3500k") on `folder`; yields False (nothing mounted) where the machine forbids it.

    `resize(folder, size)` makes room again (a remount keeps the files)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0  # fmt: skip
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def resize(folder: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, capture_output=True)


def wait_for(condition, timeout: float, what: str, poll: float = 0.1) -> None:
    """Poll `condition()` until it is true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def mp4_top_level_boxes(path: Path) -> list[str]:
    """The types of an mp4's top-level boxes (ftyp, moov, mdat, ...): two writers at once leave two `moov`."""
    data = path.read_bytes()
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        kind = data[offset + 4 : offset + 8].decode("latin-1")
        if size == 1:  # a 64-bit size follows
            size = int.from_bytes(data[offset + 8 : offset + 16], "big")
        if size < 8:
            break
        boxes.append(kind)
        offset += size
    return boxes
