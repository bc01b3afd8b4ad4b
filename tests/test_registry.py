"""The MLflow registry against a real MLflow server: lineage tags, gate-guarded promotion, rollback."""

import uuid
from pathlib import Path

import mlflow
import pytest
import yaml
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.registry import Lineage, ModelRegistry, RegistryError


@pytest.fixture
def registry(mlflow_server: str) -> ModelRegistry:
    return ModelRegistry(mlflow_server, f"kaleido-s2v-test-{uuid.uuid4().hex[:8]}")


def _version(registry: ModelRegistry, tmp_path: Path, tag: str) -> str:
    client = registry.client
    experiment = client.get_experiment_by_name("registry-tests") or None
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("registry-tests")
    run = client.create_run(experiment_id)
    checkpoint = tmp_path / f"ckpt-{tag}"
    checkpoint.mkdir()
    (checkpoint / "diffusion_pytorch_model.safetensors").write_bytes(b"weights-" + tag.encode())
    (checkpoint / "config.json").write_text("{}")
    lineage = Lineage(git_revision="abc123", dvc_data_hash=f"md5-{tag}", params_hash="p" * 16,
                      training_run_id=run.info.run_id)
    lock = tmp_path / f"dvc-{tag}.lock"
    lock.write_text(f"schema: '2.0'\nstages: {{write-dataset: {{outs: [{{path: data/dataset, md5: md5-{tag}}}]}}}}\n")
    return registry.register(run.info.run_id, checkpoint, lineage, lineage_files=(lock,))


def test_register_records_lineage_and_artifacts(registry, tmp_path):
    version = _version(registry, tmp_path, "a")
    tags = registry.version_tags(version)
    assert tags["lineage.git_revision"] == "abc123" and tags["lineage.dvc_data_hash"] == "md5-a"
    assert tags["lineage.params_hash"] == "p" * 16 and tags["lineage.training_run_id"]
    downloaded = registry.download(version, tmp_path / "dl")
    assert (downloaded / "diffusion_pytorch_model.safetensors").read_bytes() == b"weights-a"
    lock = mlflow.artifacts.download_artifacts(
        run_id=tags["lineage.training_run_id"], artifact_path="lineage/dvc-a.lock", dst_path=str(tmp_path / "lin"),
        tracking_uri=registry.client.tracking_uri,
    )  # fmt: skip
    assert yaml.safe_load(Path(lock).read_text())["stages"]["write-dataset"]["outs"][0]["md5"] == "md5-a"


