"""Images and videos in and out: reference loading, the white-pad fit, H.264 mp4 and contact sheets.

Frames are uint8 numpy arrays [T, H, W, 3] (RGB) everywhere outside the models.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kaleido.config.schema import MediaConfig
from kaleido.platform.files import atomic_path

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

WHITE = (255, 255, 255)
MAX_IMAGE_PIXELS = MediaConfig().max_image_pixels  # the schema default; callers pass media.max_image_pixels


class ImageError(ValueError):
    """A user image that cannot be used; the one-line message names the file, what is wrong and the fix."""


_BOMB_CHECK = threading.Lock()


def _open_checked(path: Path, what: str, max_pixels: int) -> Image.Image:
    """Open (header only) with OUR pixel limit instead of Pillow's global one, which it checks inside open()."""
    with _BOMB_CHECK:  # Pillow reads Image.MAX_IMAGE_PIXELS at open time; restore it for everyone else
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            f"{what} {path}: {width}x{height} = {width * height / 1e6:.1f} Mpx exceeds the limit of "
            f"{max_pixels / 1e6:.1f} Mpx (media.max_image_pixels); downscale it (the model sees at most the video "
            "size) or raise the limit"
        )
    return image


def _scaled_to_8_bit(image: Image.Image, path: Path, what: str, warn: Callable[[str], None]) -> Image.Image:
    """16-bit and 32-bit greyscale modes as 8-bit "L", SCALED (Pillow's convert("L") clamps: a 0..65535 ramp
    would become ~99% white).

    I;16*: 0..65535 -> 0..255 (x * 255 / 65535, rounded). I (32-bit int, how some readers deliver 16-bit data):
    the same when the values lie in 0..65535, else the value range [min, max] is stretched to 0..255 (warned).
    F (float): 0..1 -> 0..255; any other range is stretched the same way (warned).
    """
    values = np.asarray(image)
    sixteen_bit = values.size and values.min() >= 0 and values.max() <= 65535
    if image.mode.startswith("I;16") or (image.mode == "I" and sixteen_bit):
        scaled = (values.astype(np.float64) * (255.0 / 65535.0)).round()
    else:
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if image.mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = np.nan_to_num(values, nan=0.0) * 255.0
        else:
            span = high - low if high > low else 1.0
            warn(f"{what} {path}: {image.mode} values span {low:g}..{high:g}; stretched to 0..255")
            scaled = (np.nan_to_num(values, nan=low) - low) * (255.0 / span)
        scaled = scaled.round()
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")


