"""Cross-pairing and the sample-type mix (appendix A.1): curated clips -> training samples.

- Sample types crop:segment:inpaint:redux follow `data.references.sample_mix` (paper 1:5:3:1),
  renormalised over the types the configured models can build. Counts are EXACT for any N:
  largest-remainder apportionment of N, then a seeded shuffle of which sample gets which type.
- A `cross_pair_ratio` share of the samples (again exact) is cross-paired as appendix A.1 states it:
  "segmented subjects are composited with backgrounds ... from different, unrelated sources". Each
  subject is cut out of its own clip by its mask (its identity stays) and pasted onto the background
  plate of a clip from a DIFFERENT SOURCE VIDEO (source = the raw video a clip was cut from, never
  another shot of the same video). A redux reference is already a generated variation (new pose and
  background). When the batch has no clip from another source, the background is a procedural texture
  and the shortfall is counted (`cross_source` in the stats), never hidden. Each reference's provenance
  names the raw video of its subject and of its background.
Inputs are sorted by clip id first, so the output depends on the results and the seed only.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from kaleido.config.schema import DataConfig, SampleMix
from kaleido.data.paths import safe_name
from kaleido.data.records import SAMPLE_TYPES, ReferenceImage, TrainingSample
from kaleido.data.references import (
    CuratedSubject,
    CurationResult,
    OutputDir,
    composite,
    load_image,
    load_mask,
)
from kaleido.data.synthetic import texture

log = logging.getLogger(__name__)
PROCEDURAL = "procedural"  # a texture: the batch held no clip of another source video
GENERATED = "generated"  # a redux variation: FLUX painted the pose and the background


# ---- exact ratios -------------------------------------------------------------------------------


def effective_mix(mix: SampleMix | Mapping[str, float], enabled: Collection[str]) -> dict[str, float]:
    """The mix over the enabled sample types, normalised to sum 1 (SAMPLE_TYPES order)."""
    raw = mix.model_dump() if isinstance(mix, SampleMix) else dict(mix)
    weights = {t: float(raw.get(t, 0.0)) for t in SAMPLE_TYPES if t in enabled}
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(
            f"data.references.sample_mix {raw} gives no weight to any enabled sample type "
            f"({', '.join(weights) or 'none'}); raise one of them or enable inpaint/redux models"
        )
    return {t: w / total for t, w in weights.items()}


def apportion(n: int, weights: Mapping[Any, float]) -> dict[Any, int]:
    """Split n into integer counts proportional to `weights` (largest remainder; ties: key order).

    Exact rational arithmetic, so 1:5:3:1 over 100 is 10/50/30/10, never 9/50/31/10.
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    exact = {key: Fraction(w) for key, w in weights.items()}
    if any(w < 0 for w in exact.values()) or sum(exact.values()) <= 0:
        raise ValueError(f"weights {dict(weights)} must be >= 0 with a positive sum")
    total = sum(exact.values())
    quotas = {key: n * w / total for key, w in exact.items()}
    counts = {key: int(q) for key, q in quotas.items()}  # floor: quotas are >= 0
    keys = list(weights)
    by_remainder = sorted(keys, key=lambda k: (-(quotas[k] - counts[k]), keys.index(k)))
    for key in by_remainder[: n - sum(counts.values())]:
        counts[key] += 1
    return counts


def assign_labels(n: int, weights: Mapping[Any, float], rng: np.random.Generator) -> list[Any]:
    """n labels with exactly the apportioned counts, in a seeded random order."""
    counts = apportion(n, weights)
    labels = [key for key in weights for _ in range(counts[key])]
    return [labels[i] for i in rng.permutation(n)]


def assign_types(
    available: Sequence[Collection[str]], weights: Mapping[str, float], rng: np.random.Generator
) -> tuple[list[str], int]:
    """A type per sample with exact mix counts, giving each sample only a type it has references for.

    Samples missing some type (a model failed on them) pick first, fewest options first, the first
    compatible slot of the shuffled slot list; the others take the remaining slots in order. Returns
    (types, shortfall): shortfall counts samples that could take no slot left and fell back to
    their most weighted available type (the mix is then off by that many).
    """
    n = len(available)
    slots = assign_labels(n, weights, rng)
    chosen: list[str | None] = [None] * n
    positive = {t for t, w in weights.items() if w > 0}
    restricted = [i for i in range(n) if not positive <= set(available[i])]
    shortfall = 0
    for i in sorted(restricted, key=lambda i: (len(positive & set(available[i])), i)):
        for j, label in enumerate(slots):
            if label in available[i]:
                chosen[i] = slots.pop(j)
                break
        else:
            options = [t for t in SAMPLE_TYPES if t in available[i]]
            if not options:
                raise ValueError(f"sample {i} has no reference of any type")
            chosen[i] = max(options, key=lambda t: weights.get(t, 0.0))
            shortfall += 1
    free = iter(slots)
    for i in range(n):
        if chosen[i] is None:
            chosen[i] = next(free)
    return [str(t) for t in chosen], shortfall


