"""Images as users have them: every Pillow mode converted to 8-bit RGB as a plain reference
computation says, 16-bit and float images scaled (not clipped), transparency on white, and
unusable images refused in one line, for calibration and the evaluation bridge alike."""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atv_prune.errors import CalibrationError, ImageError
from atv_prune.eval.hooks import doc_to_visual
from atv_prune.eval.model import _visuals
from atv_prune.model.calibration import load_calibration
from atv_prune.model.images import MIN_SIDE, open_image, to_rgb
from atv_prune.model.processors import load_processor
from atv_prune.model.videos import VideoSampling
from tiny_checkpoints import make_checkpoint

RNG = np.random.default_rng(0)
SHAPE = (12, 16)


def _image(array: np.ndarray, mode: str) -> Image.Image:
    """An image of ``mode`` holding ``array``'s bytes (``fromarray`` misreads some modes)."""
    return Image.frombytes(mode, (array.shape[1], array.shape[0]), np.ascontiguousarray(array).tobytes())


def _rgb(image: Image.Image) -> np.ndarray:
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == image.size
    return np.asarray(converted).astype(np.int64)


def _gray(values: np.ndarray) -> np.ndarray:
    """A reference 8-bit gray image as RGB."""
    return np.repeat(np.rint(values).astype(np.int64)[..., None], 3, axis=2)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(rgb * a + 255 * (1 - a)).astype(np.int64)


def test_16_bit_grayscale_is_scaled_over_its_full_range_not_clipped() -> None:
    values = RNG.integers(0, 65536, SHAPE, dtype=np.uint16)
    for mode in ("I;16", "I;16B", "I;16L"):
        data = values.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
        image = Image.frombytes(mode, SHAPE[::-1], data)
        assert np.array_equal(_rgb(image), _gray(values.astype(np.float64) * 255 / 65535)), mode
    assert (np.asarray(Image.fromarray(values).convert("RGB")) == 255).mean() > 0.9  # what clipping did


@pytest.mark.parametrize("high, reference", [
    (200, lambda v: v),  # 8-bit values in a 32-bit image: as they are
    (60000, lambda v: v * 255 / 65535),  # 16-bit values: the 16-bit range
    (10**7, lambda v: (v - v.min()) * 255 / (v.max() - v.min())),  # wider: the image's own range
])
def test_32_bit_integer_images_are_scaled_by_their_range(high: int, reference) -> None:
    values = RNG.integers(0, high, SHAPE).astype(np.int32)
    values[0, 0], values[0, 1] = 0, high
    assert np.array_equal(_rgb(_image(values, "I")), _gray(reference(values.astype(np.float64))))


@pytest.mark.parametrize("low, high, reference", [
    (0.0, 1.0, lambda v: v * 255),
    (0.0, 255.0, lambda v: v),
    (-3.0, 900.0, lambda v: (v - v.min()) * 255 / (v.max() - v.min())),
])
def test_float_images_are_scaled(low: float, high: float, reference) -> None:
    values = RNG.uniform(low, high, SHAPE).astype(np.float32)
    values[0, 0], values[0, 1] = low, high
    assert np.array_equal(_rgb(_image(values, "F")), _gray(reference(values.astype(np.float64))))


def test_a_float_image_with_nan_is_refused(tmp_path: Path) -> None:
    values = np.zeros((16, 16), np.float32)
    values[3, 3] = np.nan
    _image(values, "F").save(tmp_path / "nan.tiff")
    with pytest.raises(ImageError, match="NaN or infinite values"):
        open_image(tmp_path / "nan.tiff")


def test_transparency_is_composited_on_white() -> None:
    rgba = RNG.integers(0, 256, (*SHAPE, 4), dtype=np.uint8)
    assert np.abs(_rgb(_image(rgba, "RGBA")) - _on_white(rgba[..., :3], rgba[..., 3])).max() <= 1
    la = RNG.integers(0, 256, (*SHAPE, 2), dtype=np.uint8)
    expected = _on_white(np.repeat(la[..., :1], 3, axis=2), la[..., 1])
    assert np.abs(_rgb(_image(la, "LA")) - expected).max() <= 1


