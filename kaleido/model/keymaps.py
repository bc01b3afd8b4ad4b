"""Key-name maps between the original Wan2.1 layout (ours), diffusers and the official Kaleido SAT layout.

Wan is the canonical layout: every other format is converted to Wan keys on load and from Wan keys
on save. Fused SAT tensors (query_key_value, key_value) are split / concatenated on dim 0.
"""

from __future__ import annotations

import re

import torch

# Wan block sub-module -> diffusers block sub-module (suffix `.weight` / `.bias` carried over).
_WAN_TO_DIFFUSERS_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",  # the affine LayerNorm before cross-attention
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}
_WAN_TO_DIFFUSERS_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+?)(\.weight|\.bias)?$")


def _split_param(key: str) -> tuple[str, str]:
    for suffix in (".weight", ".bias"):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return key, ""


def wan_key_to_diffusers(key: str) -> str:
    module, suffix = _split_param(key)
    match = _BLOCK_KEY.match(module)
    if match:
        index, sub = match.group(1), match.group(2)
        if sub in _WAN_TO_DIFFUSERS_BLOCK:
            return f"blocks.{index}.{_WAN_TO_DIFFUSERS_BLOCK[sub]}{suffix}"
    elif module in _WAN_TO_DIFFUSERS_TOP:
        return _WAN_TO_DIFFUSERS_TOP[module] + suffix
    raise KeyError(f"no diffusers name for Wan key {key!r}")


_DIFFUSERS_TO_WAN_BLOCK = {v: k for k, v in _WAN_TO_DIFFUSERS_BLOCK.items()}
_DIFFUSERS_TO_WAN_TOP = {v: k for k, v in _WAN_TO_DIFFUSERS_TOP.items()}


def diffusers_key_to_wan(key: str) -> str:
    module, suffix = _split_param(key)
    match = _BLOCK_KEY.match(module)
    if match:
        index, sub = match.group(1), match.group(2)
        if sub in _DIFFUSERS_TO_WAN_BLOCK:
            return f"blocks.{index}.{_DIFFUSERS_TO_WAN_BLOCK[sub]}{suffix}"
    elif module in _DIFFUSERS_TO_WAN_TOP:
        return _DIFFUSERS_TO_WAN_TOP[module] + suffix
    raise KeyError(f"no Wan name for diffusers key {key!r}")


def wan_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {wan_key_to_diffusers(k): v for k, v in state.items()}


def diffusers_to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {diffusers_key_to_wan(k): v for k, v in state.items()}


# ---- official Kaleido (SwissArmyTransformer) layout -------------------------------------------
# Names as the official Wan->SAT converter writes them (`convert_ckpt_init_wan2sat.py`); `{i}` = block.
_SAT_PREFIX = "model.diffusion_model."
_WAN_TO_SAT_BLOCK = {
    "self_attn.o": "transformer.layers.{i}.attention.dense",
    "cross_attn.q": "transformer.layers.{i}.cross_attention.query",
    "cross_attn.o": "transformer.layers.{i}.cross_attention.dense",
    "norm3": "transformer.layers.{i}.post_cross_attention_layernorm",
    "ffn.0": "transformer.layers.{i}.mlp.dense_h_to_4h",
    "ffn.2": "transformer.layers.{i}.mlp.dense_4h_to_h",
    "self_attn.norm_q": "mixins.adaln_layer.query_layernorm_list.{i}",
    "self_attn.norm_k": "mixins.adaln_layer.key_layernorm_list.{i}",
    "cross_attn.norm_q": "mixins.adaln_layer.cross_query_layernorm_list.{i}",
    "cross_attn.norm_k": "mixins.adaln_layer.cross_key_layernorm_list.{i}",
}
# Fused SAT tensors: SAT name -> the Wan sub-modules concatenated on dim 0, in order.
_SAT_FUSED = {
    "transformer.layers.{i}.attention.query_key_value": ("self_attn.q", "self_attn.k", "self_attn.v"),
    "transformer.layers.{i}.cross_attention.key_value": ("cross_attn.k", "cross_attn.v"),
}
_WAN_TO_SAT_TOP = {
    "patch_embedding": "mixins.patch_embed.proj",
    "text_embedding.0": "text_embedding.0",
    "text_embedding.2": "text_embedding.2",
    "time_embedding.0": "time_embed.0",
    "time_embedding.2": "time_embed.2",
    "time_projection.1": "adaln_projection.1",
    "head.head": "mixins.final_layer.linear",
    "head.modulation": "mixins.final_layer.adaLN_modulation",
}
_WAN_BLOCK_MODULATION_SAT = "mixins.adaln_layer.adaLN_modulations.{i}"


