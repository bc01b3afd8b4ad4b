"""A multi-subject S2V task where positions decide: the paper's Tables 2 and 3 in miniature, on a CPU.

Each clip shows three squares of IDENTICAL geometry side by side (slots left, centre, right) drifting up or down; the
clip's three references are those squares alone, in slot order: reference j's colour is the colour of slot j. The
caption names neither colours nor order ("three squares drift up across a grey background"), so the colours are
only in the references and their ORDER is only in the references' positions: reference j sits at rotary time t = j
(every R-RoPE variant but the control), so a model can put colour j in slot j only by reading reference positions.

- Palette: six hues, jittered per sample and subject (+-20 per channel), so no reference is ever byte-identical to
  another. Held out: four of the twenty colour COMBINATIONS entirely, and two of the six ORDERINGS of every other
  combination; no held-out (ordered) triple is ever trained on.
- Scores (on generated latents: the tiny random VAE's pixels carry no colour meaning, its latents do), each a mean
  over held-out samples with a bootstrap CI: slot accuracy (the colour generated in each slot, nearest to the
  per-slot colour centroids of the training latents; chance 1/6, 1/3 for a model that reads the set of colours but
  not the order), set accuracy (share of the reference colours generated in some slot), reversed (references given
  in reverse order: slot accuracy against the reversed order; a model that follows its references reverses the
  video), and ghosting (share of slots showing the colour of ANOTHER slot's reference).
- Control: `time_fixed_neg` gives every reference the same positions (t = -1, shared spatial shift), so the model is
  exactly invariant to their order (tests/test_multi_subject.py checks the forward) and can reach ~1/3 slot accuracy
  at best; more would mean order leaks another way.
- Cross-pairing (Table 3): every clip has one of four background tints, named in the caption. A reference is the
  square on a patch of background; without cross-pairing that patch is the clip's own background (a crop of the
  video), with it (share `cross_pair_ratio`) another tint. Held-out samples are always cross-paired, and the leak is
  the share of them whose generated background is nearest the REFERENCES' tint rather than the caption's.

Training goes through the real path (webdataset tars -> `kaleido encode` -> `kaleido train`, DeepSpeed); every
variant trains on the same data with the same seeds and the same noise; with `pretrain_steps` the tiny DiT is first
trained as text-to-video on the same clips (flow_matching.reference_dropout 1.0) and every variant fine-tunes from
that video prior (the paper's overlap problem comes from it).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 230),
    "yellow": (235, 205, 30), "magenta": (210, 50, 200), "cyan": (40, 200, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "brown": (125, 90, 60), "navy": (35, 45, 95), "olive": (110, 120, 50),
}
HEIGHT, WIDTH, FRAMES = 32, 96, 5
SLOTS = 3
SIDE = 20  # square side, pixels
JITTER = 20
REF_SIZE = 24  # reference canvas (the square on a background patch or white)
LATENT_STRIDE = 8


def ordered_triples() -> list[tuple[str, str, str]]:
    return list(itertools.permutations(PALETTE, SLOTS))


def split_triples(seed: int = 0) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(train, held-out) ordered colour triples: 4 of the 20 combinations held out entirely, and 2 of the 6
    orderings of each other combination (chosen by a seeded generator)."""
    rng = np.random.default_rng(seed)
    combos = list(itertools.combinations(PALETTE, SLOTS))
    held_combos = {combos[i] for i in rng.choice(len(combos), 4, replace=False)}
    train, held = [], []
    for combo in combos:
        orders = list(itertools.permutations(combo))
        if combo in held_combos:
            held += orders
            continue
        out = set(rng.choice(len(orders), 2, replace=False).tolist())
        for i, order in enumerate(orders):
            (held if i in out else train).append(order)
    return train, held


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-JITTER, JITTER + 1), 0, 255)) for c in rgb)  # type: ignore[return-value]


