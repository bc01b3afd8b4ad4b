"""Work shards: split a stage into shards, run them in parallel, and never redo a finished one.

Shards are keyed, not counted: `keyed_shards` puts each item in shard sha256(its key) mod N (the key of every
data stage is the item's source video, kaleido.data.keys), so a shard's name is its key and its content depends on
its own items only; adding an item redoes its shard alone.

`run_shards(stage, specs, fn, params)` runs `fn(ctx)` once per shard:
- locally in `data.workers` processes (concurrent.futures, spawn start: forking a process that
  holds torch/Ray threads can deadlock), in-process when one worker suffices, or on Ray when
  `data.ray_address` is set ('local' starts a local cluster; kaleido.data.ray_cluster.run_on_ray: every
  task checks that it sees the driver's data root (a shared filesystem or object storage) and the driver
  that it sees each finished shard; `kaleido` must be installed on the nodes);
- `fn` writes into `ctx.work_dir`, a hidden temp folder. When it returns, the worker hashes every
  file, writes `_SUCCESS` (spec hash, per-file sha256, content hash, the fn's summary; no
  timestamps) and renames the folder to `<root>/<stage>/shard-NNNNN` in one atomic rename;
- a shard whose `_SUCCESS` carries the same spec hash (items, payload, stage fingerprint) is
  skipped on a re-run, so an interrupted run resumes where it stopped; a failed shard leaves
  nothing behind and is reported in `StageResult.failed` while the other shards finish;
- seeds derive from `data.seed`, the stage name and the shard id, so re-runs are identical.
One runner per stage folder at a time (an exclusive lock, kaleido.platform.files.exclusive_output:
a second runner is refused naming the holder); a run clears the temp folders a killed run left.
A skipped shard is checked against its marker (every file it lists, at the size it lists), so a
damaged shard folder is redone, never trusted (in a packed stage, restored from its checked pack:
kaleido.data.shard_store, which also writes the packs and mirrors an s3:// data root). Stage folders
are never symlinks and nothing is deleted through one (paths.output_folder / paths.remove_inside).

Merged manifests (`merge_jsonl`) are sealed: `seal_manifests` records, in the stage folder's
`_MANIFESTS.json`, each manifest's sha256, rows and the content hashes of the shards it merged;
`open_manifests` removes a stage's manifests and their seals when the stage starts; the next stage
calls `check_manifest`, which refuses a manifest whose seal is missing (its stage started again and
did not finish) or does not match (edited, or a shard folder changed since).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import traceback
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kaleido.config.schema import Params
from kaleido.data import shard_store
from kaleido.data.keys import shard_name, shard_of
from kaleido.data.paths import output_folder, remove_inside
from kaleido.platform.files import (
    describe_os_error,
    exclusive_output,
    file_sizes,
    is_disk_full,
    write_json_atomic,
)
from kaleido.platform.integrity import file_sha256, seal_problem

SUCCESS = "_SUCCESS"
SEALS = "_MANIFESTS.json"


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: its id, the item keys it covers, and any JSON-able payload the fn needs.

    `inputs`: root-relative folders of upstream shards the fn reads files from ("ingest/shard-00007"); they are
    unpacked or downloaded before the fn runs (shard_store.ensure_shard). Not part of the spec hash: the payload
    names what the shard's result depends on.
    """

    shard_id: int
    items: tuple[str, ...]
    payload: Any = None
    inputs: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return shard_name(self.shard_id)


