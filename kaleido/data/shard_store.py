"""Where a finished shard is kept: its working folder, its PACK, and object storage.

A shard folder of a per-clip stage holds many small files (a clip, masks and references per clip). Versioning and
object storage want one artifact per shard instead, so a finished shard of a PACKED stage (ingest, caption, curate,
pair) is also written as

    <stage>/shard-NNNNN.tar    the folder as one deterministic tar (`_SUCCESS` first, then the top-level files:
                               the manifest parts, then the rest; owner, mode and mtime fixed)
    <stage>/shard-NNNNN.json   its marker: the `_SUCCESS` fields plus the pack's size and sha256, written LAST

DVC tracks the packs and their markers (the working folders are in .dvcignore), so a data version costs two files
per shard, not one per clip; `dvc pull` brings the packs back. The working folder is a cache of the pack: a stage
that needs an upstream shard's files calls `ensure_shard`, which unpacks it (checking the pack against its marker
and every file against `_SUCCESS`) when the folder is missing or damaged. Merging a stage's manifests reads the
parts out of the folder, or out of the pack (its first members) without unpacking it.

With an object-storage data root (`data.root: s3://...`, kaleido.platform.storage) the stage works in a local
staging folder (its `.remote.json` names the URI) and every finished shard is uploaded: a packed shard as its
pack then its marker, a plain shard (the dataset stage: its tar is already one file per shard) as its files then
`_SUCCESS`. A remote shard counts as finished only when its marker is there; `ensure_shard` downloads what a
stage needs (sizes checked against the marker, sha256 checked on unpack / by the reader).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kaleido.platform.files import write_json_atomic
from kaleido.platform.integrity import IntegrityError, file_sha256, seal_problem, verify_file

SUCCESS = "_SUCCESS"
PACK = ".tar"
PACK_MARKER = ".json"
REMOTE_FILE = ".remote.json"  # in a staging root: which object-storage location it mirrors
PACKED_STAGES = frozenset({"ingest", "caption", "curate", "pair"})  # stages with a file or more per clip
COMMAND_OF_STAGE = {"pair": "curate", "dataset": "write-dataset"}  # the `kaleido` command that redoes a stage


def is_packed(stage: str) -> bool:
    """Whether a stage's finished shards are also kept as packs (its per-clip files: clips, masks, references)."""
    return stage in PACKED_STAGES


# ---------------------------------------------------------------------------------------------
# which remote a local root mirrors


