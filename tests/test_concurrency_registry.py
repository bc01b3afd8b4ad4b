"""The registry as a system of record, against a real MLflow server: racing promotions and registrations in
real processes, a run registered once, artifacts written once, no champion whose gate failed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kaleido import registry as registry_module
from kaleido.registry import CHAMPION, HISTORY_TAG, PREVIOUS, Lineage, ModelRegistry, RegistryError


@pytest.fixture
def registry(mlflow_server: str) -> ModelRegistry:
    return ModelRegistry(mlflow_server, f"kaleido-race-{uuid.uuid4().hex[:8]}")


def _run(registry: ModelRegistry) -> str:
    client = registry.client
    experiment = client.get_experiment_by_name("registry-race")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("registry-race")
    return client.create_run(experiment_id).info.run_id


def _checkpoint(tmp_path: Path, tag: str) -> Path:
    folder = tmp_path / f"ckpt-{tag}-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"weights-" + tag.encode())
    (folder / "MLmodel").write_text(f"utc_time_created: '{time.time()}'\n")  # differs per build, same weights
    return folder


def _register(registry: ModelRegistry, run_id: str, folder: Path) -> str:
    return registry.register(run_id, folder, Lineage("g", "d", "p", run_id))


def _passed_version(registry: ModelRegistry, tmp_path: Path, tag: str) -> str:
    version = _register(registry, _run(registry), _checkpoint(tmp_path, tag))
    registry.record_gate(version, passed=True, reasons={})
    return version


def _history(registry: ModelRegistry) -> list[str]:
    return json.loads(registry.client.get_registered_model(registry.name).tags.get(HISTORY_TAG, "[]"))


_RACER = """
import json, sys, time
from kaleido.registry import ModelRegistry
uri, name, action, arg, start = sys.argv[1:6]
registry = ModelRegistry(uri, name)
while time.time() < float(start):  # every racer calls at the same instant
    time.sleep(0.001)
if action == "promote":
    print(json.dumps({"version": arg, "previous": registry.promote(arg)}))
else:
    from pathlib import Path
    from kaleido.registry import Lineage
    run_id, folder = arg.split("|")
    print(json.dumps({"version": registry.register(run_id, Path(folder), Lineage("g", "d", "p", run_id))}))
