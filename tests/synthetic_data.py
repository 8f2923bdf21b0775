"""Small generated data sets for the tests (no downloads), defined once."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gpucnn.data import write_idx

# The MNIST file names of each split: (prefix, default image count of write_random_split)
MNIST_PREFIXES = {"train": ("train", 96), "test": ("t10k", 32)}


def quadrant_images(n, seed):
    """uint8 (n, 28, 28) images whose label (0-3) is the quadrant holding a bright square."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        top, left = divmod(int(label), 2)
        y, x = 2 + 14 * top + rng.integers(0, 5), 2 + 14 * left + rng.integers(0, 5)
        image[y:y + 7, x:x + 7] = 250
    return images, labels


def write_quadrant_mnist(root: Path, n_train: int, n_test: int) -> Path:
    """<root>/mnist/ in the MNIST layout holding quadrant images (gzipped images, plain labels); returns root."""
    folder = Path(root) / "mnist"
    folder.mkdir(parents=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = quadrant_images(n, seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return Path(root)


def write_random_split(folder: Path, split: str, seed: int, n: int | None = None, gz=False):
    """One MNIST-layout split of random pixels and labels 0-9 in ``folder``; returns the two paths."""
    prefix, count = MNIST_PREFIXES[split]
    n = count if n is None else n
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    images = write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}",
                       rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))
    labels = write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n).astype(np.uint8))
    return images, labels


def random_images(n=40, seed=0, classes=4):
    """float32 (n, 1, 28, 28) normal images and int labels below ``classes``: data to train on in memory."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28)).astype(np.float32), rng.integers(0, classes, n)
