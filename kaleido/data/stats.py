"""Dataset statistics: the category histogram of the paper's figure 7 and rejection counts.

Reads the merged manifests under the data root and writes <root>/stats/: stats.json,
categories.png (bars per subject category, coloured by group) and rejections.png (counts per
stage:reason). Categories are counted over the references of the training samples (as written to
the dataset, else as curated) when there are samples, otherwise over the subject candidates found
in the captions; the JSON says which (`samples_source`, `category_source`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from kaleido.data.pairing import cross_source_summary
from kaleido.data.paths import DataLayout
from kaleido.data.records import SUBJECT_GROUPS, read_jsonl
from kaleido.data.split import validation_summary
from kaleido.platform.files import atomic_path, write_text_atomic

GROUP_COLOURS = {
    "human": "#d62728",
    "animal": "#2ca02c",
    "object": "#1f77b4",
    "cartoon": "#ff7f0e",
    "background": "#7f7f7f",
}


def _rows(path: Path) -> list[dict[str, Any]]:
    return list(read_jsonl(path)) if path.is_file() else []


def compute_stats(root: str | Path) -> dict[str, Any]:
    """Counts from the manifests under `root` (missing stages count as empty)."""
    layout = DataLayout(Path(root))
    clips = _rows(layout.clips_manifest)
    captioned = _rows(layout.captions_manifest)
    # the training set as written when there is one, else the curated samples before writing
    written = layout.dataset_manifest.is_file()
    samples = _rows(layout.dataset_manifest if written else layout.samples_manifest)
    instances = _rows(layout.instances_manifest)

    candidates: Counter[tuple[str, str]] = Counter()
    for clip in captioned:
        for match in {(m["category"], m["group"]) for m in clip.get("subjects") or []}:
            candidates[match] += 1  # clips mentioning the category
    references: Counter[tuple[str, str]] = Counter()
    for sample in samples:
        for reference in sample.get("references") or []:
            references[(reference["category"], reference["group"])] += 1
    source, counts = ("references", references) if references else ("candidates", candidates)

    rejections: dict[str, Counter[str]] = {}
    rejection_dir = layout.manifests / "rejections"
    for path in sorted(rejection_dir.glob("*.jsonl")) if rejection_dir.is_dir() else []:
        for row in read_jsonl(path):
            rejections.setdefault(row.get("stage", path.stem), Counter())[row.get("reason", "unknown")] += 1
    by_reason: Counter[str] = Counter()
    for reasons in rejections.values():
        by_reason.update(reasons)

    def table(counter: Counter[tuple[str, str]]) -> list[dict[str, Any]]:
        ordered = sorted(counter.items(), key=lambda item: (-item[1], item[0][0]))
        return [{"category": cat, "group": group, "count": n} for (cat, group), n in ordered]

    groups = {group: sum(n for (_, g), n in counts.items() if g == group) for group in SUBJECT_GROUPS}
    return {
        "clips": len(clips),
        "clip_seconds": round(sum(float(c.get("duration_s", 0.0)) for c in clips), 3),
        "captioned_clips": len(captioned),
        "clips_with_subjects": sum(1 for c in captioned if c.get("subjects")),
        "instances": len(instances),
        "samples_source": "dataset" if written else "curated",
        "samples": len(samples),
        "cross_pair_samples": sum(1 for s in samples if s.get("cross_pair")),
        # paper A.1: cross pairs take backgrounds from OTHER raw source videos; the achieved share, and how many
        # references fell back to a procedural background because the data had no other source
        "cross_source": cross_source_summary(samples),
        "validation": validation_summary(samples),
        "sample_types": dict(sorted(Counter(s.get("sample_type", "?") for s in samples).items())),
        "category_source": source,
        "categories": table(counts),
        "candidate_categories": table(candidates),
        "reference_categories": table(references),
        "groups": groups,
        "rejections": {
            "total": sum(by_reason.values()),
            "by_reason": dict(sorted(by_reason.items())),
            "by_stage": {stage: dict(sorted(reasons.items())) for stage, reasons in sorted(rejections.items())},
        },
    }


def plot_categories(stats: dict[str, Any], path: Path, limit: int = 60) -> Path:
    """Bar chart of the `limit` most frequent categories, coloured by group (figure 7 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    rows = stats["categories"][:limit]
    width = max(6.0, 0.28 * len(rows) + 2.0)
    fig, ax = plt.subplots(figsize=(width, 4.5))
    if rows:
        ax.bar(
            range(len(rows)),
            [row["count"] for row in rows],
            color=[GROUP_COLOURS.get(row["group"], "#333333") for row in rows],
        )
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([row["category"] for row in rows], rotation=90, fontsize=8)
    else:
        ax.text(0.5, 0.5, "no categories yet", ha="center", va="center", transform=ax.transAxes)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("references" if stats["category_source"] == "references" else "clips")
    ax.set_title(f"Subject categories ({stats['category_source']})")
    ax.legend(
        handles=[Patch(color=colour, label=group) for group, colour in GROUP_COLOURS.items()],
        loc="upper right",
        fontsize=8,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, metadata={"Software": None})  # no version/time stamp in the PNG
    plt.close(fig)
    return path


def plot_rejections(stats: dict[str, Any], path: Path) -> Path:
    """Horizontal bars: rejections per stage:reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    items = [
        (f"{stage}:{reason}", count)
        for stage, reasons in stats["rejections"]["by_stage"].items()
        for reason, count in reasons.items()
    ]
    items.sort(key=lambda item: (-item[1], item[0]))
    fig, ax = plt.subplots(figsize=(7.0, max(2.0, 0.3 * len(items) + 1.2)))
    if items:
        ax.barh(range(len(items)), [count for _, count in items], color="#9467bd")
        ax.set_yticks(range(len(items)))
        ax.set_yticklabels([label for label, _ in items], fontsize=8)
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "no rejections", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("count")
    ax.set_title(f"Rejections ({stats['rejections']['total']})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return path


def write_stats(root: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Compute the stats and write stats.json, categories.png and rejections.png."""
    root = Path(root)
    out = Path(out_dir) if out_dir is not None else DataLayout(root).stats
    stats = compute_stats(root)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    plot_categories(stats, out / "categories.png")
    plot_rejections(stats, out / "rejections.png")
    return stats