def keyed_shards(
    items: Sequence[str],
    key_of: Callable[[str], str],
    shards: int,
    payloads: Mapping[str, Any] | None = None,
) -> list[ShardSpec]:
    """Items grouped by the shard of their key (kaleido.data.keys.shard_of: sha256(key) mod `shards`), one spec per
    non-empty shard, shard ids ascending, items sorted inside a shard: a shard's content depends on its own items
    only, never on their position among all items (adding an item redoes its shard alone)."""
    groups: dict[int, list[str]] = {}
    for item in items:
        groups.setdefault(shard_of(key_of(item), shards), []).append(item)
    specs = []
    for shard_id in sorted(groups):
        chunk = tuple(sorted(groups[shard_id]))
        payload = {item: payloads[item] for item in chunk} if payloads is not None else None
        specs.append(ShardSpec(shard_id, chunk, payload))
    return specs


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ints and strings (strings through crc32: stable across processes and runs)."""
    words = [part if isinstance(part, int) else zlib.crc32(part.encode()) for part in parts]
    state = np.random.SeedSequence([abs(w) for w in words]).generate_state(2, dtype=np.uint32)
    return int(state.view(np.uint64)[0] >> 1)


@dataclass(frozen=True)
class ShardContext:
    """What a shard fn gets: its spec, the params, where to write and its seed."""

    stage: str
    spec: ShardSpec
    params: Params
    root: Path  # the data root (absolute)
    work_dir: Path  # write outputs here; it becomes the final shard folder
    final_rel: str  # the final shard folder relative to the root (records point there)
    seed: int  # derived from data.seed + stage + shard id

    def rng(self, *keys: int | str) -> np.random.Generator:
        """A generator for this shard, or for one item of it (`ctx.rng(clip_id)`).

        Per-item generators depend on data.seed and the item key only, so an item's result does
        not change when the shard size (and with it the shard composition) changes.
        """
        if keys:
            return np.random.default_rng(derive_seed(self.params.data.seed, self.stage, *keys))
        return np.random.default_rng(self.seed)


ShardFn = Callable[[ShardContext], Mapping[str, Any] | None]


@dataclass
class ShardOutcome:
    name: str
    status: str  # "done" | "skipped" | "failed"
    content_hash: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    disk_full: bool = False  # the shard failed for want of space (ENOSPC / EDQUOT)
    node: str | None = None  # the Ray node that ran it (None: this machine)


@dataclass
class StageResult:
    stage: str
    stage_dir: Path
    outcomes: list[ShardOutcome]

    @property
    def failed(self) -> list[ShardOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def done(self) -> list[ShardOutcome]:
        return [o for o in self.outcomes if o.status == "done"]

    @property
    def skipped(self) -> list[ShardOutcome]:
        return [o for o in self.outcomes if o.status == "skipped"]

    def shard_dirs(self) -> list[Path]:
        """Folders of the finished shards, in shard order."""
        return [self.stage_dir / o.name for o in self.outcomes if o.status != "failed"]

    @property
    def disk_full(self) -> bool:
        """Some shard failed because its filesystem is full (the CLI exits 2 for it, like any full disk)."""
        return any(o.disk_full for o in self.failed)

    def raise_for_failures(self) -> None:
        if self.failed:
            raise StageFailed(self)


class StageFailed(RuntimeError):
    """Some shards failed; the others finished and are kept. Re-running the stage resumes."""

    def __init__(self, result: StageResult) -> None:
        lines = [f"{o.name}: {o.error.strip().splitlines()[-1] if o.error else 'failed'}" for o in result.failed]
        super().__init__(
            f"stage {result.stage}: {len(result.failed)} of {len(result.outcomes)} shards failed "
            f"(finished shards are kept; run the stage again to redo only these):\n  " + "\n  ".join(lines)
        )
        self.result = result


def spec_hash(stage: str, spec: ShardSpec, fingerprint: Any) -> str:
    blob = json.dumps(
        {"stage": stage, "shard": spec.name, "items": list(spec.items), "payload": spec.payload, "fp": fingerprint},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def hash_folder(folder: Path) -> tuple[dict[str, str], str]:
    """sha256 of every file under `folder` (except _SUCCESS) and one content hash over them all."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != SUCCESS:
            files[path.relative_to(folder).as_posix()] = file_sha256(path)
    content = hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in files.items()).encode()).hexdigest()
    return files, content


def marker_intact(shard_dir: Path, marker: dict[str, Any]) -> str | None:
    """None when every file the marker lists is in `shard_dir` intact, else what is wrong.

    Every size is checked; only files modified after `_SUCCESS` was written are re-hashed
    (`integrity.seal_problem`): a re-run must not re-read terabytes to skip finished shards, yet a file cut short,
    missing, or edited in place at the same size (a racing runner, a killed copy, a hand edit, a bad disk) shows.
    """
    sizes = marker.get("sizes")
    files = marker.get("files")
    if not isinstance(sizes, dict) or not isinstance(files, dict) or set(sizes) != set(files):
        return "its marker predates file sizes or is malformed"
    try:
        sealed_ns = (shard_dir / SUCCESS).stat().st_mtime_ns
    except OSError:
        return f"{SUCCESS} is missing"
    return seal_problem(shard_dir, files, sizes, sealed_ns)


