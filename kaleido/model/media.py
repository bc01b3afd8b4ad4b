"""Images and videos in and out: reference loading, the white-pad fit, H.264 mp4 and contact sheets.

Frames are uint8 numpy arrays [T, H, W, 3] (RGB) everywhere outside the models.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

WHITE = (255, 255, 255)


def load_reference_image(path: str | Path) -> Image.Image:
    """Open a reference image as RGB; ValueError naming the path when it is missing or not an image."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"reference image {path}: file not found; check the path passed with --ref")
    if not path.is_file():
        raise ValueError(f"reference image {path}: not a file; pass an image file (PNG, JPEG, WebP, ...)")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file must fail here, not during generation
            # drop alpha onto white so transparent cut-outs match the white padding around them
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (*WHITE, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(
            f"reference image {path}: not a readable image ({exc.__class__.__name__}); "
            "pass a PNG, JPEG or WebP file"
        ) from None


def fit_size(src_width: int, src_height: int, width: int, height: int) -> tuple[int, int]:
    """(new_width, new_height) that fits a src_width x src_height image inside width x height, aspect kept.

    The shipped Kaleido arithmetic, float for float (`zai-org/Kaleido`: sample_video.py for inference,
    data_video.py `_load_reference_images` for training): compare the aspect ratios, the long side takes the
    target size and the other is `int(...)` of the scaled side, i.e. TRUNCATED (4032x3024 -> 682x512 at
    512x896, where rounding gives 683). One deliberate difference: a side that truncates to 0 (an image more
    than ~900 times wider than tall) is kept at 1 pixel; the official code fails there.
    """
    if min(src_width, src_height, width, height) < 1:
        raise ValueError(f"sizes must be positive: image {src_width}x{src_height}, target {width}x{height}")
    image_ratio = src_width / src_height
    if image_ratio > width / height:
        new_width, new_height = width, int(width / image_ratio)
    else:
        new_width, new_height = int(height * image_ratio), height
    return max(1, new_width), max(1, new_height)


def fit_and_pad(image: Image.Image, height: int, width: int, fill: tuple[int, int, int] = WHITE) -> Image.Image:
    """Resize keeping the aspect ratio to fit inside (height, width) (`fit_size`, Lanczos), then pad centred.

    This is the shipped Kaleido reference preprocessing, used by generation, latent encoding and evaluation
    alike: the whole subject stays visible and the padding is white. The padding puts the odd pixel on the
    right / bottom: (left, top, right, bottom) = (dw // 2, dh // 2, dw - dw // 2, dh - dh // 2).
    """
    if height < 1 or width < 1:
        raise ValueError(f"target size {height}x{width} must be positive")
    image = image.convert("RGB")
    new_w, new_h = fit_size(image.width, image.height, width, height)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    pad_w, pad_h = width - new_w, height - new_h
    border = (pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2)  # left, top, right, bottom
    return ImageOps.expand(image, border, fill=fill) if any(border) else image


def reference_pixels(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """One reference as the DiT's VAE sees it: `fit_and_pad` to the video size, then (x - 127.5) / 127.5.

    Returns float32 [3, height, width] in [-1, 1]. The one reference preprocessing of the project: generation
    (`WanVAE.encode_reference`, hence evaluation) and latent encoding for training both call it.
    """
    import torch

    array = np.asarray(fit_and_pad(image, height, width), dtype=np.float32)  # [H, W, 3]
    return (torch.from_numpy(array).permute(2, 0, 1) - 127.5) / 127.5


def cover_size(src_width: int, src_height: int, width: int, height: int) -> tuple[int, int]:
    """(new_width, new_height) that covers width x height with the aspect kept, before a centre crop.

    The shipped training arithmetic for video frames (`zai-org/Kaleido` data_video.py
    `resize_for_rectangle_crop`): when the source is wider than the target, the height takes the target and
    the width is int(src_width * height / src_height), truncated; otherwise the width takes the target.
    The division is correctly rounded, so the truncated side is never below the target.
    """
    if min(src_width, src_height, width, height) < 1:
        raise ValueError(f"sizes must be positive: frame {src_width}x{src_height}, target {width}x{height}")
    if src_width / src_height > width / height:
        return int(src_width * height / src_height), height
    return width, int(src_height * width / src_width)


def centre_crop_box(src_width: int, src_height: int, width: int, height: int) -> tuple[int, int]:
    """(left, top) of the centred width x height window, as the shipped loader crops: delta // 2."""
    return (src_width - width) // 2, (src_height - height) // 2


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("frames is empty: nothing to write")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (0..255), got {frames.dtype}")
    return frames


def write_video(frames: np.ndarray, path: str | Path, fps: int = 16, crf: int = 18) -> Path:
    """Write uint8 frames [T, H, W, 3] as an H.264 (yuv420p) mp4 that common players open."""
    import av

    frames = _check_frames(frames)
    # yuv420p subsamples chroma 2x2, so x264 needs even sizes: repeat the last row/column if odd.
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame of the first video stream as uint8 [T, H, W, 3] RGB."""
    import av

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"video {path}: file not found")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"video {path}: no video stream")
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"video {path}: no decodable frames")
    return np.stack(frames)


def contact_sheet(frames: np.ndarray, path: str | Path, columns: int = 8, gap: int = 2) -> Path:
    """Tile the frames row by row (white gaps) into one PNG, for a quick look without a player."""
    frames = _check_frames(frames)
    count, height, width, _ = frames.shape
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    sheet = np.full(
        (rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap, 3), 255, dtype=np.uint8
    )
    for index, frame in enumerate(frames):
        row, col = divmod(index, columns)
        top, left = row * (height + gap), col * (width + gap)
        sheet[top : top + height, left : left + width] = frame
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path, format="PNG")
    return path
