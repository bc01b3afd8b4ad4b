"""LoRA adapters on the DiT: peft injects and merges them; this module names, saves and converts their files.

An adapter is held as an `Adapter`: low-rank factors keyed by Wan module names
(`blocks.3.self_attn.q.lora_A.weight`: A is (rank, in_features), B is (out_features, rank)), with the rank
and alpha of its peft LoraConfig. The update of a linear layer is W + (alpha / rank) * B @ A (LoRA, Hu et al.
2021, eq. 3-4; peft's `scaling`).

Three file layouts, each a single safetensors file (a folder holding one is accepted too):

- `peft`: what `PeftModel.save_pretrained` writes: `adapter_model.safetensors` with keys
  `base_model.model.<module>.lora_A.weight` beside `adapter_config.json` (rank, alpha, target modules).
  The trainer's export; exact (alpha kept).
- `diffusers`: what `WanPipeline.load_lora_weights` reads: `transformer.blocks.N.attn1.to_q.lora_A.weight`
  (attn1 = self-attention, attn2 = cross-attention, ffn.net.0.proj / ffn.net.2). Alpha is folded into B
  (scale 1): every loader that ignores alphas (most do) then applies the same update. The safetensors
  metadata `lora_adapter_metadata` (diffusers' key, LoraConfig kwargs prefixed `transformer.`) says
  lora_alpha = rank for loaders that read it.
- `wan`: the original Wan / ComfyUI layout: `diffusion_model.blocks.N.self_attn.q.lora_down.weight`,
  `.lora_up.weight` and a scalar `.alpha` per module (ComfyUI and diffusers' converter apply alpha / rank).

Read too (not written): `kohya`, what musubi-tuner and kohya's sd-scripts write for Wan:
`lora_unet_blocks_N_self_attn_q.lora_down.weight`, `.lora_up.weight`, `.alpha` (the module path with `_` for `.`).

A module may have its own rank and alpha (peft's `rank_pattern` / `alpha_pattern`; a kohya or Wan file with
per-module `.alpha` values, layers of another rank): `Adapter.rank` / `alpha` are the most common ones and
`rank_pattern` / `alpha_pattern` map the other modules (Wan names) to theirs; every layout carries them.

Every base weight stays frozen: the three layouts carry low-rank deltas only, so a full-weight change of a
base module would not travel to diffusers or ComfyUI.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kaleido.config.schema import LORA_TARGETS, lora_target_problem
from kaleido.model.keymaps import wan_key_to_diffusers

LORA_LAYOUTS: tuple[str, ...] = ("peft", "diffusers", "wan")  # the layouts written; `kohya` is read as well
KOHYA_PREFIX = "lora_unet_"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY

_MODULE_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.lora_([AB])\.weight$")


class LoraError(ValueError):
    """An adapter file or setting that cannot be used; the message names the file or key and the fix."""


@dataclass
class Adapter:
    """LoRA factors by Wan module key (`blocks.N.<target>.lora_A.weight` / `.lora_B.weight`) and their scale."""

    state: dict[str, torch.Tensor]
    rank: int
    alpha: float
    meta: dict[str, str] = field(default_factory=dict)  # provenance (base model, run) carried in the file
    rank_pattern: dict[str, int] = field(default_factory=dict)  # Wan module -> its rank, where not `rank`
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # Wan module -> its alpha, where not `alpha`

    @property
    def scaling(self) -> float:
        """alpha / rank: the factor on B @ A (peft's LoraLayer.scaling) of the modules without a pattern."""
        return self.alpha / self.rank

    def module_rank(self, module: str) -> int:
        return self.rank_pattern.get(module, self.rank)

    def module_alpha(self, module: str) -> float:
        return self.alpha_pattern.get(module, self.alpha)

    def module_scaling(self, module: str) -> float:
        """alpha / rank of one module (`blocks.0.self_attn.q`)."""
        return self.module_alpha(module) / self.module_rank(module)

    @property
    def modules(self) -> list[str]:
        """Wan module names the adapter changes, e.g. blocks.0.self_attn.q."""
        return sorted({key.rsplit(".lora_", 1)[0] for key in self.state})

    @property
    def targets(self) -> list[str]:
        """The per-block target names (self_attn.q, ffn.0, ...)."""
        return sorted({module.split(".", 2)[2] for module in self.modules})

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state.values())


