"""MNIST and Fashion-MNIST: where to find them, how to download them, how to load them.

``load_dataset`` looks for a split's two IDX files in this order and uses the
first folder that holds both:

1. the ``data_dir`` argument (the CLI's ``--data-dir``): ``<data_dir>/<name>/`` or ``<data_dir>/``;
2. ``$GPUCNN_DATA_DIR``: ``<dir>/<name>/`` or ``<dir>/``;
3. the user cache ``~/.cache/gpucnn/<name>`` (root overridden by ``$GPUCNN_CACHE_DIR``
   or the ``cache_dir`` argument), where downloads land after an MD5 check;
4. ``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist`` package);
5. otherwise the files are downloaded into the cache from the mirrors in order.

Files found in folders are checked structurally (magic, dimensions, lengths,
labels in range, as many labels as images), not by checksum, so any data set in
MNIST's file layout can be used. Both ``.gz`` and uncompressed names are accepted.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm  # a widget in Jupyter, text in a terminal

from gpucnn import __version__, backend
from gpucnn.data.idx import DataError, read_idx
from gpucnn.files import umask

SPLITS = ("train", "test")
DATA_DIR_ENV = "GPUCNN_DATA_DIR"
CACHE_DIR_ENV = "GPUCNN_CACHE_DIR"
DEFAULT_CACHE_ROOT = Path("~/.cache/gpucnn")
# Where Debian's dataset packages install their files; tests point it elsewhere.
SYSTEM_DATA_ROOT = Path("/usr/share/datasets")
DOWNLOAD_TIMEOUT_S = 30.0
DOWNLOAD_CHUNK_BYTES = 1 << 16
# A .part file unchanged for this long (and for twice the download timeout) belongs to a download that
# died (a killed process cannot delete it); the next download into that folder removes it.
STALE_PART_S = 600.0


@dataclass(frozen=True)
class FileSpec:
    """One distributed file: its name (as on the mirrors) and the MD5 of those bytes."""
    filename: str
    md5: str


@dataclass(frozen=True)
class DatasetSpec:
    """Everything gpucnn knows about one data set in MNIST's file layout."""
    name: str
    files: dict              # "train-images", "train-labels", "test-images", "test-labels" -> FileSpec
    mirrors: tuple           # base URLs, tried in order
    mean: float              # of the training pixels scaled to [0, 1]
    std: float
    classes: tuple           # class names, index = label
    image_shape: tuple = (28, 28)
    system_package: str | None = None  # the Debian package that installs it, if any

    def split_files(self, split: str) -> tuple[FileSpec, FileSpec]:
        """(images, labels) FileSpecs of ``"train"`` or ``"test"``."""
        return self.files[f"{split}-images"], self.files[f"{split}-labels"]


MNIST_FILES = {"train-images": "train-images-idx3-ubyte.gz", "train-labels": "train-labels-idx1-ubyte.gz",
               "test-images": "t10k-images-idx3-ubyte.gz", "test-labels": "t10k-labels-idx1-ubyte.gz"}


def _mnist_spec(name: str, md5s: tuple, mirrors: tuple, mean: float, std: float, classes: tuple,
                **extra) -> DatasetSpec:
    """A DatasetSpec in MNIST's file layout; ``md5s`` in MNIST_FILES order."""
    files = {key: FileSpec(filename, md5) for (key, filename), md5 in zip(MNIST_FILES.items(), md5s, strict=True)}
    return DatasetSpec(name, files, mirrors, mean, std, classes, **extra)


DATASETS = {
    "mnist": _mnist_spec(
        "mnist", ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                  "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        mean=0.1307, std=0.3081, classes=tuple(str(digit) for digit in range(10))),
    "fashion-mnist": _mnist_spec(
        "fashion-mnist", ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                          "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        mean=0.2860, std=0.3530, system_package="dataset-fashion-mnist",
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")),
}


def get_spec(name: str) -> DatasetSpec:
    """The DatasetSpec registered in DATASETS under ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, not {type(name).__name__}.")
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}.")
    return DATASETS[name]


def _check_split(split) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}.")


def cache_root(cache_dir=None) -> Path:
    """The cache root: ``cache_dir``, else ``$GPUCNN_CACHE_DIR``, else ``~/.cache/gpucnn``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_DIR_ENV, "").strip()
    return Path(env).expanduser() if env else DEFAULT_CACHE_ROOT.expanduser()


def _candidate_dirs(name: str, data_dir=None, cache_dir=None, what: str = "the IDX files") -> list[Path]:
    """The folders searched for ``name``'s files, in priority order (``what`` names the files in errors)."""
    candidates = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"data directory {root} does not exist or is not a folder; "
                            f"pass a folder holding {what}.")
        candidates += [root / name, root]
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataError(f"{DATA_DIR_ENV}={env} is not a folder; point it at a folder holding "
                            f"{what} or unset it.")
        candidates += [root / name, root]
    candidates += [cache_root(cache_dir) / name, Path(SYSTEM_DATA_ROOT) / name]
    return candidates