"""


def _race(registry: ModelRegistry, action: str, args: list[str]) -> list[dict]:
    start = str(time.time() + 4.0)  # after every interpreter has imported MLflow
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, registry.client.tracking_uri, registry.name, action,
                                arg, start], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for arg in args]
    results = []
    for racer in racers:
        out, err = racer.communicate(timeout=180)
        assert racer.returncode == 0, err[-4000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_racing_promotions_are_serialised_and_history_matches_the_aliases(registry, tmp_path):
    first, second, third = (_passed_version(registry, tmp_path, tag) for tag in "abc")
    registry.promote(first)
    results = _race(registry, "promote", [second, third])
    # one after the other: the later one replaced the earlier one, never both the same `previous`
    by_previous = {r["previous"]: r["version"] for r in results}
    assert len(by_previous) == 2 and first in by_previous, results
    earlier = by_previous[first]
    later = second if earlier == third else third
    assert by_previous[earlier] == later
    assert registry.alias_version(CHAMPION) == later and registry.alias_version(PREVIOUS) == earlier
    assert _history(registry) == [first, earlier, later]
    assert registry.rollback() == (earlier, [])
    assert registry.alias_version(CHAMPION) == earlier and registry.alias_version(PREVIOUS) == first
    assert registry.alias_version(CHAMPION) != registry.alias_version(PREVIOUS)
    assert _history(registry) == [first, earlier]
    with pytest.raises(Exception, match=r"RESOURCE_DOES_NOT_EXIST|not found"):  # the lock is gone after each change
        registry.client.get_registered_model(f"{registry.name}.lock")


def test_a_run_is_registered_once_and_artifacts_are_never_overwritten(registry, tmp_path):
    run_id = _run(registry)
    folder_a = _checkpoint(tmp_path, "a")
    racers = _race(registry, "register", [f"{run_id}|{folder_a}", f"{run_id}|{_checkpoint(tmp_path, 'a')}"])
    assert racers[0]["version"] == racers[1]["version"]  # same run, same weights, raced: one version
    version = racers[0]["version"]
    assert _register(registry, run_id, _checkpoint(tmp_path, "a")) == version  # a retry returns it
    with pytest.raises(RegistryError, match=f"already registered as {registry.name} version {version} with other"):
        _register(registry, run_id, _checkpoint(tmp_path, "b"))
    found = registry.client.search_model_versions(f"name = '{registry.name}'")
    assert [v.version for v in found] == [int(version)] or [str(v.version) for v in found] == [version]
    downloaded = registry.download(version, tmp_path / "dl")
    assert (downloaded / "diffusion_pytorch_model.safetensors").read_bytes() == b"weights-a"
    source = registry.client.get_model_version(registry.name, version).source
    assert source.rsplit("/", 1)[-1].startswith("model-")  # named by content: written once


def test_a_failed_regate_of_the_champion_demotes_it(registry, tmp_path):
    first, second = _passed_version(registry, tmp_path, "a"), _passed_version(registry, tmp_path, "b")
    registry.promote(first)
    registry.promote(second)
    note = registry.record_gate(second, passed=False, reasons={"s2v_consistency": "below the stricter floor"})
    assert note and "champion is back on" in note
    assert registry.alias_version(CHAMPION) == first and registry.gate_decision(first) == "passed"
    assert registry.alias_version(PREVIOUS) is None and _history(registry) == [first]
    with pytest.raises(RegistryError, match="gate decision is failed"):
        registry.promote(second)
    # the last passing champion fails too: no champion rather than one that failed its gate
    note = registry.record_gate(first, passed=False, reasons={})
    assert "alias was removed" in note and registry.alias_version(CHAMPION) is None
    with pytest.raises(RegistryError, match="no version with alias 'champion'"):
        registry.resolve("@champion")
    # rollback checks the gate too: an earlier champion that failed a re-gate since is not restored
    for version in (first, second):
        registry.record_gate(version, passed=True, reasons={})
    registry.promote(first)
    registry.promote(second)
    assert registry.record_gate(first, passed=False, reasons={}) is None  # not the champion: nothing moves
    with pytest.raises(RegistryError, match=f"version {first}'s gate decision is failed"):
        registry.rollback()
    assert registry.alias_version(CHAMPION) == second


def test_a_held_lock_makes_others_wait_then_name_the_holder_and_a_stale_one_is_broken(registry, tmp_path,
                                                                                      monkeypatch, caplog):
    version = _passed_version(registry, tmp_path, "a")
    lock = f"{registry.name}.lock"
    registry.client.create_registered_model(lock, tags={"holder": json.dumps(
        {"pid": 4242, "host": "elsewhere", "what": "promote version 9"})})
    held = r"being changed by pid 4242 on elsewhere \(promote version 9\)"
    with pytest.raises(RegistryError, match=held), registry.registry_lock("test", wait_s=0.5):
        pass
    assert registry.alias_version(CHAMPION) is None
    monkeypatch.setattr(registry_module, "LOCK_STALE_S", 0.5)  # its holder was killed mid-change
    time.sleep(0.6)
    with caplog.at_level("WARNING", logger="kaleido.registry"):
        registry.promote(version)
    assert "breaking the registry lock" in caplog.text and registry.alias_version(CHAMPION) == version


def test_a_registration_cut_short_mid_upload_is_completed_before_a_version_points_at_it(registry, tmp_path):
    from kaleido.registry import content_sha256

    run_id = _run(registry)
    folder = _checkpoint(tmp_path, "a")
    (folder / "second.safetensors").write_bytes(b"more weights")
    # what a registration killed mid-upload leaves: the content-named folder with one of the files
    registry.ensure_model()
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "second.safetensors").write_bytes(b"more weights")
    registry.client.log_artifacts(run_id, str(partial), artifact_path=f"model-{content_sha256(folder)[:16]}")
    version = _register(registry, run_id, folder)
    downloaded = registry.download(version, tmp_path / "dl")
    assert sorted(p.name for p in downloaded.iterdir()) == ["MLmodel", "diffusion_pytorch_model.safetensors",
                                                             "second.safetensors"]
