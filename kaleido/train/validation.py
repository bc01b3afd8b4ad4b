"""Held-out validation loss, SD3-style: the flow-matching loss at FIXED (sample, noise seed, noise level) triples.

Esser et al. 2024 ("Scaling Rectified Flow Transformers", SD3) report that validation loss on held-out data at
fixed timesteps tracks downstream metrics and human preference. Here:
- samples: the `val` split of the latent cache (whole source videos held out in curation, data.validation),
  at most train.validation.max_samples of them, in cache order;
- noise levels: train.validation.sigmas (default 0.1 .. 0.9), not drawn: every evaluation sees the same ones;
- noise: one seed per (sample key, level) from train.validation.seed, so the same noise tensor every time;
- the text is the sample's own caption (never dropped: this measures the conditioned model) and the references
  its own.
The number is therefore comparable across steps, runs and models that read the same validation cache, which the
`fingerprint` names (cache settings, sample keys, levels, seed). Per sample, the loss is the mean over levels;
`val/loss` is the mean over samples, and `val/loss_sigma_<s>` the mean over samples at each level.

Reference reliance (`val/reference_reliance`): the same triples once more with SHUFFLED references (each sample gets
the references of its partner: the next validation sample, cyclically, with the same bucket, i.e. as many
references of the same size), minus the loss with its own; per sample, averaged over levels and samples. A model
that reads its references loses when handed another sample's (reliance > 0); one that ignores them scores ~0,
however low its loss (issue 23: a model whose val loss is fine may still ignore its references). Samples without
references, or without a partner, have no reliance.

Distributed: samples are dealt round-robin to the data-parallel ranks; the ranks of one sequence-parallel group
evaluate the same sample (their hooks split its tokens); every rank runs the same number of forwards (the short
ones repeat a sample at weight 0), which ZeRO-3's parameter gathering requires; results are all-gathered.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kaleido.train.data import pad_text
from kaleido.train.latents import LatentCache


@dataclass
class ValidationResult:
    """Losses at one evaluation: per sample (mean over levels) and per level (mean over samples)."""

    per_sample: dict[str, float]  # sample key -> loss
    per_level: dict[str, float]  # "0.10" -> loss
    fingerprint: str
    raw: dict[str, list[float]] = field(default_factory=dict)  # sample key -> loss per level
    shuffled: dict[str, float] = field(default_factory=dict)  # sample key -> loss with its partner's references

    @property
    def loss(self) -> float:
        return sum(self.per_sample.values()) / len(self.per_sample) if self.per_sample else float("nan")

    @property
    def per_sample_reliance(self) -> dict[str, float]:
        """sample key -> loss with shuffled references - loss with its own (samples that have a partner)."""
        return {key: value - self.per_sample[key] for key, value in self.shuffled.items() if key in self.per_sample}

    @property
    def reference_reliance(self) -> float:
        values = list(self.per_sample_reliance.values())
        return sum(values) / len(values) if values else float("nan")

    def metrics(self) -> dict[str, float]:
        """MLflow metric names: val/loss, val/loss_sigma_<level> and val/reference_reliance (when it exists)."""
        metrics = {"val/loss": self.loss, **{f"val/loss_sigma_{level}": v for level, v in self.per_level.items()}}
        if self.shuffled:
            metrics["val/reference_reliance"] = self.reference_reliance
        return metrics

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.loss, "per_level": self.per_level, "per_sample": self.per_sample,
                "fingerprint": self.fingerprint, "reference_reliance": self.reference_reliance if self.shuffled
                else None, "per_sample_shuffled": self.shuffled}


def level_name(sigma: float) -> str:
    return f"{sigma:.2f}"


def noise_seed(seed: int, key: str, sigma: float) -> int:
    """The seed of one (sample, level)'s noise: a pure function of the names, not of the order or the rank."""
    return zlib.crc32(f"{seed}:{key}:{level_name(sigma)}".encode()) + seed * 2**32