def bind_remote(root: Path, uri: str, endpoint: str | None) -> None:
    """Record in a staging root that it mirrors `uri` (every process working there reads it back)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / REMOTE_FILE
    record = {"uri": uri.rstrip("/"), "endpoint": endpoint}
    try:
        if json.loads(path.read_text()) == record:
            return
    except (OSError, ValueError):
        pass
    write_json_atomic(path, record)


def bind_params(root: Path, params: Any) -> None:
    """In a worker process (a local pool, a Ray node): bind `root` to params' s3:// data root when it has one, so
    the shard's uploads and fetches go to the bucket even where the driver's binding file is not visible."""
    from kaleido.platform.storage import endpoint_url, is_remote

    if is_remote(str(params.data.root)):
        bind_remote(root, str(params.data.root), endpoint_url(params))


def remote_for(root: Path) -> Any:
    """The `storage.Remote` a local root mirrors, or None for a plain local root."""
    try:
        record = json.loads((Path(root) / REMOTE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if record.get("endpoint") and not any(os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")):
        os.environ.setdefault("AWS_ENDPOINT_URL", record["endpoint"])  # for this process and its children
    return _remote(record["uri"], os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


_REMOTES: dict[tuple[str, str | None], Any] = {}


def _remote(uri: str, endpoint: str | None) -> Any:
    """One storage.Remote (one S3 client) per location and endpoint in a process."""
    from kaleido.platform.storage import Remote

    key = (uri, endpoint)
    if key not in _REMOTES:
        _REMOTES[key] = Remote(uri)
    return _REMOTES[key]


def local_root(params: Any) -> Path:
    """The local folder the data stages work in: data.root itself, or for `s3://...` its staging folder, bound to
    the URI (`bind_remote`) so that every process working there uploads and fetches through it."""
    from kaleido.platform.storage import endpoint_url, is_remote, staging_folder

    uri = str(params.data.root)
    if is_remote(uri):
        root = params.resolve(params.data.staging) if params.data.staging else staging_folder(uri, params)
        assert root is not None
        bind_remote(root, uri, endpoint_url(params))
        return root
    root = params.resolve(uri)
    assert root is not None
    return root


def fetch_file(root: Path, relative: str) -> Path:
    """A plain file under a root that mirrors object storage (a source video, a sidecar, a user manifest): downloaded
    when missing here or of another size there. A local root returns the path as it is."""
    path = root / relative
    remote = remote_for(root)
    if remote is None:
        return path
    size = remote.listing(relative).get(relative)
    if size is None:
        return path  # not there either: the caller reports it missing
    if not path.is_file() or path.stat().st_size != size:
        remote.download(relative, path)
    return path


def remove_remote_files(root: Path, relatives: Iterable[str]) -> None:
    remote = remote_for(root)
    if remote is not None:
        remote.remove([relative for relative in relatives if remote.exists(relative)])


# ---------------------------------------------------------------------------------------------
# packs


def pack_paths(shard_dir: Path) -> tuple[Path, Path]:
    """(pack, pack marker) of a shard folder: <stage>/shard-NNNNN.tar and .json."""
    return shard_dir.with_name(shard_dir.name + PACK), shard_dir.with_name(shard_dir.name + PACK_MARKER)


def _members(shard_dir: Path) -> list[str]:
    files = [p.relative_to(shard_dir).as_posix() for p in shard_dir.rglob("*") if p.is_file()]
    top = sorted(name for name in files if "/" not in name and name != SUCCESS)
    rest = sorted(name for name in files if "/" in name)
    return ([SUCCESS] if SUCCESS in files else []) + top + rest


def write_pack(shard_dir: Path, marker: dict[str, Any]) -> dict[str, Any]:
    """Pack a finished shard folder (atomically) and write its pack marker last; returns the pack marker."""
    pack, pack_marker = pack_paths(shard_dir)
    tmp = pack.with_name(f".{pack.name}.tmp-{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in _members(shard_dir):
            info = tar.gettarinfo(str(shard_dir / name), arcname=name)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "kaleido", "kaleido", 0o644
            with (shard_dir / name).open("rb") as handle:
                tar.addfile(info, handle)
    os.replace(tmp, pack)
    record = {
        **{key: marker.get(key) for key in ("stage", "shard", "spec_hash", "items", "content_hash", "summary")},
        "pack_sha256": file_sha256(pack),
        "pack_size": pack.stat().st_size,
    }
    write_json_atomic(pack_marker, record)
    return record


def read_pack_marker(shard_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(pack_paths(shard_dir)[1].read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def redo_hint(shard_dir: Path) -> str:
    """What redoes a damaged shard of this stage: its command (which redoes damaged shards), or the data version."""
    stage = shard_dir.parent.name
    return (f"run `kaleido {COMMAND_OF_STAGE.get(stage, stage)}` again (it redoes damaged shards), or restore the "
            "data version (`dvc pull` / `dvc checkout`)")


def pack_problem(shard_dir: Path, record: dict[str, Any]) -> str | None:
    """None when the local pack of a shard is intact (size; sha256 when it changed after its marker), else what
    differs (`integrity.seal_problem`)."""
    pack, pack_marker = pack_paths(shard_dir)
    try:
        sealed_ns = pack_marker.stat().st_mtime_ns
        expected = {pack.name: str(record["pack_sha256"])}, {pack.name: int(record["pack_size"])}
    except (OSError, KeyError, TypeError, ValueError):
        return f"its pack marker {pack_marker} is missing or malformed"
    problem = seal_problem(pack.parent, *expected, sealed_ns)
    return None if problem is None else f"shard pack {problem}"


def read_pack_members(handle: Any, names: Iterable[str]) -> dict[str, bytes]:
    """The bytes of `names` from a pack (a path or a seekable binary file object), reading only as far as needed."""
    wanted = set(names)
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=handle, mode="r:") if not isinstance(handle, (str, Path)) else tarfile.open(
        handle, "r:"
    ) as tar:
        for info in tar:
            if info.name in wanted:
                data = tar.extractfile(info)
                found[info.name] = data.read() if data is not None else b""
                if len(found) == len(wanted):
                    break
    return found


def unpack(shard_dir: Path, record: dict[str, Any]) -> None:
    """Restore a shard folder from its pack: the pack checked against its marker (size, sha256), every file against
    `_SUCCESS` (sha256), and `_SUCCESS` against the marker's content hash. IntegrityError names what differs."""
    from kaleido.data.shards import hash_folder

    pack, _ = pack_paths(shard_dir)
    fix = redo_hint(shard_dir)
    verify_file(pack, sha256=str(record["pack_sha256"]), size=int(record["pack_size"]), what="shard pack", fix=fix)
    tmp = shard_dir.with_name(f".{shard_dir.name}.unpack-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(pack, "r:") as tar:
            tar.extractall(tmp, filter="data")
        marker = json.loads((tmp / SUCCESS).read_text())
        files, content = hash_folder(tmp)
        if files != marker.get("files") or content != record.get("content_hash"):
            raise IntegrityError(f"shard pack {pack} unpacks to other files than its marker lists; {fix}")
        if shard_dir.is_symlink():
            shard_dir.unlink()
        elif shard_dir.exists():
            shutil.rmtree(shard_dir)
        os.rename(tmp, shard_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# a shard's states


def folder_marker(shard_dir: Path) -> dict[str, Any] | None:
    """The `_SUCCESS` of a working folder whose files are all there at their recorded sizes, else None."""
    from kaleido.data.shards import marker_intact, read_marker

    marker = read_marker(shard_dir) if not shard_dir.is_symlink() else None
    if marker is None or marker_intact(shard_dir, marker) is not None:
        return None
    return marker


def shard_marker(shard_dir: Path) -> dict[str, Any] | None:
    """What is known of a finished shard: its intact folder's `_SUCCESS`, else its pack marker (local, then the
    remote one, downloaded), else None. Every variant carries spec_hash, content_hash and summary."""
    marker = folder_marker(shard_dir)
    if marker is not None:
        return marker
    record = read_pack_marker(shard_dir)
    if record is not None and pack_paths(shard_dir)[0].is_file():
        problem = pack_problem(shard_dir, record)
        if problem is None:
            return record
        # a damaged pack is no finished shard: the stage redoes it (a remote copy is fetched anew)
        logging.getLogger("kaleido.data").warning("%s/%s: %s; it is not kept", shard_dir.parent.name,
                                                  shard_dir.name, problem)
        if remote_for(shard_dir.parent.parent) is None:
            return None
        drop_local_copy(shard_dir)
    remote = remote_for(shard_dir.parent.parent)
    if remote is None:
        return None
    relative = f"{shard_dir.parent.name}/{shard_dir.name}"
    data = remote.read_bytes(relative + PACK_MARKER)
    if data is not None:
        record = json.loads(data)
        write_json_atomic(pack_paths(shard_dir)[1], record)  # the pack itself is fetched when a stage needs it
        return record
    data = remote.read_bytes(f"{relative}/{SUCCESS}")
    if data is not None:
        return json.loads(data)  # a plain (unpacked) remote shard: fetched file by file when needed
    return None


def drop_local_copy(shard_dir: Path) -> None:
    """Remove this machine's copy of a shard (folder, pack, pack marker) under a root that mirrors object storage,
    when the remote copy, the truth, has changed (another Ray node redid the shard)."""
    pack, pack_marker = pack_paths(shard_dir)
    if shard_dir.is_dir() and not shard_dir.is_symlink():
        shutil.rmtree(shard_dir)
    pack.unlink(missing_ok=True)
    pack_marker.unlink(missing_ok=True)


def _drop_if_stale(shard_dir: Path, remote: Any) -> None:
    """Under an object-storage root, a local copy whose content hash differs from the remote marker's is stale (the
    shard was redone elsewhere since): drop it so that it is fetched again. One small GET per call."""
    relative = f"{shard_dir.parent.name}/{shard_dir.name}"
    data = remote.read_bytes(relative + PACK_MARKER) or remote.read_bytes(f"{relative}/{SUCCESS}")
    if data is None:
        return
    local = folder_marker(shard_dir) or read_pack_marker(shard_dir)
    if local is not None and local.get("content_hash") != json.loads(data).get("content_hash"):
        drop_local_copy(shard_dir)


def ensure_shard(shard_dir: Path) -> Path:
    """Make a finished shard's working folder present and intact (unpack its pack; download it first when the root
    mirrors object storage, replacing a stale local copy). Returns the folder. FileNotFoundError when the shard is
    nowhere, IntegrityError when its bytes differ from their seal."""
    root = shard_dir.parent.parent
    if remote_for(root) is not None:
        _drop_if_stale(shard_dir, remote_for(root))
    record = read_pack_marker(shard_dir)
    marker = folder_marker(shard_dir)
    if marker is not None and (record is None or marker.get("content_hash") == record.get("content_hash")):
        return shard_dir
    pack, pack_marker = pack_paths(shard_dir)
    remote = remote_for(root)
    relative = f"{shard_dir.parent.name}/{shard_dir.name}"
    if record is not None and pack.is_file():
        unpack(shard_dir, record)
        return shard_dir
    if remote is not None:
        data = remote.read_bytes(relative + PACK_MARKER)
        if data is not None:
            record = json.loads(data)
            remote.download_files(shard_dir.parent.name, shard_dir.parent, {shard_dir.name + PACK: record["pack_size"]})
            write_json_atomic(pack_marker, record)
            unpack(shard_dir, record)
            return shard_dir
        data = remote.read_bytes(f"{relative}/{SUCCESS}")
        if data is not None:
            marker = json.loads(data)
            tmp = shard_dir.with_name(f".{shard_dir.name}.fetch-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            remote.download_files(relative, tmp, marker["sizes"])
            for name, digest in sorted(marker["files"].items()):
                verify_file(tmp / name, sha256=digest, size=marker["sizes"][name], what="shard file",
                            fix=redo_hint(shard_dir))
            (tmp / SUCCESS).write_bytes(data)
            if shard_dir.exists():
                shutil.rmtree(shard_dir)
            os.rename(tmp, shard_dir)
            return shard_dir
    raise FileNotFoundError(f"shard {shard_dir} is not finished (no intact folder, pack or remote copy); run the "
                            f"stage that writes {shard_dir.parent.name} first")


_LISTINGS: dict[tuple[str, str], frozenset[str]] = {}


def shard_has_file(root: Path, relative: str) -> bool | None:
    """Whether a finished shard holds `relative` (a root-relative path `<stage>/shard-NNNNN/...`) by its `_SUCCESS`
    listing, read from the intact folder or from its pack's first member (local or remote) without unpacking it;
    None when the path is not inside a shard folder or the shard is not finished (the caller looks at the file)."""
    parts = relative.split("/")
    if len(parts) < 3 or not parts[1].startswith("shard-"):
        return None
    shard_dir = root / parts[0] / parts[1]
    marker = folder_marker(shard_dir) or shard_marker(shard_dir)
    if marker is None:
        return None
    key = (str(shard_dir), str(marker.get("content_hash")))
    if key not in _LISTINGS:
        files = marker.get("files")
        if not isinstance(files, dict):  # a pack marker: the listing is the pack's first member
            text = None
            pack, _ = pack_paths(shard_dir)
            if pack.is_file():
                text = read_pack_members(pack, [SUCCESS]).get(SUCCESS)
            else:
                remote = remote_for(root)
                if remote is not None:
                    with remote.open(f"{parts[0]}/{parts[1]}{PACK}") as handle:
                        text = read_pack_members(handle, [SUCCESS]).get(SUCCESS)
            files = json.loads(text).get("files", {}) if text else {}
        _LISTINGS[key] = frozenset(files)
    return "/".join(parts[2:]) in _LISTINGS[key]


def read_part(shard_dir: Path, name: str) -> str | None:
    """A top-level file of a finished shard (a manifest part) as text, from the folder or its pack (local or
    remote: only the pack's first members are read); None when the shard has no such file."""
    path = shard_dir / name
    marker = folder_marker(shard_dir)
    if marker is not None:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    pack, _ = pack_paths(shard_dir)
    record = read_pack_marker(shard_dir)
    if record is not None and pack.is_file():
        problem = pack_problem(shard_dir, record)
        if problem is not None:
            raise IntegrityError(f"{shard_dir}: {problem}; {redo_hint(shard_dir)}")
        return _part_from(pack, name)
    remote = remote_for(shard_dir.parent.parent)
    if remote is not None:
        relative = f"{shard_dir.parent.name}/{shard_dir.name}"
        if remote.exists(relative + PACK_MARKER):
            with remote.open(relative + PACK) as handle:
                return _part_from(handle, name)
        data = remote.read_bytes(f"{relative}/{name}")
        return data.decode("utf-8") if data is not None else None
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _part_from(pack: Any, name: str) -> str | None:
    # only when _SUCCESS lists it: a missing part must not make the whole pack be read
    head = read_pack_members(pack, [SUCCESS])
    files = json.loads(head[SUCCESS]).get("files", {}) if SUCCESS in head else {}
    if name not in files:
        return None
    if not isinstance(pack, (str, Path)):
        pack.seek(0)
    return read_pack_members(pack, [name])[name].decode("utf-8")


# ---------------------------------------------------------------------------------------------
# a stage's writer side


def publish(shard_dir: Path, marker: dict[str, Any], packed: bool, progress: bool = False) -> None:
    """A shard folder just finished: write its pack (packed stages) and upload it when the root mirrors object
    storage (marker last)."""
    root = shard_dir.parent.parent
    record = write_pack(shard_dir, marker) if packed else None
    remote = remote_for(root)
    if remote is None:
        return
    stage = shard_dir.parent.name
    if record is not None:
        pack, pack_marker = pack_paths(shard_dir)
        remote.upload_files(shard_dir.parent, stage, [pack.name], last=[pack_marker.name], progress=progress)
    else:
        files = sorted(marker.get("files", {}))
        remote.upload_files(shard_dir, f"{stage}/{shard_dir.name}", files, last=[SUCCESS], progress=progress)


def published(shard_dir: Path, marker: dict[str, Any], packed: bool) -> None:
    """A shard found finished: make sure its pack exists (a run killed between the folder and the pack) and that
    the remote copy is this one; cheap when both are in place."""
    record = read_pack_marker(shard_dir)
    if packed and folder_marker(shard_dir) is not None and (
        record is None or record.get("content_hash") != marker.get("content_hash")
        or not pack_paths(shard_dir)[0].is_file()
    ):
        publish(shard_dir, marker, packed)
        return
    remote = remote_for(shard_dir.parent.parent)
    if remote is None:
        return
    relative = f"{shard_dir.parent.name}/{shard_dir.name}"
    data = remote.read_bytes(relative + PACK_MARKER if packed else f"{relative}/{SUCCESS}")
    there = json.loads(data).get("content_hash") if data is not None else None
    if there != marker.get("content_hash"):
        ensure_shard(shard_dir)
        publish(shard_dir, json.loads((shard_dir / SUCCESS).read_text()), packed)


def drop_remote_orphans(stage_dir: Path, keep: set[str]) -> list[str]:
    """Delete the remote objects of this stage's shards that are not in `keep` (a source removed, the shard count
    changed); returns the shard names removed."""
    remote = remote_for(stage_dir.parent)
    if remote is None:
        return []
    stage = stage_dir.name
    doomed: dict[str, list[str]] = {}
    for relative in remote.listing(stage):
        head = relative.split("/")[1] if relative.count("/") >= 1 else ""
        name = head.removesuffix(PACK).removesuffix(PACK_MARKER)
        if name.startswith("shard-") and name not in keep:
            doomed.setdefault(name, []).append(relative)
    for _name, objects in sorted(doomed.items()):  # markers first: a shard is never left half-deleted but "finished"
        markers = [o for o in objects if o.endswith((PACK_MARKER, "/" + SUCCESS))]
        remote.remove(markers)
        remote.remove([o for o in objects if o not in markers])
    return sorted(doomed)


def upload_stage_files(root: Path, files: Iterable[Path]) -> None:
    """Upload merged manifests and seals (root-relative; in the given order: seals last) when the root mirrors
    object storage."""
    remote = remote_for(root)
    if remote is None:
        return
    for path in files:
        if path.is_file():
            remote.upload(path, path.relative_to(root).as_posix())


def download_stage_files(root: Path, relatives: Iterable[str]) -> None:
    """Fetch merged manifests and seals a stage reads (root-relative) when the root mirrors object storage; a file
    missing remotely is removed locally too (the remote is the truth)."""
    remote = remote_for(root)
    if remote is None:
        return
    for relative in relatives:
        data = remote.read_bytes(relative)
        local = root / relative
        if data is None:
            local.unlink(missing_ok=True)
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        if not local.is_file() or local.read_bytes() != data:
            tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, local)
