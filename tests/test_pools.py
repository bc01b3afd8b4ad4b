"""Model pools without a cluster: the request batcher, batch methods, the pool sizes from the planner, the proxies'
protocols, and models by pool key (data.models.factory). The pools on a real two-node Ray cluster:
tests/test_ray_cluster.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_PARAMS

from kaleido.data.pools import PROXIES, Batcher, pool_specs, run_batch


def test_concurrent_requests_are_batched_up_to_the_limit_and_errors_stay_per_item() -> None:
    seen: list[list[int]] = []

    def square_all(items: list[int]) -> list[object]:
        seen.append(list(items))
        return [ValueError(f"bad {i}") if i == 13 else i * i for i in items]

    async def main() -> list[object]:
        batcher = Batcher(square_all, max_batch=8, wait_s=0.05)
        calls = [batcher.submit(i) for i in range(20)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        late = await batcher.submit(3)  # a lone request waits wait_s for company, then runs alone
        return [*results, late, batcher.batches]

    *results, late, batches = asyncio.run(main())
    assert batches == [8, 8, 4, 1] and [len(b) for b in seen] == batches  # 20 concurrent calls: 3 batches
    assert results[:13] == [i * i for i in range(13)] and results[14:] == [i * i for i in range(14, 20)]
    assert isinstance(results[13], ValueError) and str(results[13]) == "bad 13"  # only its caller gets the error
    assert late == 9


def test_a_batch_that_raises_as_a_whole_fails_every_caller_in_it() -> None:
    def broken(items: list[int]) -> list[int]:
        raise RuntimeError("CUDA error: an illegal memory access")

    async def main() -> list[object]:
        batcher = Batcher(broken, max_batch=4, wait_s=0.01)
        return await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "illegal memory" in str(r) for r in results)


def test_run_batch_uses_the_models_batch_method_or_goes_one_by_one() -> None:
    from kaleido.data.synthetic import BoxSegmenter, FixedScorer

    class Counting(FixedScorer):
        def __init__(self) -> None:
            super().__init__({"cat": 0.25})
            self.batch_calls = 0

        def category_scores(self, images, categories):
            self.batch_calls += 1
            return super().category_scores(images, categories)

    scorer = Counting()
    image = np.zeros((8, 8, 3), np.uint8)
    out = run_batch(scorer, "category_score", [((image, "cat"), {}), ((image, "dog"), {})])
    assert out == [0.25, 1.0] and scorer.batch_calls == 1  # one call for the whole batch
    masks = run_batch(BoxSegmenter(), "segment", [((image, [(0, 0, 4, 4)]), {}), ((image, "not boxes"), {})])
    assert masks[0].shape == (1, 8, 8) and masks[0].sum() == 16 and isinstance(masks[1], Exception)


def test_tiny_clip_batch_scores_match_one_by_one(tiny_vision: dict[str, Path]) -> None:
    """CLIP's batch path (one forward pass) against the per-item calls a local worker makes: equal to float32
    rounding (the filter threshold compares to 3 decimals)."""
    from kaleido.vision.clip import ClipScorer

    scorer = ClipScorer.from_pretrained(tiny_vision["clip"], device="cpu")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 30 + 7 * i, 3), dtype=np.uint8) for i in range(6)]
    categories = ["cat", "dog", "cup", "cat", "horse", "person"]
    batch = scorer.category_scores(images, categories)
    single = [scorer.category_score(image, category) for image, category in zip(images, categories, strict=True)]
    assert batch == pytest.approx(single, abs=1e-6)


def test_pool_sizes_come_from_the_planner_and_fit_the_cluster(tmp_path: Path) -> None:
    import yaml

    from kaleido.config.schema import set_dotted, validate_params

    prod_file = REPO_PARAMS.parent / "k8s" / "overlays" / "prod" / "params.yaml"
    raw = yaml.safe_load(prod_file.read_text())
    prod = validate_params(raw, base_dir=tmp_path)
    curate = {s.key: s for s in pool_specs(prod, ["grounding_dino", "sam", "clip", "face"], gpus=32,
                                           concurrency=10_000)}
    assert curate["sam"].num_gpus == 0.25 and curate["clip"].max_batch == 64
    assert sum(s.actors * s.num_gpus for s in curate.values()) <= 32
    flux = {s.key: s for s in pool_specs(prod, ["flux_fill", "flux_redux"], gpus=32, concurrency=10_000)}
    assert flux["flux_fill"].num_gpus == 1.0 and 16 <= sum(s.actors * s.num_gpus for s in flux.values()) <= 32
    # a small run: no more actors than shard tasks can call at once
    assert all(s.actors <= 3 for s in pool_specs(prod, ["sam", "clip"], gpus=32, concurrency=3))
    # models on the CPU (a CPU-only cluster): one actor per model, no GPU
    set_dotted(raw, "data.models.device", "cpu")
    cpu = pool_specs(validate_params(raw, base_dir=tmp_path), ["sam", "flux_fill"], gpus=0, concurrency=8)
    assert [(s.actors, s.num_gpus) for s in cpu] == [(1, 0.0), (1, 0.0)]


def test_proxies_implement_the_local_models_protocols() -> None:
    from kaleido.data.caption import Captioner
    from kaleido.vision import CategoryScorer, Detector, FaceDetector, Inpainter, Segmenter, Variator

    protocols = {"grounding_dino": Detector, "sam": Segmenter, "clip": CategoryScorer, "face": FaceDetector,
                 "flux_fill": Inpainter, "flux_redux": Variator}
    for key, protocol in protocols.items():
        assert isinstance(PROXIES[key](key, [], {"name": key}), protocol), key
    captioner = PROXIES["vlm"]("vlm", [], {"name": "vlm", "source": "vlm:x"})
    assert captioner.source == "vlm:x" and callable(captioner.caption) and Captioner  # (a non-runtime Protocol)


def test_models_by_pool_key_through_the_factory(tmp_path: Path, data_params) -> None:
    from kaleido.data.models import build_model, configured, installed_pools, local_model, shard_model
    from kaleido.data.synthetic import BoxSegmenter, HalvesDetector, TextureInpainter

    params = data_params(tmp_path / "data", {"data.models.factory": "kaleido.data.synthetic:stand_in_model",
                                             "data.models.flux_redux": None})
    assert isinstance(build_model("grounding_dino", params.data, params), HalvesDetector)
    assert isinstance(build_model("flux_fill", params.data, params), TextureInpainter)
    assert configured("flux_fill", params) and not configured("flux_redux", params)
    assert local_model("sam", params) is local_model("sam", params)  # once per process and config
    stand_in = object()
    with installed_pools({"sam": stand_in}):
        assert shard_model("sam", params) is stand_in
    assert isinstance(shard_model("sam", params), BoxSegmenter)
    broken = data_params(tmp_path / "data", {"data.models.factory": "kaleido.nowhere:models"})
    with pytest.raises(ValueError, match=r"data\.models\.factory='kaleido\.nowhere:models': cannot import"):
        build_model("sam", broken.data, broken)
