"""Images as they come from the world, through the one loader (media.load_image) that every path uses: phone photos
stored sideways, 16/32-bit and float greyscale, CMYK, palettes with transparency, animations, oversized and
unreadable files. Inputs are built in the tests; expected values follow from how a viewer shows the file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kaleido.cli import app
from kaleido.model.media import ImageError, load_image, load_reference_image, reference_pixels, to_rgb

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _upright(width: int = 64, height: int = 40) -> Image.Image:
    """A scene with a red block in its top-left corner and a blue one at the bottom-right."""
    pixels = np.full((height, width, 3), 200, dtype=np.uint8)
    pixels[:12, :16] = (255, 0, 0)
    pixels[-12:, -16:] = (0, 0, 255)
    return Image.fromarray(pixels)


def _corner_colours(image: Image.Image) -> tuple[tuple[int, ...], tuple[int, ...]]:
    pixels = np.asarray(image).astype(int)
    return tuple(pixels[4, 4]), tuple(pixels[-4, -4])


@pytest.mark.parametrize(
    ("orientation", "stored_as"),
    [
        (6, Image.Transpose.ROTATE_90),  # phone held upright: stored rotated 90 counter-clockwise, shown 90 clockwise
        (8, Image.Transpose.ROTATE_270),
        (3, Image.Transpose.ROTATE_180),
        (2, Image.Transpose.FLIP_LEFT_RIGHT),
    ],
)
def test_exif_orientation_reaches_the_model_upright(tmp_path, orientation, stored_as):
    upright = _upright()
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright.transpose(stored_as).save(path, quality=95, exif=exif)
    with Image.open(path) as raw:
        assert raw.size != upright.size or orientation in (2, 3)  # what a loader without EXIF would see
    image = load_image(path)
    assert image.size == upright.size
    top_left, bottom_right = _corner_colours(image)
    assert top_left[0] > 200 and top_left[2] < 60, top_left  # red at the top-left, as a viewer shows it
    assert bottom_right[2] > 200 and bottom_right[0] < 60, bottom_right
    # ...and the padded model input has the subject the same way up
    pixels = reference_pixels(image, 48, 80)
    assert pixels.shape == (3, 48, 80)


def test_16_bit_greyscale_is_scaled_not_clamped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
        assert (np.asarray(raw.convert("L")) == 255).mean() > 0.95  # Pillow's own convert clamps: ~all white
    grey = np.asarray(load_image(path))[..., 0].astype(int)
    np.testing.assert_array_equal(grey[0], np.arange(256))  # 0..65535 -> 0..255, one level per step
    assert abs(grey.mean() - 127.5) < 0.5


def test_32_bit_integer_and_float_modes(tmp_path):
    sixteen_in_int = Image.fromarray(np.full((4, 4), 32896, dtype=np.int32), mode="I")  # 16-bit data in mode I
    assert np.asarray(to_rgb(sixteen_in_int, Path("i.tif")))[0, 0].tolist() == [128, 128, 128]
    floats = Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), mode="F")
    got = np.asarray(to_rgb(floats, Path("f.tif")))[..., 0]
    assert got.reshape(-1).tolist() == [round(k * 255 / 15) for k in range(16)]  # 0..1 -> 0..255
    notes = []
    wide = Image.fromarray(np.array([[-1000, 5000]], dtype=np.int32), mode="I")
    assert np.asarray(to_rgb(wide, Path("w.tif"), warn=notes.append))[0, :, 0].tolist() == [0, 255]
    assert notes and "-1000..5000" in notes[0] and "stretched" in notes[0]


def test_cmyk_palette_and_alpha(tmp_path):
    cyan = Image.new("CMYK", (4, 4), (255, 0, 0, 0))
    cyan.save(tmp_path / "cyan.jpg", quality=100)
    r, g, b = np.asarray(load_image(tmp_path / "cyan.jpg"))[2, 2].tolist()
    assert r < 30 and g > 225 and b > 225
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "pal.png", transparency=0)
    pixels = np.asarray(load_image(tmp_path / "pal.png"))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[1, 1].tolist() == [255, 0, 0]
    la = Image.fromarray(np.stack([np.full((4, 4), 0, np.uint8), np.array([[0, 255] * 2] * 4, np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png"))[0, :2, 0].tolist() == [255, 0]  # transparent -> white


def test_a_reference_with_nothing_visible_is_refused_naming_the_file(tmp_path):
    """A fully transparent PNG (a cut-out exported without its subject) would become a plain white card: refused with
    one line naming the file; its neighbours too (a palette whose every index is transparent, LA), and a cut-out that
    is nearly empty is warned about. An editor's file that kept colours under alpha 0 is told how to recover them."""
    empty = Image.new("RGBA", (32, 24), (0, 0, 0, 0))
    empty.save(tmp_path / "empty.png")
    with pytest.raises(ImageError) as info:
        load_reference_image(tmp_path / "empty.png")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "empty.png") in message and "fully transparent" in message
    assert "without the alpha channel" not in message
    hidden = np.zeros((24, 32, 4), np.uint8)
    hidden[..., 0] = np.linspace(0, 255, 32, dtype=np.uint8)  # a picture under a zero alpha
    Image.fromarray(hidden, "RGBA").save(tmp_path / "hidden.png")
    with pytest.raises(ImageError, match="save it without the alpha channel"):
        load_reference_image(tmp_path / "hidden.png")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([10, 200, 10] * 256)
    palette.save(tmp_path / "pal.png", transparency=0)
    with pytest.raises(ImageError, match="fully transparent"):
        load_reference_image(tmp_path / "pal.png")
    Image.new("LA", (8, 8), (90, 0)).save(tmp_path / "la.png")
    with pytest.raises(ImageError, match="fully transparent"):
        load_reference_image(tmp_path / "la.png")
    speck = np.zeros((100, 100, 4), np.uint8)
    speck[50, 50] = (200, 0, 0, 255)  # one visible pixel in 10,000
    Image.fromarray(speck, "RGBA").save(tmp_path / "speck.png")
    notes: list[str] = []
    image = load_image(tmp_path / "speck.png", "reference image", warn=notes.append)
    assert image.getpixel((50, 50)) == (200, 0, 0) and len(notes) == 1 and "0.01% of its pixels" in notes[0]


