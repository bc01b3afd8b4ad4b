"""A learnable subject-to-video task that runs on a CPU: does training make the model follow its references?

The data: each clip shows one subject (a square or a circle in one of four colours) moving over a grey
background; its reference is that subject alone, white-padded as the real pipeline pads references; the
caption names the SHAPE and the motion but never the colour ("a circle moves right across a grey background").
The colour is therefore only in the reference: a model that generates the right colour has learned to read its
references. Every clip is its own source video, and the held-out ones (split "val") are never trained on.

The path is the real one: webdataset tars (kaleido.data.writer) -> `kaleido encode` (tiny Wan VAE, UMT5, latent
cache) -> `kaleido train` (DeepSpeed, flow-matching loss, R-RoPE references, held-out val/loss) -> S2VPipeline
sampling (text encoder, reference encoding, Euler). With the tiny random-weight VAE decoded pixels carry no
colour meaning, so the reference-following score is measured on the generated LATENTS: the fraction of held-out
samples whose generated latents are nearest (mean squared distance) to the mean training latent of the
reference's colour. Chance is 1/4. Conditions (the paper's Table 2 spirit): the trained model with its own
references, the untrained model, the trained model with shuffled references (another colour; scored against the
true colour), without references, and a model trained with R-RoPE variant `none`.

    kaleido learnable-task --out artifacts/learnable [--steps 600] [--ablations]
"""

from __future__ import annotations

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

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230), "yellow": (240, 200, 30),
}
SHAPES = ("square", "circle")
HEIGHT, WIDTH, FRAMES = 32, 48, 5
BACKGROUND = 128
SUBJECT = 7  # half size of the subject, pixels


