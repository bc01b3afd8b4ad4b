"""diffusers' WanTransformer3DModel built with the same config and weights as a KaleidoDiT.

diffusers is an independent implementation of Wan2.1: tests check that both compute the same function
and the benchmark compares their speed.
"""

from __future__ import annotations

import torch

from kaleido.model.dit import DiTConfig, KaleidoDiT
from kaleido.model.keymaps import wan_to_diffusers


def diffusers_twin(model: KaleidoDiT) -> torch.nn.Module:
    """A diffusers WanTransformer3DModel holding copies of `model`'s weights."""
    from diffusers import WanTransformer3DModel

    cfg: DiTConfig = model.cfg
    twin = WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
    )
    twin.load_state_dict(wan_to_diffusers(model.state_dict()), strict=True)
    return twin.to(next(model.parameters()).device)
