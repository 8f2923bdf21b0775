"""Decoding image files (PNG, JPEG, BMP, GIF, ...) with Pillow into uint8 (C, H, W) arrays.

Pillow is an optional extra (``pip install 'gpucnn[images]'``), imported only
when an image file is read. Every image is converted to RGB (C = 3) or grey
(C = 1, ``grey=True``): palette, grey, grey+alpha, RGBA and CMYK files all come
out the same way (alpha is dropped). With a ``size``, the shorter side is resized
to ``size`` and the centre ``size x size`` square is cropped, as torchvision's
``Resize(size)`` + ``CenterCrop(size)`` do.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from gpucnn.data.idx import DataError

INSTALL_HINT = "reading image files needs Pillow: pip install 'gpucnn[images]'"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")


class MissingPillowError(DataError):
    """Pillow (the ``images`` extra) is not installed."""


def require_pillow():
    """The PIL.Image module; MissingPillowError with the install command when Pillow is missing."""
    try:
        from PIL import Image  # noqa: PLC0415 - optional extra
    except ImportError:
        raise MissingPillowError(INSTALL_HINT) from None
    return Image


def is_image_file(path) -> bool:
    """True for a visible file whose suffix names an image format Pillow reads."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def resize_center_crop(image, size: int):
    """A PIL image scaled so its shorter side is ``size`` (bilinear), then cropped to the centre size x size."""
    Image = require_pillow()
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def read_image(path, size: int | None = None, grey: bool = False) -> np.ndarray:
    """An image file as uint8 (3, H, W) RGB, or (1, H, W) with ``grey``; H = W = size when a size is given.

    Raises DataError naming the file when it cannot be opened or decoded
    (corrupt, truncated, not an image), MissingPillowError without Pillow.
    """
    Image = require_pillow()
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # "Palette images with Transparency expressed in bytes should be converted to RGBA": we drop alpha.
            warnings.simplefilter("ignore")
            with Image.open(path) as opened:
                opened.load()   # decodes now, so a truncated or corrupt file fails here
                image = opened.convert("L" if grey else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {' '.join(str(exc).split()) or type(exc).__name__}.") from None
    if size is not None:
        image = resize_center_crop(image, size)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))