def test_oversized_image_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (14000, 13000)).save(path)  # 182 Mpx, a valid PNG of ~30 KB
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError) as info:
        load_image(path, "reference image", max_pixels=120_000_000)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "14000x13000" in message and "182.0 Mpx" in message and "120.0 Mpx" in message
    assert "media.max_image_pixels" in message
    assert pillow_limit == Image.MAX_IMAGE_PIXELS  # Pillow's own limit is left as it was


def test_animated_image_uses_its_first_frame_and_says_so(tmp_path, caplog):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with caplog.at_level(logging.WARNING, logger="kaleido"):
        image = load_image(path, "reference image")
    assert np.asarray(image)[0, 0].tolist()[0] > 200
    assert "animated GIF with 3 frames; frame 0 (the first) is used" in caplog.text


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_unreadable_files_are_one_line_errors(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageError) as info:
        load_image(path, "reference image")
    assert "\n" not in str(info.value) and "not a readable image" in str(info.value) and str(path) in str(info.value)


def test_truncated_jpeg_is_refused(tmp_path):
    path = tmp_path / "cut.jpg"
    _upright(256, 256).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(path)


def test_generate_refuses_bad_references_before_loading_models(tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("1", (14000, 13000)).save(huge)
    broken = tmp_path / "broken.jpg"
    broken.write_text("hello")
    for ref, expected in ((huge, "exceeds the limit"), (broken, "not a readable image")):
        result = CliRunner().invoke(app, ["generate", "--prompt", "a cat", "--ref", str(ref), "--out",
                                          str(tmp_path / "v.mp4"), "--params", str(REPO_PARAMS)])
        assert result.exit_code == 2, result.output
        assert expected in result.output and "Traceback" not in result.output
        assert not (tmp_path / "v.mp4").exists()


def test_eval_set_references_go_through_the_same_loader(tmp_path):
    import yaml

    from kaleido.eval.evalset import EvalSetError, load_eval_set

    Image.new("1", (14000, 13000)).save(tmp_path / "huge.png")
    Image.fromarray(np.tile(np.arange(0, 65536, 257, dtype=np.uint16), (4, 1))).save(tmp_path / "deep.png")
    cases = [
        {"id": "a", "prompt": "a cat", "category": "animal", "references": ["deep.png"]},
        {"id": "b", "prompt": "a dog", "category": "animal", "references": ["huge.png"]},
        {"id": "c", "prompt": "a cup", "category": "object", "references": ["bad\x00name.png"]},
    ]
    (tmp_path / "evalset.yaml").write_text(yaml.safe_dump({"cases": cases}))
    with pytest.raises(EvalSetError) as info:
        load_eval_set(tmp_path, max_pixels=120_000_000)
    message = str(info.value)
    assert "2 problem(s)" in message and "exceeds the limit" in message and "NUL character" in message
    assert "deep.png" not in message  # a 16-bit reference is fine


def test_arrays_and_pil_images_in_memory_follow_the_same_rules():
    from kaleido.vision import to_rgb_array

    deep = Image.fromarray(np.tile(np.array([0, 65535], dtype=np.uint16), (2, 1)))
    assert to_rgb_array(deep)[0, :, 0].tolist() == [0, 255]
