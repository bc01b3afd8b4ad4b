"""Verify on read, once: a sealed file is checked against its recorded size and sha256 where it is used.

Every consumer of a sealed artifact (dataset tars, latent shards, checkpoints, registry versions) calls
`verify_file(path, size=..., sha256=...)` before it reads the bytes. A full sha256 per read would re-read
terabytes per epoch, so a verdict is remembered per file by (real path, size, mtime, inode, expected hash):
in this process, and across processes in a small SQLite table under the cache folder ($KALEIDO_CACHE or
~/.cache/kaleido). A file rewritten in place (same size, new bytes) gets a new mtime and is hashed again; a
bit flip that keeps mtime (disk rot under a live file system) is outside what a cheap check can see, and
`verify_file(..., recheck=True)` re-reads anyway (audits).

A mismatch raises `IntegrityError` naming the file, what the seal recorded, what is there, and the fix.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path


class IntegrityError(ValueError):
    """A file differs from its seal (missing, another size, other bytes); the message names it and the fix."""


def cache_root() -> Path:
    """The per-user cache of downloaded versions, assets and verdicts: $KALEIDO_CACHE or ~/.cache/kaleido."""
    return Path(os.environ.get("KALEIDO_CACHE", Path.home() / ".cache" / "kaleido"))


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


_memo: set[tuple[str, int, int, int, str]] = set()
_memo_lock = threading.Lock()


def _db_path() -> Path:
    return cache_root() / "verified.sqlite"


def _db_lookup(key: tuple[str, int, int, int, str]) -> bool:
    try:
        with sqlite3.connect(_db_path(), timeout=10) as db:
            row = db.execute(
                "SELECT 1 FROM verified WHERE path=? AND size=? AND mtime_ns=? AND inode=? AND sha256=?", key
            ).fetchone()
        return row is not None
    except sqlite3.Error:  # no table yet, a read-only cache: the verdict is simply not cached
        return False


def _db_store(key: tuple[str, int, int, int, str]) -> None:
    try:
        _db_path().parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(_db_path(), timeout=10) as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS verified (path TEXT, size INTEGER, mtime_ns INTEGER, inode INTEGER, "
                "sha256 TEXT, PRIMARY KEY (path, size, mtime_ns, inode, sha256))"
            )
            db.execute("INSERT OR IGNORE INTO verified VALUES (?, ?, ?, ?, ?)", key)
    except (sqlite3.Error, OSError):  # a cache that cannot be written costs a re-hash next time, nothing else
        pass


def verify_file(
    path: str | Path, *, sha256: str, size: int | None = None, what: str = "", fix: str = "", recheck: bool = False
) -> None:
    """Check that `path` holds the bytes its seal recorded (size first, then sha256 unless a verdict is cached).

    `what` says what the file is ("dataset tar", "latent shard") and `fix` what to do about a mismatch; both go
    into the message. Raises IntegrityError (missing, other size, other sha256).
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    hint = f"; {fix}" if fix else ""
    try:
        info = path.stat()
    except OSError as exc:
        raise IntegrityError(f"{label} is missing ({exc.strerror or exc}){hint}") from None
    if size is not None and info.st_size != int(size):
        raise IntegrityError(f"{label} is {info.st_size} bytes, its seal records {size} (truncated or replaced){hint}")
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns, info.st_ino, sha256)
    if not recheck:
        with _memo_lock:
            if key in _memo:
                return
        if _db_lookup(key):
            with _memo_lock:
                _memo.add(key)
            return
    actual = file_sha256(path)
    if actual != sha256:
        raise IntegrityError(
            f"{label} has sha256 {actual[:16]}..., its seal records {sha256[:16]}... (the bytes changed after they "
            f"were sealed: a corrupted copy, cache or download){hint}"
        )
    with _memo_lock:
        _memo.add(key)
    _db_store(key)


