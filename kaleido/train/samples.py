"""Samples during training: every `train.samples.every` steps, a few held-out samples generated at fixed seeds and
logged as videos and one contact sheet (what musubi-tuner and ai-toolkit users look at while a run trains).

The inputs come from the latent cache the run trains on: the first `count` samples of the val split (the train
split when there is none), with their cached caption embeddings and reference latents, so no text encoder is loaded;
the unconditional CFG branch gets the empty prompt's embedding (the cache's null context). Sizes are each sample's
own bucket; steps, guidance, shift and sampler are `generate.*`. Seeds are `train.samples.seed + i`: the same sample
gets the same noise at every step, so the sheets of one run show training, not noise. Rank 0 generates with the live
module (ZeRO stages 1-2 and no sequence parallelism: the plan refuses the other combinations, where one rank alone
cannot run the model). Files: <stage>/samples/step_<N>/sample_<i>.mp4 and sheet.png; MLflow artifacts under
samples/step_<N>/.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from kaleido.config import Params
    from kaleido.train.latents import LatentCache

SHEET_FRAMES = 8  # frames per row of the contact sheet (evenly spaced)


class TrainingSamples:
    """The samples of one run: which cache entries, and how to draw them with the module being trained."""

    def __init__(self, params: Params, cache: LatentCache, output: Path, device: torch.device):
        settings = params.train.samples
        self.params = params
        self.cache = cache
        self.every = settings.every
        self.seed = settings.seed
        self.folder = output / "samples"
        self.device = device
        pool = cache.split_indices("val") or cache.split_indices("train")
        self.indices = pool[: settings.count]
        self._vae: Any = None

    def due(self, step: int) -> bool:
        return bool(self.every) and bool(self.indices) and step % self.every == 0

    def _pipeline(self, module: torch.nn.Module) -> Any:
        from kaleido.model.generate import S2VPipeline, vae_dtype
        from kaleido.model.vae import WanVAE

        if self._vae is None:
            path = self.params.resolve(self.params.model.vae)
            self._vae = WanVAE.from_pretrained(path, device=self.device,
                                               dtype=vae_dtype(self.params.model.vae_dtype, self.device))
        dtype = next(module.parameters()).dtype
        return S2VPipeline(module, self._vae, None, text_len=self.params.model.text_len,
                           max_references=self.params.model.max_references, device=self.device, dtype=dtype)

    def generate(self, module: torch.nn.Module, step: int) -> Path:
        """Draw every sample with `module` (its train/eval mode is restored), write them, return the step's folder."""
        from kaleido.model.media import contact_sheet, write_video
        from kaleido.platform.files import write_json_atomic
        from kaleido.train.data import pad_text

        g = self.params.generate
        text_len = self.params.model.text_len
        null = pad_text(self.cache.null_context(), text_len)
        folder = self.folder / f"step_{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        was_training = module.training
        started = time.perf_counter()
        rows, listing = [], []
        try:
            pipe = self._pipeline(module)
            for number, index in enumerate(self.indices):
                sample = self.cache.samples[index]
                item = self.cache.load(index)
                frames_count, height, width, _ = sample.bucket
                frames = pipe.sample(pad_text(item["text"], text_len), null, item["refs"], frames_count, height,
                                     width, g.steps, g.guidance_scale, g.shift, g.sampler, self.seed + number)
                write_video(frames, folder / f"sample_{number}.mp4", fps=g.fps)
                picks = np.linspace(0, len(frames) - 1, min(SHEET_FRAMES, len(frames))).round().astype(int)
                rows.append(frames[picks])
                listing.append({"file": f"sample_{number}.mp4", "key": sample.key, "split": sample.split,
                                "seed": self.seed + number, "frames": frames_count, "height": height, "width": width})
        finally:
            module.train(was_training)
        # one sheet: a row of SHEET_FRAMES frames per sample, padded (black) to the largest bucket
        height, width = max(row.shape[1] for row in rows), max(row.shape[2] for row in rows)
        padded = [np.pad(row, ((0, 0), (0, height - row.shape[1]), (0, width - row.shape[2]), (0, 0)))
                  for row in rows]
        columns = max(len(row) for row in padded)
        sheet = np.concatenate([np.concatenate([row, np.zeros((columns - len(row), *row.shape[1:]), row.dtype)])
                                for row in padded])
        contact_sheet(sheet, folder / "sheet.png", columns=columns)
        write_json_atomic(folder / "samples.json", {"step": step, "samples": listing, "steps": g.steps,
                                                    "guidance_scale": g.guidance_scale, "shift": g.shift,
                                                    "sampler": g.sampler,
                                                    "seconds": round(time.perf_counter() - started, 3)})
        return folder
