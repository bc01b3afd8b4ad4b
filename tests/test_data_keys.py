"""Stable identity at scale (pure functions, no media): shard keys, the exact mix per shard and its global bound at
10, 1k and 100k samples, and how little moves when a sample or a source is added."""

from __future__ import annotations

from collections import Counter

import pytest

from kaleido.config.schema import DataConfig
from kaleido.data.keys import shard_name, shard_of, unit
from kaleido.data.pairing import (
    DonorIndex,
    apportion,
    assign_cross_pairs,
    assign_types,
    validation_sources,
)
from kaleido.data.records import ClipRecord
from kaleido.data.references import CurationResult

MIX = {"crop": 0.1, "segment": 0.5, "inpaint": 0.3, "redux": 0.1}
ALL = {"crop", "segment", "inpaint", "redux"}


def test_shard_keys_are_stable_hashes_of_the_source_and_nest() -> None:
    # sha256("raw/bikes.mp4") mod 8 = 6, worked out with hashlib by hand (not through this module)
    assert shard_of("raw/bikes.mp4", 8) == 6 and shard_name(6) == "shard-00006"
    sources = [f"raw/video-{i:05d}.mp4" for i in range(2000)]
    for source in sources[:200]:
        assert shard_of(source, 64) % 16 == shard_of(source, 16)  # dataset shards hold whole work shards
    counts = Counter(shard_of(source, 16) for source in sources)
    assert len(counts) == 16 and max(counts.values()) < 2 * 2000 / 16  # spread evenly
    with pytest.raises(ValueError):
        shard_of("x", 0)


@pytest.mark.parametrize("n", [10, 1_000, 100_000])
def test_mix_and_cross_ratio_exact_per_shard_at_10_1k_100k(n: int) -> None:
    ids = [f"clip-{i:06d}" for i in range(n)]
    types, shortfall = assign_types([ALL] * n, MIX, [unit(0, "type", i) for i in ids])
    assert shortfall == 0 and Counter(types) == {k: v for k, v in apportion(n, MIX).items() if v}
    for t, count in Counter(types).items():
        assert abs(count - n * MIX[t]) < 1
    flags = assign_cross_pairs([unit(0, "cross", i) for i in ids], 0.4)
    assert sum(flags) == round(0.4 * n)


def test_global_mix_within_one_per_shard_of_exact() -> None:
    """100k samples over 64 dataset shards of uneven size: each shard exact, the total within 64 of exact."""
    n, shards = 100_000, 64
    ids = [f"src-{i // 7:05d}/clip-{i:06d}" for i in range(n)]  # 7 clips per source
    by_shard: dict[int, list[str]] = {}
    for sample_id in ids:
        by_shard.setdefault(shard_of(sample_id.split("/")[0], shards), []).append(sample_id)
    total: Counter[str] = Counter()
    cross = 0
    for members in by_shard.values():
        types, _ = assign_types([ALL] * len(members), MIX, [unit(0, "type", i) for i in members])
        total.update(types)
        cross += sum(assign_cross_pairs([unit(0, "cross", i) for i in members], 0.4))
    for t, share in MIX.items():
        assert abs(total[t] - n * share) < len(by_shard)
    assert abs(cross - 0.4 * n) < len(by_shard)


def test_adding_samples_moves_at_most_one_sample_per_range_boundary() -> None:
    ids = [f"clip-{i:04d}" for i in range(1000)]
    before, _ = assign_types([ALL] * 1000, MIX, [unit(0, "type", i) for i in ids])
    flags_before = assign_cross_pairs([unit(0, "cross", i) for i in ids], 0.4)
    for added in ("aaa-first", "clip-0500x", "zzz-last"):
        grown = [*ids, added]
        after, _ = assign_types([ALL] * 1001, MIX, [unit(0, "type", i) for i in grown])
        flags_after = assign_cross_pairs([unit(0, "cross", i) for i in grown], 0.4)
        assert sum(a != b for a, b in zip(before, after[:1000], strict=True)) <= len(MIX) - 1
        assert sum(a != b for a, b in zip(flags_before, flags_after[:1000], strict=True)) <= 1


def test_types_honour_missing_references_exactly() -> None:
    ids = [f"clip-{i:04d}" for i in range(1000)]
    available = [ALL - {"inpaint"} if i % 10 == 0 else ALL for i in range(1000)]  # inpaint failed on 100 clips
    types, shortfall = assign_types(available, MIX, [unit(3, "type", i) for i in ids])
    assert shortfall == 0 and Counter(types) == apportion(1000, MIX)
    assert all(t != "inpaint" for t, a in zip(types, available, strict=True) if "inpaint" not in a)


def test_validation_split_is_decided_per_source() -> None:
    sources = [f"raw/v{i:05d}.mp4" for i in range(5000)]
    held = validation_sources(sources, 0.2, seed=0)
    assert abs(len(held) / 5000 - 0.2) < 0.02  # binomial: sd 0.006
    more = validation_sources([*sources, "raw/new-a.mp4", "raw/00-first.mp4", "raw/zz-last.mp4"], 0.2, seed=0)
    assert more & set(sources) == held  # no existing source changed sides
    assert validation_sources(sources, 0.2, seed=1) != held


def _result(clip_id: str, source: str) -> CurationResult:
    clip = ClipRecord(clip_id, source, 0, 1, 0.0, 1.0, 16.0, 16.0, 96, 64, 16, 1.0, f"clips/{clip_id}.mp4")
    return CurationResult(clip=clip, plate=f"plates/{clip_id}.png")


def test_donors_come_from_another_source_of_the_split_and_a_new_source_takes_over_only_its_arc() -> None:
    sources = [f"raw/s{i:03d}.mp4" for i in range(40)]
    results = [_result(f"s{i:03d}-c{k}", source) for i, source in enumerate(sources) for k in range(3)]
    cfg = DataConfig()
    held = validation_sources(sources, cfg.validation.share, cfg.seed)
    split_of = {r.clip.clip_id: "val" if r.clip.source in held else "train" for r in results}
    index = DonorIndex(results, split_of, seed=0)
    draws = {}
    for result in results:
        donor = index.draw(result.clip.clip_id, 0, result.clip.source, split_of[result.clip.clip_id])
        assert donor is not None and donor.clip.source != result.clip.source
        assert split_of[donor.clip.clip_id] == split_of[result.clip.clip_id]
        draws[result.clip.clip_id] = donor.clip.clip_id
    new = [_result(f"new-c{k}", "raw/new.mp4") for k in range(3)]
    split_of.update({r.clip.clip_id: "train" for r in new})
    grown = DonorIndex([*results, *new], split_of, seed=0)
    changed = 0
    for result in results:
        donor = grown.draw(result.clip.clip_id, 0, result.clip.source, split_of[result.clip.clip_id])
        if donor.clip.clip_id != draws[result.clip.clip_id]:
            changed += 1
            assert donor.clip.source == "raw/new.mp4"  # only the new source takes donors over
    assert changed <= len(results) * 4 / 40  # about 1/S of them (S = 32 training sources here)