@dataclass
class SlotSample:
    name: str
    colours: tuple[str, ...]  # slot order = reference order
    rgb: list[tuple[int, int, int]]  # jittered subject colours
    background: str  # the clip's (named in the caption)
    reference_backgrounds: list[str | None]  # per reference: a tint, or None (white)
    dy: int
    y0: int
    split: str
    background_in_caption: bool = True

    @property
    def caption(self) -> str:
        motion = f"three squares drift {'up' if self.dy < 0 else 'down'}"
        return f"{motion} across a {self.background} background" if self.background_in_caption else motion


def clip_frames(sample: SlotSample) -> np.ndarray:
    """uint8 [FRAMES, HEIGHT, WIDTH, 3]: the three squares in their slots over the background, drifting by dy."""
    frames = np.empty((FRAMES, HEIGHT, WIDTH, 3), np.uint8)
    frames[:] = BACKGROUNDS[sample.background]
    slot = WIDTH // SLOTS
    for t in range(FRAMES):
        top = sample.y0 + sample.dy * t - SIDE // 2
        for j, rgb in enumerate(sample.rgb):
            left = j * slot + (slot - SIDE) // 2
            frames[t, max(top, 0):top + SIDE, left:left + SIDE] = rgb
    return frames


def reference_image(rgb: tuple[int, int, int], background: str | None) -> Image.Image:
    """The square alone, centred on a REF_SIZE canvas of a background tint (a crop of a clip) or white."""
    fill = BACKGROUNDS[background] if background is not None else (255, 255, 255)
    canvas = np.empty((REF_SIZE, REF_SIZE, 3), np.uint8)
    canvas[:] = fill
    start = (REF_SIZE - SIDE) // 2
    canvas[start:start + SIDE, start:start + SIDE] = rgb
    return Image.fromarray(canvas)


def make_samples(train_count: int, val_count: int, seed: int = 0, backgrounds: bool = False,
                 cross_pair_ratio: float = 0.0, background_in_caption: bool = True) -> list[SlotSample]:
    """Training samples cycle through the training triples, held-out ones through the held-out triples.

    backgrounds=False: grey clips and white references (Table 2). True: a background tint per clip; references on
    the clip's tint, or with probability cross_pair_ratio on another one; held-out references always on another
    tint (the leak test). background_in_caption=False: the caption does not name the tint (the references are then
    the only cue a model trained without cross-pairing has for it)."""
    train_triples, held_triples = split_triples(seed)
    rng = np.random.default_rng(seed + 1)
    names = list(BACKGROUNDS)
    samples = []
    for split, count, triples in (("train", train_count, train_triples), ("val", val_count, held_triples)):
        order = rng.permutation(len(triples))
        for k in range(count):
            colours = triples[order[k % len(triples)]]
            background = names[int(rng.integers(len(names)))] if backgrounds else "grey"
            if not backgrounds:
                ref_bgs: list[str | None] = [None] * SLOTS
            else:
                crossed = split == "val" or rng.random() < cross_pair_ratio
                others = [b for b in names if b != background]
                ref_bg = others[int(rng.integers(len(others)))] if crossed else background
                ref_bgs = [ref_bg] * SLOTS
            samples.append(SlotSample(
                name=f"{split}{len(samples):05d}", colours=tuple(colours),
                rgb=[_jitter(rng, PALETTE[c]) for c in colours], background=background,
                reference_backgrounds=ref_bgs, dy=int(rng.choice([-1, 1])), y0=int(rng.integers(14, 19)),
                split=split, background_in_caption=background_in_caption,
            ))
    return samples