def assign_cross_pairs(n: int, ratio: float, rng: np.random.Generator) -> list[bool]:
    """Exactly round-half-by-largest-remainder(n * ratio) True flags, in a seeded random order."""
    if ratio <= 0:
        return [False] * n
    if ratio >= 1:
        return [True] * n
    return assign_labels(n, {True: ratio, False: 1.0 - ratio}, rng)


# ---- pairing ------------------------------------------------------------------------------------


def _available(result: CurationResult) -> set[str]:
    """Sample types for which every subject of the clip has a reference."""
    sets = [set(subject.references) for subject in result.subjects]
    return set.intersection(*sets) if sets else set()


def _reference(
    subject: CuratedSubject, result: CurationResult, sample_type: str, image_path: str | None = None
) -> ReferenceImage:
    inst = subject.instance
    return ReferenceImage(
        category=inst.category,
        group=inst.group,
        source_clip_id=result.clip.clip_id,
        frame_index=inst.frame_index,
        box=inst.box,
        image_path=image_path if image_path is not None else subject.references[sample_type],
        mask_path=subject.masks.get(sample_type),
        sample_type=sample_type,
        instance_id=inst.instance_id,
        metrics=dict(inst.metrics),
    )


def _composite_reference(
    subject: CuratedSubject,
    result: CurationResult,
    sample_type: str,
    plate: np.ndarray,
    data_root: Path | None,
    out: OutputDir | None,
    name: str,
) -> ReferenceImage:
    """The subject's crop cut out by its mask and pasted on `plate`."""
    crop_path = subject.references["crop"]
    mask_path = subject.masks["crop"]
    crop = load_image(result.resolve(crop_path, data_root))
    mask = load_mask(result.resolve(mask_path, data_root))
    pixels = composite(crop, mask, plate, subject.bounds, subject.frame_size)
    reference = _reference(subject, result, sample_type, image_path="")
    if out is not None:
        reference.image_path = out.save_image(f"{name}.png", pixels)
        reference.mask_path = out.save_mask(f"{name}_mask.png", mask)
    else:
        # handed back in memory: the dataset writer stores the PNGs and fills the paths
        reference.image_path, reference.mask_path = None, None
        reference.image, reference.mask = pixels, mask.astype(np.uint8) * 255
    return reference


def validation_sources(sample_counts: Mapping[str, int], share: float, seed: int) -> set[str]:
    """The source videos held out for validation: whole sources, so no clip of a validation video is trained on.

    Sources are ranked by sha256(f"{seed}:{source}") (stable when sources are added: a source keeps its rank)
    and taken in that order when they fit within share x total samples. With two or more sources and share > 0
    at least one is held out: when none fits, the smallest (it never leaves the training side empty). With one
    source none is (the stats say so).
    """
    sources = {source: count for source, count in sample_counts.items() if count > 0}
    total = sum(sources.values())
    if share <= 0 or len(sources) < 2:
        return set()
    ranked = sorted(sources, key=lambda source: hashlib.sha256(f"{seed}:{source}".encode()).hexdigest())
    held: set[str] = set()
    count = 0
    for source in ranked:
        if count + sources[source] <= share * total and total - count - sources[source] > 0:
            held.add(source)
            count += sources[source]
    if not held:
        held.add(min(ranked, key=lambda source: (sources[source], ranked.index(source))))
    return held


def cross_source_summary(samples: Iterable[TrainingSample | Mapping[str, Any]]) -> dict[str, Any]:
    """How many references of cross-paired samples have a background from another raw source video.

    {"references", "other_source", "generated" (redux variations), "procedural" (no other source available),
    "share": other_source / references (None without cross pairs), "shortfall": procedural}.
    """
    counts: Counter[str] = Counter()
    for sample in samples:
        row = sample.to_json() if isinstance(sample, TrainingSample) else sample
        if not row.get("cross_pair"):
            continue
        for info in row.get("provenance", {}).get("references", []):
            counts["references"] += 1
            kind = info.get("kind")
            counts["generated" if kind == "redux_variation" else str(kind)] += 1
    total = counts["references"]
    return {
        "references": total,
        "other_source": counts["other_source"],
        "generated": counts["generated"],
        "procedural": counts[PROCEDURAL],
        "share": round(counts["other_source"] / total, 6) if total else None,
        "shortfall": counts[PROCEDURAL],
    }


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


