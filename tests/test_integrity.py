"""Verify on read: kaleido.platform.integrity (size + sha256 against a seal, verdict cached by size and mtime)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kaleido.platform import integrity
from kaleido.platform.integrity import IntegrityError, file_sha256, verify_file


@pytest.fixture()
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KALEIDO_CACHE", str(tmp_path / "cache"))
    integrity._memo.clear()
    return tmp_path / "cache"


def test_same_size_corruption_is_named(tmp_path: Path, fresh_cache: Path) -> None:
    path = tmp_path / "shard.tar"
    path.write_bytes(b"a" * 4096)
    digest = file_sha256(path)
    verify_file(path, sha256=digest, size=4096, what="dataset tar")
    path.write_bytes(b"b" + b"a" * 4095)  # same size, other bytes, new mtime
    with pytest.raises(IntegrityError, match=r"dataset tar .*shard\.tar has sha256 .* its seal records"):
        verify_file(path, sha256=digest, size=4096, what="dataset tar", fix="run `kaleido write-dataset` again")


def test_missing_and_truncated(tmp_path: Path, fresh_cache: Path) -> None:
    path = tmp_path / "x.bin"
    with pytest.raises(IntegrityError, match="is missing"):
        verify_file(path, sha256="0" * 64, size=3)
    path.write_bytes(b"ab")
    with pytest.raises(IntegrityError, match="is 2 bytes, its seal records 3"):
        verify_file(path, sha256=file_sha256(path), size=3)


def test_verdict_is_cached_across_processes_by_size_and_mtime(
    tmp_path: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "latents.safetensors"
    path.write_bytes(os.urandom(1 << 16))
    digest = file_sha256(path)
    verify_file(path, sha256=digest)
    integrity._memo.clear()  # a new process: only the SQLite verdict is left
    calls = []
    monkeypatch.setattr(integrity, "file_sha256", lambda p, block=1 << 20: calls.append(p) or "x")
    verify_file(path, sha256=digest)
    assert calls == []  # cached: not hashed again
    os.utime(path, ns=(0, 0))  # touched: hashed again (and the stub's wrong hash is caught)
    with pytest.raises(IntegrityError):
        verify_file(path, sha256=digest)
    assert len(calls) == 1
