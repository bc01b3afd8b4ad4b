"""The whole data path on synthetic source videos with stand-in curation models (kaleido.data.synthetic: no model
weights): every source is a short shot of two sharp subjects on a flat background, captioned "a cat and a dog"."""

from __future__ import annotations

from typing import Any

from kaleido.data.synthetic import STAND_IN_STAGES, write_sources  # noqa: F401  (re-exported for the tests)

STAGE_OVERRIDES: dict[str, Any] = STAND_IN_STAGES


def run_data_stages(params: Any) -> dict[str, Any]:
    """ingest -> caption -> curate -> write-dataset (the models: data.models.factory); the reports by stage."""
    from kaleido.data.pipeline import run_caption, run_curation, run_ingest, run_write_dataset

    return {
        "ingest": run_ingest(params, progress=False),
        "caption": run_caption(params, progress=False),
        "curate": run_curation(params, progress=False),
        "write": run_write_dataset(params, progress=False),
    }