def read_marker(shard_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((shard_dir / SUCCESS).read_text())
    except (OSError, ValueError):
        return None


def _execute(stage: str, spec: ShardSpec, fn: ShardFn, params: Params, stage_dir: Path, expected: str) -> ShardOutcome:
    """Run one shard in this process: temp folder, fn, hashes, marker, atomic rename."""
    tmp = stage_dir / f".{spec.name}.tmp"
    final = stage_dir / spec.name
    root = stage_dir.parent
    shard_store.bind_params(root, params)
    remove_inside(root, tmp)
    tmp.mkdir(parents=True)
    ctx = ShardContext(
        stage=stage,
        spec=spec,
        params=params,
        root=root,
        work_dir=tmp,
        final_rel=final.relative_to(root).as_posix(),
        seed=derive_seed(params.data.seed, stage, spec.shard_id),
    )
    try:
        for folder in spec.inputs:  # upstream shards this one reads: unpacked / downloaded, checked
            shard_store.ensure_shard(root / folder)
        summary = dict(fn(ctx) or {})
        files, content = hash_folder(tmp)
        marker = {
            "stage": stage,
            "shard": spec.name,
            "spec_hash": expected,
            "items": len(spec.items),
            "files": files,
            "sizes": file_sizes(tmp, exclude=(SUCCESS,)),
            "content_hash": content,
            "summary": summary,
        }
        (tmp / SUCCESS).write_text(json.dumps(marker, indent=1, sort_keys=True, default=str) + "\n")
        remove_inside(root, final)
        os.rename(tmp, final)  # atomic: the shard folder appears complete or not at all
        shard_store.publish(final, marker, shard_store.is_packed(stage))  # its pack; uploaded, marker last
    except BaseException as exc:  # SystemExit from a shard fn fails that shard, not the whole run
        shutil.rmtree(tmp, ignore_errors=True)  # tmp is a real folder made above (rmtree never follows links)
        if isinstance(exc, KeyboardInterrupt):
            raise
        if is_disk_full(exc):  # one line naming the file and the free space, not a traceback
            return ShardOutcome(spec.name, "failed", error=describe_os_error(exc), disk_full=True)
        return ShardOutcome(spec.name, "failed", error="".join(traceback.format_exception(exc)))
    return ShardOutcome(spec.name, "done", content_hash=content, summary=summary)


def _execute_pinned(stage: str, spec: ShardSpec, fn: ShardFn, params: Params, stage_dir: Path,
                    expected: str) -> ShardOutcome:
    """`_execute` with the one thread set-up of every executor (kaleido.platform.workers.pinned_threads): the
    local pool, this process and Ray run a shard alike, so its bytes do not depend on which one ran it."""
    from kaleido.platform.workers import pinned_threads

    with pinned_threads():
        return _execute(stage, spec, fn, params, stage_dir, expected)


def _worker_init(gpus: Any = None) -> None:
    if gpus is not None:  # one GPU per worker: it sees only its own (before anything initialises CUDA)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus.get(timeout=60)


def _progress(total: int, stage: str, unit: str, enabled: bool) -> Any:
    from kaleido.platform.progress import Progress  # a bar on a terminal, a line per interval in a log

    return Progress(stage, total, unit, enabled=enabled)


def run_shards(
    stage_name: str,
    shard_specs: Sequence[ShardSpec],
    fn: ShardFn,
    cfg: Params,
    *,
    fingerprint: Any = None,
    progress: bool = True,
    unit: str = "item",
    gpus: Sequence[str] = (),
    models: Sequence[str] = (),
) -> StageResult:
    """Run `fn` over every shard not already finished; see the module docstring.

    `fingerprint`: anything JSON-able that, when changed, must redo every shard (the stage's
    params, model paths). `fn` must be a module-level function (it is pickled by name).
    `gpus`: GPU ids for a model stage's local workers: one worker per GPU, each seeing only its own through
    CUDA_VISIBLE_DEVICES (at most len(gpus) workers). Empty: CPU work, or Ray (which places its own).
    `models`: the model pools the shard fn calls (kaleido.data.models keys). On Ray they are started for the shards
    that are not finished (none: no pool), the shard tasks call their models through them
    (kaleido.data.models.shard_model), and they are torn down when the shards are done (kaleido.data.pools).
    """
    root = shard_store.local_root(cfg)
    stage_dir = output_folder(root, stage_name)
    names = {spec.name for spec in shard_specs}
    if len(names) != len(shard_specs):
        raise ValueError(f"stage {stage_name}: shard ids must be unique")
    with exclusive_output(stage_dir, f"stage {stage_name}"):
        stage_dir.mkdir(parents=True, exist_ok=True)
        for leftover in [*stage_dir.glob(".shard-*.tmp"), *stage_dir.glob(".shard-*.unpack-*"),
                         *stage_dir.glob(".shard-*.tar.tmp-*"), *stage_dir.glob(".ray-run-*")]:
            remove_inside(root, leftover)
        for orphan in stage_dir.glob("shard-*"):
            base = orphan.name.removesuffix(shard_store.PACK).removesuffix(shard_store.PACK_MARKER)
            if base not in names:  # a shard no source maps to any more (removed, or another shard count)
                remove_inside(root, orphan)
        shard_store.drop_remote_orphans(stage_dir, names)
        return _run_pending(stage_name, stage_dir, shard_specs, fn, cfg, fingerprint, progress, unit, tuple(gpus),
                            tuple(models))


def _run_pending(
    stage_name: str,
    stage_dir: Path,
    shard_specs: Sequence[ShardSpec],
    fn: ShardFn,
    cfg: Params,
    fingerprint: Any,
    progress: bool,
    unit: str,
    gpus: tuple[str, ...] = (),
    models: tuple[str, ...] = (),
) -> StageResult:
    """Skip the shards whose marker matches and whose files are intact; run the others."""
    import logging

    outcomes: dict[str, ShardOutcome] = {}
    pending: list[tuple[ShardSpec, str]] = []
    bar = _progress(sum(len(s.items) for s in shard_specs), stage_name, unit, progress)
    packed = shard_store.is_packed(stage_name)
    for spec in shard_specs:
        expected = spec_hash(stage_name, spec, fingerprint)
        marker = read_marker(stage_dir / spec.name)
        damage = marker_intact(stage_dir / spec.name, marker) if marker is not None else None
        kept = None
        if marker is not None and marker.get("spec_hash") == expected and damage is None:
            kept = marker
            shard_store.published(stage_dir / spec.name, marker, packed)
        elif packed or shard_store.remote_for(stage_dir.parent) is not None:
            # no intact folder: the shard's pack (local, or the remote copy) is the finished shard
            found = shard_store.shard_marker(stage_dir / spec.name)
            if found is not None and found.get("spec_hash") == expected:
                kept = found
        if kept is not None:
            outcomes[spec.name] = ShardOutcome(
                spec.name, "skipped", content_hash=kept.get("content_hash"), summary=kept.get("summary", {})
            )
            bar.update(len(spec.items), skipped=True)
        else:
            if damage is not None and marker is not None and marker.get("spec_hash") == expected:
                logging.getLogger("kaleido.data").warning(
                    "%s/%s is finished but damaged (%s): redoing it", stage_name, spec.name, damage
                )
            pending.append((spec, expected))

    def finished(spec: ShardSpec, outcome: ShardOutcome) -> None:
        outcomes[spec.name] = outcome
        bar.update(len(spec.items))

    try:
        if not pending:
            pass
        elif cfg.data.ray_address:
            from kaleido.data.pools import model_pools
            from kaleido.data.ray_cluster import run_on_ray

            with model_pools(cfg, models, [spec for spec, _ in pending]) as pools:
                run_on_ray(stage_name, pending, fn, cfg, stage_dir, finished, pools)
        elif cfg.data.workers == 1 or len(pending) == 1:
            for spec, expected in pending:
                finished(spec, _execute_pinned(stage_name, spec, fn, cfg, stage_dir, expected))
        else:
            _run_pool(stage_name, pending, fn, cfg, stage_dir, finished, gpus)
    finally:
        bar.close()
    return StageResult(stage_name, stage_dir, [outcomes[spec.name] for spec in shard_specs])


def _run_pool(
    stage: str,
    pending: Sequence[tuple[ShardSpec, str]],
    fn: ShardFn,
    cfg: Params,
    stage_dir: Path,
    finished: Callable[[ShardSpec, ShardOutcome], None],
    gpus: tuple[str, ...] = (),
) -> None:
    workers = min(cfg.data.workers, len(pending), len(gpus) or cfg.data.workers)
    context = multiprocessing.get_context("spawn")
    devices = None
    if gpus:
        devices = context.Queue()
        for gpu in gpus[:workers]:
            devices.put(gpu)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(devices,)) as pool:
        futures: dict[Future[ShardOutcome], ShardSpec] = {
            pool.submit(_execute_pinned, stage, spec, fn, cfg, stage_dir, expected): spec
            for spec, expected in pending
        }
        waiting: Iterable[Future[ShardOutcome]] = set(futures)
        while waiting:
            done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
            for future in done:
                spec = futures[future]
                try:
                    finished(spec, future.result())
                except BrokenProcessPool as exc:
                    # a worker died (killed, out of memory, os._exit): the pool cannot run the rest
                    finished(spec, ShardOutcome(spec.name, "failed", error=f"worker process died: {exc}"))
                except Exception as exc:  # e.g. an unpicklable fn: report it, keep going
                    finished(spec, ShardOutcome(spec.name, "failed", error="".join(traceback.format_exception(exc))))