def test_missing_lineage_file_is_refused(registry, tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    lineage = Lineage("abc123", "md5-x", "p" * 16, "run-x")
    with pytest.raises(RegistryError, match=r"dvc\.lock do not exist; run the DVC stages"):
        registry.register("run-x", checkpoint, lineage, lineage_files=(tmp_path / "dvc.lock",))
    assert registry.client.search_model_versions(f"name='{registry.name}'") == []


def test_empty_checkpoint_is_refused(registry, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="missing or empty"):
        registry.register("run", tmp_path / "empty", Lineage("g", "d", "p", "r"))


def test_only_a_passed_gate_can_be_promoted(registry, tmp_path):
    version = _version(registry, tmp_path, "a")
    with pytest.raises(RegistryError, match="gate decision is missing"):
        registry.promote(version)
    page = registry.client.get_model_version(registry.name, version).description  # the UI's version page
    assert "| data (DVC hash of data/dataset) | `md5-a` |" in page and "### Gate: not gated yet" in page
    registry.record_gate(version, passed=False, reasons={"s2v_consistency": "0.41 < floor 0.5"})
    with pytest.raises(RegistryError, match="gate decision is failed"):
        registry.promote(version)
    assert registry.alias_version("champion") is None
    page = registry.client.get_model_version(registry.name, version).description
    assert "### Gate: FAILED" in page and "| s2v_consistency | 0.41 < floor 0.5 |" in page
    assert "| git revision | `abc123` |" in page and "/lineage/dvc.lock` |" in page


def test_a_version_whose_artifacts_were_deleted_cannot_be_promoted_or_rolled_back_to(registry, tmp_path,
                                                                                       mlflow_server, monkeypatch):
    """The probe: a registered version whose artifacts were deleted was promoted (exit 0)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # resolves the mlflow-artifacts: source

    kept, emptied = _version(registry, tmp_path, "a"), _version(registry, tmp_path, "b")
    for version in (kept, emptied):
        registry.record_gate(version, passed=True, reasons={})
    registry.promote(emptied)
    registry.promote(kept)
    source = registry.client.get_model_version(registry.name, emptied).source
    get_artifact_repository(source).delete_artifacts()
    with pytest.raises(RegistryError, match=f"version {emptied} cannot be promoted: .* holds no files"):
        registry.promote(emptied)
    with pytest.raises(RegistryError, match=f"no earlier champion to roll back to .*version {emptied}'s files"):
        registry.rollback()
    assert registry.alias_version("champion") == kept


def test_promote_keeps_previous_and_rollback_restores(registry, tmp_path):
    first, second = _version(registry, tmp_path, "a"), _version(registry, tmp_path, "b")
    for version in (first, second):
        registry.record_gate(version, passed=True, reasons={})
    assert registry.promote(first) is None
    assert registry.promote(second) == first
    assert registry.alias_version("champion") == second and registry.alias_version("previous") == first
    assert registry.resolve(f"models:/{registry.name}@champion") == second
    assert registry.rollback() == (first, [])
    assert registry.alias_version("champion") == first and registry.alias_version("previous") is None
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback()


def test_cli_promote_and_rollback(registry, tmp_path, mlflow_server):
    first, second = _version(registry, tmp_path, "a"), _version(registry, tmp_path, "b")
    registry.record_gate(first, passed=True, reasons={})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"platform": {"mlflow_tracking_uri": mlflow_server,
                                                   "registered_model": registry.name}}))
    runner = CliRunner()
    refused = runner.invoke(app, ["registry", "promote", second, "--params", str(params)])
    assert refused.exit_code == 1 and "cannot be promoted" in refused.output
    assert runner.invoke(app, ["registry", "promote", first, "--params", str(params)]).exit_code == 0
    registry.record_gate(second, passed=True, reasons={})
    assert runner.invoke(app, ["registry", "promote", f"models:/{registry.name}/{second}", "--params",
                               str(params)]).exit_code == 0
    shown = runner.invoke(app, ["registry", "show", "--params", str(params)])
    assert "champion" in shown.output and "previous" in shown.output
    rolled = runner.invoke(app, ["registry", "rollback", "--params", str(params)])
    assert rolled.exit_code == 0 and f'"champion": "{first}"' in rolled.output
    assert mlflow.get_tracking_uri()  # the CLI did not need the global tracking URI


def test_rollback_skips_deleted_and_failed_versions_and_names_them(registry, tmp_path, mlflow_server):
    """A history v1 -> v2 -> v3 -> v4 where v3 was deleted in the UI and v2 was re-gated `failed`: rollback from
    v4 goes to v1 (not a traceback, never to a failed or missing version) and says what it skipped."""
    versions = [_version(registry, tmp_path, tag) for tag in "abcd"]
    for version in versions:
        registry.record_gate(version, passed=True, reasons={})
        registry.promote(version)
    v1, v2, v3, _ = versions
    registry.client.delete_model_version(registry.name, v3)
    registry.record_gate(v2, passed=False, reasons={"s2v_consistency": "re-gated"})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"platform": {"mlflow_tracking_uri": mlflow_server,
                                                   "registered_model": registry.name}}))
    rolled = CliRunner().invoke(app, ["registry", "rollback", "--params", str(params)])
    assert rolled.exit_code == 0, rolled.output
    assert f'"champion": "{v1}"' in rolled.output and '"previous": null' in rolled.output
    assert f"warning: skipped version {v3} was deleted" in rolled.output
    assert f"warning: skipped version {v2}'s gate decision is failed" in rolled.output
    assert registry.alias_version("champion") == v1 and registry.alias_version("previous") is None
    # nothing left to go back to: refused, naming why, and the champion stays
    with pytest.raises(RegistryError, match=rf"no earlier champion to roll back to; v{v1} stays"):
        registry.rollback()
    assert registry.alias_version("champion") == v1


def test_deleted_versions_and_missing_tags_give_messages_not_tracebacks(registry, tmp_path, mlflow_server):
    first, second = _version(registry, tmp_path, "a"), _version(registry, tmp_path, "b")
    registry.record_gate(first, passed=True, reasons={})
    registry.promote(first)
    registry.client.delete_model_version(registry.name, first)  # the champion itself, deleted in the UI
    assert registry.alias_version("champion") is None  # the alias points nowhere
    with pytest.raises(RegistryError, match=rf"has no version {first} \(deleted\?\)"):
        registry.resolve(first)
    with pytest.raises(RegistryError, match=rf"version {first} does not exist"):
        registry.promote(first)
    assert registry.gate_decision(second) is None  # never gated: no tag, no error
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"platform": {"mlflow_tracking_uri": mlflow_server,
                                                   "registered_model": registry.name}}))
    runner = CliRunner()
    for command in (["registry", "show"], ["registry", "rollback"], ["registry", "promote", first],
                    ["registry", "promote", second]):
        result = runner.invoke(app, [*command, "--params", str(params)])
        assert "Traceback" not in result.output and "MlflowException" not in result.output, result.output
        assert result.exit_code in (0, 1), result.output
    shown = runner.invoke(app, ["registry", "show", "--params", str(params)])
    assert f"v{second}" in shown.output and "gate=-" in shown.output and "champion" not in shown.output


@pytest.mark.parametrize("ref, expected", [
    ("models:/kaleido-s2v/3", ("kaleido-s2v", "3")), ("models:/kaleido-s2v@champion", ("kaleido-s2v", "@champion")),
    ("models:/team/kaleido-s2v/12", ("team/kaleido-s2v", "12")),
])
def test_model_references_parse_as_mlflow_writes_them(ref, expected):
    from kaleido.registry import parse_model_ref

    assert parse_model_ref(ref) == expected


@pytest.mark.parametrize("ref", ["models:/kaleido-s2v", "models:/@champion", "models:/kaleido-s2v@", "models:/"])
def test_malformed_model_references_name_both_forms(ref):
    from kaleido.registry import RegistryError, parse_model_ref

    with pytest.raises(RegistryError, match="models:/<name>/<version> or models:/<name>@<alias>"):
        parse_model_ref(ref)
