"""Captions for clips (paper section 3.2 (1)) and the subject candidates found in them (3.2 (2)).

Two captioners share one interface (`Captioner.caption(clip, frames) -> str`):
- `VLMCaptioner`: a vision-language model from a LOCAL folder through transformers
  (AutoProcessor + AutoModelForImageTextToText). It is shown `data.caption.frames` frames spread
  over the clip: as several images through the processor's chat template when it has one, else as
  one contact-sheet image. Greedy decoding, so a re-run gives the same caption.
- `SidecarCaptions`: captions the user already has, in a JSONL / JSON / CSV file under the data
  root, keyed by clip id, clip path or source video path (a source's caption goes to all its clips).
Every path in a sidecar must stay inside the data root (paths.py); rows that escape, and clips
without a caption, become Rejections.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kaleido.config.schema import CaptionConfig
from kaleido.data.paths import PathOutsideRoot, relative_to_root, resolve_inside
from kaleido.data.records import ClipRecord, Rejection

STAGE = "caption"
DEFAULT_PROMPT: str = CaptionConfig.model_fields["prompt"].default
KEY_FIELDS = ("clip_id", "path", "clip", "source", "video", "file", "key")
CAPTION_FIELDS = ("caption", "text", "prompt", "description")
_PATH_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".gif")


class Captioner(Protocol):
    source: str  # goes to ClipRecord.caption_source

    def caption(self, clip: ClipRecord, frames: np.ndarray | None) -> str | None:
        """The caption of one clip (None: this captioner has none for it)."""
        ...


# ---------------------------------------------------------------------------------------------
# sidecar captions


def _looks_like_path(key: str) -> bool:
    return "/" in key or "\\" in key or key.lower().endswith(_PATH_SUFFIXES)


def _rows_from_file(path: Path) -> list[tuple[str, Any]]:
    """(key, caption) pairs from a JSONL, JSON or CSV sidecar file."""
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            return [(str(key), value) for key, value in data.items()]
        if isinstance(data, list):
            return [_row_pair(row, f"item {n}") for n, row in enumerate(data)]
        raise ValueError("a JSON sidecar must be an object {key: caption} or a list of rows")
    if suffix == ".jsonl":
        pairs = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:  # json counts within the line: name the file's line
                    raise ValueError(f"line {number} is not JSON ({exc.args[0].split(':')[0]})") from None
                pairs.append(_row_pair(row, f"line {number}"))
        return pairs
    if suffix == ".csv":
        return [_row_pair(row, f"row {n}") for n, row in enumerate(csv.DictReader(io.StringIO(text)), 2)]
    raise ValueError(f"unknown sidecar format {suffix!r}: use .jsonl, .json or .csv")


def _row_pair(row: Any, where: str) -> tuple[str, Any]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with a key field ({', '.join(KEY_FIELDS)}) and a caption")
    key = next((row[name] for name in KEY_FIELDS if row.get(name)), None)
    caption = next((row[name] for name in CAPTION_FIELDS if name in row), None)
    if key is None:
        raise ValueError(f"{where}: no key field; use one of {', '.join(KEY_FIELDS)}")
    return str(key), caption


@dataclass
class SidecarCaptions:
    """Captions from a user file, keyed by clip id or by root-relative clip/source path."""

    source: str
    by_key: dict[str, str] = field(default_factory=dict)

    def lookup(self, clip: ClipRecord) -> str | None:
        for key in (clip.clip_id, clip.path, clip.source):
            if key in self.by_key:
                return self.by_key[key]
        return None

    def caption(self, clip: ClipRecord, frames: np.ndarray | None = None) -> str | None:
        return self.lookup(clip)


def load_sidecar(root: Path, path: str | Path) -> tuple[SidecarCaptions | None, list[Rejection]]:
    """Parse a sidecar file (path relative to the data root). Bad rows are Rejections, not errors."""
    shown = str(path)
    try:
        real = resolve_inside(root, path)
    except PathOutsideRoot as exc:
        return None, [Rejection(STAGE, shown, exc.reason, f"sidecar file: {exc}")]
    if not real.is_file():
        return None, [Rejection(STAGE, shown, "missing_file", f"sidecar file {shown} not found under the data root")]
    try:
        pairs = _rows_from_file(real)
    except (ValueError, UnicodeDecodeError, csv.Error) as exc:
        return None, [Rejection(STAGE, shown, "bad_sidecar", f"cannot parse the sidecar file: {exc}")]
    captions = SidecarCaptions(source=f"sidecar:{relative_to_root(root, real)}")
    rejections = []
    for key, caption in pairs:
        if not isinstance(caption, str) or not caption.strip():
            rejections.append(Rejection(STAGE, key, "empty_caption", "the sidecar row has no caption text"))
            continue
        if _looks_like_path(key):
            try:
                key = relative_to_root(root, resolve_inside(root, key))
            except PathOutsideRoot as exc:
                rejections.append(Rejection(STAGE, key, exc.reason, f"sidecar row: {exc}"))
                continue
        captions.by_key[key] = " ".join(caption.split())
    return captions, rejections


# ---------------------------------------------------------------------------------------------
# vision-language model


def sample_frame_indices(count: int, wanted: int) -> list[int]:
    """`wanted` frame indices spread over `count` frames (segment centres; all frames if fewer)."""
    if count <= wanted:
        return list(range(count))
    return [int((k + 0.5) * count / wanted) for k in range(wanted)]


class VLMCaptioner:
    """A transformers image-text-to-text model from a local folder (no hub access)."""

    def __init__(
        self,
        model_dir: str | Path,
        max_new_tokens: int = 64,
        frames: int = 4,
        prompt: str = DEFAULT_PROMPT,
        label: str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.max_new_tokens = max_new_tokens
        self.frames = frames
        self.prompt = prompt
        self.source = f"vlm:{label or self.model_dir}"
        self._model: Any = None
        self._processor: Any = None

    def load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"VLM folder {self.model_dir} not found (data.caption.vlm)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self._processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(self.model_dir, local_files_only=True, dtype=dtype)
        self._model = model.to(device).eval()

    def _inputs(self, images: Sequence[Any]) -> Any:
        processor = self._processor
        if getattr(processor, "chat_template", None):
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": self.prompt}]
            text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            return processor(images=list(images), text=text, return_tensors="pt")
        # no chat template: one contact-sheet image, with the image token if the processor uses one
        from PIL import Image

        sheet = Image.fromarray(_grid(np.stack([np.asarray(image) for image in images])))
        token = getattr(processor, "image_token", None)
        text = f"{token}\n{self.prompt}" if token else self.prompt
        return processor(images=[sheet], text=text, return_tensors="pt")

    def caption_frames(self, frames: np.ndarray) -> str:
        """Caption for uint8 frames [T, H, W, 3] (the sampled subset is shown to the model)."""
        import torch
        from PIL import Image

        self.load()
        images = [Image.fromarray(frames[i]) for i in sample_frame_indices(len(frames), self.frames)]
        inputs = self._inputs(images)
        model = self._model
        inputs = {
            key: value.to(model.device, model.dtype if value.is_floating_point() else value.dtype)
            if hasattr(value, "to")
            else value
            for key, value in inputs.items()
        }
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if not getattr(model.config, "is_encoder_decoder", False):
            output = output[:, inputs["input_ids"].shape[1] :]  # decoder-only: drop the prompt
        text = self._processor.batch_decode(output, skip_special_tokens=True)[0]
        return " ".join(text.split())

    def caption(self, clip: ClipRecord, frames: np.ndarray | None) -> str | None:
        if frames is None:
            raise ValueError("the VLM captioner needs the clip's frames")
        return self.caption_frames(frames)


def _grid(frames: np.ndarray) -> np.ndarray:
    """Frames tiled in a near-square grid (for processors that take one image)."""
    count, height, width, _ = frames.shape
    columns = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    sheet = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, frame in enumerate(frames):
        row, col = divmod(index, columns)
        sheet[row * height : (row + 1) * height, col * width : (col + 1) * width] = frame
    return sheet


_VLMS: dict[tuple[Any, ...], VLMCaptioner] = {}


def cached_vlm(model_dir: Path, max_new_tokens: int, frames: int, prompt: str, label: str) -> VLMCaptioner:
    """One loaded VLM per process and settings (shard workers caption many shards)."""
    key = (str(model_dir), max_new_tokens, frames, prompt, label)
    if key not in _VLMS:
        _VLMS[key] = VLMCaptioner(model_dir, max_new_tokens, frames, prompt, label)
    return _VLMS[key]


# ---------------------------------------------------------------------------------------------
# tiny offline VLM (tests and the embedded default; random weights, real format)

TINY_VOCAB = (
    "a", "the", "an", "man", "woman", "person", "child", "boy", "girl", "dog", "cat", "horse", "car", "bike",
    "ball", "cup", "tree", "street", "park", "beach", "room", "walks", "runs", "sits", "stands", "plays",
    "rides", "holds", "looks", "jumps", "with", "and", "on", "in", "near", "of", "at", "to", "red", "blue",
    "green", "small", "big", "white", "black", "young", "old", "happy", "video", "camera", "field", "road",
    "water", "sky", "grass", "table", "chair",
)


def build_tiny_vlm(folder: str | Path, seed: int = 0) -> Path:
    """A random-weight LLaVA (tiny CLIP vision tower + tiny Llama) with an offline word tokenizer,
    saved with save_pretrained so it loads through AutoProcessor / AutoModelForImageTextToText.
    Its captions are random words; the code path is the real one."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    folder = Path(folder)
    special = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:"]
    vocab = {token: index for index, token in enumerate([*special, *TINY_VOCAB])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<image>", "USER:", "ASSISTANT:"],
    )
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=template,
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # random weights: keep special tokens out of the output so captions are words, and stop early
    model.generation_config.suppress_tokens = [vocab[t] for t in special if t != "</s>"]
    model.generation_config.min_new_tokens = 4
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# the caption stage's shard function