def seal_problem(
    folder: str | Path, hashes: Mapping[str, str], sizes: Mapping[str, int], sealed_ns: int | None
) -> str | None:
    """None when every sealed file of `folder` is intact, else the first problem in words.

    Every file's size is checked (a stat); a file modified after its seal was written (`sealed_ns`: the marker's
    mtime, ns; None: every file) is also re-hashed against its sha256 (verdict cached by path, size, mtime and
    inode). So a byte flipped in place is caught without re-reading terabytes of untouched files on every re-run:
    writers write the marker last, and unpacked or restored files keep mtimes no newer than their marker's.
    """
    from kaleido.platform.files import sizes_problem

    problem = sizes_problem(folder, dict(sizes))
    if problem is not None:
        return problem
    for name, sha256 in hashes.items():
        path = Path(folder) / name
        if sealed_ns is not None and path.stat().st_mtime_ns <= sealed_ns:
            continue
        try:
            verify_file(path, sha256=sha256)
        except IntegrityError:
            return f"{name} changed after it was sealed (other sha256)"
    return None


def cached_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, re-read only when its path, size, mtime or inode changed since it was last hashed
    here (the verdict cache of `verify_file`). For identities that must survive a copy: a `dvc checkout` or a
    `cp` that does not keep mtimes changes the stamp, not the bytes."""
    info = Path(path).stat()
    where = (str(Path(path).resolve()), info.st_size, info.st_mtime_ns, info.st_ino)
    try:
        with sqlite3.connect(_db_path(), timeout=10) as db:
            row = db.execute("SELECT sha256 FROM verified WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
                             where).fetchone()
        if row is not None:
            return str(row[0])
    except sqlite3.Error:  # no table yet, a read-only cache: hash it
        pass
    digest = file_sha256(path)
    record_verified(path, digest)
    return digest


def record_verified(path: str | Path, sha256: str) -> None:
    """Remember that `path`, as it is now, holds `sha256` (its writer just hashed it): a later verify_file of the
    unchanged file costs no read."""
    info = Path(path).stat()
    key = (str(Path(path).resolve()), info.st_size, info.st_mtime_ns, info.st_ino, sha256)
    with _memo_lock:
        _memo.add(key)
    _db_store(key)


def verify_files(folder: str | Path, hashes: Mapping[str, str], sizes: Mapping[str, int] | None = None, *,
                 what: str = "", fix: str = "") -> None:
    """`verify_file` for every `relative name -> sha256` of `hashes` under `folder` (sizes when given)."""
    for name, digest in sorted(hashes.items()):
        verify_file(Path(folder) / name, sha256=digest, size=(sizes or {}).get(name), what=what, fix=fix)


def folder_manifest(folder: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, int | str]]:
    """{relative POSIX name: {"size", "sha256"}} of every file under `folder` (names in `exclude` left out): the
    seal a later reader checks with `verify_manifest` (a registered version keeps it in its MLmodel). The writer's
    own hashes count as verdicts: a reader on this machine does not read the files again."""
    folder = Path(folder)
    manifest: dict[str, dict[str, int | str]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in exclude:
            digest = file_sha256(path)
            record_verified(path, digest)
            manifest[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": digest}
    return manifest


def verify_manifest(folder: str | Path, manifest: Mapping[str, Mapping[str, int | str]], *, what: str = "",
                    fix: str = "") -> None:
    """`verify_file` for every entry of a `folder_manifest` (missing, other size or other bytes: IntegrityError
    naming the file)."""
    for name, entry in sorted(manifest.items()):
        verify_file(Path(folder) / name, sha256=str(entry["sha256"]), size=int(entry["size"]), what=what, fix=fix)


def listing_problem(manifest: Mapping[str, Mapping[str, int | str]], sizes: Mapping[str, int]) -> str | None:
    """Why a remote copy (`sizes`: name -> bytes, as a store lists them) cannot hold the sealed files, or None.

    Sizes only: a store's listing has no sha256; the bytes are checked where they are downloaded."""
    for name, entry in sorted(manifest.items()):
        if name not in sizes:
            return f"{name} is missing"
        if int(sizes[name]) != int(entry["size"]):
            return f"{name} is {sizes[name]} bytes, its seal records {entry['size']}"
    return None
