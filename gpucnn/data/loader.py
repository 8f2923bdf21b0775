"""Mini-batches in a reproducible order.

The order of an epoch depends only on (seed, epoch), so a run resumed from a
checkpoint, and every rank of a distributed run, see exactly the same batches.
"""
from __future__ import annotations


import numpy as np

from gpucnn import backend
from gpucnn.data.augment import Augment
from gpucnn.utils import check_int


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(n)`` (int64, shape (n,)) that depends only on (seed, epoch)."""
    n = check_int(n, "n", 0)
    seed = check_int(seed, "seed", 0)
    epoch = check_int(epoch, "epoch", 0)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


class BatchIterator:
    """Yields ``(x_batch, y_batch)`` gathered by index from ``images`` and ``labels``.

    images (N, ...) and labels (N, ...) are NumPy or CuPy arrays on the same
    device; batches live there too. With ``shuffle`` the order of epoch ``e`` is
    ``epoch_permutation(N, seed, e)``; set the epoch with ``set_epoch`` before
    iterating. ``len()`` is the number of batches in a full epoch: ``ceil(N / B)``,
    or ``N // B`` with ``drop_last``. ``set_epoch(e, start_batch=k)`` makes the
    iterations that follow skip the first k batches of epoch e (resuming
    mid-epoch); ``set_epoch(e)`` starts at batch 0.

    ``augment`` (a gpucnn.data.Augment, or None) crops and flips each batch's images at random,
    with the generator of (seed, epoch, batch index): reproducible, and a resumed epoch
    continues with the same crops and flips.
    """

    def __init__(self, images, labels, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, augment=None):
        for name, array in (("images", images), ("labels", labels)):
            if not hasattr(array, "shape") or not hasattr(array, "ndim"):
                raise TypeError(f"{name} must be a NumPy or CuPy array, not {type(array).__name__}.")
            if array.ndim < 1:
                raise ValueError(f"{name} must have at least one dimension (the sample axis).")
        if len(images) != len(labels):
            raise ValueError(f"images and labels must have the same length, not {len(images)} and {len(labels)}.")
        if backend.device_of(images) != backend.device_of(labels):
            raise ValueError(f"images (on {backend.device_of(images)}) and labels "
                             f"(on {backend.device_of(labels)}) must be on the same device.")
        self.images = images
        self.labels = labels
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.shuffle = bool(shuffle)
        self.seed = check_int(seed, "seed", 0)
        self.drop_last = bool(drop_last)
        if augment is not None and not isinstance(augment, Augment):
            raise TypeError(f"augment must be a gpucnn.data.Augment or None, not {type(augment).__name__}.")
        if augment is not None and getattr(images, "ndim", 0) != 4:
            raise ValueError(f"augment needs images (N, C, H, W), not shape {tuple(images.shape)}.")
        self.augment = augment
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        n = len(self.images)
        if self.drop_last:
            return n // self.batch_size
        return -(-n // self.batch_size)

    @property
    def batches_left(self) -> int:
        """Batches the next iteration yields: ``len(self) - start_batch``."""
        return len(self) - self.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch (and so the order) of the next iteration, starting at batch ``start_batch``."""
        epoch = check_int(epoch, "epoch", 0)
        start_batch = check_int(start_batch, "start_batch", 0)
        if start_batch > len(self):
            raise ValueError(f"start_batch {start_batch} is past the end of an epoch of {len(self)} batches.")
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self):
        n = len(self.images)
        order = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else np.arange(n, dtype=np.int64)
        xp = backend.get_array_module(self.images)
        order = xp.asarray(order)  # one host-to-device copy per epoch, then slices of it
        return self._batches(order, self.start_batch, len(self))

    def _batches(self, order, first: int, stop: int):
        for b in range(first, stop):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            images = self.images[batch]
            if self.augment is not None:
                images = self.augment(images, Augment.generator(self.seed, self.epoch, b))
            yield images, self.labels[batch]