def merge_jsonl(shard_dirs: Iterable[Path], name: str, out: Path, extra: Iterable[dict[str, Any]] = ()) -> int:
    """Concatenate `name` from each shard folder (in order) plus `extra` rows into `out`, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    count = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for row in extra:
            handle.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
            count += 1
        for folder in shard_dirs:
            text = shard_store.read_part(folder, name)  # the folder's file, or the member of its pack
            for line in (text or "").splitlines():
                if line.strip():
                    handle.write(line + "\n")
                    count += 1
    os.replace(tmp, out)
    return count


# ---------------------------------------------------------------------------------------------
# sealed manifests


class ManifestError(ValueError):
    """A merged manifest is not the complete, unchanged output of its stage; the message says which stage to run."""


def _read_seals(stage_dir: Path) -> dict[str, Any]:
    try:
        seals = json.loads((stage_dir / SEALS).read_text())
    except (OSError, ValueError):
        return {}
    return seals if isinstance(seals, dict) else {}


def _seal_key(root: Path, manifest: Path) -> str:
    return manifest.resolve().relative_to(root.resolve()).as_posix()


def open_manifests(root: Path, stage_dir: Path, manifests: Iterable[Path]) -> None:
    """A stage starts: delete its merged manifests and their seals, so that a run killed from here on leaves no
    stale manifest for the next stage to take as this run's output (call it holding the stage's lock)."""
    manifests = list(manifests)
    seals = _read_seals(stage_dir)
    for manifest in manifests:
        seals.pop(_seal_key(root, manifest), None)
    if stage_dir.is_dir():  # seals first: a kill in between leaves unsealed manifests, which are refused
        write_json_atomic(stage_dir / SEALS, seals)
        shard_store.upload_stage_files(root, [stage_dir / SEALS])
    for manifest in manifests:
        remove_inside(root, manifest)
    shard_store.remove_remote_files(root, [_seal_key(root, manifest) for manifest in manifests])


def seal_manifests(root: Path, stage_dir: Path, merged: Mapping[Path, Sequence[Path]]) -> None:
    """Record each finished manifest's sha256, rows and the content hashes of the shard folders it merged."""
    seals = _read_seals(stage_dir)
    for manifest, shard_dirs in merged.items():
        rows = sum(1 for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip())
        shards = {}
        for folder in shard_dirs:
            marker = shard_store.shard_marker(folder) or {}
            shards[folder.resolve().relative_to(root.resolve()).as_posix()] = marker.get("content_hash")
        seals[_seal_key(root, manifest)] = {"sha256": file_sha256(manifest), "rows": rows, "shards": shards}
    write_json_atomic(stage_dir / SEALS, seals)
    shard_store.upload_stage_files(root, [*merged, stage_dir / SEALS])  # object storage: the seals last