def check_targets(targets: Sequence[str]) -> list[str]:
    """The targets, or LoraError naming the unknown ones and the allowed Wan names (the params schema's rule)."""
    problem = lora_target_problem(tuple(targets))
    if problem:
        raise LoraError(problem)
    return list(targets)


def lora_config(rank: int, alpha: float, targets: Sequence[str], dropout: float = 0.0,
                rank_pattern: Mapping[str, int] | None = None,
                alpha_pattern: Mapping[str, float] | None = None):  # -> peft.LoraConfig
    """peft's LoraConfig for the DiT. Targets match by suffix (peft), so `self_attn.q` hits every block's; the
    patterns give single modules (`blocks.3.ffn.0`) their own rank / alpha."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=check_targets(targets),
                      bias="none", init_lora_weights=True, rank_pattern=dict(rank_pattern or {}),
                      alpha_pattern=dict(alpha_pattern or {}))


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str], dropout: float = 0.0,
             seed: int = 0) -> nn.Module:
    """Inject trainable LoRA layers into `model` in place (peft.inject_adapter_in_model) and freeze every base
    weight. B starts at zero, so the model's function is unchanged until the first update; A's random init
    is drawn from `seed` (every rank and every restart draws the same A). Returns `model`."""
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = inject_adapter_in_model(lora_config(rank, alpha, targets, dropout), model)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return model


def adapter_of(model: nn.Module, rank: int, alpha: float) -> Adapter:
    """The adapter weights of a model with injected LoRA layers (peft.get_peft_model_state_dict), on CPU."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    return Adapter(state, rank, alpha)


def check_fits(adapter: Adapter, shapes: Mapping[str, tuple[int, ...] | torch.Size], what: str = "the model") -> None:
    """LoraError unless every factor fits a linear weight of `shapes` (Wan key -> shape, e.g. a checkpoint's
    headers): A is (rank, in_features), B is (out_features, rank)."""
    for key, tensor in adapter.state.items():
        module, kind = key.rsplit(".lora_", 1)
        weight = shapes.get(f"{module}.weight")
        if weight is None:
            blocks = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")), default=-1)
            raise LoraError(f"the adapter changes {module}, which {what} lacks ({what} has {blocks} blocks): it "
                            "was trained for another architecture")
        out_features, in_features = tuple(weight)
        rank = adapter.module_rank(module)
        want = (rank, in_features) if kind.startswith("A") else (out_features, rank)
        if tuple(tensor.shape) != want:
            raise LoraError(f"adapter tensor {key} has shape {tuple(tensor.shape)}, {what} needs {want}: "
                            "the adapter belongs to a model of another size")


def merge_lora(model: nn.Module, adapter: Adapter, scale: float = 1.0) -> nn.Module:
    """`model` (a plain DiT) with W += scale * (alpha / rank) * B @ A folded into its weights, by peft
    (LoraModel.merge_and_unload): the result has the original modules and parameter names."""
    from peft import set_peft_model_state_dict
    from peft.tuners.lora import LoraModel

    check_fits(adapter, {k: v.shape for k, v in model.state_dict().items()})
    for name in adapter.modules:  # merging writes these weights: own them (load_dit may leave them memory-mapped)
        linear = model.get_submodule(name)
        linear.weight.data = linear.weight.data.clone()
    config = lora_config(adapter.rank, adapter.alpha * scale, adapter.targets, rank_pattern=adapter.rank_pattern,
                         alpha_pattern={m: a * scale for m, a in adapter.alpha_pattern.items()})
    config.target_modules = adapter.modules  # exactly the modules the file holds
    wrapped = LoraModel(model, config, "default")
    dtype = next(model.parameters()).dtype
    result = set_peft_model_state_dict(wrapped.model, {k: v.to(dtype) for k, v in adapter.state.items()})
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing:
        raise LoraError(f"peft found no tensor for {len(missing)} adapter weight(s): {missing[:3]}")
    if result.unexpected_keys:
        raise LoraError(f"peft did not place {len(result.unexpected_keys)} adapter tensor(s): "
                        f"{result.unexpected_keys[:3]}")
    return wrapped.merge_and_unload()