class ValidationSet:
    """The fixed triples of a latent cache's `val` split."""

    def __init__(self, cache: LatentCache, sigmas: Sequence[float], max_samples: int, seed: int):
        self.cache = cache
        self.sigmas = [float(s) for s in sigmas]
        self.seed = int(seed)
        self.indices = cache.split_indices("val")[:max_samples]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def partners(self) -> dict[int, int]:
        """Cache index -> the cache index whose references it gets shuffled: the next validation sample (cyclically,
        in validation order) with the same bucket (frames, size, number of references); samples without references
        or without such a partner are left out."""
        found: dict[int, int] = {}
        count = len(self.indices)
        for position, index in enumerate(self.indices):
            bucket = self.cache.samples[index].bucket
            if bucket[3] == 0:
                continue
            for step in range(1, count):
                other = self.indices[(position + step) % count]
                if self.cache.samples[other].bucket == bucket:
                    found[index] = other
                    break
        return found

    @property
    def fingerprint(self) -> str:
        """Names everything that makes two validation losses comparable."""
        blob = json.dumps({
            "settings": self.cache.index.get("settings_hash"), "dataset": self.cache.index.get("dataset"),
            "keys": [self.cache.samples[i].key for i in self.indices], "sigmas": self.sigmas, "seed": self.seed,
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def sample_losses(
        self,
        model: Callable[..., torch.Tensor],
        index: int,
        text_len: int,
        dtype: torch.dtype,
        device: torch.device,
        references_of: int | None = None,
    ) -> list[float]:
        """The loss of sample `index` at every level: one forward, the levels stacked as the batch. references_of: the
        cache index whose references replace the sample's own (the same noise, levels and text otherwise)."""
        item = self.cache.load(index)
        key = self.cache.samples[index].key
        levels = len(self.sigmas)
        x0 = item["video"].float()[None].expand(levels, *item["video"].shape)  # [L, C, F, H, W]
        noise = torch.stack([
            torch.randn(item["video"].shape, generator=torch.Generator().manual_seed(noise_seed(self.seed, key, s)))
            for s in self.sigmas
        ])
        sigma = torch.tensor(self.sigmas, dtype=torch.float32)
        s = sigma.view(levels, 1, 1, 1, 1)
        noisy = ((1 - s) * x0 + s * noise).to(device=device, dtype=dtype)
        target = (noise - x0).to(device)
        context = pad_text(item["text"], text_len)[None].expand(levels, -1, -1).to(device=device, dtype=dtype)
        refs = item["refs"] if references_of is None else self.cache.load(references_of)["refs"]
        references = refs[None].expand(levels, *refs.shape).to(device=device, dtype=dtype) if refs.shape[0] else None
        with torch.no_grad():
            prediction = model(noisy, sigma.to(device) * 1000.0, context, references).float()
        per_level = ((prediction - target.float()) ** 2).flatten(1).mean(1)
        return [float(v) for v in per_level.cpu()]

    def evaluate(
        self,
        model: Callable[..., torch.Tensor],
        text_len: int,
        dtype: torch.dtype,
        device: torch.device,
        dp_rank: int = 0,
        dp_size: int = 1,
        gather: Callable[[Any], list[Any]] | None = None,
    ) -> ValidationResult:
        """Every rank calls this together; `gather` all-gathers a picklable object across ranks (None: one rank)."""
        mine = self.indices[dp_rank::dp_size]
        rounds = -(-len(self.indices) // dp_size) if self.indices else 0
        partners = self.partners
        raw: dict[str, list[float]] = {}
        shuffled: dict[str, float] = {}
        for turn in range(rounds):
            # short ranks repeat a sample (results dropped) so every rank runs as many forwards
            index = mine[turn] if turn < len(mine) else (mine[-1] if mine else self.indices[0])
            losses = self.sample_losses(model, index, text_len, dtype, device)
            # every rank runs the shuffled forward too (a sample without a partner: its own references, dropped),
            # so ZeRO-3's gathers stay in step
            partner = partners.get(index)
            other = self.sample_losses(model, index, text_len, dtype, device, partner if partner is not None else index)
            if turn < len(mine):
                key = self.cache.samples[index].key
                raw[key] = losses
                if partner is not None:
                    shuffled[key] = sum(other) / len(other)
        if gather is not None:
            merged: dict[str, list[float]] = {}
            merged_shuffled: dict[str, float] = {}
            for part, part_shuffled in gather((raw, shuffled)):
                merged.update(part)
                merged_shuffled.update(part_shuffled)
            raw, shuffled = merged, merged_shuffled
        keys = [self.cache.samples[i].key for i in self.indices if self.cache.samples[i].key in raw]
        per_sample = {key: sum(raw[key]) / len(raw[key]) for key in keys}
        per_level = {
            level_name(s): sum(raw[key][j] for key in keys) / len(keys) if keys else float("nan")
            for j, s in enumerate(self.sigmas)
        }
        return ValidationResult(per_sample, per_level, self.fingerprint, {key: raw[key] for key in keys},
                                {key: shuffled[key] for key in keys if key in shuffled})


# ---- the record a training leaves, and what evaluation and the gate read from it ------------------------------

RECORD_NAME = "val_loss.json"


def case_fingerprint(fingerprint: str, key: str) -> str:
    """A validation case's identity for the gate's pairing: the sample within one validation set."""
    return hashlib.sha256(f"{fingerprint}:{key}".encode()).hexdigest()[:16]


def validation_block(record: dict[str, Any]) -> dict[str, Any]:
    """The `validation` block of an evaluation document from a training's val_loss.json.

    cases: one per held-out sample, metrics val_loss (the trained model) and val_loss_base (the model it started
    from), and where the sample has a shuffling partner reference_reliance (loss with shuffled references - with its
    own) and reference_reliance_base; paired by the gate through (id, fingerprint). A record written before reliance
    was measured simply has none.
    """
    fingerprint = record["fingerprint"]
    final, base = record["final"]["per_sample"], record["base"]["per_sample"]
    reliance = _reliance(record["final"])
    reliance_base = _reliance(record["base"])
    cases = []
    for key, value in final.items():
        metrics = {"val_loss": value, **({"val_loss_base": base[key]} if key in base else {})}
        if key in reliance:
            metrics["reference_reliance"] = reliance[key]
        if key in reliance_base:
            metrics["reference_reliance_base"] = reliance_base[key]
        cases.append({"id": key, "fingerprint": case_fingerprint(fingerprint, key), "metrics": metrics})
    return {
        "fingerprint": fingerprint, "sigmas": record["sigmas"], "seed": record["seed"], "latents": record["latents"],
        "text_len": record["text_len"],
        "loss": record["final"]["loss"], "base_loss": record["base"]["loss"], "init": record.get("init"),
        "reference_reliance": record["final"].get("reference_reliance"),
        "base_reference_reliance": record["base"].get("reference_reliance"),
        "cases": cases,
    }


def _reliance(result: dict[str, Any]) -> dict[str, float]:
    """sample key -> reference reliance of one ValidationResult.to_json()."""
    own, shuffled = result["per_sample"], result.get("per_sample_shuffled") or {}
    return {key: value - own[key] for key, value in shuffled.items() if key in own}


def recompute_block(checkpoint: str | Path, block: dict[str, Any], device: str = "cpu",
                    lora: str | Path | None = None) -> dict[str, Any]:
    """The same validation set (`block`'s cache, samples, levels, seed) evaluated for another model's weights
    (`checkpoint`, with a LoRA adapter merged when given).

    ValueError when the cache is not here or no longer holds the same set (its fingerprint differs).
    """
    from kaleido.model.checkpoint import load_dit
    from kaleido.platform.storage import is_remote

    latents = str(block["latents"])  # a folder, or an s3:// cache (fetched through the staging folder)
    if not is_remote(latents) and not (Path(latents) / "index.json").is_file():
        raise ValueError(f"the validation cache {latents} is not on this machine; run the gate where training ran")
    cache = LatentCache(latents)
    validation = ValidationSet(cache, block["sigmas"], len(block["cases"]), block["seed"])
    if validation.fingerprint != block["fingerprint"]:
        raise ValueError(f"the validation cache {latents} changed since the candidate was trained (fingerprint "
                         f"{validation.fingerprint} != {block['fingerprint']}); re-encode and retrain, or re-evaluate")
    model = load_dit(checkpoint, device=device, lora=lora).eval()
    dtype = next(model.parameters()).dtype
    result = validation.evaluate(model, int(block["text_len"]), dtype, torch.device(device))
    fingerprint = result.fingerprint
    reliance = result.per_sample_reliance
    return {
        **{k: v for k, v in block.items()
           if k not in ("cases", "loss", "base_loss", "reference_reliance", "base_reference_reliance")},
        "loss": result.loss,
        "reference_reliance": result.reference_reliance if reliance else None,
        "cases": [{"id": key, "fingerprint": case_fingerprint(fingerprint, key),
                   "metrics": {"val_loss": value, **({"reference_reliance": reliance[key]} if key in reliance else {})}}
                  for key, value in result.per_sample.items()],
        "recomputed_for": str(checkpoint),
    }
