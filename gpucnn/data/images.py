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
from gpucnn.files import require_regular_file

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


def _full_scale(image) -> int:
    """The largest value of an integer image of more than 8 bits ("I;16*" or "I" mode): its bit depth's."""
    if image.mode.startswith("I;16"):
        return 65535
    if image.format == "TIFF":
        bits = image.tag_v2.get(258, (32,))
        sample_format = image.tag_v2.get(339, (1,))
        bits = bits[0] if isinstance(bits, tuple) else bits
        sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
        return 2 ** (bits - 1) - 1 if sample_format == 2 else 2 ** bits - 1
    return 65535  # 16-bit PNG; Pillow scales a PGM/PPM's maxval to 16 bits


def _eight_bit_grey(image, path):
    """A 16-bit, 32-bit integer or float grey image as an 8-bit one, scaled by its bit depth.

    Pillow's own conversion to "L" clips such pixels at 255 (a 16-bit picture comes
    out nearly binary). Floats must lie in [0, 1]; integers are divided by their
    full scale (65535 for 16 bits). DataError for negative or out-of-range values.
    """
    Image = require_pillow()
    pixels = np.asarray(image).astype(np.float64)
    if pixels.size and (not np.isfinite(pixels).all() or pixels.min() < 0):
        raise DataError(f"cannot read image {path}: it holds negative or non-finite pixel values.")
    if image.mode == "F":
        if pixels.size and pixels.max() > 1:
            raise DataError(f"cannot read image {path}: its float pixels exceed 1 (float images must hold "
                            "values in [0, 1]).")
        scale = 1.0
    else:
        scale = _full_scale(image)
        if pixels.size and pixels.max() > scale:
            raise DataError(f"cannot read image {path}: a pixel exceeds its bit depth's maximum {scale}.")
    return Image.fromarray(np.rint(pixels * (255.0 / scale)).astype(np.uint8))  # 2-D uint8: mode L


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
                if opened.mode == "F" or opened.mode.startswith("I"):
                    image = _eight_bit_grey(opened, path).convert("L" if grey else "RGB")
                else:
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
    if suffix not in IMAGE_SUFFIXES and suffix != ".npy":
        raise ValueError(f"{path}: predict reads PNG/JPEG/BMP/GIF/TIFF/WebP images (Pillow), .pgm images and "
                         f".npy arrays, not {path.suffix or 'this file'}.")
    require_regular_file(path, "image file", DataError)  # a FIFO or /dev/zero would never end
    if suffix in IMAGE_SUFFIXES and suffix != ".pgm":  # Pillow, imported only here
        return read_image(path, size=H, grey=C == 1)[None].astype(np.float32) / np.float32(255)
    if suffix == ".pgm":
        pixels = read_pgm(path)
        if pixels.shape != (H, W):
            raise ValueError(f"{path} is a {pixels.shape[1]}x{pixels.shape[0]} image; the model takes {W}x{H} "
                             "(convert it to PNG to have it resized).")
        return np.repeat(pixels[None, None], C, axis=1)
    return _npy_pixels(path, C, H, W)


def _npy_pixels(path: Path, C: int, H: int, W: int) -> np.ndarray:
    """A .npy file of a grey or colour image or batch as float32 (N, C, H, W) pixels in [0, 1]."""
    try:
        array = np.load(path, allow_pickle=False)
    except MemoryError:
        raise ValueError(f"{path} is not a readable .npy array (its header declares more memory than there "
                         "is; damaged?).") from None
    except Exception as exc:  # noqa: BLE001 - NumPy's header parser raises ValueError, SyntaxError, TokenError, ...
        raise ValueError(f"{path} is not a readable .npy array ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}).") from None
    if not isinstance(array, np.ndarray):  # an .npz archive named .npy: np.load opened it as an archive
        array.close()
        raise ValueError(f"{path} is an .npz archive, not a .npy array; save one array with np.save, or "
                         "rename it to .npz if it is a checkpoint.")
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
