"""The train / validation split: whole source videos held out, each by its own seeded draw.

A source is validation when its draw from (seed, source) is below `data.validation.share`: a per-source decision, so
adding sources never moves another across the split (kaleido.data.pairing uses it per dataset shard with the split
decided over the whole data).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from kaleido.data.records import TrainingSample


def source_draw(seed: int, source: str) -> float:
    """A source video's uniform draw in [0, 1): the first 64 bits of sha256(f"{seed}:{source}")."""
    return int(hashlib.sha256(f"{seed}:{source}".encode()).hexdigest()[:16], 16) / 2.0**64


def validation_sources(sources: Mapping[str, int] | Iterable[str], share: float, seed: int) -> set[str]:
    """The source videos held out for validation: whole sources, so no clip of a validation video is trained on.

    sources: source paths (or {source: samples}; sources with 0 samples are ignored). A source is held out when
    its own draw (`source_draw`) is below `share`: a per-source decision, so adding or removing sources never
    moves another one across the split. The held-out share of samples is `share` in expectation, with standard
    deviation sqrt(share (1 - share) sum n_i^2) / sum n_i for sources of n_i samples (~0.1 % at 2M samples of
    ~10 per source). Small data: with two or more sources and share > 0 at least one is held out (when no draw is
    below `share`, the source with the lowest draw) and never every source (the highest draw stays in training);
    with one source none is (the stats say so). Those two rules look at the whole list, so they can move a
    source when sources are added, but only while the data is that small.
    """
    if isinstance(sources, Mapping):
        names = sorted(source for source, count in sources.items() if count > 0)
    else:
        names = sorted(set(sources))
    if share <= 0 or len(names) < 2:
        return set()
    draws = {source: source_draw(seed, source) for source in names}
    held = {source for source in names if draws[source] < share}
    if not held:
        held = {min(names, key=lambda source: (draws[source], source))}
    if len(held) == len(names):
        held.discard(max(names, key=lambda source: (draws[source], source)))
    return held


def validation_summary(
    samples: Iterable[TrainingSample | Mapping[str, Any]], share: float | None = None
) -> dict[str, Any]:
    """The realised train/validation split: samples and source videos per side, and the achieved share."""
    rows = [s.to_json() if isinstance(s, TrainingSample) else s for s in samples]
    sources: dict[str, set[str]] = {"train": set(), "val": set()}
    counts: Counter[str] = Counter()
    for row in rows:
        split = row.get("split", "train")
        counts[split] += 1
        sources.setdefault(split, set()).add(str(row.get("provenance", {}).get("source", "?")))
    total = sum(counts.values())
    summary: dict[str, Any] = {
        **({"target_share": share} if share is not None else {}),
        "train_samples": counts["train"], "val_samples": counts["val"],
        "share": round(counts["val"] / total, 6) if total else None,
        "train_sources": len(sources["train"]), "val_sources": sorted(sources["val"]),
    }
    if total and not counts["val"] and (share is None or share > 0):
        summary["note"] = "no validation set: the data has fewer than two source videos (or data.validation.share 0)"
    return summary
