"""The MLflow model registry for `kaleido-s2v`: register, record gate decisions, promote, roll back.

Versions are created from a training run's checkpoint artifacts with `create_model_version(source=...)`
(MLflow 3 refuses `register_model("runs:/...")` for a plain artifact folder). Aliases, not the
deprecated stages, mark the serving model: `champion`, and `previous` for the one it replaced.
Promotion is refused unless the version's gate decision tag says `passed`: every promotion path
(CLI, Prefect flow, library) goes through `promote`. On the cluster, MLflow basic-auth permissions
keep write access to the registered model with the platform's service account, so the tag check is
the only way in.

The registry is the system of record, so every change of aliases, history and gate tags is
serialised across processes and machines: MLflow has no compare-and-set on aliases or tags, but
creating a registered model is atomic (its name is the primary key of the backing SQL table; a
second create fails with RESOURCE_ALREADY_EXISTS). `registry_lock` therefore holds the registered
model `<name>.lock` for the few calls of a change (promote, rollback, a gate decision, creating a
version) and deletes it after. Others wait (`LOCK_WAIT_S`); a lock older than `LOCK_STALE_S` (its
holder was killed mid-change) is broken with a warning. Rules kept under the lock:
- `champion_history` is rewritten with the aliases, never apart from them;
- a training run is registered once: a second call returns the existing version when the weights are
  the same (content sha256 without the MLmodel file, whose time stamp changes per build) and is
  refused when they differ; a version's artifacts sit at `model-<sha256[:16]>` in its run, a path
  that is written once (an existing path is never uploaded to again);
- no path leaves `champion` on a version whose latest gate decision is not `passed`: a failed
  re-gate of the champion demotes it (see `record_gate`), and rollback skips versions that failed;
- no path gives `champion` to a version whose files are not whole in the artifact store: its MLmodel's
  manifest (kaleido.serving.seal_model_folder: every file's size and sha256) is compared with the store's
  listing (`stored_problem`), naming the file that is missing or has another size; a download is checked
  against the sha256s (kaleido.serving.verify_model_folder).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException

from kaleido.platform.files import file_sizes, folder_sha256
from kaleido.platform.workspace import REVISION_ENV

CHAMPION = "champion"
PREVIOUS = "previous"
GATE_TAG = "gate.decision"
GATE_REASONS_TAG = "gate.reasons"
HISTORY_TAG = "champion_history"  # JSON list of versions that held `champion`, oldest first
CONTENT_TAG = "content.sha256"  # the version's files (without MLmodel): what "the same weights" means
LOCK_WAIT_S = 120.0  # how long a change waits for another one to finish
LOCK_STALE_S = 300.0  # a lock this old was left by a killed process (a change takes seconds)

log = logging.getLogger("kaleido.registry")


class RegistryError(RuntimeError):
    """A registry operation was refused; the message says why and what to do."""


def parse_model_ref(ref: str) -> tuple[str, str]:
    """A registry URI as MLflow writes it: models:/name/3 -> (name, "3"); models:/name@alias -> (name, "@alias").

    RegistryError for anything else (the message shows both forms)."""
    body = ref.removeprefix("models:/")
    if "@" in body:
        name, _, alias = body.partition("@")
        if name and alias:
            return name, f"@{alias}"
    else:
        name, _, version = body.rpartition("/")
        if name and version:
            return name, version
    raise RegistryError(f"model reference {ref!r}: expected models:/<name>/<version> or models:/<name>@<alias>")


def find_version(ref: str, tracking_uri: str) -> tuple[ModelRegistry, str, Any]:
    """(registry, version number, MLflow ModelVersion) of models:/<name>@<alias> or models:/<name>/<version>.

    RegistryError for a malformed reference or one that names nothing; MLflow's own errors (unknown model,
    unreachable server) pass through for the caller to word."""
    name, selector = parse_model_ref(ref)
    registry = ModelRegistry(tracking_uri, name)
    version = registry.resolve(selector)
    return registry, version, registry.client.get_model_version(name, version)


@dataclass(frozen=True)
class Lineage:
    """Where a model version comes from: each becomes a version tag (lineage.*)."""

    git_revision: str
    dvc_data_hash: str
    params_hash: str
    training_run_id: str
    base_model: str = ""  # what training started from: models:/<name>/<version>, or a checkpoint path
    kind: str = "full"  # full | lora (the version holds an adapter on base_model)

    def tags(self) -> dict[str, str]:
        tags = {
            "lineage.git_revision": self.git_revision,
            "lineage.dvc_data_hash": self.dvc_data_hash,
            "lineage.params_hash": self.params_hash,
            "lineage.training_run_id": self.training_run_id,
            "lineage.kind": self.kind,
        }
        if self.base_model:
            tags["lineage.base_model"] = self.base_model
        return tags


def version_description(tags: dict[str, str]) -> str:
    """The model version's description (Markdown, shown on its MLflow UI page): the lineage and the gate's verdict
    with its reasons, from the version's tags (the tags stay the machine-readable record)."""
    lineage = [("data (DVC hash of data/dataset)", "lineage.dvc_data_hash"), ("git revision", "lineage.git_revision"),
               ("params hash", "lineage.params_hash"), ("training run", "lineage.training_run_id"),
               ("kind", "lineage.kind"), ("base model", "lineage.base_model"), ("content sha256", CONTENT_TAG)]
    lines = ["### Lineage", "", "| | |", "|---|---|"]
    lines += [f"| {title} | `{tags[key]}` |" for title, key in lineage if tags.get(key)]
    if tags.get("lineage.training_run_id"):
        lines.append(f"| dvc.lock | `runs:/{tags['lineage.training_run_id']}/lineage/dvc.lock` |")
    decision = tags.get(GATE_TAG)
    lines += ["", f"### Gate: {decision.upper() if decision else 'not gated yet'}"]
    if decision:
        try:
            reasons = json.loads(tags.get(GATE_REASONS_TAG) or "{}")
        except ValueError:
            reasons = {"reasons": tags.get(GATE_REASONS_TAG, "")}
        lines += ["", "| metric | verdict |", "|---|---|"]
        lines += [f"| {metric} | {str(reason).replace('|', '/')} |" for metric, reason in sorted(reasons.items())]
    return "\n".join(lines) + "\n"


