"""The multi-subject task (kaleido/train/multi_subject.py): its data hold out orderings and colour combinations and
never repeat a reference byte for byte, its scores count what they say, and its control variant cannot see the order
of the references at all (so ~1/3 slot accuracy is its ceiling, and more would mean order leaks another way)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kaleido.model.dit import KaleidoDiT, dit_config
from kaleido.model.rope import ROPE_VARIANTS
from kaleido.train import multi_subject as ms


def _model(variant: str) -> KaleidoDiT:
    torch.manual_seed(0)
    model = KaleidoDiT(dit_config("tiny"), rope_variant=variant).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def _inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 2, 4, 12, generator=gen, dtype=torch.float64)
    context = torch.randn(1, 6, dit_config("tiny").text_dim, generator=gen, dtype=torch.float64)
    refs = torch.randn(1, 3, 16, 4, 12, generator=gen, dtype=torch.float64)
    return latents, torch.tensor([400.0]), context, refs


def _spread(variant: str) -> float:
    """The largest change of the video prediction over every reordering of three references."""
    model = _model(variant)
    latents, timestep, context, refs = _inputs()
    with torch.no_grad():
        outputs = [model(latents, timestep, context, refs[:, list(order)])
                   for order in itertools.permutations(range(3))]
    return max(float((out - outputs[0]).abs().max()) for out in outputs)


def test_the_control_is_exactly_invariant_to_the_order_of_its_references() -> None:
    # float64: what is left is the summation order of the attention over permuted keys (~1e-16)
    assert _spread("time_fixed_neg") < 1e-12


@pytest.mark.parametrize("variant", [v for v in ROPE_VARIANTS if v != "time_fixed_neg"])
def test_every_other_variant_sees_the_order(variant: str) -> None:
    assert _spread(variant) > 1e-4


def test_held_out_triples_are_never_trained_on() -> None:
    train, held = ms.split_triples(0)
    assert len(train) + len(held) == 120 and not set(train) & set(held)
    combos = {tuple(sorted(t)) for t in held} - {tuple(sorted(t)) for t in train}
    assert len(combos) == 4  # four colour combinations never seen in any order
    seen = {tuple(sorted(t)) for t in train}
    held_orderings = [t for t in held if tuple(sorted(t)) in seen]
    assert len(held_orderings) == 16 * 2  # and two unseen orderings of every other combination


def test_samples_jitter_every_reference_and_captions_name_no_colour() -> None:
    samples = ms.make_samples(40, 12)
    pixels = [bytes(np.asarray(ms.reference_image(rgb, None)).tobytes()) for s in samples for rgb in s.rgb]
    assert len(set(pixels)) == len(pixels)  # no reference byte-identical to another
    for sample in samples:
        assert not any(colour in sample.caption for colour in ms.PALETTE)
    train, held = ms.split_triples(0)
    assert {s.colours for s in samples if s.split == "val"} <= set(held)
    assert {s.colours for s in samples if s.split == "train"} <= set(train)
    frames = ms.clip_frames(samples[0])
    slot = ms.WIDTH // ms.SLOTS
    for j, rgb in enumerate(samples[0].rgb):  # slot j shows reference j's colour
        assert tuple(frames[0, samples[0].y0, j * slot + slot // 2]) == rgb


def test_cross_pairing_changes_the_reference_background_only() -> None:
    naive = ms.make_samples(60, 10, backgrounds=True, cross_pair_ratio=0.0)
    crossed = ms.make_samples(60, 10, backgrounds=True, cross_pair_ratio=1.0)
    for sample in naive:
        same = {bg == sample.background for bg in sample.reference_backgrounds}
        assert same == ({True} if sample.split == "train" else {False})  # held out: always another tint
    assert all(bg != s.background for s in crossed for bg in s.reference_backgrounds)
    assert all(s.background in s.caption for s in naive)
    silent = ms.make_samples(20, 4, backgrounds=True, background_in_caption=False)
    assert not any(tint in s.caption for s in silent for tint in ms.BACKGROUNDS)


def test_scores_count_slots_sets_and_ghosts() -> None:
    target = ["red", "green", "blue"]
    assert ms.sample_scores(["red", "green", "blue"], target) == {"slot_accuracy": 1.0, "set_accuracy": 1.0,
                                                                   "ghosting": 0.0}
    reversed_ = ms.sample_scores(["blue", "green", "red"], target)  # the set, the wrong order: two ghosts
    assert reversed_ == pytest.approx({"slot_accuracy": 1 / 3, "set_accuracy": 1.0, "ghosting": 2 / 3})
    other = ms.sample_scores(["cyan", "cyan", "red"], target)
    assert other == pytest.approx({"slot_accuracy": 0.0, "set_accuracy": 1 / 3, "ghosting": 1 / 3})


@pytest.mark.slow
def test_trained_control_generates_the_same_video_for_any_order(tiny_assets, tmp_path) -> None:
    """End to end (tars -> encode -> `kaleido train` -> sampling from the cache): whatever the control learned, its
    generations do not depend on the references' order (so its slot accuracy is that of an order-blind model, ~1/3
    at best); the shipped variant's do."""
    from kaleido.config import load_params
    from kaleido.model.checkpoint import load_dit
    from kaleido.model.generate import S2VPipeline
    from kaleido.model.vae import WanVAE
    from kaleido.train.data import pad_text
    from kaleido.train.encode import run_encode
    from kaleido.train.latents import LatentCache

    assets = {key: str(tiny_assets / ("transformer" if key == "checkpoint" else key))
              for key in ("checkpoint", "vae", "text_encoder", "tokenizer")}
    data, latents = tmp_path / "data", tmp_path / "latents"
    ms.write_dataset(data, ms.make_samples(32, 4))
    settings = ms.TrainSettings(steps=40)
    spreads = {}
    for variant in ("time_fixed_neg", "shift_wh"):
        params_path = ms.task_params(tmp_path / variant, data, latents, assets, assets["checkpoint"], variant,
                                     settings)
        if variant == "time_fixed_neg":
            run_encode(load_params(params_path), progress=False)
        stage = ms.train(params_path)
        cache = LatentCache(latents)
        dit = load_dit(stage / "export")
        assert dit.rope_variant == variant  # the export's own record
        vae = WanVAE.from_pretrained(tiny_assets / "vae", device="cpu", dtype=torch.float32)
        pipe = S2VPipeline(dit.double(), vae, None, text_len=512, device="cpu", dtype=torch.float64)
        null = pad_text(cache.null_context(), 512)
        worst = 0.0
        for index in cache.split_indices("val"):
            item = cache.load(index)
            context = pad_text(item["text"], 512)
            outputs = [pipe.sample_latents(context, null, item["refs"][list(order)], ms.FRAMES, ms.HEIGHT, ms.WIDTH,
                                           4, 1.0, 3.0, "euler", 0) for order in itertools.permutations(range(3))]
            worst = max(worst, max(float((out - outputs[0]).abs().max()) for out in outputs))
        spreads[variant] = worst
    assert spreads["time_fixed_neg"] < 1e-5, spreads  # float64 DiT; the scheduler rounds to float32 per step
    assert spreads["shift_wh"] > 1e-3, spreads