# ---- files ---------------------------------------------------------------------------------------------------


def _to_layout(adapter: Adapter, layout: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sorted(adapter.state.items()):
        module, kind = key.rsplit(".lora_", 1)
        kind = kind.split(".")[0]  # A | B
        tensor = tensor.contiguous()
        if layout == "peft":
            out[f"base_model.model.{key}"] = tensor
        elif layout == "diffusers":
            scaled = tensor * adapter.module_scaling(module) if kind == "B" else tensor
            out[f"transformer.{wan_key_to_diffusers(module + '.weight')[: -len('.weight')]}.lora_{kind}.weight"] = (
                scaled.contiguous()
            )
        else:  # wan / ComfyUI
            out[f"diffusion_model.{module}.{'lora_down' if kind == 'A' else 'lora_up'}.weight"] = tensor
            out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(adapter.module_alpha(module)))
    return out


def save_adapter(adapter: Adapter, dst: str | Path, layout: str = "peft") -> Path:
    """Write `adapter` in `layout`; returns the safetensors file written.

    peft: `dst` is a folder (adapter_model.safetensors + adapter_config.json). diffusers / wan: `dst` is a
    `.safetensors` file, or a folder that gets `pytorch_lora_weights.safetensors` / `lora_wan.safetensors`.
    """
    from safetensors.torch import save_file

    if layout not in LORA_LAYOUTS:
        raise LoraError(f"LoRA layout {layout!r}: choose one of {', '.join(LORA_LAYOUTS)}")
    dst = Path(dst)
    meta = {"kaleido_lora": json.dumps({"rank": adapter.rank, "alpha": adapter.alpha, "layout": layout,
                                        **adapter.meta})}
    if layout == "peft":
        dst.mkdir(parents=True, exist_ok=True)
        config = lora_config(adapter.rank, adapter.alpha, adapter.targets, rank_pattern=adapter.rank_pattern,
                             alpha_pattern=adapter.alpha_pattern)
        config.save_pretrained(str(dst))
        file = dst / PEFT_WEIGHTS
    else:
        if dst.suffix in (".pt", ".pth", ".bin", ".ckpt", ".json", ".yaml"):
            raise LoraError(f"{dst}: a {layout} adapter is written as a .safetensors file, or into a folder")
        if dst.suffix != ".safetensors":
            dst.mkdir(parents=True, exist_ok=True)
            dst = dst / ("pytorch_lora_weights.safetensors" if layout == "diffusers" else "lora_wan.safetensors")
        dst.parent.mkdir(parents=True, exist_ok=True)
        file = dst
        if layout == "diffusers":
            targets = sorted({wan_key_to_diffusers(f"blocks.0.{t}.weight").split(".", 2)[2][: -len(".weight")]
                              for t in adapter.targets})
            # diffusers packs each component's LoraConfig kwargs under its prefix (`transformer.r`, ...); with the
            # alphas folded into B, each module's alpha is its rank (scale 1)
            patterns = {wan_key_to_diffusers(f"{m}.weight")[: -len(".weight")]: r
                        for m, r in adapter.rank_pattern.items()}
            config = {"r": adapter.rank, "lora_alpha": adapter.rank, "target_modules": targets}
            if patterns:
                config |= {"rank_pattern": patterns, "alpha_pattern": patterns}
            meta[DIFFUSERS_METADATA_KEY] = json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                                      sort_keys=True)
    save_file(_to_layout(adapter, layout), str(file), metadata={"format": "pt", **meta})
    return file