def wan_to_sat(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan keys -> SAT keys (with the `model.diffusion_model.` prefix), fusing q/k/v and k/v."""
    out: dict[str, torch.Tensor] = {}
    fused_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, suffix = _split_param(key)
        match = _BLOCK_KEY.match(module)
        if match:
            i, sub = match.group(1), match.group(2)
            if sub == "modulation":
                out[_SAT_PREFIX + _WAN_BLOCK_MODULATION_SAT.format(i=i)] = value
                continue
            if sub in _WAN_TO_SAT_BLOCK:
                out[_SAT_PREFIX + _WAN_TO_SAT_BLOCK[sub].format(i=i) + suffix] = value
                continue
            for sat_name, parts in _SAT_FUSED.items():
                if sub in parts:
                    fused_parts.setdefault(_SAT_PREFIX + sat_name.format(i=i) + suffix, {})[sub] = value
                    break
            else:
                raise KeyError(f"no SAT name for Wan key {key!r}")
        elif module in _WAN_TO_SAT_TOP:
            out[_SAT_PREFIX + _WAN_TO_SAT_TOP[module] + suffix] = value
        else:
            raise KeyError(f"no SAT name for Wan key {key!r}")
    for sat_key, parts in fused_parts.items():
        template = next(t for t in _SAT_FUSED if _fill(t, sat_key))
        order = _SAT_FUSED[template]
        missing = [p for p in order if p not in parts]
        if missing:
            raise KeyError(f"cannot fuse {sat_key}: missing Wan parts {missing}")
        out[sat_key] = torch.cat([parts[p] for p in order], dim=0)
    return out


def _fill(template: str, sat_key: str) -> str | None:
    """Block index if `sat_key` (prefix and suffix stripped) instantiates `template`, else None."""
    module, _ = _split_param(sat_key.removeprefix(_SAT_PREFIX))
    pattern = "^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$"
    match = re.match(pattern, module)
    return match.group(1) if match else None


def sat_to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAT keys -> Wan keys, splitting fused query_key_value / key_value back into q, k, v."""
    top = {v: k for k, v in _WAN_TO_SAT_TOP.items()}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        module, suffix = _split_param(key.removeprefix(_SAT_PREFIX))
        if module in top:
            out[top[module] + suffix] = value
            continue
        i = _fill(_WAN_BLOCK_MODULATION_SAT, key) if not suffix else None
        if i is not None:
            out[f"blocks.{i}.modulation"] = value
            continue
        for wan_sub, template in _WAN_TO_SAT_BLOCK.items():
            i = _fill(template, _SAT_PREFIX + module)
            if i is not None:
                out[f"blocks.{i}.{wan_sub}{suffix}"] = value
                break
        else:
            for template, parts in _SAT_FUSED.items():
                i = _fill(template, _SAT_PREFIX + module)
                if i is not None:
                    if value.shape[0] % len(parts):
                        raise ValueError(f"{key}: dim 0 ({value.shape[0]}) does not split into {len(parts)}")
                    for part, chunk in zip(parts, value.chunk(len(parts), dim=0), strict=True):
                        out[f"blocks.{i}.{part}{suffix}"] = chunk.clone()
                    break
            else:
                unknown.append(key)
    if unknown:
        raise KeyError(f"unexpected keys in the SAT checkpoint (no Wan name): {unknown[:20]}")
    return out