def _to_srgb(image: Image.Image, path: Path, what: str, warn: Callable[[str], None]) -> Image.Image:
    """RGB / RGBA / CMYK with an embedded ICC profile (Display P3 phone photos, Adobe RGB, print CMYK) converted
    to sRGB as a colour-managed viewer shows them; without a profile (or with one lcms cannot use), as is."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        output = "RGBA" if image.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=output)
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        warn(f"{what} {path}: its ICC colour profile cannot be applied ({exc}); colours are taken as sRGB")
        return image
    return converted if converted is not None else image


def to_rgb(
    image: Image.Image, path: Path, what: str = "image", warn: Callable[[str], None] | None = None
) -> Image.Image:
    """Any Pillow image as 8-bit RGB as a viewer shows it: EXIF orientation applied, first frame of an
    animation, 16/32-bit modes scaled (not clamped), colour profiles to sRGB, transparency onto WHITE (so a
    cut-out's background matches the white padding the reference gets), CMYK / palette / LAB converted."""
    warn = warn or log.warning
    frames = getattr(image, "n_frames", 1)
    if getattr(image, "is_animated", False) and frames > 1:
        warn(f"{what} {path}: animated {image.format} with {frames} frames; frame 0 (the first) is used")
        image.seek(0)
    image = ImageOps.exif_transpose(image)  # applies and drops the Orientation tag; a copy when it rotates
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _scaled_to_8_bit(image, path, what, warn)
    elif image.mode == "LAB":
        from PIL import ImageCms

        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        image = ImageCms.applyTransform(image, transform)
    image = _to_srgb(image, path, what, warn)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        _check_visible(rgba, path, what, warn)
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


MIN_VISIBLE = 0.01  # below this share of visible pixels a reference is (nearly) empty: warned


def _check_visible(rgba: Image.Image, path: Path, what: str, warn: Callable[[str], None]) -> None:
    """Refuse an image with nothing visible (every alpha 0): onto white it becomes a blank white card that the model
    would take as a subject. Warn when under MIN_VISIBLE of it shows. Hidden colours (an editor that kept the pixels
    under a zero alpha) are named, since dropping the alpha channel would bring them back."""
    pixels = np.asarray(rgba)
    alpha = pixels[..., 3]
    visible = float(np.count_nonzero(alpha)) / max(alpha.size, 1)
    if visible == 0.0:
        hidden = pixels[..., :3]
        colours = " (its colour channels do hold a picture: save it without the alpha channel to use that)" if (
            hidden.size and int(hidden.max()) - int(hidden.min()) > 16) else ""
        raise ImageError(f"{what} {path}: every pixel is fully transparent (alpha 0), so nothing of the subject would "
                         f"reach the model, only a white card{colours}; export the subject with its pixels")
    if visible < MIN_VISIBLE:
        warn(f"{what} {path}: only {visible:.2%} of its pixels are visible (the rest is transparent and becomes "
             "white); check that this cut-out holds the subject")


def load_image(
    path: str | Path,
    what: str = "image",
    max_pixels: int | None = None,
    warn: Callable[[str], None] | None = None,
) -> Image.Image:
    """THE loader of user images (generate --ref, eval-set references, curation images, samples): 8-bit RGB.

    Checks before decoding: the file exists and is a file, the pixel count is within `max_pixels`
    (media.max_image_pixels; refused with the size and the limit). Then `to_rgb`. Every failure is an
    ImageError with a one-line message naming `what` and the file; notes (animated input, stretched value
    ranges, unusable colour profiles) go to `warn` (default: this module's logger, printed by the CLI).
    """
    path = Path(path)
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if not path.exists():
        raise ImageError(f"{what} {path}: file not found; check the path")
    if not path.is_file():
        raise ImageError(f"{what} {path}: not a file; pass an image file (PNG, JPEG, WebP, ...)")
    try:
        image = _open_checked(path, what, max_pixels)
        with image:
            image.load()  # decode now: a truncated file must fail here, not during generation
            return to_rgb(image, path, what, warn)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ImageError(
            f"{what} {path}: not a readable image ({exc.__class__.__name__}: {detail[:120]}); "
            "pass a PNG, JPEG, WebP, GIF, TIFF or BMP file"
        ) from None


def load_reference_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """A reference image as RGB (`load_image`); ImageError (a ValueError) naming the path when unusable."""
    return load_image(path, "reference image", max_pixels)


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


def frame_rotation(frame: object) -> int:
    """A decoded PyAV frame's display rotation in degrees counter-clockwise: 0, 90, 180 or 270.

    PyAV reads it from the display matrix (a phone video tagged "rotate 90"); flips in that matrix are rare and
    not applied.
    """
    return round((getattr(frame, "rotation", 0) or 0) / 90.0) % 4 * 90


def sample_aspect_ratio(stream: object) -> float:
    """A PyAV video stream's sample (pixel) aspect ratio, width / height of one stored pixel (SAR: 4:3 for
    anamorphic DV, 2:1 for a squeezed editor's export); 1.0 when unset or invalid."""
    for owner in (getattr(stream, "codec_context", None), stream):
        ratio = getattr(owner, "sample_aspect_ratio", None)
        if ratio and math.isfinite(float(ratio)) and float(ratio) > 0:
            return float(ratio)
    return 1.0


def display_width(width: int, sample_aspect: float) -> int:
    """The width a player shows for `width` stored pixels of aspect `sample_aspect` (rounded, at least 1), as
    ffmpeg's display aspect ratio = width * SAR / height."""
    return max(1, round(width * sample_aspect))


def frame_to_rgb(frame: object, size: tuple[int, int] | None = None, interpolation: str | None = None,
                 sample_aspect: float = 1.0) -> np.ndarray:
    """uint8 RGB [H, W, 3] of a PyAV video frame AS A PLAYER SHOWS IT (display rotation applied, as ffmpeg's
    autorotate does; non-square pixels, `sample_aspect` != 1, stretched to square ones), optionally resized so that
    the DISPLAYED frame is `size` = (width, height)."""
    turns = frame_rotation(frame) // 90
    if size is None and sample_aspect != 1.0:
        stored = (display_width(frame.width, sample_aspect), frame.height)
        size = stored if turns % 2 == 0 else (stored[1], stored[0])
    if size is None:
        array = frame.to_ndarray(format="rgb24")
    else:
        width, height = size if turns % 2 == 0 else (size[1], size[0])  # resize in stored orientation
        array = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation=interpolation)
    return np.ascontiguousarray(np.rot90(array, turns)) if turns else array


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("frames is empty: nothing to write")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (0..255), got {frames.dtype}")
    return frames


def write_video(
    frames: np.ndarray, path: str | Path, fps: int = 16, crf: int = 18, metadata: dict[str, str] | None = None
) -> Path:
    """Write uint8 frames [T, H, W, 3] as an H.264 (yuv420p) mp4 that common players open.

    `metadata`: container tags (e.g. {"comment": json}) that `ffprobe` and `read_video_metadata` show.
    """
    import av

    frames = _check_frames(frames)
    # yuv420p subsamples chroma 2x2, so x264 needs even sizes: repeat the last row/column if odd.
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    # written whole or not at all (kaleido.platform.files.atomic_path): a reader, or a second writer of the same
    # path, never sees half an mp4
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", options={"movflags": "+faststart"}) as container:
        container.metadata.update(metadata or {})
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # One encoder thread: x264's output depends on its thread count (auto = the cores it sees), so pinning it
        # makes the bytes the same on every machine and executor (a Ray worker sees other cores than a local
        # process). Ingest runs one encoder per worker process, so the cores are used anyway. No macroblock-tree
        # rate control: with it, the same frames at small sizes (the embedded 96x64 clips) gave a different
        # bitstream in 6 of 8 encodes in one process (measured; x264 reads lookahead data it has not written
        # there), which made a shard's content hash depend on the run. It costs some bitrate at equal quality.
        stream.options = {"crf": str(crf), "threads": "1", "x264-params": "mbtree=0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path


def read_video_metadata(path: str | Path) -> dict[str, str]:
    """The container tags of a video (what `write_video(metadata=...)` wrote)."""
    import av

    with av.open(str(path)) as container:
        return dict(container.metadata)


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame of the first video stream as uint8 [T, H, W, 3] RGB, as displayed (`frame_to_rgb`:
    rotation applied, non-square pixels made square)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"video {path}: file not found")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"video {path}: no video stream")
        sar = sample_aspect_ratio(container.streams.video[0])
        frames = [frame_to_rgb(frame, sample_aspect=sar) for frame in container.decode(video=0)]
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
    with atomic_path(path) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    return path