def save_adapter_layouts(adapter: Adapter, folder: str | Path) -> list[Path]:
    """`adapter` in every layout into `folder`: adapter_model.safetensors + adapter_config.json (peft),
    pytorch_lora_weights.safetensors (diffusers' default name: `load_lora_weights(folder)` finds it) and
    lora_wan.safetensors (Wan / ComfyUI). A training export and a registered version both hold this folder."""
    return [save_adapter(adapter, folder, layout) for layout in LORA_LAYOUTS]


def adapter_meta(path: str | Path) -> dict[str, str]:
    """The provenance an adapter file carries (base, base_model, ...), from its header only: no tensor is read."""
    _, meta = _keys_and_meta(adapter_file(path))
    extra = json.loads(meta.get("kaleido_lora", "{}"))
    return {k: str(v) for k, v in extra.items() if k not in ("rank", "alpha", "layout")}


def adapter_file(path: str | Path) -> Path:
    """The safetensors file of an adapter path (a file, or a folder holding exactly one adapter file)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / PEFT_WEIGHTS).is_file():
            return path / PEFT_WEIGHTS
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        raise LoraError(f"{path}: expected one LoRA .safetensors file (or {PEFT_WEIGHTS}), found "
                        f"{[f.name for f in files] or 'none'}; pass the file itself")
    raise LoraError(f"{path}: no such LoRA file or folder")


def is_adapter(path: str | Path) -> bool:
    """True when `path` is a LoRA file (or a folder with one) in any of the three layouts."""
    try:
        return detect_layout(adapter_file(path)) is not None
    except (LoraError, OSError, ValueError):
        return False


def _keys_and_meta(file: Path) -> tuple[list[str], dict[str, str]]:
    from safetensors import safe_open

    from kaleido.model.checkpoint import CheckpointError, safetensors_header

    try:
        safetensors_header(file)  # says what is wrong (empty, truncated, size mismatch), naming the file
    except CheckpointError as exc:
        raise LoraError(str(exc)) from None
    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys()), handle.metadata() or {}
    except Exception as exc:  # SafetensorError: truncated, not safetensors
        raise LoraError(f"{file}: not a readable safetensors file ({str(exc)[:200]})") from None


def detect_layout(file: Path) -> str | None:
    """peft | diffusers | wan | kohya for a LoRA safetensors file, None when it holds no LoRA factors."""
    keys, _ = _keys_and_meta(file)
    if not keys or not any(".lora_" in k for k in keys):
        return None
    # kohya's family: lora_unet_ (the DiT) and lora_te*_ (text encoders, refused when loaded, by name)
    for prefix, layout in (("base_model.model.", "peft"), ("transformer.", "diffusers"), ("diffusion_model.", "wan"),
                           ("lora_", "kohya")):
        if all(k.startswith(prefix) for k in keys):
            return layout
    return None


# kohya's module path: `blocks_3_self_attn_q` <- `blocks.3.self_attn.q` (ambiguous `_`, so matched against our names)
_KOHYA_MODULE = re.compile(r"^blocks_(\d+)_(.+)$")
_KOHYA_TARGETS = {target.replace(".", "_"): target for target in LORA_TARGETS}


def _kohya_module(file: Path, key: str) -> str:
    """The Wan module of a kohya / musubi-tuner key body (`lora_unet_blocks_0_ffn_0` -> `blocks.0.ffn.0`)."""
    if not key.startswith(KOHYA_PREFIX):
        raise LoraError(f"{file}: {key} is not a LoRA of the DiT (kohya / musubi-tuner DiT names start with "
                        f"{KOHYA_PREFIX}; lora_te* are a text encoder's, which Kaleido does not adapt)")
    body = key[len(KOHYA_PREFIX):]
    match = _KOHYA_MODULE.match(body)
    if match is None or match.group(2) not in _KOHYA_TARGETS:
        raise LoraError(f"{file}: {KOHYA_PREFIX}{body} is not a LoRA of the DiT's linear layers (kohya / musubi-tuner "
                        f"names are lora_unet_blocks_N_<{'|'.join(sorted(_KOHYA_TARGETS))}>)")
    return f"blocks.{match.group(1)}.{_KOHYA_TARGETS[match.group(2)]}"


def _most_common(values: Mapping[str, float]) -> float:
    counts: dict[float, int] = {}
    for value in values.values():
        counts[value] = counts.get(value, 0) + 1
    return max(sorted(counts), key=lambda value: counts[value])


def _peft_patterns(config: Mapping[str, object], key: str, modules: Sequence[str]) -> dict[str, float]:
    """peft's rank_pattern / alpha_pattern resolved to our module names (a pattern key matches a module name's end,
    as peft's `get_pattern_key` does)."""
    patterns = config.get(key) or {}
    if not isinstance(patterns, Mapping):
        raise LoraError(f"{key} must be a mapping of module name patterns to numbers, got {patterns!r}")
    resolved: dict[str, float] = {}
    for module in modules:
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                resolved[module] = float(value)
                break
    return resolved


