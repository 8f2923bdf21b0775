"""CIFAR-10 from its official binary version: where to find it, how to download it, how to read it.

The binary distribution ``cifar-10-binary.tar.gz`` unpacks to ``cifar-10-batches-bin/``
holding ``data_batch_1.bin`` ... ``data_batch_5.bin`` (the training split),
``test_batch.bin`` and ``batches.meta.txt`` (the class names, one per line). Each
record is 3,073 bytes: 1 label byte (0-9), then 3,072 pixel bytes, the 32x32 red
plane, then green, then blue (row-major), which is exactly (C, H, W) = (3, 32, 32).
The Python (pickled) version is never read: unpickling runs code.

``load_cifar10`` looks for a split's files in the same order as MNIST
(``gpucnn.data.datasets``): ``data_dir``, ``$GPUCNN_DATA_DIR``, the cache
``<cache>/cifar10/cifar-10-batches-bin``, then a download of the archive (progress
bar, MD5 check, written to a temporary name and renamed), unpacked into the cache.
In each folder ``D`` it tries ``D/cifar10/cifar-10-batches-bin``, ``D/cifar10``,
``D/cifar-10-batches-bin`` and ``D``. Files found in folders are checked structurally
(a whole number of records, labels 0-9), not by checksum, so smaller batch files in
the same layout work too.
"""
from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from gpucnn.data import datasets
from gpucnn.data.datasets import DATA_DIR_ENV, FileSpec
from gpucnn.data.idx import DataError
from gpucnn.files import umask

NAME = "cifar10"
BATCHES_DIR = "cifar-10-batches-bin"
ARCHIVE = FileSpec("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530")
MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
SPLIT_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
META_FILE = "batches.meta.txt"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (3, 32, 32)
RECORD_BYTES = 1 + 3 * 32 * 32


def read_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch file: images uint8 (N, 3, 32, 32) and labels int64 (N,); DataError when malformed."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc}).") from None
    if data.size == 0 or data.size % RECORD_BYTES:
        raise DataError(f"{path} is not a CIFAR-10 binary batch: its {data.size:,} bytes are not a whole number "
                        f"of {RECORD_BYTES:,}-byte records (truncated, or another file).")
    records = data.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if int(labels.max()) >= len(CLASSES):
        bad = int(np.flatnonzero(labels >= len(CLASSES))[0])
        raise DataError(f"{path} is not a CIFAR-10 binary batch: record {bad} has label {int(labels[bad])}, but "
                        f"labels are 0-{len(CLASSES) - 1} (is it the CIFAR-100 version, or another file?).")
    images = np.ascontiguousarray(records[:, 1:]).reshape(-1, *IMAGE_SHAPE)
    return images, labels


