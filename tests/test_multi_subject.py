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


def test_an_exported_control_samples_the_same_video_for_any_order(tmp_path) -> None:
    """Through the export (its recorded R-RoPE) and the sampling loop: the control's generations do not depend on
    the references' order (so its slot accuracy is an order-blind model's, ~1/3 at best); the shipped variant's do."""
    from kaleido.model.checkpoint import load_dit, save_dit
    from kaleido.model.generate import S2VPipeline
    from kaleido.model.settings import ModelSettings

    class _NoVae:  # sample_latents never decodes; only the latent shape is asked for
        @staticmethod
        def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
            return 16, (frames - 1) // 4 + 1, height // 8, width // 8

    _, _, context, refs = _inputs()
    spreads = {}
    for variant in ("time_fixed_neg", "shift_wh"):
        save_dit(_model(variant), tmp_path / variant, "wan", dit_config("tiny"), settings=ModelSettings(variant))
        dit = load_dit(tmp_path / variant)
        assert dit.rope_variant == variant  # the export's own record
        pipe = S2VPipeline(dit, _NoVae(), None, device="cpu", dtype=torch.float64)
        outputs = [pipe.sample_latents(context[0], torch.zeros_like(context[0]), refs[0][list(order)], 5, 32, 96, 4,
                                       2.0, 3.0, "euler", 0) for order in itertools.permutations(range(3))]
        spreads[variant] = max(float((out - outputs[0]).abs().max()) for out in outputs)
    assert spreads["time_fixed_neg"] < 1e-5, spreads  # float64 DiT; the scheduler keeps float32 latents
    assert spreads["shift_wh"] > 1e-3, spreads