def check_manifest(root: Path, stage_dir: Path, manifest: Path, command: str) -> int:
    """Refuse `manifest` unless its stage sealed it and nothing changed since; returns its rows.

    `command` is the CLI command that writes it (named in the fix). Raises ManifestError or
    FileNotFoundError (no manifest at all).
    """
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} not found; run `{command}` first")
    seal = _read_seals(stage_dir).get(_seal_key(root, manifest))
    if not isinstance(seal, dict):
        raise ManifestError(
            f"manifest {manifest} is not the finished output of `{command}` (no seal in {stage_dir / SEALS}): that "
            f"stage started again and did not finish (killed or failed), or the file was written by hand; run "
            f"`{command}` again (or pass your own file with --manifest)"
        )
    if file_sha256(manifest) != seal.get("sha256"):
        raise ManifestError(
            f"manifest {manifest} changed after `{command}` wrote it ({seal.get('rows')} rows then); run `{command}` "
            "again (or pass your own file with --manifest)"
        )
    for relative, content_hash in (seal.get("shards") or {}).items():
        folder = root / relative
        marker = read_marker(folder)
        damage = marker_intact(folder, marker) if marker is not None else "it has no _SUCCESS marker"
        if damage is not None:  # no intact folder: the shard's pack (or remote copy) stands for it
            marker = shard_store.shard_marker(folder)
            damage = None if marker is not None else damage
        if marker is None or marker.get("content_hash") != content_hash or damage is not None:
            why = damage or "its content hash changed"
            raise ManifestError(
                f"manifest {manifest} names files in {folder}, which changed after `{command}` merged it ({why}); "
                f"run `{command}` again"
            )
    return int(seal.get("rows", 0))
