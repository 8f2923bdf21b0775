"""Reading image files: PNG, JPEG, BMP, GIF, ... with Pillow into uint8 (C, H, W) arrays; PGM and .npy directly.

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


def read_pgm(path) -> np.ndarray:
    """A PGM image (P2 text or P5 binary) as float32 (H, W) intensities in [0, 1] (value / maxval)."""
    path = Path(path)
    data = path.read_bytes()
    if data[:2] not in (b"P2", b"P5"):
        raise ValueError(f"{path} is not a PGM image (it starts with {data[:2]!r}, not P2 or P5).")
    fields, pos = [], 2
    while len(fields) < 3:  # width, height, maxval; '#' starts a comment running to the end of the line
        while pos < len(data) and (data[pos:pos + 1].isspace() or data[pos:pos + 1] == b"#"):
            if data[pos:pos + 1] == b"#":
                end = data.find(b"\n", pos)
                pos = len(data) if end < 0 else end
            pos += 1
        start = pos
        while pos < len(data) and data[pos:pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise ValueError(f"{path} has a malformed PGM header (expected width, height and maxval).")
        fields.append(int(data[start:pos]))
    width, height, maxval = fields
    if width < 1 or height < 1 or not 1 <= maxval <= 65535:
        raise ValueError(f"{path} has an invalid PGM header: {width}x{height}, maxval {maxval}.")
    count = width * height
    if data[:2] == b"P5":
        dtype = np.dtype("u1") if maxval < 256 else np.dtype(">u2")
        raster = data[pos + 1:pos + 1 + count * dtype.itemsize]  # one whitespace byte follows maxval
        if len(raster) < count * dtype.itemsize:
            raise ValueError(f"{path} is truncated: {width}x{height} pixels need {count * dtype.itemsize} bytes.")
        values = np.frombuffer(raster, dtype=dtype).astype(np.float32)
    else:
        tokens = data[pos:].split()
        if len(tokens) < count:
            raise ValueError(f"{path} is truncated: {width}x{height} pixels, found {len(tokens)} values.")
        try:
            values = np.array([int(t) for t in tokens[:count]], dtype=np.float32)
        except ValueError:
            raise ValueError(f"{path} holds a non-integer pixel value.") from None
    if values.max() > maxval:
        raise ValueError(f"{path} holds a pixel value above its maxval {maxval}.")
    return (values / np.float32(maxval)).reshape(height, width)


def read_model_input(path, input_shape) -> np.ndarray:
    """The images of one file as float32 pixels in [0, 1], shaped (N, C, H, W) = (N, *input_shape).

    PNG/JPEG/... (Pillow) are converted to the model's colour mode and resized and
    centre-cropped to its size; PGM and .npy must already have its size. A grey
    PGM given to a colour model is repeated over the three channels.
    """
    path = Path(path)
    C, H, W = input_shape
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES and suffix != ".pgm":  # Pillow, imported only here
        return read_image(path, size=H, grey=C == 1)[None].astype(np.float32) / np.float32(255)
    if suffix == ".pgm":
        pixels = read_pgm(path)
        if pixels.shape != (H, W):
            raise ValueError(f"{path} is a {pixels.shape[1]}x{pixels.shape[0]} image; the model takes {W}x{H} "
                             "(convert it to PNG to have it resized).")
        return np.repeat(pixels[None, None], C, axis=1)
    if suffix != ".npy":
        raise ValueError(f"{path}: predict reads PNG/JPEG/BMP/GIF/TIFF/WebP images (Pillow), .pgm images and "
                         f".npy arrays, not {path.suffix or 'this file'}.")
    return _npy_pixels(path, C, H, W)


def _npy_pixels(path: Path, C: int, H: int, W: int) -> np.ndarray:
    """A .npy file of a grey or colour image or batch as float32 (N, C, H, W) pixels in [0, 1]."""
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path} is not a readable .npy array ({exc}).") from None
    if C == 1 and array.shape == (H, W):
        array = array[None, None]
    elif C == 1 and array.ndim == 3 and array.shape[1:] == (H, W):
        array = array[:, None]
    elif array.shape == (C, H, W):
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != (C, H, W) or len(array) == 0:
        accepted = f"({H}, {W}), (N, {H}, {W}) or " if C == 1 else ""
        raise ValueError(f"{path} holds an array of shape {array.shape}; predict takes {accepted}"
                         f"({C}, {H}, {W}) or (N, {C}, {H}, {W}).")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255)
    if array.dtype.kind != "f":
        raise TypeError(f"{path} holds {array.dtype} values; predict takes uint8 pixels (0-255) or floats in [0, 1].")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError(f"{path} holds floats outside [0, 1]; scale them to [0, 1] or save uint8 pixels (0-255).")
    return array.astype(np.float32)