def _local_file(directory: Path, file_spec: FileSpec) -> Path | None:
    """The file in ``directory`` under its uncompressed or its ``.gz`` name, if either exists."""
    names = [file_spec.filename]
    if file_spec.filename.endswith(".gz"):
        names.insert(0, file_spec.filename[:-3])  # uncompressed first: it reads faster
    for filename in names:
        if (directory / filename).is_file():
            return directory / filename
    return None


def _split_paths(directory: Path, spec: DatasetSpec, split: str) -> tuple[Path, Path] | None:
    """(images path, labels path) of ``split`` when ``directory`` holds both, else None."""
    images, labels = (_local_file(directory, f) for f in spec.split_files(split))
    return (images, labels) if images is not None and labels is not None else None


def find_dataset_dir(name: str, data_dir=None, *, split: str | None = None, cache_dir=None) -> Path | None:
    """The first folder in the search order holding both files of ``split`` (of any split when None).

    Returns None when no folder does; nothing is downloaded or read.
    """
    spec = get_spec(name)
    if split is not None:
        _check_split(split)
    splits = SPLITS if split is None else (split,)
    for directory in _candidate_dirs(name, data_dir, cache_dir):
        if any(_split_paths(directory, spec, s) is not None for s in splits):
            return directory
    return None


def _load_split(images_path: Path, labels_path: Path, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Read and structurally validate one split: uint8 (N, H, W) images and int64 (N,) labels."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != tuple(spec.image_shape):
        raise DataError(f"{images_path} holds {images.dtype} values of shape {images.shape}, but {spec.name} "
                        f"images are uint8 of shape (N, {spec.image_shape[0]}, {spec.image_shape[1]}); "
                        "check that the folder holds the right files.")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{labels_path} holds {labels.dtype} values of shape {labels.shape}, but labels are "
                        "uint8 of shape (N,); check that the folder holds the right files.")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
                        "labels; the two files come from different data sets or splits.")
    if len(labels) and int(labels.max()) >= len(spec.classes):
        raise DataError(f"{labels_path} contains label {int(labels.max())}, but {spec.name} has "
                        f"{len(spec.classes)} classes (0..{len(spec.classes) - 1}); check that the folder "
                        "holds the right files.")
    return images, labels.astype(np.int64)


def _fetch(url: str, part: Path, file_spec: FileSpec, progress, timeout: float) -> None:
    """Download ``url`` into ``part``, checking the length and the MD5; raises DataError on failure."""
    request = urllib.request.Request(url, headers={"User-Agent": f"gpucnn/{__version__}"})
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as out:
        length = response.headers.get("Content-Length")
        expected_size = int(length) if length and length.isdigit() else None
        bar_file = progress if hasattr(progress, "write") else None
        with tqdm(total=expected_size, unit="B", unit_scale=True, unit_divisor=1024, desc=file_spec.filename,
                  disable=not progress, file=bar_file, leave=False) as bar:
            while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
                _write_part(out, chunk, part)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            _write_part(out, b"", part)  # flushed here: a full disk shows now, not at close
    # http.client returns a short body without complaint when the server hangs up early.
    if expected_size is not None and received != expected_size:
        raise DataError(f"the connection closed after {received} of {expected_size} bytes")
    got = digest.hexdigest()
    if got != file_spec.md5.lower():
        raise DataError(f"checksum mismatch for {file_spec.filename}: expected MD5 {file_spec.md5}, got {got} "
                        "(the mirror served a different or damaged file)")


class CacheWriteError(DataError):
    """The download could not be written to the cache (a full disk): no other mirror can help."""


