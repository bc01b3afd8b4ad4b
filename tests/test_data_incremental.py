"""Adding one source video redoes only its own shards in every stage (ingest, caption, curate, pairing, the tar, the
latent shard) and leaves every other shard, sample, tar and latent shard byte-identical, whatever its name sorts to.

Real stages on small synthetic sources (ingest with PyAV and PySceneDetect, the sidecar captioner, curation with
stand-in detector/segmenter, the webdataset writer, `kaleido encode` with the tiny random-weight VAE and umT5)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from _data_helpers import STAGE_OVERRIDES, run_data_stages, write_sources
from conftest import make_data_params

from kaleido.data.keys import shard_name, shard_of

BASE = [f"raw/m-{i:02d}.mp4" for i in (3, 5, 7, 9, 11, 13, 15, 17)]
ADDED = {"first": "raw/a-00.mp4", "middle": "raw/m-08.mp4", "last": "raw/z-99.mp4"}
SHARDS, DATASET_SHARDS = 16, 4
STAGES = ("ingest", "caption", "curate", "pair", "dataset")


def _params(folder: Path, assets: Path):
    overrides = {
        **STAGE_OVERRIDES, "data.shards": SHARDS, "data.dataset_shards": DATASET_SHARDS,
        "data.validation.share": 0.3,
        "train.dataset": str(folder / "data" / "dataset"), "train.latents": str(folder / "latents"),
        "train.frames": 5, "model.vae": str(assets / "vae"), "model.text_encoder": str(assets / "text_encoder"),
        "model.tokenizer": str(assets / "tokenizer"), "model.checkpoint": str(assets / "transformer"),
    }
    return make_data_params(folder / "data", overrides)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(folder: Path) -> dict[str, dict[str, str]]:
    """Every shard's artifact by stage (pack, dataset tar, latent shard) -> sha256, and every sample's row."""
    data = folder / "data"
    shot: dict[str, dict[str, str]] = {stage: {} for stage in (*STAGES, "latents", "samples")}
    for stage in STAGES[:4]:
        for pack in sorted((data / stage).glob("shard-*.tar")):
            shot[stage][pack.stem] = _digest(pack)
    for tar in sorted((data / "dataset").glob("shard-*/*.tar")):
        shot["dataset"][tar.parent.name] = _digest(tar)
    for shard in sorted((folder / "latents").glob("*.safetensors")):
        shot["latents"][shard.stem] = _digest(shard)
    for line in (data / "manifests" / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        shot["samples"][row["sample_id"]] = json.dumps(row, sort_keys=True)
    return shot


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_assets):
    """The data path run once over eight sources, then encoded."""
    from kaleido.train.encode import run_encode

    folder = tmp_path_factory.mktemp("incremental") / "base"
    write_sources(folder / "data", BASE)
    params = _params(folder, tiny_assets)
    run_data_stages(params)
    run_encode(params, progress=False)
    return folder


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_adding_one_source_redoes_only_its_own_shards(base, tiny_assets, tmp_path, where):
    from kaleido.train.encode import run_encode

    added = ADDED[where]
    assert sorted([*BASE, added]).index(added) == {"first": 0, "middle": 3, "last": len(BASE)}[where]
    folder = tmp_path / where
    shutil.copytree(base, folder)  # copy2: sizes and mtimes kept, as a re-run on the same disk sees them
    before = _snapshot(folder)
    write_sources(folder / "data", [added])
    params = _params(folder, tiny_assets)
    reports = run_data_stages(params)
    encoded = run_encode(params, progress=False)
    after = _snapshot(folder)

    work = shard_name(shard_of(added, SHARDS))
    group = shard_name(shard_of(added, DATASET_SHARDS))
    # every stage ran exactly the new source's shard; every other shard was skipped
    for stage, own in (("ingest", work), ("caption", work), ("curate", work), ("write", group)):
        result = reports[stage].result
        assert [o.name for o in result.done] == [own], (stage, [(o.name, o.status) for o in result.outcomes])
        assert {o.name for o in result.skipped} == {o.name for o in result.outcomes} - {own}
    assert encoded.encoded_shards == [f"{group}__train-{group.removeprefix('shard-')}"] and not encoded.removed_shards
    # ...and every other shard's artifact is byte-identical
    own_of = {"ingest": work, "caption": work, "curate": work, "pair": group, "dataset": group}
    for stage, own in own_of.items():
        assert set(after[stage]) - set(before[stage]) <= {own}, stage
        assert {k: v for k, v in after[stage].items() if k != own} == {k: v for k, v in before[stage].items()
                                                                       if k != own}, stage
        assert after[stage].get(own) != before[stage].get(own), stage  # its own shard did change
    own_latent = f"{group}__train-{group.removeprefix('shard-')}"
    assert {k: v for k, v in after["latents"].items() if k != own_latent} == {
        k: v for k, v in before["latents"].items() if k != own_latent}
    # existing samples: outside its dataset shard byte-identical; inside it, split unchanged and at most one
    # sample per rank-range boundary moved (mix: types - 1 = 1 boundary here, cross flag: 1)
    grouped = {json.loads(row)["sample_id"]: shard_name(shard_of(json.loads(row)["provenance"]["source"],
                                                                  DATASET_SHARDS)) for row in after["samples"].values()}
    new = set(after["samples"]) - set(before["samples"])
    assert len(new) == 1 and added.removeprefix("raw/").removesuffix(".mp4") in next(iter(new))
    assert set(before["samples"]) <= set(after["samples"])
    moved = 0
    for sample_id, row in before["samples"].items():
        if grouped[sample_id] != group:
            assert after["samples"][sample_id] == row, sample_id
            continue
        old, now = json.loads(row), json.loads(after["samples"][sample_id])
        assert old["split"] == now["split"]
        moved += (old["sample_type"] != now["sample_type"]) + (old["cross_pair"] != now["cross_pair"])
    assert moved <= 2


def _flip_byte(path: Path, at: int | None = None) -> None:
    """Edit a file in place at the same size (a bad disk, a hand edit): only its bytes and mtime change."""
    data = bytearray(path.read_bytes())
    where = len(data) // 2 if at is None else at
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_copy_that_changes_every_mtime_redoes_nothing(base, tiny_assets, tmp_path):
    """A `dvc checkout`, `dvc pull` or plain `cp` gives every file a new mtime: sources are known by their bytes and
    finished shards by their seals, so nothing is redone."""
    from kaleido.train.encode import run_encode

    folder = tmp_path / "copied"
    shutil.copytree(base, folder, copy_function=shutil.copy)  # bytes only: every mtime is now
    params = _params(folder, tiny_assets)
    reports = run_data_stages(params)
    for stage in ("ingest", "caption", "curate", "write"):
        assert not reports[stage].result.done, (stage, [(o.name, o.status) for o in reports[stage].result.outcomes])
    assert not run_encode(params, progress=False).encoded_shards


def test_a_byte_changed_in_place_is_redone_by_the_command_that_wrote_it(base, tiny_assets, tmp_path, caplog):
    """Same-size damage after a shard was sealed: a curated clip file, a dataset tar, latent files. The stage
    that wrote each redoes it (the curate shard from its pack), so every artifact is byte-identical again."""
    from kaleido.data.shard_store import read_part
    from kaleido.platform.integrity import IntegrityError
    from kaleido.train.encode import run_encode

    folder = tmp_path / "damaged"
    shutil.copytree(base, folder)
    before = _snapshot(folder)
    data = folder / "data"
    curated = next(p for p in sorted((data / "curate").glob("shard-*/**/*")) if p.is_file() and p.suffix == ".png")
    tar = sorted((data / "dataset").glob("shard-*/*.tar"))[0]
    latent = sorted((folder / "latents").glob("shard-*.safetensors"))[0]
    null_context = folder / "latents" / "null_context.safetensors"
    curated_sha = _digest(curated)
    for path in (curated, tar, latent, null_context):
        _flip_byte(path)
    params = _params(folder, tiny_assets)
    with caplog.at_level("WARNING"):
        reports = run_data_stages(params)
        encoded = run_encode(params, progress=False)
    assert "changed after it was sealed" in caplog.text
    assert [o.name for o in reports["write"].result.done] == [tar.parent.name]
    assert encoded.encoded_shards == [latent.stem]
    assert _snapshot(folder) == before
    assert not reports["curate"].result.done and _digest(curated) == curated_sha  # restored from its pack

    # a damaged pack with no working folder: the stage redoes the shard, and a reader names the command
    shard = sorted(p for p in (data / "ingest").glob("shard-*") if p.is_dir())[0]
    shutil.rmtree(shard)
    _flip_byte(shard.with_suffix(".tar"), at=shard.with_suffix(".tar").stat().st_size - 2000)
    with pytest.raises(IntegrityError, match=r"kaleido ingest` again"):
        read_part(shard, "clips.jsonl")
    again = run_data_stages(params)
    assert [o.name for o in again["ingest"].result.done] == [shard.name]
    assert _snapshot(folder) == before


def test_write_dataset_refuses_other_dataset_shards_than_pairing_used(base, tiny_assets, tmp_path):
    """Pairing decided the mix and donors per dataset shard: cutting the tars another way is refused by name."""
    from kaleido.data.pipeline import run_write_dataset

    folder = tmp_path / "reshard"
    shutil.copytree(base, folder)
    params = make_data_params(folder / "data", {**STAGE_OVERRIDES, "data.shards": SHARDS, "data.dataset_shards": 2})
    with pytest.raises(ValueError, match=rf"paired the samples over {DATASET_SHARDS} dataset shards .* set "
                                         rf"data.dataset_shards: {DATASET_SHARDS}, or run `kaleido curate`"):
        run_write_dataset(params, progress=False)
    pairing = json.loads((folder / "data" / "pair" / "pairing.json").read_text())
    assert pairing["dataset_shards"] == DATASET_SHARDS