def pair_samples(
    results: Iterable[CurationResult],
    cfg: DataConfig,
    rng: np.random.Generator,
    *,
    data_root: str | Path | None = None,
    out_dir: str | Path | None = None,
    rel_dir: str | None = None,
    stats: dict[str, Any] | None = None,
) -> list[TrainingSample]:
    """One training sample per clip with kept subjects; types and cross pairs at the configured ratios.

    data_root: where the results' relative paths live now (default: where curate_clip wrote them).
    out_dir / rel_dir: where composite references are written and how records name that folder;
      without out_dir, composites come back in memory (ReferenceImage.image / .mask, no path).
    stats: filled with the realised mix, counts and the disabled types.
    """
    results = sorted(results, key=lambda r: r.clip.clip_id)
    usable = [r for r in results if r.subjects]
    root = Path(data_root) if data_root is not None else None
    enabled = {t for r in results for t in r.enabled_types} or {"crop", "segment"}
    mix = effective_mix(cfg.references.sample_mix, enabled)
    types, shortfall = assign_types([_available(r) for r in usable], mix, rng)
    cross = assign_cross_pairs(len(usable), cfg.references.cross_pair_ratio, rng)
    held_out = validation_sources(Counter(r.clip.source for r in usable), cfg.validation.share, cfg.seed)
    split_of = {r.clip.clip_id: ("val" if r.clip.source in held_out else "train") for r in results}
    plates = [r for r in results if r.plate]

    samples: list[TrainingSample] = []
    kinds: Counter[str] = Counter()
    for result, sample_type, is_cross in zip(usable, types, cross, strict=True):
        clip = result.clip
        sample_id = safe_name(clip.clip_id, limit=200)
        out = None
        if out_dir is not None:
            out = OutputDir(Path(out_dir) / sample_id, f"{rel_dir}/{sample_id}" if rel_dir else sample_id)
        references, provenance_refs = [], []
        for k, subject in enumerate(result.subjects):
            kind, background_clip, background_source = "own", clip.clip_id, clip.source
            if not is_cross:
                reference = _reference(subject, result, sample_type)
            elif sample_type == "redux":
                # no mask to cut the variation out with; its pose and background are generated already
                reference, kind = _reference(subject, result, sample_type), "redux_variation"
                background_clip = background_source = GENERATED
            else:
                # another source of the SAME split: a validation video's pixels never reach training
                unrelated = [r for r in plates if r.clip.source != clip.source
                             and split_of[r.clip.clip_id] == split_of[clip.clip_id]]
                if unrelated:
                    donor = unrelated[int(rng.integers(len(unrelated)))]
                    plate = load_image(donor.resolve(donor.plate or "", root))
                    kind, background_clip, background_source = "other_source", donor.clip.clip_id, donor.clip.source
                else:
                    height, width = subject.frame_size
                    plate = texture(height, width, seed=int(rng.integers(2**31)))
                    kind, background_clip = PROCEDURAL, PROCEDURAL
                    background_source = PROCEDURAL
                name = f"xpair_{k}_{safe_name(subject.instance.category)}"
                reference = _composite_reference(subject, result, sample_type, plate, root, out, name)
            kinds[kind] += 1
            references.append(reference)
            provenance_refs.append({
                "instance_id": reference.instance_id, "kind": kind,
                "subject_clip_id": clip.clip_id, "subject_source": clip.source,
                "background_clip_id": background_clip, "background_source": background_source,
            })
        samples.append(
            TrainingSample(
                sample_id=sample_id,
                clip_id=clip.clip_id,
                clip_path=clip.path,
                caption=clip.caption or "",
                sample_type=sample_type,
                cross_pair=is_cross,
                references=references,
                split=split_of[clip.clip_id],
                provenance={
                    "source": clip.source,
                    "span_s": [clip.start_s, clip.end_s],
                    "sample_mix": mix,
                    "cross_pair_ratio": cfg.references.cross_pair_ratio,
                    "references": provenance_refs,
                },
            )
        )
    if stats is not None:
        disabled = {}
        for r in results:
            disabled.update(r.stats.get("disabled_types", {}))
        stats.update(
            {
                "samples": len(samples),
                "clips_without_subjects": len(results) - len(usable),
                "sample_mix": mix,
                "sample_types": dict(Counter(types)),
                "disabled_types": {t: disabled.get(t, "disabled") for t in SAMPLE_TYPES if t not in enabled},
                "mix_shortfall": shortfall,
                "cross_pairs": sum(cross),
                "cross_pair_ratio": cfg.references.cross_pair_ratio,
                "reference_kinds": dict(kinds),
                "cross_source": cross_source_summary(samples),
                "validation": validation_summary(samples, cfg.validation.share),
            }
        )
    procedural = kinds.get(PROCEDURAL, 0)
    if procedural:
        log.warning(
            "%d cross-paired reference(s) got a procedural background: the batch has no clip of another source "
            "video (paper A.1 pairs subjects with unrelated sources); add source videos", procedural
        )
    if shortfall:
        log.warning("sample-type mix missed by %d sample(s): their references of the drawn type failed", shortfall)
    return samples