def test_palette_images_use_their_palette_and_transparent_index() -> None:
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = RNG.integers(0, 256, SHAPE, dtype=np.uint8)
    image = _image(indices, "P")
    image.putpalette(palette.flatten().tolist())
    assert np.array_equal(_rgb(image), palette[indices])
    image.info["transparency"] = int(indices[0, 0])
    expected = palette[indices].astype(np.int64)
    expected[indices == indices[0, 0]] = 255
    assert np.array_equal(_rgb(image), expected)


def test_other_modes_follow_their_colour_formulas() -> None:
    gray = RNG.integers(0, 256, SHAPE, dtype=np.uint8)
    assert np.array_equal(_rgb(_image(gray, "L")), _gray(gray))
    bits = Image.fromarray(gray > 127).convert("1")
    assert np.array_equal(_rgb(bits), _gray((gray > 127) * 255))
    cmyk = RNG.integers(0, 256, (*SHAPE, 4), dtype=np.uint8).astype(np.float64)
    expected = np.rint((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255)
    assert np.abs(_rgb(_image(cmyk.astype(np.uint8), "CMYK")) - expected).max() <= 1
    ycc = RNG.integers(0, 256, (*SHAPE, 3), dtype=np.uint8).astype(np.float64)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128
    expected = np.clip(np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1), 0, 255)
    assert np.abs(_rgb(_image(ycc.astype(np.uint8), "YCbCr")) - expected).max() <= 1
    hsv = RNG.integers(0, 256, (*SHAPE, 3), dtype=np.uint8)
    expected = np.array([[colorsys.hsv_to_rgb(*(v / 255 for v in pixel)) for pixel in row] for row in hsv]) * 255
    assert np.abs(_rgb(_image(hsv, "HSV")) - expected).max() <= 1
    lab = np.zeros((2, 2, 3), np.uint8)
    lab[0, :] = (255, 0, 0)  # L = 100, a = b = 0 (signed bytes in raw LAB data): white
    lab[1, :] = (0, 0, 0)  # L = 0: black
    converted = _rgb(_image(lab, "LAB"))
    assert (converted[0] >= 250).all() and (converted[1] <= 5).all()


def test_a_16_bit_png_reaches_calibration_and_evaluation_scaled(tmp_path: Path) -> None:
    values = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    expected = _gray(values.astype(np.float64) * 255 / 65535)
    assert np.array_equal(np.asarray(open_image(tmp_path / "deep.png")), expected)
    assert np.array_equal(np.asarray(doc_to_visual({"image": str(tmp_path / "deep.png")})[0]), expected)
    rgba = _image(np.zeros((16, 16, 4), np.uint8), "RGBA")  # fully transparent
    assert (np.asarray(_visuals([rgba], "doc 0", VideoSampling())[0][0]) == 255).all()


def _calibrate_on(image_path: Path, tmp_path: Path) -> None:
    record = {"image": str(image_path), "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                          {"from": "gpt", "value": "A thing."}]}
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps([record]))
    processor = load_processor(make_checkpoint(tmp_path / "llava", "llava"))
    load_calibration(calib, processor, samples=1)


def test_a_tiny_image_is_refused_in_one_line(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(CalibrationError, match=f"dot.png is 1x1 pixels: .* at least {MIN_SIDE} pixels a side"):
        _calibrate_on(tmp_path / "dot.png", tmp_path)
    Image.new("RGB", (MIN_SIDE, MIN_SIDE)).save(tmp_path / "small.png")
    assert open_image(tmp_path / "small.png").size == (MIN_SIDE, MIN_SIDE)


def test_an_image_too_large_to_decode_safely_is_refused_before_decoding(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 pixels: above the limit, below twice it
    with pytest.raises(ImageError, match="is 40x30 pixels .* limit for decoding safely: downscale it first"):
        open_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # more than twice the limit: Pillow refuses to open it
    with pytest.raises(CalibrationError, match="big.png is too large to decode safely"):
        _calibrate_on(tmp_path / "big.png", tmp_path)