def _write_part(out, chunk: bytes, part: Path) -> None:
    """Write (and, for an empty chunk, flush) downloaded bytes; a local failure is a CacheWriteError."""
    try:
        if chunk:
            out.write(chunk)
        else:
            out.flush()
    except OSError as exc:
        raise CacheWriteError(f"cannot write the download to {part} ({exc.strerror or exc}); free some space "
                              f"there, or set {CACHE_DIR_ENV} to a folder with room.") from None


def _remove_stale_parts(directory: Path, timeout: float) -> None:
    """Delete ``*.part`` files of dead downloads; a live one writes at least every ``timeout`` seconds."""
    cutoff = time.time() - max(STALE_PART_S, 2 * timeout)
    for part in directory.glob("*.part"):
        try:
            if part.is_file() and part.stat().st_mtime < cutoff:
                part.unlink()
        except OSError:
            pass  # gone already, or not ours to delete: it is never read either way


def _download_file(file_spec: FileSpec, directory: Path, mirrors, progress, timeout: float) -> Path:
    """Fetch one file into ``directory`` from the first mirror that delivers the right bytes."""
    target = directory / file_spec.filename
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + file_spec.filename
        # A unique partial name, so two processes filling the same cache cannot mix their bytes.
        try:
            fd, part_name = tempfile.mkstemp(prefix=f"{file_spec.filename}.", suffix=".part", dir=directory)
        except OSError as exc:
            raise DataError(f"cannot write to the cache folder {directory} ({exc}); set {CACHE_DIR_ENV} to a "
                            "writable folder.") from None
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp's 0600 would become the cached file's mode
        os.close(fd)
        part = Path(part_name)
        try:
            _fetch(url, part, file_spec, progress, timeout)
            os.replace(part, target)
            return target
        except CacheWriteError:
            raise  # the disk, not the mirror: another mirror would fail the same way
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError and DataError included
            failures.append(f"{url}: {exc}")
        finally:
            part.unlink(missing_ok=True)
    tried = "; ".join(failures)
    raise DataError(f"could not download {file_spec.filename}: every mirror failed ({tried}); check the "
                    "network connection or the mirrors, or put the files in a folder and pass it as data_dir "
                    f"(--data-dir) or {DATA_DIR_ENV}.")


