"""Data augmentation per batch: random crop from the zero-padded image and random horizontal flip.

``Augment(crop=True, flip=True)`` is given to ``BatchIterator(..., augment=...)`` (and so to the
Trainer and ``gpucnn train --augment``). Each batch of (B, C, H, W) images gets, per image, a
crop offset in [0, 2 * padding] on each axis of the image padded by ``padding`` pixels of
black, and a flip with probability 1/2. The random numbers are drawn on the host by a
Generator keyed by (seed, epoch, batch index) - a counter-based stream: batch b of epoch e
gets the same crops and flips in every run with that seed, and a run resumed at batch b
(the checkpoint holds the epoch and step) continues exactly, whatever ran before it. The
gather then runs where the images live (NumPy, CuPy or the emulator's arrays).

Flipping suits clothes (Fashion-MNIST) and CIFAR-10 photographs, whose mirror images are images
of the same class; it is wrong for digits and letters (a mirrored 2 is no 2), so MNIST should
use ``crop`` alone.
"""
from __future__ import annotations

import numpy as np

from gpucnn import backend
from gpucnn.utils import check_int

CHOICES = ("none", "crop", "flip", "crop+flip")
_STREAM = 0xA06  # keys the augmentation's generators apart from the batch order's


def default_padding(image_size: int) -> int:
    """Pixels of padding for a random crop: 4 for 32x32 images (CIFAR's), 2 for 28x28 ones (MNIST's)."""
    return 4 if image_size >= 32 else max(1, image_size // 14)


class Augment:
    """Random crop (``crop``, from the image padded by ``padding`` pixels of ``fill``) and random
    horizontal flip (``flip``) of every image of a batch.

    ``padding`` None: ``default_padding`` of the images' height. ``fill``: the value of a black
    pixel after normalisation, one number or one per channel ((0 - mean) / std; 0 for raw images).
    """

    def __init__(self, crop: bool = True, flip: bool = True, padding: int | None = None, fill=0.0):
        self.crop = bool(crop)
        self.flip = bool(flip)
        if not (self.crop or self.flip):
            raise ValueError("an Augment needs crop or flip (or both); pass augment=None for none.")
        self.padding = None if padding is None else check_int(padding, "padding", 1)
        fill = np.atleast_1d(np.asarray(fill, dtype=np.float64))
        if fill.ndim != 1 or not np.all(np.isfinite(fill)):
            raise ValueError(f"fill must be a finite number or one per channel, not {fill!r}.")
        self.fill = fill

    @classmethod
    def from_name(cls, name: str, fill=0.0) -> "Augment | None":
        """``"none"`` -> None, ``"crop"``, ``"flip"`` or ``"crop+flip"`` -> an Augment doing that."""
        if name not in CHOICES:
            raise ValueError(f"augment must be one of {', '.join(CHOICES)}, not {name!r}.")
        if name == "none":
            return None
        return cls(crop="crop" in name, flip="flip" in name, fill=fill)

    @property
    def name(self) -> str:
        """``"crop"``, ``"flip"`` or ``"crop+flip"`` (what ``from_name`` takes)."""
        return "+".join(part for part, on in (("crop", self.crop), ("flip", self.flip)) if on)

    def describe(self) -> dict:
        """The settings a checkpoint records (a resumed run must augment the same way)."""
        return {"name": self.name, "padding": self.padding, "fill": [float(v) for v in self.fill]}

    @staticmethod
    def generator(seed: int, epoch: int, batch: int) -> np.random.Generator:
        """The host Generator of batch ``batch`` of epoch ``epoch`` in a run seeded ``seed``."""
        return np.random.default_rng([seed, epoch, batch, _STREAM])

    def draw(self, rng: np.random.Generator, count: int, height: int) -> tuple:
        """(crop offsets (count, 2) int64 in [0, 2 * padding], flips (count,) bool) for ``count`` images."""
        padding = self._padding(height)
        offsets = rng.integers(0, 2 * padding + 1, size=(count, 2)) if self.crop else \
            np.full((count, 2), padding, np.int64)
        flips = rng.random(count) < 0.5 if self.flip else np.zeros(count, bool)
        return offsets, flips

    def __call__(self, images, rng: np.random.Generator):
        """A new (B, C, H, W) array: each image cropped and flipped as drawn from ``rng``."""
        if getattr(images, "ndim", None) != 4:
            raise ValueError(f"augmentation needs images (B, C, H, W), not shape {getattr(images, 'shape', None)}.")
        B, C, H, W = images.shape
        if self.fill.size not in (1, C):
            raise ValueError(f"fill has {self.fill.size} values but the images have {C} channels.")
        offsets, flips = self.draw(rng, B, H)
        padding = self._padding(H)
        # Index of every output pixel in the padded image: row oy + i, column ox + j (mirrored when flipped).
        rows = offsets[:, :1] + np.arange(H)
        columns = offsets[:, 1:] + np.arange(W)
        columns = np.where(flips[:, None], columns[:, ::-1], columns)
        xp = backend.get_array_module(images)
        padded = xp.empty((B, C, H + 2 * padding, W + 2 * padding), images.dtype)
        padded[...] = xp.asarray(np.broadcast_to(self.fill, (C,)).astype(images.dtype)).reshape(1, C, 1, 1)
        padded[:, :, padding:padding + H, padding:padding + W] = images
        gather = (np.arange(B)[:, None, None, None], np.arange(C)[None, :, None, None],
                  rows[:, None, :, None], columns[:, None, None, :])
        return padded[tuple(xp.asarray(index) for index in gather)]

    def _padding(self, height: int) -> int:
        return default_padding(height) if self.padding is None else self.padding

    def __repr__(self) -> str:
        return f"Augment(crop={self.crop}, flip={self.flip}, padding={self.padding}, fill={self.fill.tolist()})"