def _mask(shape: str, height: int, width: int, cx: float, cy: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    if shape == "square":
        return (np.abs(xx - cx) < SUBJECT) & (np.abs(yy - cy) < SUBJECT)
    return (xx - cx) ** 2 + (yy - cy) ** 2 < SUBJECT**2


def task_clip(colour: str, shape: str, seed: int) -> tuple[np.ndarray, Image.Image, str]:
    """(frames uint8 [FRAMES, HEIGHT, WIDTH, 3], the reference image, the caption) of one sample."""
    rng = np.random.default_rng(seed)
    x0, y0 = int(rng.integers(SUBJECT, WIDTH - SUBJECT - 8)), int(rng.integers(SUBJECT, HEIGHT - SUBJECT))
    dx = int(rng.choice([-2, -1, 1, 2]))
    frames = np.full((FRAMES, HEIGHT, WIDTH, 3), BACKGROUND, np.uint8)
    for t in range(FRAMES):
        frames[t][_mask(shape, HEIGHT, WIDTH, x0 + dx * t + 4, y0)] = COLOURS[colour]
    reference = np.full((2 * SUBJECT + 2, 2 * SUBJECT + 2, 3), 255, np.uint8)
    reference[_mask(shape, *reference.shape[:2], SUBJECT + 0.5, SUBJECT + 0.5)] = COLOURS[colour]
    caption = f"a {shape} moves {'right' if dx > 0 else 'left'} across a grey background"
    return frames, Image.fromarray(reference), caption


def write_task_dataset(root: Path, train_per_class: int, val_per_class: int, seed: int = 0) -> dict[str, Any]:
    """Clips, references and webdataset tars under `root` (dataset/ holds the tars); returns the labels."""
    from kaleido.data.records import ReferenceImage, TrainingSample
    from kaleido.data.writer import write_tar
    from kaleido.model.media import write_video

    (root / "clips").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    samples, labels = [], {}
    classes = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    per_class = train_per_class + val_per_class
    for k in range(per_class):
        for c, (colour, shape) in enumerate(classes):
            index = k * len(classes) + c
            frames, reference, caption = task_clip(colour, shape, seed * 100_003 + index)
            name = f"task{index:05d}"
            write_video(frames, root / "clips" / f"{name}.mp4", fps=16)
            reference.save(root / "refs" / f"{name}.png")
            split = "val" if k >= train_per_class else "train"
            samples.append(TrainingSample(
                sample_id=name, clip_id=name, clip_path=f"clips/{name}.mp4", caption=caption, sample_type="segment",
                cross_pair=False, split=split,
                references=[ReferenceImage(category=shape, group="object", source_clip_id=name,
                                           image_path=f"refs/{name}.png", sample_type="segment")],
                provenance={"source": f"synthetic/{name}", "colour": colour, "shape": shape},
            ))
            labels[name] = {"colour": colour, "shape": shape, "split": split, "caption": caption}
    write_tar([(sample, None) for sample in samples], root, root / "dataset" / "task-00000.tar")
    return labels


@dataclass
class TaskReport:
    steps: int
    val_loss_base: float | None = None
    val_loss: float | None = None
    scores: dict[str, float] = field(default_factory=dict)  # condition -> reference-following score
    samples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"held-out validation loss: {self.val_loss_base:.4f} (untrained) -> {self.val_loss:.4f} "
                 f"(trained, {self.steps} steps)" if self.val_loss is not None else "no validation loss",
                 f"reference-following score over {self.samples} held-out samples (chance 0.25):",
                 "condition | score"]
        lines += [f"{name} | {value:.3f}" for name, value in self.scores.items()]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def task_params(out: Path, assets: dict[str, str], steps: int, variant: str = "shift_wh",
                tracking_uri: str = "") -> Path:
    """A params.yaml for one training of the task (the tiny assets, this data, these steps)."""
    from kaleido.config.schema import validate_params

    raw = {
        "model": {**assets, "arch": "tiny", "rope": {"variant": variant}},
        "generate": {"frames": FRAMES, "height": HEIGHT, "width": WIDTH, "steps": 10, "shift": 3.0,
                     "guidance_scale": 1.0, "negative_prompt": ""},
        "train": {
            "dataset": str(out.parent / "data" / "dataset"), "latents": str(out.parent / "latents"),
            "output_dir": str(out / "runs"), "frames": FRAMES, "buckets": [[HEIGHT, WIDTH]], "nproc_per_node": 1,
            "micro_batch": 8, "activation_checkpointing": False, "checkpoint_every": steps,
            "cache_dtype": "float32", "validation": {"every": max(1, steps // 4), "max_samples": 64},
            "pretrain": {"lr": 2e-3, "steps": steps, "global_batch": 8, "init": assets["checkpoint"],
                         "schedule": {"mode": "pretrain", "warmup": min(1.0, 10 / steps)}},
        },
        "platform": {"mlflow_tracking_uri": tracking_uri},
    }
    validate_params(raw, base_dir=out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return out / "params.yaml"


def _train(params_path: Path) -> None:
    """`kaleido train --stage pretrain` in a subprocess (the local DeepSpeed launcher)."""
    from kaleido.platform.services import _bin

    command = [_bin("kaleido"), "train", "--stage", "pretrain", "--params", str(params_path)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "KALEIDO_RUN": "learnable"})
    if done.returncode != 0:
        raise RuntimeError(f"training failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


def reference_following(
    params_path: Path, checkpoint: Path | str, labels: dict[str, dict[str, str]], cache_dir: Path,
    condition: str = "own", seed: int = 0,
) -> float:
    """The fraction of held-out samples whose generated latents are nearest to their TRUE colour's mean latent.

    condition: "own" references, "shuffled" (each sample gets a reference of another colour), "none" (no
    references). Centroids: the mean training-split video latent of each colour, from the latent cache.
    """
    from kaleido.config import load_params
    from kaleido.model.generate import S2VPipeline
    from kaleido.train.latents import LatentCache

    params = load_params(params_path, {"model.checkpoint": str(checkpoint)})
    cache = LatentCache(cache_dir)
    colours = list(COLOURS)
    sums = {colour: torch.zeros(0) for colour in colours}
    counts = dict.fromkeys(colours, 0)
    for index in cache.split_indices("train"):
        key = cache.samples[index].key
        label = labels[_name(key)]
        video = cache.load(index)["video"].float()
        sums[label["colour"]] = video if counts[label["colour"]] == 0 else sums[label["colour"]] + video
        counts[label["colour"]] += 1
    centroids = torch.stack([sums[c] / counts[c] for c in colours])
    pipe = S2VPipeline.from_params(params, device="cpu")
    g = params.generate
    held_out = sorted(name for name, label in labels.items() if label["split"] == "val")
    rng = np.random.default_rng(seed)
    hits = 0
    for i, name in enumerate(held_out):
        label = labels[name]
        references: list[Image.Image] = []
        if condition == "own":
            references = [Image.open(cache_dir.parent / "data" / "refs" / f"{name}.png").convert("RGB")]
        elif condition == "shuffled":
            others = [n for n in held_out if labels[n]["colour"] != label["colour"]]
            other = others[int(rng.integers(len(others)))]
            references = [Image.open(cache_dir.parent / "data" / "refs" / f"{other}.png").convert("RGB")]
        latents = pipe(label["caption"], references, g.frames, g.height, g.width, g.steps, g.guidance_scale, g.shift,
                       g.sampler, seed + i, g.negative_prompt, progress=False, output_type="latents")[0]
        distances = ((latents[None] - centroids) ** 2).flatten(1).mean(1)
        hits += int(colours[int(distances.argmin())] == label["colour"])
    return hits / len(held_out)


def _name(key: str) -> str:
    """The sample name inside a cache key (the writer's webdataset key)."""
    return key.rsplit("/", 1)[-1]


CONDITIONS = ("own", "untrained", "shuffled", "none")


def run_learnable_task(
    out: Path, assets: dict[str, str], steps: int = 600, ablations: bool = False, train_per_class: int = 12,
    val_per_class: int = 4, echo: Any = print, tracking_uri: str = "", conditions: tuple[str, ...] = CONDITIONS,
) -> TaskReport:
    """Build the data, encode, train, and score the `conditions` (own, untrained, shuffled, none references);
    writes report.json under `out`."""
    from kaleido.config import load_params
    from kaleido.train.encode import run_encode

    out = Path(out).resolve()
    report = TaskReport(steps=steps)
    started = time.perf_counter()
    labels = write_task_dataset(out / "data", train_per_class, val_per_class)
    main = out / "shift_wh"
    params_path = task_params(main, assets, steps, tracking_uri=tracking_uri)
    run_encode(load_params(params_path), progress=False)
    report.seconds["data+encode"] = time.perf_counter() - started
    echo(f"learnable task: {len(labels)} samples encoded; training {steps} steps")
    started = time.perf_counter()
    _train(params_path)
    report.seconds["train"] = time.perf_counter() - started
    metrics = json.loads((main / "runs" / "pretrain" / "metrics.json").read_text())
    report.val_loss_base, report.val_loss = metrics.get("val_loss_base"), metrics.get("val_loss")
    export = main / "runs" / "pretrain" / "export"
    cache = out / "latents"
    report.samples = sum(1 for label in labels.values() if label["split"] == "val")
    started = time.perf_counter()
    names = {"own": "trained, own references", "untrained": "untrained", "shuffled": "trained, shuffled references",
             "none": "trained, no references"}
    for condition in conditions:
        checkpoint = assets["checkpoint"] if condition == "untrained" else export
        given = "own" if condition == "untrained" else condition
        report.scores[names[condition]] = reference_following(params_path, checkpoint, labels, cache, given)
    if ablations:
        ablation = out / "rope_none"
        ablation_params = task_params(ablation, assets, steps, variant="none", tracking_uri=tracking_uri)
        _train(ablation_params)
        report.scores["trained with R-RoPE `none`, own references"] = reference_following(
            ablation_params, ablation / "runs" / "pretrain" / "export", labels, cache, "own")
    report.seconds["score"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report
