"""Every data set the CLI can read, behind one call: ``load_split(dataset, split, ...)``.

=============  ===========================================  ======================
--dataset      where the files come from                     images
=============  ===========================================  ======================
mnist          IDX files (``gpucnn.data.datasets``)          grey 28x28
fashion-mnist  IDX files (``gpucnn.data.datasets``)          grey 28x28
cifar10        binary batches (``gpucnn.data.cifar``)        colour 32x32
folder         ``--data-dir DIR`` with DIR/train/<class>/*   colour (or grey), resized
               (``gpucnn.data.folder``)                     to ``image_size``
=============  ===========================================  ======================

Images always come back as uint8 (N, C, H, W), labels as int64 (N,).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gpucnn.data import cifar, datasets, folder
from gpucnn.data.idx import DataError

FOLDER = "folder"
DATASET_NAMES = (*datasets.DATASETS, cifar.NAME, FOLDER)    # mnist, fashion-mnist, cifar10, folder


@dataclass
class Split:
    """One split of a data set: uint8 images (N, C, H, W), int64 labels (N,), class names (index = label)."""
    images: np.ndarray
    labels: np.ndarray
    classes: tuple
    skipped: list = field(default_factory=list)   # unreadable images left out (image folders only)
    from_cache: bool = False                      # decoded earlier and read from the cache (image folders only)


def check_dataset(name) -> str:
    """``name`` when it is one of DATASET_NAMES; DataError listing them otherwise."""
    if name not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}.")
    return name


def _fixed(name: str, cifar_value, mnist_value):
    """None for an image folder, ``cifar_value`` for CIFAR-10, ``mnist_value(spec)`` for the MNIST family."""
    check_dataset(name)
    if name == FOLDER:
        return None
    if name == cifar.NAME:
        return cifar_value
    return mnist_value(datasets.DATASETS[name])


def native_input_shape(name: str):
    """(C, H, W) of the data set's own images, or None for an image folder (any size, RGB or grey)."""
    return _fixed(name, cifar.IMAGE_SHAPE, lambda spec: (1, *spec.image_shape))


def default_classes(name: str):
    """The class names of a fixed data set (None for an image folder: they come from its sub-folders)."""
    return _fixed(name, cifar.CLASSES, lambda spec: spec.classes)


def load_split(name: str, split: str = "train", data_dir=None, download: bool = True, progress=True,
               image_size: int | None = None, grey: bool = False, skip_bad_images: bool = False,
               classes=None) -> Split:
    """Load one split of the data set ``name`` (see the module table).

    ``data_dir`` is where to look first (required for ``folder``: the folder
    holding train/ and test/). ``image_size``, ``grey`` and ``skip_bad_images``
    apply to image folders only (``image_size`` required there), and so does ``classes``: the class
    names to label an image folder by (a checkpoint's), in place of its train/ sub-folders.
    """
    check_dataset(name)
    if name == FOLDER:
        if data_dir is None:
            raise DataError("--dataset folder needs --data-dir DIR, the folder holding DIR/train/<class>/<image> "
                            "and DIR/test/<class>/<image>.")
        if image_size is None:
            raise ValueError("an image folder needs an image size to resize its images to.")
        part = folder.load_image_folder(data_dir, split, image_size=image_size, grey=grey,
                                        skip_bad_images=skip_bad_images, progress=progress, classes=classes)
        return Split(part.images, part.labels, part.classes, part.skipped, part.from_cache)
    if name == cifar.NAME:
        images, labels = cifar.load_cifar10(split, data_dir=data_dir, download=download, progress=progress)
        return Split(images, labels, cifar.cifar10_classes(data_dir))
    images, labels = datasets.load_dataset(name, split, data_dir=data_dir, download=download, progress=progress)
    return Split(images[:, None], labels, datasets.DATASETS[name].classes)
