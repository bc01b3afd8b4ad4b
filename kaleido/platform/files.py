"""Files that a later stage, another process or a user reads: one writer at a time, whole or absent.

A shared team platform runs many commands at once on one data root, one `--out` folder or one
cache. Three rules, one function each, used by every stage:

- `exclusive_output(folder, what)`: an exclusive lock per output folder, held for the whole run
  (filelock: an OS `flock`, released by the kernel when the holder dies, so a SIGKILLed runner
  never leaves a stale lock). A second runner is refused at once with the holder's pid, host and
  start time (`OutputBusy`); the CLI turns that into `error: ...` and exit 2. The `.locks` folder
  and its files are never used through a symbolic link (`LockFolderLinked`).
- `atomic_path(path)` / `write_text_atomic` / `write_json_atomic`: write to a temporary name in the
  same folder, then `os.replace` (atomic on POSIX): a reader sees the old file or the new one,
  never half of one. The temporary name keeps the suffix (PyAV and Pillow pick the format from it).
- `describe_os_error(exc, path)`: an OSError as `<path>: <why>`, saying "no space left on device"
  with the free bytes for ENOSPC (torch's checkpoint writer hides it behind an `inline_container`
  RuntimeError: `is_disk_full` recognises that too).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class OutputBusy(RuntimeError):
    """Another process holds the output folder's lock; the message names it and says what to do."""


class LockFolderLinked(OutputBusy):
    """The lock folder (or a lock file) is a symbolic link: locks are made only in a real folder beside the output,
    never wherever a link points (outside the data root, in another user's folder)."""


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise LockFolderLinked(
            f"{path} is a symbolic link (to {os.readlink(path)}); lock files are created only in a real folder, never "
            f"through a link. Remove the link (`rm {path}`); the folder is made again on the next run"
        )


LOCKS = ".locks"  # beside the output folders; ignored by git (.gitignore) and outside every DVC out


def lock_path(folder: str | Path) -> Path:
    """The lock file of an output folder: `<parent>/.locks/<name>.lock`, outside the folder so that a run may
    replace the folder itself."""
    folder = Path(folder)
    return folder.parent / LOCKS / f"{folder.name}.lock"


def _holder_text(holder_file: Path) -> str:
    try:
        holder = json.loads(holder_file.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
        return f"pid {holder['pid']} on {holder['host']}, started {started} ({holder.get('command', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (holder unknown)"


@contextmanager
def exclusive_output(folder: str | Path, what: str, *, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the exclusive lock of `folder` (an output folder; need not exist yet) for the block.

    `what` names the run in messages ("kaleido curate", "evaluation"). `wait_s` > 0 waits that many
    seconds for the holder to finish before giving up. Raises OutputBusy naming the holder.
    Re-entrant within one process (a stage that calls another stage on the same folder).
    """
    from filelock import FileLock, Timeout

    path = lock_path(folder)
    _refuse_link(path.parent)  # mkdir(exist_ok=True) would follow it silently
    path.parent.mkdir(parents=True, exist_ok=True)
    holder_file = path.with_name(path.name + ".holder")
    for file in (path, holder_file):
        _refuse_link(file)  # filelock opens with O_CREAT|O_TRUNC: it would truncate the link's target
    lock = FileLock(str(path), is_singleton=True)  # one object per path in a process: re-entrant
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        raise OutputBusy(
            f"{folder} is being written by {_holder_text(holder_file)}; two runs into one output folder would "
            f"mix their files. Wait for it to finish (or stop it), or give this {what} another output folder (another "
            "--out; for a data stage, another data.root)"
        ) from None
    try:
        if lock.lock_counter == 1:
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": what}
            write_text_atomic(holder_file, json.dumps(record) + "\n")
        yield
    finally:
        lock.release()


@contextmanager
def named_os_errors(path: str | Path, also: str | Path | None = None) -> Iterator[None]:
    """An OSError raised inside the block without a file name (or naming `also`) is raised again naming `path`.

    A full disk's ENOSPC comes from write() or close(), whose OSError names no file; the CLI's `error: <path>: <why>`
    line (and describe_os_error) needs the path the user knows, not the temporary name of an atomic write (`also`).
    """
    try:
        yield
    except OSError as exc:
        # only the system's own errors (an errno): a subclass raised with a message of its own keeps its type
        unnamed = exc.filename is None or (also is not None and str(exc.filename) == str(also))
        if exc.errno is not None and unnamed:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically, on error it is removed.

    The temporary name is `.<stem>.tmp-<pid><suffix>` (same folder, same filesystem, same suffix). An OSError that
    names no file (a full disk's ENOSPC from write()) or the temporary name is raised naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        with named_os_errors(path, also=tmp):
            yield tmp
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` whole or not at all; returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, document: Any) -> Path:
    """`document` as indented, key-sorted JSON at `path`, whole or not at all."""
    return write_text_atomic(path, json.dumps(document, indent=1, sort_keys=True, default=str) + "\n")


def folder_sha256(path: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """Content hash of a folder: the relative name and bytes of every file (sorted), files named in `exclude`
    left out; a file's hash when `path` is a file."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in exclude) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path if path.is_dir() else path.parent)).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def file_sizes(folder: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """{relative POSIX name: bytes} of every file under `folder` (names in `exclude` left out): what a completion
    marker records so that a later reader can tell a whole folder from one cut short."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in exclude}  # fmt: skip


def sizes_problem(folder: str | Path, sizes: dict[str, int]) -> str | None:
    """None when every file of `sizes` is in `folder` at its recorded size, else the first difference in words.

    Sizes, not hashes: checking must not re-read terabytes; a file cut short, missing or replaced by one of
    another size (a racing writer, a killed copy, a full disk) shows. Follows links (DVC's link cache types).
    """
    for name, size in sizes.items():
        try:
            actual = (Path(folder) / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} is {actual} bytes, {size} were written (truncated or replaced)"
    return None


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent); None when unknown."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when torch's zip writer wrapped it in a RuntimeError.

    torch.save on a full disk says "file write failed" or, when the stream failed silently first ("basic_ios::clear:
    iostream error"), "[enforce fail at inline_container.cc:672] . unexpected pos N vs M": bytes that never reached
    the disk."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "No space left on device" in text
        or ("inline_container" in text and ("file write failed" in text or "unexpected pos" in text))
    )


def describe_os_error(exc: BaseException, path: str | Path | None = None) -> str:
    """`<path>: <why>` for an OSError (or torch's wrapped write error), with the free space when the disk is full."""
    where = path if path is not None else getattr(exc, "filename", None) or "?"
    if is_disk_full(exc):
        free = free_bytes(where) if where != "?" else None
        room = f" ({free / 1e6:.1f} MB free)" if free is not None else ""
        return f"{where}: no space left on device{room}; free space or point the output at a larger disk"
    if isinstance(exc, OSError):
        return f"{where}: {exc.strerror or exc}"
    return f"{where}: {exc}"