def write_batch(path, images, labels) -> Path:
    """Write images uint8 (N, 3, 32, 32) and labels (N,) in 0-9 as one binary batch file (for tests and tools)."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE or labels.shape != (len(images),):
        raise ValueError(f"write_batch needs uint8 images (N, 3, 32, 32) and labels (N,), not {images.dtype} "
                         f"{images.shape} and {labels.shape}.")
    if len(labels) and not (0 <= labels.min() and labels.max() < len(CLASSES)):
        raise ValueError("labels must lie in 0-9.")
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
    path = Path(path)
    records.tofile(path)
    return path


def read_class_names(folder) -> tuple[str, ...]:
    """The names in ``batches.meta.txt`` (one per line, blank lines ignored), else the standard ten."""
    meta = Path(folder) / META_FILE
    if not meta.is_file():
        return CLASSES
    names = tuple(line.strip() for line in meta.read_text(encoding="utf-8", errors="replace").splitlines()
                  if line.strip())
    if len(names) != len(CLASSES):
        raise DataError(f"{meta} names {len(names)} classes; CIFAR-10 has {len(CLASSES)}.")
    return names


def _candidate_dirs(data_dir=None, cache_dir=None) -> list[Path]:
    """Folders that may hold the batch files, in priority order."""
    # The MNIST search order, checked there (a missing --data-dir or a bad $GPUCNN_DATA_DIR is an error) ...
    places = datasets._candidate_dirs(NAME, data_dir, cache_dir, what="the CIFAR-10 batch files")
    folders = []
    for place in places:
        # ... where each place may also hold the archive's own folder name.
        for folder in (place / BATCHES_DIR, place):
            if folder not in folders:
                folders.append(folder)
    return folders


def _has_split(folder: Path, split: str) -> bool:
    return all((folder / name).is_file() for name in SPLIT_FILES[split])


def cache_folder(cache_dir=None) -> Path:
    """Where a download unpacks the batch files: ``<cache root>/cifar10/cifar-10-batches-bin``."""
    return datasets.cache_root(cache_dir) / NAME / BATCHES_DIR


def find_cifar10_dir(data_dir=None, split: str = "train", cache_dir=None) -> Path | None:
    """The first folder in the search order holding every file of ``split``; None when none does."""
    datasets._check_split(split)
    for folder in _candidate_dirs(data_dir, cache_dir):
        if _has_split(folder, split):
            return folder
    return None


def _unpack(archive: Path, target: Path) -> None:
    """Copy the batch files and batches.meta.txt out of the archive into ``target``, atomically.

    Only the expected member names are read, as plain files; nothing else in the
    archive is extracted (so no path in it can reach outside the cache).
    """
    wanted = [*SPLIT_FILES["train"], *SPLIT_FILES["test"], META_FILE]
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    staging.chmod(0o777 & ~umask())  # mkdtemp's 0700 would become the data folder's mode
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                for name in wanted:
                    member = members.get(f"{BATCHES_DIR}/{name}")
                    if member is None:
                        raise DataError(f"the downloaded {ARCHIVE.filename} lacks {BATCHES_DIR}/{name}.")
                    with tar.extractfile(member) as src, open(staging / name, "wb") as out:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"cannot unpack {archive} ({exc}); delete it and run again.") from None
        if target.exists():  # an older, incomplete unpack: replaced as a whole
            for leftover in target.iterdir():
                leftover.unlink()
            target.rmdir()
        os.replace(staging, target)
    finally:
        if staging.exists():
            for leftover in staging.iterdir():
                leftover.unlink()
            staging.rmdir()


def download_cifar10(mirrors=None, cache_dir=None, progress=True,
                     timeout: float = datasets.DOWNLOAD_TIMEOUT_S) -> Path:
    """Download and unpack CIFAR-10 into the cache unless it is there; returns the batch folder.

    The archive goes to a temporary ``.part`` file, is checked against its MD5,
    renamed, unpacked into a temporary folder that is renamed in turn, then deleted.
    """
    mirrors = MIRRORS if mirrors is None else tuple(mirrors)
    if not mirrors or not all(isinstance(m, str) and m for m in mirrors):
        raise ValueError(f"mirrors must be a non-empty sequence of base URLs, not {mirrors!r}.")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}.")
    target = cache_folder(cache_dir)
    if _has_split(target, "train") and _has_split(target, "test"):
        return target
    directory = target.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the cache folder {directory} ({exc}); set {datasets.CACHE_DIR_ENV} to a "
                        "writable folder.") from None
    datasets._remove_stale_parts(directory, timeout)
    archive = directory / ARCHIVE.filename
    if not archive.is_file():
        archive = datasets._download_file(ARCHIVE, directory, mirrors, progress, timeout)
    _unpack(archive, target)
    archive.unlink(missing_ok=True)
    return target


def load_cifar10(split: str = "train", data_dir=None, download: bool = True, progress=True, mirrors=None,
                 cache_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """One split of CIFAR-10: images uint8 (N, 3, 32, 32) and labels int64 (N,).

    Searches ``data_dir``, ``$GPUCNN_DATA_DIR`` and the cache (see the module
    docstring); downloads into the cache when none holds the split and
    ``download`` is true, else raises DataError saying where it looked.
    """
    datasets._check_split(split)
    folder = find_cifar10_dir(data_dir, split, cache_dir)
    if folder is None:
        if not download:
            searched = ", ".join(str(d) for d in _candidate_dirs(data_dir, cache_dir))
            raise DataError(f"no CIFAR-10 {split} files ({', '.join(SPLIT_FILES[split])}) found in {searched}; "
                            f"pass the folder holding {BATCHES_DIR}/ as data_dir (--data-dir), set "
                            f"{DATA_DIR_ENV}, or allow downloading.")
        folder = download_cifar10(mirrors=mirrors, cache_dir=cache_dir, progress=progress)
    parts = [read_batch(folder / name) for name in SPLIT_FILES[split]]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return images, labels


def cifar10_classes(data_dir=None, cache_dir=None) -> tuple[str, ...]:
    """The class names of the CIFAR-10 found for the training split (batches.meta.txt), else the standard ten."""
    folder = find_cifar10_dir(data_dir, "train", cache_dir) or find_cifar10_dir(data_dir, "test", cache_dir)
    return read_class_names(folder) if folder is not None else CLASSES