def write_dataset(root: Path, samples: list[SlotSample]) -> dict[str, dict[str, Any]]:
    """Clips, references and one webdataset tar under `root` (dataset/); returns the labels by sample name."""
    from kaleido.data.records import ReferenceImage, TrainingSample
    from kaleido.data.writer import write_tar
    from kaleido.model.media import write_video

    for folder in ("clips", "refs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    records, labels = [], {}
    for sample in samples:
        write_video(clip_frames(sample), root / "clips" / f"{sample.name}.mp4", fps=16)
        references = []
        for j, (rgb, ref_bg) in enumerate(zip(sample.rgb, sample.reference_backgrounds, strict=True)):
            path = f"refs/{sample.name}_{j}.png"
            reference_image(rgb, ref_bg).save(root / path)
            references.append(ReferenceImage(category="square", group="object", source_clip_id=sample.name,
                                             image_path=path, sample_type="segment"))
        crossed = any(bg is not None and bg != sample.background for bg in sample.reference_backgrounds)
        records.append(TrainingSample(
            sample_id=sample.name, clip_id=sample.name, clip_path=f"clips/{sample.name}.mp4", caption=sample.caption,
            sample_type="segment", cross_pair=crossed, split=sample.split, references=references,
            provenance={"source": f"synthetic/{sample.name}", "colours": list(sample.colours)},
        ))
        labels[sample.name] = asdict(sample)
    write_tar([(record, None) for record in records], root, root / "dataset" / "task-00000.tar")
    (root / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    return labels


# ---- training ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 400
    lr: float = 2e-3
    batch: int = 8
    seed: int = 0
    warmup: float = 0.05


def task_params(out: Path, data: Path, latents: Path, assets: dict[str, str], init: str, variant: str,
                settings: TrainSettings, reference_dropout: float = 0.0, tracking_uri: str = "") -> Path:
    """A params.yaml for one training of the task: the tiny assets, this data, this R-RoPE variant and init."""
    from kaleido.config.schema import validate_params

    raw = {
        "model": {**assets, "arch": "tiny", "rope": {"variant": variant}},
        "generate": {"frames": FRAMES, "height": HEIGHT, "width": WIDTH, "steps": 10, "shift": 3.0,
                     "guidance_scale": 1.0, "negative_prompt": ""},
        "flow_matching": {"reference_dropout": reference_dropout},
        "train": {
            "dataset": str(data / "dataset"), "latents": str(latents), "output_dir": str(out / "runs"),
            "frames": FRAMES, "buckets": [[HEIGHT, WIDTH]], "nproc_per_node": 1, "micro_batch": settings.batch,
            "activation_checkpointing": False, "checkpoint_every": settings.steps, "cache_dtype": "float32",
            "seed": settings.seed, "validation": {"every": 0, "max_samples": 64},
            "pretrain": {"lr": settings.lr, "steps": settings.steps, "global_batch": settings.batch, "init": init,
                         "schedule": {"mode": "pretrain", "warmup": settings.warmup}},
        },
        "platform": {"mlflow_tracking_uri": tracking_uri},
    }
    validate_params(raw, base_dir=out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return out / "params.yaml"


def train(params_path: Path, threads: int = 1) -> Path:
    """`kaleido train --stage pretrain` in a subprocess (the local DeepSpeed launcher, `threads` torch threads, at a
    lower CPU priority); returns the stage folder."""
    from kaleido.platform.services import _bin

    env = {**os.environ, "KALEIDO_RUN": "multi-subject", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    command = ["nice", "-n", "10", _bin("kaleido"), "train", "--stage", "pretrain", "--params", str(params_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"training failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return params_path.parent / "runs" / "pretrain"


# ---- scoring -------------------------------------------------------------------------------------------------


def _key_name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


class Scorer:
    """Nearest-centroid readers of generated latents, fitted on the training split of the latent cache.

    Slot colour: per slot and palette colour, the mean training latent of that slot's columns (latent width /
    SLOTS each) over the samples with that colour there. Background: per tint, the mean whole training latent over
    the samples with that background (the subjects average out)."""

    def __init__(self, cache: Any, labels: dict[str, dict[str, Any]]):
        self.colours = list(PALETTE)
        self.tints = list(BACKGROUNDS)
        slot_sums: dict[tuple[int, str], torch.Tensor] = {}
        slot_counts: dict[tuple[int, str], int] = {}
        bg_sums: dict[str, torch.Tensor] = {}
        bg_counts: dict[str, int] = {}
        for index in cache.split_indices("train"):
            label = labels[_key_name(cache.samples[index].key)]
            video = cache.load(index)["video"].float()
            for slot, colour in enumerate(label["colours"]):
                part = self.slot_part(video, slot)
                slot_sums[(slot, colour)] = slot_sums.get((slot, colour), 0) + part
                slot_counts[(slot, colour)] = slot_counts.get((slot, colour), 0) + 1
            bg_sums[label["background"]] = bg_sums.get(label["background"], 0) + video
            bg_counts[label["background"]] = bg_counts.get(label["background"], 0) + 1
        self.slot_centroids = {
            slot: torch.stack([slot_sums[(slot, c)] / slot_counts[(slot, c)] for c in self.colours])
            for slot in range(SLOTS)
        }
        present = [t for t in self.tints if t in bg_counts]
        self.present_tints = present
        self.bg_centroids = torch.stack([bg_sums[t] / bg_counts[t] for t in present])

    @staticmethod
    def slot_part(video: torch.Tensor, slot: int) -> torch.Tensor:
        """[16, F, h, w] -> the latent columns of one slot."""
        width = video.shape[-1] // SLOTS
        return video[..., slot * width:(slot + 1) * width]

    def slots(self, latents: torch.Tensor) -> list[str]:
        """The colour read in each slot of generated latents [16, F, h, w]."""
        out = []
        for slot in range(SLOTS):
            part = self.slot_part(latents, slot)
            distances = ((self.slot_centroids[slot] - part[None]) ** 2).flatten(1).mean(1)
            out.append(self.colours[int(distances.argmin())])
        return out

    def background(self, latents: torch.Tensor) -> str:
        distances = ((self.bg_centroids - latents[None]) ** 2).flatten(1).mean(1)
        return self.present_tints[int(distances.argmin())]


def sample_scores(read: list[str], target: list[str]) -> dict[str, float]:
    """Per-sample scores of the colours read per slot against the references' colours in slot order."""
    slot = sum(a == b for a, b in zip(read, target, strict=True)) / SLOTS
    found = sum(colour in read for colour in target) / SLOTS
    ghost = sum(r != t and r in target for r, t in zip(read, target, strict=True)) / SLOTS
    return {"slot_accuracy": slot, "set_accuracy": found, "ghosting": ghost}


def score_model(params_path: Path, checkpoint: Path, cache: Any, labels: dict[str, dict[str, Any]], scorer: Scorer,
                seed: int = 0) -> dict[str, list[float]]:
    """Per held-out sample scores of one model: slot/set accuracy and ghosting with its own references, slot
    accuracy with the references reversed (against the reversed order), and for clips with a background the leak
    (1 when the generated background is the references' tint, not the caption's). Generation runs from the cached
    caption embeddings and reference latents (the same inputs training saw), the checkpoint's own R-RoPE."""
    from kaleido.config import load_params
    from kaleido.model.checkpoint import load_dit
    from kaleido.model.generate import S2VPipeline
    from kaleido.model.vae import WanVAE
    from kaleido.train.data import pad_text

    params = load_params(params_path)
    g = params.generate
    dit = load_dit(checkpoint)  # its recorded R-RoPE settings
    vae = WanVAE.from_pretrained(params.resolve(params.model.vae), device="cpu", dtype=torch.float32)
    pipe = S2VPipeline(dit, vae, None, text_len=params.model.text_len, device="cpu")
    null = pad_text(cache.null_context(), params.model.text_len)
    scores: dict[str, list[float]] = {}
    for number, index in enumerate(cache.split_indices("val")):
        label = labels[_key_name(cache.samples[index].key)]
        item = cache.load(index)
        context = pad_text(item["text"], params.model.text_len)
        target = list(label["colours"])
        for condition, refs, expected in (("own", item["refs"], target),
                                          ("reversed", item["refs"].flip(0), target[::-1])):
            latents = pipe.sample_latents(context, null, refs, FRAMES, HEIGHT, WIDTH, g.steps, g.guidance_scale,
                                          g.shift, g.sampler, seed + number)[0]
            values = sample_scores(scorer.slots(latents), expected)
            if condition == "own":
                for key, value in values.items():
                    scores.setdefault(key, []).append(value)
                if any(label["reference_backgrounds"]):
                    read = scorer.background(latents)
                    scores.setdefault("background_leak", []).append(float(read == label["reference_backgrounds"][0]))
                    scores.setdefault("background_right", []).append(float(read == label["background"]))
            else:
                scores.setdefault("reversed_slot_accuracy", []).append(values["slot_accuracy"])
    return scores


# ---- the table -----------------------------------------------------------------------------------------------


@dataclass
class TableReport:
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (condition, seed): scores + losses
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self, confidence: float = 0.95) -> list[dict[str, Any]]:
        """Per condition: each score's mean over seeds and samples with a bootstrap CI over held-out samples
        (samples of all seeds pooled; the seeds' own means listed too)."""
        from kaleido.eval.metrics import bootstrap_mean

        out = []
        for condition in dict.fromkeys(row["condition"] for row in self.rows):
            rows = [row for row in self.rows if row["condition"] == condition]
            entry: dict[str, Any] = {"condition": condition, "seeds": len(rows)}
            for metric in rows[0]["scores"]:
                pooled = [v for row in rows for v in row["scores"][metric]]
                ci = bootstrap_mean(pooled, confidence=confidence, seed=0)
                entry[metric] = {"mean": ci.mean, "low": ci.low, "high": ci.high, "n": ci.n,
                                 "per_seed": [float(np.mean(row["scores"][metric])) for row in rows]}
            for key in ("val_loss", "reference_reliance"):
                values = [row[key] for row in rows if row.get(key) is not None]
                entry[key] = float(np.mean(values)) if values else None
            out.append(entry)
        return out

    def markdown(self) -> str:
        metrics = ["slot_accuracy", "set_accuracy", "reversed_slot_accuracy", "ghosting", "background_leak"]
        summary = self.summary()
        shown = [m for m in metrics if any(m in entry for entry in summary)]
        lines = ["| condition | seeds | " + " | ".join(shown) + " | val loss | reliance |",
                 "|---" * (len(shown) + 4) + "|"]
        for entry in summary:
            cells = []
            for metric in shown:
                value = entry.get(metric)
                cells.append("" if value is None else f"{value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}]")
            loss = "" if entry["val_loss"] is None else f"{entry['val_loss']:.4f}"
            reliance = "" if entry["reference_reliance"] is None else f"{entry['reference_reliance']:+.4f}"
            row = [entry["condition"], str(entry["seeds"]), *cells, loss, reliance]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)


def _metrics_of(stage: Path) -> dict[str, Any]:
    return json.loads((stage / "metrics.json").read_text())


def run_table(
    out: Path, assets: dict[str, str], variants: tuple[str, ...] = ("none", "shift_w", "shift_h", "shift_wh",
                                                                     "time_fixed_neg"),
    seeds: tuple[int, ...] = (0, 1), settings: TrainSettings = TrainSettings(), pretrain_steps: int = 0,
    train_count: int = 384, val_count: int = 48, cross_pairing: bool = False, echo: Any = print,
    threads: int = 1, background_in_caption: bool = True,
) -> TableReport:
    """Table 2 in miniature (every R-RoPE variant, each seed) and, with cross_pairing, Table 3 (shift_wh trained
    with and without cross-paired references on clips with backgrounds, named in the caption or not). An empty
    `variants` runs Table 3 alone. Writes report.json and table.md."""
    from kaleido.config import load_params
    from kaleido.train.encode import run_encode
    from kaleido.train.latents import LatentCache

    out = Path(out).resolve()
    report = TableReport(settings={"variants": list(variants), "seeds": list(seeds), "train": asdict(settings),
                                   "pretrain_steps": pretrain_steps, "train_count": train_count,
                                   "val_count": val_count, "cross_pairing": cross_pairing})
    datasets = {"slots": make_samples(train_count, val_count)} if variants else {}
    suffix = "" if background_in_caption else "_silent"
    if cross_pairing:
        for name, ratio in (("bg_naive", 0.0), ("bg_cross", 0.5)):
            datasets[name + suffix] = make_samples(train_count, val_count, backgrounds=True, cross_pair_ratio=ratio,
                                                   background_in_caption=background_in_caption)
    caches: dict[str, tuple[Any, dict[str, Any], Scorer, Path]] = {}
    started = time.perf_counter()
    for name, samples in datasets.items():
        data = out / name / "data"
        latents = out / name / "latents"
        # the data are a function of the arguments: a second table in the same folder reuses them
        marker = out / name / "data.json"
        identity = json.dumps([asdict(sample) for sample in samples], sort_keys=True)
        if marker.is_file() and marker.read_text() == identity and (latents / "index.json").is_file():
            labels = json.loads((data / "labels.json").read_text())
        else:
            echo(f"multi-subject task: writing and encoding {name} ({len(samples)} samples; about 2 minutes on a "
                 "2-core CPU)")
            labels = write_dataset(data, samples)
            probe = task_params(out / name / "encode", data, latents, assets, assets["checkpoint"], "shift_wh",
                                settings)
            run_encode(load_params(probe), progress=False)
            marker.write_text(identity)
        cache = LatentCache(latents)
        caches[name] = (cache, labels, Scorer(cache, labels), data)
    report.seconds["data+encode"] = time.perf_counter() - started
    echo(f"multi-subject task: {', '.join(f'{k}: {len(v)} samples' for k, v in datasets.items())} encoded")

    def one(name: str, condition: str, variant: str, seed: int) -> None:
        cache, labels, scorer, data = caches[name]
        run = out / name / f"{condition}-s{seed}"
        init = assets["checkpoint"]
        if pretrain_steps:  # the video prior: text-to-video on the same clips, once per (dataset, seed)
            prior = out / name / f"t2v-s{seed}"
            if not (prior / "runs" / "pretrain" / "export").exists():
                begun = time.perf_counter()
                prior_settings = TrainSettings(pretrain_steps, settings.lr, settings.batch, seed, settings.warmup)
                train(task_params(prior, data, cache.folder, assets, init, "shift_wh", prior_settings, 1.0), threads)
                report.seconds[f"{name}/t2v-s{seed}"] = time.perf_counter() - begun
            init = str(prior / "runs" / "pretrain" / "export")
        begun = time.perf_counter()
        run_settings = TrainSettings(settings.steps, settings.lr, settings.batch, seed, settings.warmup)
        params_path = task_params(run, data, cache.folder, assets, init, variant, run_settings)
        done = run / "row.json"  # a finished run with the same params is reused (an interrupted table resumes)
        if done.is_file() and json.loads(done.read_text()).get("params") == params_path.read_text():
            report.rows.append(json.loads(done.read_text())["row"])
            echo(f"  {name} {condition} seed {seed}: reused {done}")
            return
        stage = train(params_path, threads)
        trained = time.perf_counter() - begun
        scores = score_model(params_path, stage / "export", cache, labels, scorer, seed)
        metrics = _metrics_of(stage)
        row = {"dataset": name, "condition": condition, "variant": variant, "seed": seed, "scores": scores,
               "val_loss": metrics.get("val_loss"), "reference_reliance": metrics.get("reference_reliance"),
               "seconds": {"train": trained, "score": time.perf_counter() - begun - trained}}
        report.rows.append(row)
        done.write_text(json.dumps({"params": params_path.read_text(), "row": row}) + "\n")
        means = ", ".join(f"{k} {np.mean(v):.3f}" for k, v in scores.items())
        echo(f"  {name} {condition} seed {seed}: {means} ({time.perf_counter() - begun:.0f} s)")
        (out / "report.json").write_text(json.dumps(asdict(report), indent=1) + "\n")

    for seed in seeds:
        for variant in variants:
            one("slots", variant, variant, seed)
        if cross_pairing:
            caption = "" if background_in_caption else ", caption silent on the background"
            one("bg_cross" + suffix, f"shift_wh, cross-paired 50%{caption}", "shift_wh", seed)
            one("bg_naive" + suffix, f"shift_wh, no cross-pairing{caption}", "shift_wh", seed)
    report.seconds["total"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
    (out / "table.md").write_text(report.markdown() + "\n")
    return report
