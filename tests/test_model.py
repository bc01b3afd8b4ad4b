"""The DiT computes Wan2.1's function (checked against diffusers' independent implementation) and injects
references the way the shipped Kaleido does."""

import pytest
import torch

from kaleido.model.attention import get_attention_backend
from kaleido.model.dit import DIT_CONFIGS, KaleidoDiT, dit_config
from kaleido.model.keymaps import diffusers_to_wan, wan_to_diffusers


@pytest.fixture(scope="module")
def pair():
    """Our tiny DiT and diffusers' WanTransformer3DModel with the same random weights."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    cfg = dit_config("tiny")
    theirs = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
    ).eval()
    # Randomise every parameter (diffusers zero-inits some biases) so no term can hide.
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ours = KaleidoDiT(cfg, attention_backend="reference").eval()
    ours.load_state_dict(diffusers_to_wan(theirs.state_dict()), strict=True)
    return ours, theirs


@pytest.mark.parametrize(
    ("batch", "frames", "height", "width", "text_len"),
    [(1, 3, 8, 8, 7), (2, 1, 6, 10, 5), (1, 2, 4, 12, 16), (1, 5, 10, 6, 3)],
    ids=["cube", "single-frame-batch2", "wide", "tall"],
)
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_t2v_equals_diffusers(pair, batch, frames, height, width, text_len, backend):
    ours, theirs = pair
    ours.set_attention_backend(backend)
    gen = torch.Generator().manual_seed(frames * 100 + width)
    latents = torch.randn(batch, 16, frames, height, width, generator=gen)
    timestep = torch.rand(batch, generator=gen) * 1000
    context = torch.randn(batch, text_len, ours.cfg.text_dim, generator=gen)
    with torch.no_grad():
        expected = theirs(latents, timestep, context, return_dict=False)[0]
        got = ours(latents, timestep, context)
    assert got.shape == latents.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_parameter_names_are_wan_names(pair):
    ours, _ = pair
    names = set(ours.state_dict())
    for name in [
        "patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias", "time_embedding.0.weight",
        "time_embedding.2.weight", "time_projection.1.weight", "blocks.0.norm3.weight", "blocks.0.norm3.bias",
        "blocks.0.self_attn.q.weight", "blocks.0.self_attn.norm_q.weight", "blocks.1.cross_attn.norm_k.weight",
        "blocks.1.ffn.0.weight", "blocks.1.ffn.2.bias", "blocks.1.modulation", "head.head.weight", "head.modulation",
    ]:
        assert name in names, name
    # norm1 / norm2 / head.norm carry no parameters; RoPE tables are not state
    assert not any(".norm1." in n or ".norm2." in n or n.startswith("head.norm") or "freq" in n for n in names)
    assert set(wan_to_diffusers(ours.state_dict())) == set(pair[1].state_dict())


@pytest.mark.parametrize(("name", "billions"), [("1.3B", 1.419), ("14B", 14.288)])
def test_released_config_sizes(name, billions):
    with torch.device("meta"):
        model = KaleidoDiT(DIT_CONFIGS[name])
    assert abs(model.num_parameters() / 1e9 - billions) < 0.001
    assert model.blocks[0].self_attn.norm_q.weight.shape == (DIT_CONFIGS[name].dim,)  # RMSNorm over the full dim


def _inputs(model, refs=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 3, 6, 8, generator=gen)
    references = torch.randn(1, refs, 16, 6, 8, generator=gen) if refs else None
    context = torch.randn(1, 5, model.cfg.text_dim, generator=gen)
    return latents, torch.tensor([500.0]), context, references


def test_references_condition_the_video_and_are_dropped_from_output(pair):
    ours, _ = pair
    latents, t, context, references = _inputs(ours)
    with torch.no_grad():
        without = ours(latents, t, context)
        with_refs = ours(latents, t, context, references)
        other_refs = ours(latents, t, context, torch.randn_like(references))
    assert with_refs.shape == latents.shape  # reference tokens are not in the output
    assert not torch.allclose(with_refs, without, atol=1e-4)
    assert not torch.allclose(with_refs, other_refs, atol=1e-4)


def test_reference_order_matters_through_rrope(pair):
    # references differ only in t under shift_wh: swapping them changes the result
    ours, _ = pair
    latents, t, context, references = _inputs(ours)
    with torch.no_grad():
        a = ours(latents, t, context, references)
        b = ours(latents, t, context, references.flip(1))
    assert not torch.allclose(a, b, atol=1e-5)


def test_references_equal_a_manual_concatenation(pair):
    """Shipped injection: refs first, shared patch embedding, positions from R-RoPE, output = video tokens."""
    from kaleido.model.rope import sequence_rope

    ours, _ = pair
    latents, t, context, references = _inputs(ours)
    with torch.no_grad():
        got = ours(latents, t, context, references)
        # independent assembly: embed refs + video as ONE clip of n+F frames (same conv, since kernel t = 1)
        clip = torch.cat([references.permute(0, 2, 1, 3, 4), latents], dim=2)
        tokens = ours.patch_embedding(clip).flatten(2).transpose(1, 2)
        rope = sequence_rope((3, 3, 4), [(1, 3, 4)] * 2, "shift_wh", 80, ours.cfg.head_dim)
        from kaleido.model.dit import sinusoidal_embedding

        temb = ours.time_embedding(sinusoidal_embedding(t, ours.cfg.freq_dim))
        mod = ours.time_projection(temb).unflatten(1, (6, -1))
        ctx = ours.text_embedding(context)
        x = tokens
        for block in ours.blocks:
            x = block(x, mod, ctx, rope, ours.backend)
        expected = ours._unpatchify(ours.head(x[:, 2 * 12 :], temb), (3, 3, 4))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32 summation order


@pytest.mark.parametrize("variant", ["none", "shift_wh", "shift_wh_no_overlap", "time_future"])
def test_rope_variant_is_a_knob(variant):
    torch.manual_seed(1)
    model = KaleidoDiT(dit_config("tiny"), attention_backend="sdpa", rope_variant=variant)
    baseline = KaleidoDiT(dit_config("tiny"), attention_backend="sdpa", rope_variant="shift_wh")
    baseline.load_state_dict(model.state_dict())
    latents, t, context, references = _inputs(model)
    with torch.no_grad():
        same = torch.allclose(model(latents, t, context, references), baseline(latents, t, context, references))
    assert same == (variant == "shift_wh")


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(2)
    model = KaleidoDiT(dit_config("tiny"), attention_backend="sdpa")
    latents, t, context, references = _inputs(model)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(latents, t, context, references).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_backends_agree_in_float64():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 37, 3, 16, dtype=torch.float64) for _ in range(3))
    ref = get_attention_backend("reference").attention(q, k, v)
    sdpa = get_attention_backend("sdpa").attention(q, k, v)
    assert ref.dtype == torch.float64
    assert (ref - sdpa).abs().max() < 1e-12


def test_unknown_backend_and_bad_latent_size():
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("flash9")
    model = KaleidoDiT(dit_config("tiny"))
    with pytest.raises(ValueError, match="not divisible by patch"):
        model(torch.randn(1, 16, 1, 5, 8), torch.tensor([1.0]), torch.randn(1, 3, 32))


def test_bf16_weights_and_autocast_run_close_to_fp32():
    torch.manual_seed(4)
    model = KaleidoDiT(dit_config("tiny"))
    latents, t, context, references = _inputs(model)
    with torch.no_grad():
        expected = model(latents, t, context, references)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(latents, t, context, references)
        half = KaleidoDiT(dit_config("tiny")).to(torch.bfloat16)
        half.load_state_dict(model.state_dict())
        stored = half(latents.bfloat16(), t, context.bfloat16(), references.bfloat16())
    assert stored.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (eps 2^-8 = 0.004); a few roundings deep, errors stay within ~10 eps of the scale
    scale = expected.abs().max().item()
    for out in (autocast, stored):
        assert (out.float() - expected).abs().max().item() < 0.04 * scale