def load_adapter(path: str | Path) -> tuple[Adapter, str]:
    """An adapter from a file or folder in any of the three layouts; returns (adapter, layout).

    LoraError naming the file when it is unreadable, holds no LoRA factors, mixes ranks or alphas, or names a
    module the DiT does not have.
    """
    from safetensors.torch import load_file

    from kaleido.model.keymaps import diffusers_key_to_wan

    file = adapter_file(path)
    layout = detect_layout(file)
    if layout is None:
        raise LoraError(f"{file}: not a LoRA adapter in a known layout (keys start with base_model.model. (peft), "
                        "transformer. (diffusers), diffusion_model. (Wan / ComfyUI) or lora_unet_ (kohya / "
                        "musubi-tuner) and hold lora_A/lora_B or lora_down/lora_up)")
    _, meta = _keys_and_meta(file)
    raw = load_file(str(file))
    state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, tensor in raw.items():
        if layout == "peft":
            name = key[len("base_model.model."):]
        elif layout == "diffusers":
            module, kind = key[len("transformer."):].rsplit(".lora_", 1)
            try:
                name = f"{diffusers_key_to_wan(module + '.weight')[: -len('.weight')]}.lora_{kind}"
            except KeyError:
                raise LoraError(f"{file}: {key} targets a module the Kaleido DiT does not have") from None
        else:
            if layout == "kohya":
                stem, _, rest = key.partition(".")
                body = f"{_kohya_module(file, stem)}.{rest}"
            else:
                body = key[len("diffusion_model."):]
            if body.endswith(".alpha"):
                alphas[body[: -len(".alpha")]] = float(tensor)
                continue
            name = body.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B.")
        state[name.replace(".default.", ".")] = tensor
    bad = [k for k in state if not _MODULE_KEY.match(k) or _MODULE_KEY.match(k).group(2) not in LORA_TARGETS]
    if bad:
        raise LoraError(f"{file}: {len(bad)} tensor(s) are not LoRA factors of the DiT's linear layers, e.g. {bad[0]}")
    # every module needs both factors: a lone A or B would merge as "no change" without a word
    factors: dict[str, set[str]] = {}
    for key in state:
        module, kind = key.rsplit(".lora_", 1)
        factors.setdefault(module, set()).add(kind[0])
    unpaired = sorted(m for m, kinds in factors.items() if kinds != {"A", "B"})
    if unpaired:
        raise LoraError(f"{file}: {len(unpaired)} module(s) lack a factor (each needs lora_A/lora_down and "
                        f"lora_B/lora_up), e.g. {unpaired[0]}: the file is incomplete")
    nonfinite = sorted(k for k, t in state.items() if not torch.isfinite(t).all())
    if nonfinite:
        raise LoraError(f"{file}: {len(nonfinite)} tensor(s) hold NaN or infinite values, e.g. {nonfinite[0]}: "
                        "the adapter diverged in training or the file is damaged")
    # each module's rank is its factors' (A: rank x in, B: out x rank); the most common one is the adapter's rank
    ranks: dict[str, int] = {}
    for key, tensor in state.items():
        module, kind = key.rsplit(".lora_", 1)
        rank_here = int(tensor.shape[0] if kind.startswith("A") else tensor.shape[-1])
        if ranks.setdefault(module, rank_here) != rank_here:
            raise LoraError(f"{file}: {module}'s lora_A and lora_B disagree on the rank ({ranks[module]} vs "
                            f"{rank_here}): the file is damaged")
    rank = int(_most_common(ranks))
    modules = sorted(ranks)
    module_alphas: dict[str, float]
    if layout == "peft":
        config_file = file.with_name(PEFT_CONFIG)
        if not config_file.is_file():
            raise LoraError(f"{file}: a peft adapter needs {PEFT_CONFIG} beside it (its lora_alpha)")
        try:
            config = json.loads(config_file.read_text())
            alpha, config_rank = float(config["lora_alpha"]), int(config["r"])
            config_ranks = {m: int(r) for m, r in _peft_patterns(config, "rank_pattern", modules).items()}
            module_alphas = {m: _peft_patterns(config, "alpha_pattern", modules).get(m, alpha) for m in modules}
        except (ValueError, KeyError, TypeError) as exc:
            raise LoraError(f"{config_file}: not a peft LoRA config with numeric r and lora_alpha ({exc})") from None
        wrong = [m for m in modules if config_ranks.get(m, config_rank) != ranks[m]]
        if wrong:
            raise LoraError(f"{config_file}: r={config['r']} (rank_pattern {config.get('rank_pattern') or {}}) says "
                            f"rank {config_ranks.get(wrong[0], config_rank)} for {wrong[0]}, its weights have rank "
                            f"{ranks[wrong[0]]}")
    elif layout == "diffusers":
        diffusers_meta = json.loads(meta.get(DIFFUSERS_METADATA_KEY, "{}"))
        # diffusers' convention: no alpha = scale 1 (alpha = rank), per module
        if "transformer.lora_alpha" in diffusers_meta:
            # its patterns name diffusers modules: matched as peft matches them, against each module's diffusers name
            names = {wan_key_to_diffusers(f"{m}.weight")[: -len(".weight")]: m for m in modules}
            config = {"alpha_pattern": diffusers_meta.get("transformer.alpha_pattern") or {}}
            named = {names[d]: a for d, a in _peft_patterns(config, "alpha_pattern", list(names)).items()}
            base_alpha = float(diffusers_meta["transformer.lora_alpha"])
            module_alphas = {m: named.get(m, base_alpha) for m in modules}
        else:
            module_alphas = {m: float(ranks[m]) for m in modules}
    else:
        module_alphas = {m: alphas.get(m, float(ranks[m])) for m in modules}  # no alpha: scale 1 (kohya's rule)
    alpha = _most_common(module_alphas)
    bad = sorted(m for m, a in module_alphas.items() if not (a > 0 and a < float("inf")))
    if bad:
        raise LoraError(f"{file}: alpha {module_alphas[bad[0]]} of {bad[0]} is not a positive finite number")
    return Adapter(state, rank, alpha, adapter_meta(file),
                   rank_pattern={m: r for m, r in ranks.items() if r != rank},
                   alpha_pattern={m: a for m, a in module_alphas.items() if a != alpha}), layout



def adapter_summary(adapter: Adapter, layout: str) -> str:
    """One line: layout, rank, alpha, targets, modules and parameter count."""
    own = set(adapter.rank_pattern) | set(adapter.alpha_pattern)
    return (f"LoRA ({layout} layout): rank {adapter.rank}, alpha {adapter.alpha:g} (scale {adapter.scaling:g}), "
            f"targets {', '.join(adapter.targets)}, {len(adapter.modules)} modules"
            + (f" ({len(own)} with their own rank or alpha)" if own else "")
            + f", {adapter.num_parameters() / 1e6:.3f} M parameters")