def caption_shard(ctx: Any) -> dict[str, Any]:
    """Shard fn (shards.run_shards): caption the shard's clips and find their subject candidates.

    Payload per clip id: {"record": ClipRecord JSON, "caption": sidecar caption or None}.
    Writes clips.jsonl (captioned ClipRecords, subjects filled) and rejections.jsonl.
    """
    from kaleido.data.records import write_jsonl
    from kaleido.data.taxonomy import load_taxonomy
    from kaleido.model.media import read_video

    params = ctx.params
    cfg = params.data.caption
    taxonomy_path = params.resolve(cfg.taxonomy)
    taxonomy = load_taxonomy(str(taxonomy_path) if taxonomy_path else None)
    from kaleido.data.models import ModelUnavailable, shard_model

    # the VLM: this process's own (loaded once per process) or, on Ray, the stage's VLM pool (kaleido.data.pools)
    captioner: Captioner | None = shard_model("vlm", params) if cfg.captioner == "vlm" else None
    records: list[ClipRecord] = []
    rejections: list[Rejection] = []
    no_subjects = 0
    for clip_id in ctx.spec.items:
        entry = ctx.spec.payload[clip_id]
        clip = ClipRecord.from_json(entry["record"])
        if captioner is None:
            text, source = entry.get("caption"), entry.get("source")
            if not text:
                rejections.append(
                    Rejection(STAGE, clip_id, "no_caption", "no sidecar caption for this clip id, clip or source")
                )
                continue
        else:
            source = captioner.source
            try:
                frames = read_video(resolve_inside(ctx.root, clip.path))
            except (ValueError, OSError, PathOutsideRoot) as exc:
                rejections.append(Rejection(STAGE, clip_id, "unreadable_clip", str(exc)))
                continue
            try:
                text = captioner.caption(clip, frames)
            except ModelUnavailable:  # the VLM pool is gone: the shard fails (a re-run redoes it), no clip is lost
                raise
            except Exception as exc:  # a model failure on one clip must not stop the run
                rejections.append(Rejection(STAGE, clip_id, "model_failed", f"{exc.__class__.__name__}: {exc}"))
                continue
            if not text:
                rejections.append(Rejection(STAGE, clip_id, "empty_caption", "the model returned no words"))
                continue
        clip.caption, clip.caption_source = text, source
        clip.subjects = taxonomy.match(text)
        if not clip.subjects:
            no_subjects += 1
            rejections.append(
                Rejection("subjects", clip_id, "no_subjects", f"no taxonomy term in the caption: {text[:120]!r}")
            )
        records.append(clip)
    write_jsonl(ctx.work_dir / "clips.jsonl", records)
    write_jsonl(ctx.work_dir / "rejections.jsonl", rejections)
    return {"clips": len(ctx.spec.items), "captioned": len(records), "no_subjects": no_subjects}
