"""Cross-pairing and the sample-type mix (appendix A.1): curated clips -> training samples, one dataset shard at a time.

`pair_samples` pairs the clips of ONE dataset shard (kaleido.data.keys: every clip of a source video is in its
shard); the stage runs it per shard, so its cost is linear in the data and a new source re-pairs only its shard.
- Sample types crop:segment:inpaint:redux follow `data.references.sample_mix` (paper 1:5:3:1), renormalised over
  the types the configured models can build; a `cross_pair_ratio` share of the samples is cross-paired. Both are
  EXACT per shard (largest remainder over the shard's n samples, |count - n x share| < 1) and so within
  `dataset_shards` of exact over the whole data. WHICH sample gets which type is decided by rank: samples are
  ordered by a uniform draw from (seed, their own id) and the types fill contiguous rank ranges. A sample's draw
  never changes; adding a sample to a shard moves each range boundary by at most one rank, so at most one
  existing sample per boundary (types - 1 for the mix, 1 for the cross flag) changes, and only in that shard.
- Cross pairs as appendix A.1 states them: "segmented subjects are composited with backgrounds ... from different,
  unrelated sources". The subject is cut out of its own clip by its mask and pasted onto the background plate of
  a clip from a DIFFERENT SOURCE VIDEO of the SAME SPLIT (a validation video's pixels never reach training).
  Donors are drawn in O(log S) by consistent hashing: the plate-bearing sources of each split sit on a ring at
  a draw from (seed, source); a subject takes the first source after its own draw (seed, sample id, subject)
  that is not its own, then a plate of that source the same way. A new source takes over only the arc before
  its point (about 1/S of the shard's cross pairs). A redux reference is already a generated variation (new pose
  and background). With no other source of the split in the shard the background is a procedural texture and
  the shortfall is counted (`cross_source` in the stats), never hidden.
- FLUX runs after the draws, only for what the samples use (kaleido.data.generated): inpaint references for the
  non-cross inpaint samples, redux variations for the redux samples, an inpainted plate per donor clip drawn. A
  failed FLUX call turns its sample into a segment sample, counted in `mix_shortfall` (never hidden).
- The split holds out whole source videos: a source is validation when its draw from (seed, source) is below
  `data.validation.share` (decided per source: adding sources never moves another), see `validation_sources`.
Inputs are sorted by clip id first, so the output depends on the results and the seed only.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from kaleido.config.schema import DataConfig, SampleMix
from kaleido.data.generated import FluxBuilder, FluxModels, FrameSource
from kaleido.data.keys import stable_hash, unit
from kaleido.data.paths import safe_name
from kaleido.data.records import SAMPLE_TYPES, ReferenceImage, Rejection, TrainingSample
from kaleido.data.references import (
    CuratedSubject,
    CurationResult,
    OutputDir,
    composite,
    load_image,
    load_mask,
)
from kaleido.data.split import validation_sources, validation_summary
from kaleido.data.synthetic import texture

log = logging.getLogger(__name__)
PROCEDURAL = "procedural"  # a texture: the shard held no clip of another source video of the split
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


def rank_order(keys: Sequence[float]) -> list[int]:
    """Indices of `keys` from the smallest draw to the largest (ties: index)."""
    return sorted(range(len(keys)), key=lambda i: (keys[i], i))


def assign_labels(keys: Sequence[float], weights: Mapping[Any, float]) -> list[Any]:
    """A label per key with exactly the apportioned counts: labels fill contiguous ranges of the keys' rank order.

    keys: each sample's own uniform draw (`keys.unit(seed, ..., sample id)`). Output aligned with `keys`.
    """
    counts = apportion(len(keys), weights)
    slots = [label for label in weights for _ in range(counts[label])]
    labels: list[Any] = [None] * len(keys)
    for slot, index in zip(slots, rank_order(keys), strict=True):
        labels[index] = slot
    return labels


def assign_types(
    available: Sequence[Collection[str]], weights: Mapping[str, float], keys: Sequence[float]
) -> tuple[list[str], int]:
    """A type per sample with exact mix counts, giving each sample only a type it has references for.

    Slots are the types' contiguous ranges over the rank order of `keys`. Samples missing some type (a model
    failed on them) pick first, fewest options first, the free compatible slot nearest their own rank; the
    others take the remaining slots in rank order. Returns (types aligned with `available`, shortfall):
    shortfall counts samples that could take no slot left and fell back to their most weighted available type
    (the mix is then off by that many).
    """
    n = len(available)
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} samples")
    counts = apportion(n, weights)
    slots: list[str | None] = [label for label in weights for _ in range(counts[label])]
    order = rank_order(keys)
    rank = {index: position for position, index in enumerate(order)}
    chosen: list[str | None] = [None] * n
    positive = {t for t, w in weights.items() if w > 0}
    restricted = [i for i in range(n) if not positive <= set(available[i])]
    shortfall = 0
    free: dict[str, list[int]] = defaultdict(list)  # label -> its free slot positions, ascending
    for position, label in enumerate(slots):
        free[str(label)].append(position)
    for i in sorted(restricted, key=lambda i: (len(positive & set(available[i])), rank[i])):
        best: tuple[int, int, str] | None = None  # (distance, position, label)
        for label in available[i]:
            positions = free.get(label, [])
            at = bisect.bisect_left(positions, rank[i])
            for k in (at - 1, at):
                if 0 <= k < len(positions):
                    candidate = (abs(positions[k] - rank[i]), positions[k], label)
                    best = candidate if best is None or candidate < best else best
        if best is not None:
            _, position, label = best
            free[label].remove(position)
            chosen[i], slots[position] = label, None
            continue
        options = [t for t in SAMPLE_TYPES if t in available[i]]
        if not options:
            raise ValueError(f"sample {i} has no reference of any type")
        chosen[i] = max(options, key=lambda t: weights.get(t, 0.0))
        shortfall += 1
    remaining = iter(label for label in slots if label is not None)
    for i in order:
        if chosen[i] is None:
            chosen[i] = next(remaining)
    return [str(t) for t in chosen], shortfall


def assign_cross_pairs(keys: Sequence[float], ratio: float) -> list[bool]:
    """Exactly largest-remainder(n x ratio) True flags, on the lowest-ranked keys (aligned with `keys`)."""
    if ratio <= 0:
        return [False] * len(keys)
    if ratio >= 1:
        return [True] * len(keys)
    return [bool(flag) for flag in assign_labels(keys, {True: ratio, False: 1.0 - ratio})]


# ---- pairing ------------------------------------------------------------------------------------


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
    return _new_image(_reference(subject, result, sample_type, image_path=""), pixels, mask, out, name)


def _generated_reference(
    subject: CuratedSubject, result: CurationResult, sample_type: str, pixels: np.ndarray, data_root: Path | None,
    out: OutputDir | None, name: str,
) -> ReferenceImage:
    """A FLUX-made reference: an inpaint reference keeps the crop window (its mask is the crop's), a redux variation
    has a pose of its own (no mask)."""
    reference = _reference(subject, result, sample_type, image_path="")
    if sample_type == "inpaint":
        mask = load_mask(result.resolve(subject.masks["crop"], data_root))
        return _new_image(reference, pixels, mask, out, name)
    return _new_image(reference, pixels, None, out, name)


def _new_image(reference: ReferenceImage, pixels: np.ndarray, mask: np.ndarray | None, out: OutputDir | None,
               name: str) -> ReferenceImage:
    """Point `reference` at new pixels: written under `out`, or handed back in memory (the dataset writer, or the
    stage's persist_pixels, stores the PNGs and fills the paths)."""
    reference.mask_path = None
    if out is not None:
        reference.image_path = out.save_image(f"{name}.png", pixels)
        if mask is not None:
            reference.mask_path = out.save_mask(f"{name}_mask.png", mask)
    else:
        reference.image_path, reference.image = None, pixels
        reference.mask = mask.astype(np.uint8) * 255 if mask is not None else None
    return reference


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


class DonorIndex:
    """Background plates indexed by (split, source); `draw` picks another source's plate in O(log S).

    Consistent hashing: per split, the plate-bearing sources sit on a ring at `unit(seed, "donor-source",
    source)`, each source's plates at `unit(seed, "donor-plate", clip id)`. A subject's draw (seed, sample id,
    subject index) takes the first source after it on the ring that is not the subject's own, then that
    source's first plate after a second draw. A source added to the shard changes only the draws that land on
    the arc just before its point.
    """

    def __init__(self, results: Iterable[CurationResult], split_of: Mapping[str, str], seed: int) -> None:
        self.seed = seed
        plates: dict[tuple[str, str], list[tuple[float, str, CurationResult]]] = defaultdict(list)
        for result in results:
            if result.plate:
                clip = result.clip
                entry = (unit(seed, "donor-plate", clip.clip_id), clip.clip_id, result)
                plates[(split_of[clip.clip_id], clip.source)].append(entry)
        self.plates = {key: sorted(entries, key=lambda e: (e[0], e[1])) for key, entries in plates.items()}
        rings: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for split, source in self.plates:
            rings[split].append((unit(seed, "donor-source", source), source))
        self.rings = {split: sorted(ring) for split, ring in rings.items()}

    def draw(self, sample_id: str, subject: int, source: str, split: str) -> CurationResult | None:
        """The donor clip for subject `subject` of `sample_id` (of `source`, in `split`); None when the shard has no
        plate of another source of that split."""
        ring = self.rings.get(split, [])
        if not ring or (len(ring) == 1 and ring[0][1] == source):
            return None
        at = bisect.bisect_right(ring, (unit(self.seed, "donor", sample_id, subject), "\U0010ffff"))
        donor_source = ring[at % len(ring)][1]
        if donor_source == source:  # each source is one point: the next one is another source
            donor_source = ring[(at + 1) % len(ring)][1]
        entries = self.plates[(split, donor_source)]
        draw = unit(self.seed, "donor-clip", sample_id, subject)
        at = bisect.bisect_right([e[0] for e in entries], draw)
        return entries[at % len(entries)][2]


def pair_samples(
    results: Iterable[CurationResult],
    cfg: DataConfig,
    seed: int,
    *,
    flux: FluxModels | None = None,
    frames: FrameSource | None = None,
    data_root: str | Path | None = None,
    out_dir: str | Path | None = None,
    rel_dir: str | None = None,
    stats: dict[str, Any] | None = None,
    splits: Mapping[str, str] | None = None,
    rejections: list[Rejection] | None = None,
) -> list[TrainingSample]:
    """One training sample per clip with kept subjects; types and cross pairs at the configured ratios.

    results: the clips of one dataset shard (any order). seed: data.seed; every decision is a draw from (seed,
      the sample's own id), see the module docstring.
    flux: the generators for the inpaint / redux types and the plates (kaleido.data.generated); None or a None
      member disables that type (the mix is renormalised over crop, segment and the enabled types).
    frames: (result, frame index) -> the clip's frame, for inpaint references (default: decode the clip file under
      data_root).
    data_root: where the results' relative paths live now (default: where curate_clip wrote them).
    out_dir / rel_dir: where composite and generated references are written and how records name that folder;
      without out_dir, they come back in memory (ReferenceImage.image / .mask, no path).
    stats: filled with the realised mix, counts, FLUX calls and failures and the disabled types.
    splits: {source: "train" | "val"} decided over the whole data (`validation_sources`); default: decided
      over these results.
    rejections: receives a Rejection per failed FLUX call.
    Cost: O(n log n) for n clips (sorts and ring look-ups) plus one composite per cross-paired reference and the
    FLUX calls of the module docstring.
    """
    results = sorted(results, key=lambda r: r.clip.clip_id)
    usable = [r for r in results if r.subjects]
    root = Path(data_root) if data_root is not None else None
    flux = flux or FluxModels()
    enabled = flux.enabled_types
    mix = effective_mix(cfg.references.sample_mix, enabled)
    sample_ids = [safe_name(r.clip.clip_id, limit=200) for r in usable]
    type_keys = [unit(seed, "type", sample_id) for sample_id in sample_ids]
    drawn, _ = assign_types([enabled] * len(usable), mix, type_keys)
    cross = assign_cross_pairs([unit(seed, "cross", sample_id) for sample_id in sample_ids],
                               cfg.references.cross_pair_ratio)
    if splits is None:
        held_out = validation_sources(Counter(r.clip.source for r in usable), cfg.validation.share, cfg.seed)
        splits = {r.clip.source: "val" if r.clip.source in held_out else "train" for r in results}
    split_of = {r.clip.clip_id: splits.get(r.clip.source, "train") for r in results}
    donors = DonorIndex(results, split_of, seed)
    builder = FluxBuilder(flux, cfg, seed, root, frames)

    samples: list[TrainingSample] = []
    types: list[str] = []
    kinds: Counter[str] = Counter()
    for result, sample_id, sample_type, is_cross in zip(usable, sample_ids, drawn, cross, strict=True):
        clip = result.clip
        out = None
        if out_dir is not None:
            out = OutputDir(Path(out_dir) / sample_id, f"{rel_dir}/{sample_id}" if rel_dir else sample_id)
        generated: list[np.ndarray] | None = None
        if sample_type == "redux" or (sample_type == "inpaint" and not is_cross):
            generated = (builder.redux if sample_type == "redux" else builder.inpaint)(result, sample_id)
            if generated is None:
                sample_type = "segment"  # a FLUX call failed: counted in mix_shortfall, the rejection names it
        types.append(sample_type)
        references, provenance_refs = [], []
        for k, subject in enumerate(result.subjects):
            kind, background_clip, background_source, plate_how = "own", clip.clip_id, clip.source, None
            name = f"{sample_type}_{k}_{safe_name(subject.instance.category)}"
            if generated is not None:
                reference = _generated_reference(subject, result, sample_type, generated[k], root, out, name)
                if is_cross:  # redux: no mask to cut the variation out with; its pose and background are generated
                    kind, background_clip, background_source = "redux_variation", GENERATED, GENERATED
            elif not is_cross:
                reference = _reference(subject, result, sample_type)
            else:
                # another source of the SAME split: a validation video's pixels never reach training
                donor = donors.draw(sample_id, k, clip.source, split_of[clip.clip_id])
                if donor is not None:
                    plate, plate_how = builder.plate(donor)
                    kind, background_clip, background_source = "other_source", donor.clip.clip_id, donor.clip.source
                else:
                    height, width = subject.frame_size
                    plate = texture(height, width, seed=stable_hash(seed, "texture", sample_id, k) % 2**31)
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
                **({"plate": plate_how} if plate_how else {}),
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
    shortfall = builder.failures["inpaint"] + builder.failures["redux"]
    if rejections is not None:
        rejections.extend(builder.rejections)
    if stats is not None:
        stats.update(
            {
                "samples": len(samples),
                "clips_without_subjects": len(results) - len(usable),
                "sample_mix": mix,
                "sample_types": dict(Counter(types)),
                "disabled_types": flux.disabled_types,
                "mix_shortfall": shortfall,
                "cross_pairs": sum(cross),
                "cross_pair_ratio": cfg.references.cross_pair_ratio,
                "reference_kinds": dict(kinds),
                "cross_source": cross_source_summary(samples),
                "validation": validation_summary(samples, cfg.validation.share),
                "flux_calls": {key: builder.calls[key] for key in ("inpaint", "plate", "redux")},
                "flux_failures": {key: builder.failures[key] for key in ("inpaint", "plate", "redux")},
            }
        )
    procedural = kinds.get(PROCEDURAL, 0)
    if procedural:
        log.warning(
            "%d cross-paired reference(s) got a procedural background: the dataset shard has no clip of another "
            "source video of the same split (paper A.1 pairs subjects with unrelated sources); add source videos, "
            "or lower data.dataset_shards so that each holds more sources", procedural
        )
    if shortfall:
        log.warning("sample-type mix missed by %d sample(s): their FLUX references failed (they are segment samples "
                    "now; the rejections name the errors)", shortfall)
    if builder.failures["plate"]:
        log.warning("%d background plate(s) kept their subjects: FLUX fill failed on them (see the rejections)",
                    builder.failures["plate"])
    return samples
