"""The whole data path on synthetic source videos with stand-in curation models (kaleido.data.synthetic: no model
weights): every source is a short shot of two sharp subjects on a flat background, captioned "a cat and a dog"."""

from __future__ import annotations

from typing import Any

from kaleido.data.synthetic import write_sources  # noqa: F401  (re-exported for the tests)

STAGE_OVERRIDES: dict[str, Any] = {
    "data.workers": 1,
    "data.grounding.frames_per_clip": 1,
    # the stand-in detector and segmenter of kaleido.data.synthetic, built wherever a model is (any process)
    "data.models.factory": "kaleido.data.synthetic:stand_in_model",
    "data.models.flux_fill": None,
    "data.models.flux_redux": None,
    "data.filters": {"min_area": 0.0, "max_area": 1.0, "clip_min_score": -1.0, "min_sharpness": 0.0,
                     "min_brightness": 0.0, "max_brightness": 255.0},
    "data.ingest.clip_min_seconds": 1.0,
    "data.ingest.clip_max_seconds": 4.0,
    "data.ingest.fps": 16,
}


def run_data_stages(params: Any) -> dict[str, Any]:
    """ingest -> caption -> curate -> write-dataset (the models: data.models.factory); the reports by stage."""
    from kaleido.data.pipeline import run_caption, run_curation, run_ingest, run_write_dataset

    return {
        "ingest": run_ingest(params, progress=False),
        "caption": run_caption(params, progress=False),
        "curate": run_curation(params, progress=False),
        "write": run_write_dataset(params, progress=False),
    }