def download_dataset(name: str, split: str | None = None, mirrors=None, cache_dir=None, progress=True,
                     timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download the files of ``split`` (both splits when None) missing from the cache; returns the cache folder.

    Each file goes to a ``.part`` file in the cache folder, is checked against
    its MD5, then moved into place; on any failure the partial is deleted and the
    next mirror is tried. A ``.part`` file is never read; one left by a killed
    process is deleted by a later download once it is stale (STALE_PART_S).
    ``progress`` is a bool or a text stream for the tqdm bar.
    """
    spec = get_spec(name)
    if split is not None:
        _check_split(split)
    mirrors = spec.mirrors if mirrors is None else tuple(mirrors)
    if not mirrors or not all(isinstance(m, str) and m for m in mirrors):
        raise ValueError(f"mirrors must be a non-empty sequence of base URLs, not {mirrors!r}.")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}.")
    directory = cache_root(cache_dir) / spec.name
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the cache folder {directory} ({exc}); set {CACHE_DIR_ENV} to a "
                        "writable folder.") from None
    _remove_stale_parts(directory, timeout)
    for s in SPLITS if split is None else (split,):
        for file_spec in spec.split_files(s):
            if _local_file(directory, file_spec) is None:
                _download_file(file_spec, directory, mirrors, progress, timeout)
    return directory


def load_dataset(name: str, split: str = "train", data_dir=None, download: bool = True, progress=True,
                 mirrors=None, cache_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of a data set: images uint8 (N, 28, 28) and labels int64 (N,).

    Searches ``data_dir``, ``$GPUCNN_DATA_DIR``, the cache and ``/usr/share/datasets``
    (see the module docstring); downloads into the cache when none holds the
    split and ``download`` is true, else raises DataError saying where it looked.
    ``progress`` is a bool or a text stream for the download progress bar;
    ``mirrors`` (base URLs) replaces the data set's own list; ``cache_dir``
    replaces the cache root.
    """
    spec = get_spec(name)
    _check_split(split)
    searched = _candidate_dirs(spec.name, data_dir, cache_dir)
    for directory in searched:
        paths = _split_paths(directory, spec, split)
        if paths is not None:
            return _load_checked(paths, spec, cached=directory == cache_root(cache_dir) / spec.name)
    if not download:
        images_file, labels_file = (f.filename for f in spec.split_files(split))
        package = f", install the Debian package {spec.system_package}" if spec.system_package else ""
        raise DataError(f"no {spec.name} {split} files ({images_file}, {labels_file}, or without .gz) found in "
                        f"{', '.join(str(d) for d in searched)}; pass a folder holding them as data_dir "
                        f"(--data-dir), set {DATA_DIR_ENV}{package}, or allow downloading.")
    directory = download_dataset(spec.name, split, mirrors=mirrors, cache_dir=cache_dir, progress=progress)
    return _load_checked(_split_paths(directory, spec, split), spec, cached=True)


def _load_checked(paths: tuple[Path, Path], spec: DatasetSpec, cached: bool) -> tuple[np.ndarray, np.ndarray]:
    """``_load_split``; a damaged file in the download cache gets the way out added to the message."""
    try:
        return _load_split(*paths, spec)
    except DataError as exc:
        if not cached:
            raise
        raise DataError(f"{exc} These files are gpucnn's cached download: delete {paths[0]} and {paths[1]} "
                        "and run again to download them afresh.") from None


def normalize(images, mean, std):
    """uint8 images (N, H, W) or (N, C, H, W) -> float32 (N, C, H, W) holding ``(images / 255 - mean) / std``.

    Grey (N, H, W) images get a channel axis (C = 1). ``mean`` and ``std`` are one
    number for every channel or one per channel (a sequence of length C), e.g. the
    training split's ``gpucnn.data.channel_stats``. Works on NumPy or CuPy arrays;
    the result lives on the same device.
    """
    if not hasattr(images, "dtype") or not hasattr(images, "ndim"):
        raise TypeError(f"normalize needs a NumPy or CuPy array, not {type(images).__name__}.")
    if images.dtype != np.uint8:
        raise TypeError(f"normalize expects uint8 images, not {images.dtype}.")
    if images.ndim not in (3, 4):
        raise ValueError(f"normalize expects images of shape (N, H, W) or (N, C, H, W), not {tuple(images.shape)}.")
    out = images.astype(np.float32)
    if images.ndim == 3:
        out = out.reshape(images.shape[0], 1, *images.shape[1:])
    out *= np.float32(1.0 / 255.0)
    return standardize(out, mean, std, copy=False)


def standardize(pixels, mean, std, copy: bool = True):
    """float32 pixels in [0, 1] (N, C, H, W) -> ``(pixels - mean) / std``, on the pixels' device.

    ``mean`` and ``std`` are one number for every channel or one per channel (C).
    ``copy=False`` works in place (``normalize`` passes the copy it made).
    """
    C = pixels.shape[1]
    means, stds = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (mean, std))
    for name, values in (("mean", means), ("std", stds)):
        if values.ndim != 1 or len(values) not in (1, C):
            raise ValueError(f"normalize needs one {name} or one per channel ({C}), not {np.asarray(values).tolist()}.")
    if not np.isfinite(means).all() or not np.isfinite(stds).all() or (stds <= 0).any():
        raise ValueError(f"normalize needs a finite mean and a positive finite std, not mean={means.tolist()}, "
                         f"std={stds.tolist()}.")
    xp = backend.get_array_module(pixels)
    out = pixels.astype(np.float32, copy=copy)
    out -= xp.asarray(means.astype(np.float32).reshape(1, len(means), 1, 1))
    out /= xp.asarray(stds.astype(np.float32).reshape(1, len(stds), 1, 1))
    return out


def channel_stats(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of uint8 images (N, H, W) or (N, C, H, W), as pixels scaled to [0, 1].

    Exact (from a 256-bin histogram per channel, so no float sums over millions of
    pixels); a channel with no spread gets std 1, so normalising it cannot divide by 0.
    """
    images = backend.to_numpy(images)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim not in (3, 4) \
            or images.shape[0] == 0:
        raise ValueError("channel_stats needs a non-empty uint8 array of shape (N, H, W) or (N, C, H, W).")
    if images.ndim == 3:
        images = images[:, None]
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(np.ascontiguousarray(images[:, c]).reshape(-1), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float((counts * levels).sum() / total)
        var = float((counts * (levels - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(var ** 0.5 if var > 0 else 1.0)
    return tuple(means), tuple(stds)