def git_revision(repo: Path | None = None) -> str:
    """HEAD's commit (with `-dirty` when the tree has changes); outside git (a flow-run pod's workspace) the image's
    revision from $KALEIDO_GIT_REVISION (a Dockerfile build argument), else `unknown`."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get(REVISION_ENV) or "unknown"
    return f"{head}-dirty" if dirty else head


def content_sha256(folder: Path) -> str:
    """sha256 of a version's folder without MLflow's `MLmodel` (it carries a creation time and a uuid that change
    with every build of the same weights)."""
    return folder_sha256(folder, exclude=("MLmodel",))


class ModelRegistry:
    """Registry operations for one registered model."""

    def __init__(self, tracking_uri: str, name: str = "kaleido-s2v"):
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.name = name

    # ---- versions -----------------------------------------------------------------------------------

    def ensure_model(self) -> None:
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    self.name, description="Kaleido subject-to-video DiT (Wan2.1 + R-RoPE references)"
                )
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile: fine
                    raise

    def register(
        self,
        run_id: str,
        checkpoint_dir: Path,
        lineage: Lineage,
        artifact_path: str = "model",
        extra_tags: dict[str, str] | None = None,
        lineage_files: tuple[Path, ...] = (),
    ) -> str:
        """Upload `checkpoint_dir` to the run's artifacts and create a model version from it; returns the version.

        The flow hands an MLflow Model folder (kaleido.serving.build_model): the version then loads with
        mlflow.pyfunc and `mlflow models serve`.

        lineage_files (dvc.lock, say) go to the run's `lineage/` artifacts: every out's hash of the data version,
        beside the one dataset hash the tags carry.
        """
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir() or not any(checkpoint_dir.iterdir()):
            raise RegistryError(f"checkpoint folder {checkpoint_dir} is missing or empty; nothing to register")
        missing = [str(path) for path in lineage_files if not Path(path).is_file()]
        if missing:
            raise RegistryError(f"lineage file(s) {', '.join(missing)} do not exist; run the DVC stages first")
        self.ensure_model()
        content = content_sha256(checkpoint_dir)
        existing = self._run_version(run_id, content)
        if existing is not None:
            return existing
        # written once: the path names the content, so an upload never replaces another version's files. An upload
        # cut short (a killed registration) is completed before any version points at it.
        path = f"{artifact_path}-{content[:16]}"
        wanted = file_sizes(checkpoint_dir)
        if self._uploaded_sizes(run_id, path) != wanted:
            self.client.log_artifacts(run_id, str(checkpoint_dir), artifact_path=path)
            uploaded = self._uploaded_sizes(run_id, path)
            if uploaded != wanted:
                raise RegistryError(
                    f"uploading {checkpoint_dir} to run {run_id}/{path} left {len(uploaded)} of {len(wanted)} files "
                    "at their sizes; no version was created. Check the artifact store's free space and register again"
                )
        for file in lineage_files:  # once per run: a second registration of the run returned above
            self.client.log_artifact(run_id, str(file), artifact_path="lineage")
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{path}"
        tags = {**lineage.tags(), **(extra_tags or {}), CONTENT_TAG: content}
        with self.registry_lock(f"register run {run_id}"):
            existing = self._run_version(run_id, content)  # a racing registration of the same run got there first
            if existing is not None:
                return existing
            version = self.client.create_model_version(self.name, source=source, run_id=run_id, tags=tags,
                                                       description=version_description(tags))
        return str(version.version)

    def _uploaded_sizes(self, run_id: str, path: str) -> dict[str, int]:
        """{name relative to `path`: bytes} of the run's artifacts under `path` (empty when there are none)."""
        sizes: dict[str, int] = {}
        pending = [path]
        while pending:
            for info in self.client.list_artifacts(run_id, pending.pop()):
                if info.is_dir:
                    pending.append(info.path)
                else:
                    sizes[info.path[len(path) + 1:]] = int(info.file_size or 0)
        return sizes

    def _run_version(self, run_id: str, content: str) -> str | None:
        """The version already registered from `run_id` (same content), None if none; RegistryError when that
        version holds other weights."""
        found = self.client.search_model_versions(f"name = '{self.name}' and run_id = '{run_id}'")
        if not found:
            return None
        first = min(found, key=lambda v: int(v.version))
        if first.tags.get(CONTENT_TAG) not in (None, content):
            raise RegistryError(
                f"training run {run_id} is already registered as {self.name} version {first.version} with other "
                f"weights (sha256 {first.tags.get(CONTENT_TAG, '?')[:16]}, these are {content[:16]}); a run is "
                "registered once: train a new run to register other weights"
            )
        log.warning("training run %s is already registered as %s version %s: returning it", run_id, self.name,
                    first.version)
        return str(first.version)

    def exists(self, version: str) -> bool:
        """False for a version that was never created or was deleted (the MLflow UI allows that)."""
        try:
            self.client.get_model_version(self.name, version)
        except (MlflowException, RestException):
            return False
        return True

    def version_tags(self, version: str) -> dict[str, str]:
        """The version's tags; RegistryError naming the version when it does not exist (any more)."""
        try:
            return dict(self.client.get_model_version(self.name, version).tags)
        except (MlflowException, RestException):
            raise RegistryError(
                f"{self.name} version {version} does not exist (deleted?); `kaleido registry show` lists the versions"
            ) from None

    def resolve(self, ref: str) -> str:
        """A version number from `3`, `@champion`, `champion` or `models:/name@champion` / `models:/name/3`.

        RegistryError when the version does not exist or the alias points nowhere.
        """
        text = ref.removeprefix(f"models:/{self.name}")
        text = text.removeprefix("/")
        if text.isdigit():
            if not self.exists(text):
                raise RegistryError(f"{self.name} has no version {text} (deleted?); `kaleido registry show` lists them")
            return text
        alias = text.removeprefix("@")
        version = self.alias_version(alias)
        if version is None:
            raise RegistryError(f"{self.name} has no version with alias {alias!r}")
        return version

    def alias_version(self, alias: str) -> str | None:
        """The version an alias names, or None when no existing version holds it."""
        try:
            version = str(self.client.get_model_version_by_alias(self.name, alias).version)
        except (MlflowException, RestException):
            return None
        return version if self.exists(version) else None

    # ---- gate ---------------------------------------------------------------------------------------

    def record_gate(self, version: str, passed: bool, reasons: dict[str, Any]) -> str | None:
        """Write the gate's decision and per-metric reasons onto the version's tags; returns a note on a demotion.

        Rule (documented in docs/operations.md): `champion` never stays on a version whose latest gate
        decision is not `passed`. A failed re-gate of the champion demotes it in the same locked change: the
        champion goes back to the latest earlier champion whose gate still passes (as `rollback` would); when
        there is none, the `champion` alias is removed (serving a model that failed its own gate is worse than
        refusing to serve: `models:/...@champion` then fails with "no version with alias 'champion'").
        """
        with self.registry_lock(f"gate version {version}"):
            self.client.set_model_version_tag(self.name, version, GATE_TAG, "passed" if passed else "failed")
            self.client.set_model_version_tag(
                self.name, version, GATE_REASONS_TAG, json.dumps(reasons, sort_keys=True)
            )
            # the UI's version page shows the description, not every tag: the verdict and reasons go there too
            self.client.update_model_version(self.name, version,
                                             description=version_description(self.version_tags(version)))
            if passed or self.alias_version(CHAMPION) != version:
                return None
            try:
                restored, _ = self._rollback_locked()
            except RegistryError:
                self.client.delete_registered_model_alias(self.name, CHAMPION)
                self._set_history([v for v in self._history() if v != version])
                note = f"version {version} failed its re-gate and was champion: no earlier champion passes, so " \
                       "the champion alias was removed"
            else:
                note = f"version {version} failed its re-gate and was champion: champion is back on {restored}"
            log.warning("%s", note)
            return note

    def gate_decision(self, version: str) -> str | None:
        """`passed`, `failed`, or None when the version has no gate tag (never gated) or does not exist."""
        try:
            return self.version_tags(version).get(GATE_TAG)
        except RegistryError:
            return None

    # ---- serialised changes -------------------------------------------------------------------------

    @contextmanager
    def registry_lock(self, what: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
        """Hold `<name>.lock` (a registered model: its creation is atomic in MLflow's store) for a change.

        Waits up to `wait_s` for another holder; breaks a lock older than LOCK_STALE_S (killed holder).
        RegistryError naming the holder when it does not come free. Re-entrant in one object.
        """
        if getattr(self, "_lock_depth", 0):
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        lock = f"{self.name}.lock"
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": time.time()})
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.client.create_registered_model(
                    lock, tags={"holder": holder},
                    description=f"Held while a change of {self.name} runs (kaleido.registry); deleted after it.",
                )
                break
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            held = self._lock_holder(lock)
            if held is not None and time.time() - held[1] > LOCK_STALE_S:
                log.warning("breaking the registry lock %s left by %s (%.0f s old: its holder was killed)", lock,
                            held[0], time.time() - held[1])
                self._delete_lock(lock)
                continue
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"{self.name} is being changed by {held[0] if held else 'another process'} for more than "
                    f"{wait_s:.0f} s; try again, or delete the registered model {lock} if that process is gone"
                )
            time.sleep(0.1 + random.random() * 0.2)
        self._lock_depth = 1
        try:
            yield
        finally:
            self._lock_depth = 0
            self._delete_lock(lock)

    def _lock_holder(self, lock: str) -> tuple[str, float] | None:
        try:
            model = self.client.get_registered_model(lock)
        except (MlflowException, RestException):
            return None  # released meanwhile
        try:
            holder = json.loads(model.tags.get("holder", "{}"))
            text = f"pid {holder['pid']} on {holder['host']} ({holder['what']})"
        except (ValueError, KeyError, TypeError):
            text = "an unknown process"
        return text, model.creation_timestamp / 1000.0

    def _delete_lock(self, lock: str) -> None:
        with suppress(MlflowException, RestException):  # already released (broken as stale by another process)
            self.client.delete_registered_model(lock)

    # ---- promotion ----------------------------------------------------------------------------------

    def _history(self) -> list[str]:
        """The versions that held `champion`, oldest first, as recorded (deleted ones included)."""
        try:
            tags = self.client.get_registered_model(self.name).tags
        except (MlflowException, RestException):
            return []
        try:
            history = json.loads(tags.get(HISTORY_TAG, "[]"))
        except json.JSONDecodeError:
            return []  # a hand-edited tag: start afresh rather than fail every command
        return [str(v) for v in history] if isinstance(history, list) else []

    def _set_history(self, history: list[str]) -> None:
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, json.dumps(history))

    def promote(self, version: str) -> str | None:
        """Make `version` the champion; the replaced champion becomes `previous`. Returns the replaced one.

        Refused unless the version's gate decision is `passed` (read under the lock: a re-gate cannot slip in
        between the check and the alias). Two promotions at once run one after the other.
        """
        with self.registry_lock(f"promote version {version}"):
            if not self.exists(version):
                raise RegistryError(f"{self.name} version {version} does not exist (deleted?); nothing to promote")
            decision = self.gate_decision(version)
            if decision != "passed":
                raise RegistryError(
                    f"{self.name} version {version} cannot be promoted: its gate decision is "
                    f"{decision or 'missing'}; run `kaleido gate --candidate models:/{self.name}/{version}` first"
                )
            problem = self.stored_problem(version)
            if problem is not None:
                raise RegistryError(
                    f"{self.name} version {version} cannot be promoted: {problem}. Its registered files are damaged "
                    "or were deleted; register its training run's export again (a new version) and gate that"
                )
            current = self.alias_version(CHAMPION)
            if current == version:
                return None
            if current is not None:
                self.client.set_registered_model_alias(self.name, PREVIOUS, current)
            self.client.set_registered_model_alias(self.name, CHAMPION, version)
            self._set_history([*[v for v in self._history() if v != version], version])
            return current

    def rollback(self) -> tuple[str, list[str]]:
        """Give `champion` back to the latest earlier champion that still exists and whose gate passed.

        Earlier champions that were deleted, or whose latest gate decision is not `passed` (re-gated since), are
        skipped and named. Returns (the new champion, notes on what was skipped); RegistryError when no earlier
        champion qualifies (the current one stays).
        """
        with self.registry_lock("rollback"):
            return self._rollback_locked()

    def _rollback_locked(self) -> tuple[str, list[str]]:
        history = self._history()
        current = self.alias_version(CHAMPION)
        if current is None:
            raise RegistryError(f"{self.name} has no champion to roll back from")
        earlier = history[:-1] if history and history[-1] == current else list(history)
        notes: list[str] = []
        candidates = []
        for version in earlier:
            if version == current or version in candidates:
                continue
            if not self.exists(version):
                notes.append(f"version {version} was deleted")
            elif self.gate_decision(version) != "passed":
                notes.append(f"version {version}'s gate decision is {self.gate_decision(version) or 'missing'}")
            else:
                candidates.append(version)
        while candidates and (problem := self.stored_problem(candidates[-1])) is not None:
            notes.append(f"version {candidates.pop()}'s files: {problem}")
        if not candidates:
            skipped = f" (skipped: {'; '.join(notes)})" if notes else ""
            raise RegistryError(f"{self.name} has no earlier champion to roll back to{skipped}; v{current} stays")
        restored = candidates[-1]
        self.client.set_registered_model_alias(self.name, CHAMPION, restored)
        if len(candidates) >= 2:
            self.client.set_registered_model_alias(self.name, PREVIOUS, candidates[-2])
        elif self._alias_exists(PREVIOUS):
            self.client.delete_registered_model_alias(self.name, PREVIOUS)
        self._set_history(candidates)
        return restored, notes

    def _alias_exists(self, alias: str) -> bool:
        try:
            return alias in self.client.get_registered_model(self.name).aliases
        except (MlflowException, RestException):
            return False

    def download(self, ref: str, dst: Path) -> Path:
        """Download a version's folder (an MLflow Model; kaleido.serving.model_checkpoint finds its DiT weights),
        checked against its MLmodel's manifest: IntegrityError naming a file that is missing or differs."""
        import mlflow.artifacts

        from kaleido.serving import verify_model_folder

        number = self.resolve(ref)  # resolve: it exists
        version = self.client.get_model_version(self.name, number)
        folder = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=version.source, dst_path=str(dst), tracking_uri=self.client.tracking_uri
            )
        )
        verify_model_folder(folder, f"{self.name} version {number}")
        return folder

    def stored_problem(self, version: str) -> str | None:
        """Why the version's files in the artifact store cannot be whole, or None: its MLmodel is read (one small
        download) and every file of its manifest must be listed at its size. A version sealed before manifests
        existed must at least list the artifacts its MLmodel names; a plain checkpoint folder (no MLmodel: not
        servable, evaluation can still load it) must not be empty."""
        import tempfile

        import mlflow.artifacts
        import yaml

        from kaleido.platform.integrity import listing_problem

        record = self.client.get_model_version(self.name, version)
        sizes = self._listing(record.source)
        if not sizes:
            return f"{record.source} holds no files (its artifacts were deleted)"
        if "MLmodel" not in sizes:
            return None  # a plain checkpoint folder: nothing sealed to compare
        with tempfile.TemporaryDirectory(prefix="kaleido-mlmodel-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{record.source}/MLmodel", dst_path=tmp,
                                                        tracking_uri=self.client.tracking_uri)
            try:
                meta = yaml.safe_load(Path(local).read_text()) or {}
            except yaml.YAMLError as exc:
                return f"{record.source}/MLmodel is not readable YAML ({str(exc).splitlines()[0]})"
        flavor = (meta.get("flavors") or {}).get("python_function") or {}
        manifest = (flavor.get("config") or {}).get("files")
        if manifest is None:  # sealed before manifests: every named artifact must be there
            manifest = {}
            for entry in (flavor.get("artifacts") or {}).values():
                prefix = str(entry.get("path", "")).rstrip("/")
                if not any(name == prefix or name.startswith(prefix + "/") for name in sizes):
                    return f"{record.source}/{prefix} is missing"
        problem = listing_problem(manifest, sizes)
        return f"{record.source}/{problem}" if problem else None

    def _listing(self, source: str) -> dict[str, int]:
        """{name relative to `source`: bytes} of every file the artifact store lists under a version's source."""
        import mlflow.artifacts

        sizes: dict[str, int] = {}
        pending = [""]
        while pending:
            sub = pending.pop()
            try:
                found = mlflow.artifacts.list_artifacts(artifact_uri=f"{source}/{sub}" if sub else source,
                                                        tracking_uri=self.client.tracking_uri)
            except MlflowException:
                found = []
            for info in found:
                name = f"{sub}/{Path(info.path).name}" if sub else Path(info.path).name
                if info.is_dir:
                    pending.append(name)
                else:
                    sizes[name] = int(info.file_size or 0)
        return sizes
