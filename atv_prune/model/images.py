"""Images as users have them, turned into the 8-bit RGB that image processors expect.

``Image.convert("RGB")`` alone is wrong for two kinds of files: it *clips* high-bit-depth images
(a 16-bit grayscale PNG becomes almost white, every value above 255 saturated) and it *drops* the
alpha channel (transparent pixels show whatever colour they store, often black). :func:`to_rgb`
scales 16-bit, 32-bit integer and float images to 8 bits and composites transparent images on
white, the background they are shown on almost everywhere (documents, web pages, image viewers);
every other mode (palette, grayscale, bilevel, CMYK, YCbCr, HSV, LAB) uses Pillow's own colour
conversion. :func:`open_image` also refuses, in one line, an image too small to carry anything
(a processor would upscale a 1x1 image to hundreds of pixels a side) or too large to decode safely.
Calibration and the evaluation bridge both read images through this module.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImageError, one_line

#: The shorter side, in pixels, below which an image is refused.
MIN_SIDE = 8
#: Modes holding more than 8 bits per pixel, which ``convert("RGB")`` would clip.
HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
#: Modes with an alpha channel.
WITH_ALPHA = ("RGBA", "RGBa", "LA", "PA")

_WHITE = (255, 255, 255, 255)
_DOWNSCALE = "downscale it first (the processor would downscale it anyway)"


def to_8_bit(values: np.ndarray, mode: str) -> np.ndarray:
    """A high-bit-depth image's values scaled to 0..255 (uint8), rounded to nearest:

    - 16-bit modes (``I;16*``): ``v * 255 / 65535``, the container's full range (so 12-bit data
      stored in 16 bits stays as dark as it is);
    - 32-bit integer (``I``): as is when every value is in 0..255, as 16-bit when in 0..65535,
      else the image's own min..max range;
    - float (``F``): ``v * 255`` when every value is in 0..1, as is when in 0..255, else min..max.
    """
    data = values.astype(np.float64)
    if not np.isfinite(data).all():
        raise ValueError("the image holds NaN or infinite values")
    low, high = float(data.min()), float(data.max())
    if mode.startswith("I;16"):
        scaled = data * 255 / 65535
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = data * 255
    elif low >= 0 and high <= 255:
        scaled = data
    elif mode == "I" and low >= 0 and high <= 65535:
        scaled = data * 255 / 65535
    else:
        scaled = (data - low) * 255 / (high - low) if high > low else np.zeros_like(data)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: high bit depths scaled (not clipped), transparency composited on
    white, every other mode converted by Pillow. Raises ``ValueError`` for non-finite values."""
    if image.mode in HIGH_BIT_DEPTH:
        return Image.fromarray(to_8_bit(np.asarray(image), image.mode), mode="L").convert("RGB")
    if image.mode in WITH_ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: Path) -> Image.Image:
    """Decode the image at ``path`` as 8-bit RGB (:func:`to_rgb`), or raise a one-line
    :class:`ImageError`: a file Pillow cannot read, an image whose shorter side is under
    :data:`MIN_SIDE` pixels, or one above Pillow's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``, about 89 megapixels), refused before it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in our words
            opened = Image.open(path)
        with opened:
            _check_size(path, *opened.size)
            opened.load()
            return to_rgb(opened)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:  # more than twice the limit: Pillow refuses to open it
        raise ImageError(f"image {path} is too large to decode safely ({one_line(error, 200)}): {_DOWNSCALE}") from None
    except Exception as error:  # noqa: BLE001 - whatever Pillow's decoders raise for a damaged file
        raise ImageError(f"cannot read image {path} ({type(error).__name__}: {one_line(error, 200)}): replace or "
                         "remove the damaged file") from None


def _check_size(path: Path, width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageError(f"image {path} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), above "
                         f"Pillow's {limit / 1e6:.0f}-megapixel limit for decoding safely: {_DOWNSCALE}")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image {path} is {width}x{height} pixels: the processor would upscale it many times over, "
                         f"so it shows nothing: use images at least {MIN_SIDE} pixels a side")
