"""Reference reliance: held-out val loss with shuffled references minus with the sample's own, on the same fixed
(sample, noise, level) triples (kaleido/train/validation.py), and the record the gate reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kaleido.train.latents import CachedSample, LatentCache, write_index
from kaleido.train.validation import ValidationSet, validation_block

TEXT_DIM = 8


def _cache(folder: Path, buckets: list[tuple[int, int, int, int]]) -> LatentCache:
    """A latent cache of val samples: sample i's video is its reference latent repeated over 2 frames."""
    folder.mkdir(parents=True)
    tensors, samples = {}, []
    gen = torch.Generator().manual_seed(0)
    for i, (frames, height, width, refs) in enumerate(buckets):
        key = f"val/s{i}"
        ref = torch.randn(max(refs, 1), 16, height // 8, width // 8, generator=gen)
        tensors[f"{key}/video"] = ref[0, :, None].expand(16, 2, *ref.shape[-2:]).contiguous()
        tensors[f"{key}/refs"] = ref[:refs].contiguous()
        tensors[f"{key}/text"] = torch.randn(3, TEXT_DIM, generator=gen)
        samples.append(CachedSample(key, "s0", (frames, height, width, refs), 3, "val"))
    save_file(tensors, str(folder / "s0.safetensors"))
    write_index(folder, samples, {"text_dim": TEXT_DIM, "z_dim": 16})
    return LatentCache(folder)


def _reads_references(noisy, timestep, context, refs):
    # predicts the velocity's -x0 part from the first reference: right for its own sample, wrong for another's
    guess = torch.zeros_like(noisy) if refs is None else refs[:, 0, :, None].expand_as(noisy)
    return -guess


def _ignores_references(noisy, timestep, context, refs):
    return -0.5 * noisy


def test_partners_share_the_bucket_and_skip_samples_without_references(tmp_path) -> None:
    cache = _cache(tmp_path / "c", [(5, 32, 48, 2), (5, 48, 32, 2), (5, 32, 48, 2), (5, 32, 48, 0), (5, 32, 48, 2)])
    partners = ValidationSet(cache, [0.5], 64, 0).partners
    assert partners == {0: 2, 2: 4, 4: 0}  # cyclic, same bucket; 1 has no same-bucket partner, 3 no references


def test_a_model_that_reads_its_references_has_reliance_and_one_that_ignores_them_has_none(tmp_path) -> None:
    cache = _cache(tmp_path / "c", [(5, 32, 48, 1)] * 4)
    validation = ValidationSet(cache, [0.3, 0.7], 64, 0)
    reads = validation.evaluate(_reads_references, 4, torch.float32, torch.device("cpu"))
    ignores = validation.evaluate(_ignores_references, 4, torch.float32, torch.device("cpu"))
    # own reference: error = noise (loss ~1); another's: error = noise - x0 + x0' (adds |x0 - x0'|^2 ~ 2)
    assert reads.reference_reliance > 1.0 and all(v > 0.5 for v in reads.per_sample_reliance.values())
    assert ignores.reference_reliance == 0.0  # the same noise, levels and text: exactly the same loss
    assert set(reads.metrics()) >= {"val/loss", "val/reference_reliance"}
    # the same triples: the own-reference loss does not change by measuring reliance
    assert reads.loss == pytest.approx(sum(reads.per_sample.values()) / 4)


def test_the_record_carries_reliance_per_case_for_the_gate(tmp_path) -> None:
    cache = _cache(tmp_path / "c", [(5, 32, 48, 1)] * 3)
    validation = ValidationSet(cache, [0.5], 64, 0)
    base = validation.evaluate(_ignores_references, 4, torch.float32, torch.device("cpu"))
    final = validation.evaluate(_reads_references, 4, torch.float32, torch.device("cpu"))
    record = {"fingerprint": final.fingerprint, "sigmas": [0.5], "seed": 0, "latents": str(tmp_path / "c"),
              "text_len": 4, "base": base.to_json(), "final": final.to_json()}
    block = validation_block(record)
    assert block["reference_reliance"] == pytest.approx(final.reference_reliance)
    assert block["base_reference_reliance"] == 0.0
    for case in block["cases"]:
        assert case["metrics"]["reference_reliance"] == pytest.approx(final.per_sample_reliance[case["id"]])
        assert case["metrics"]["reference_reliance_base"] == 0.0
    # a record written before reliance was measured has none, and still reads
    del record["final"]["per_sample_shuffled"], record["base"]["per_sample_shuffled"]
    assert all("reference_reliance" not in case["metrics"] for case in validation_block(record)["cases"])
