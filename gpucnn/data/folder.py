"""Image folders in the layout of torchvision's ImageFolder, decoded once and cached as uint8 arrays.

    DIR/train/<class>/<image>     DIR/test/<class>/<image>

Classes are the sub-folders of ``DIR/train``, sorted by name; label i is the
i-th class. ``DIR/test`` may lack some classes but holds no others. Image files
are the suffixes in ``gpucnn.data.images.IMAGE_SUFFIXES`` (other and hidden files
are ignored); each is converted to RGB (or grey) and resized and centre-cropped
to ``image_size`` (see ``gpucnn.data.images``). A training class folder with no
image is an error (nothing to learn the class from); a test one is allowed.

The decoded split is cached in ``<cache root>/folders/<key>/<split>.npz`` (key:
the folder's absolute path, the size and the colour mode) together with a
manifest (every file's relative path, size and modification time); a later load
whose manifest matches the folder's reads the cache instead of decoding, and any
added, removed or changed file makes it decode again. A corrupt image is a
DataError naming it, unless ``skip_bad_images``: then it is left out and counted.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm  # a widget in Jupyter, text in a terminal

from gpucnn.data import datasets
from gpucnn.data.idx import DataError
from gpucnn.files import remove_stale_temporaries, write_atomically
from gpucnn.data.images import is_image_file, read_image, require_pillow

CACHE_SUBDIR = "folders"
CACHE_FORMAT = "gpucnn-image-folder-cache-1"


@dataclass
class FolderSplit:
    """One decoded split: images uint8 (N, C, S, S), labels int64 (N,), the class names, and what was skipped."""
    images: np.ndarray
    labels: np.ndarray
    classes: tuple
    skipped: list            # paths of unreadable images left out (only with skip_bad_images)
    from_cache: bool = False


def folder_classes(root) -> tuple[str, ...]:
    """The class names of an image folder: the sub-folders of ``root/train``, sorted by name."""
    root = Path(root).expanduser()
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{root} is not an image folder: it has no train/ sub-folder (expected "
                        f"{root}/train/<class>/<image> and {root}/test/<class>/<image>).")
    classes = tuple(sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if len(classes) < 2:
        raise DataError(f"{train} holds {len(classes)} class folder{'s' if len(classes) != 1 else ''}; "
                        "a classifier needs at least 2 (one sub-folder per class).")
    return classes


def _classes_of(root: Path, given) -> tuple[tuple[str, ...], str | None]:
    """(the classes, where they came from: None for train/'s sub-folders) of an image folder; ``given``
    (a checkpoint's class names) stand in for them, and must equal them where train/ exists."""
    if given is None:
        return folder_classes(root), None
    given = tuple(given)
    if (root / "train").is_dir() and folder_classes(root) != given:
        raise DataError(f"the image folder's classes {folder_classes(root)} are not the checkpoint's {given}; "
                        "evaluate on a folder whose class folders are the checkpoint's classes.")
    return given, "the checkpoint"


def _scan(root: Path, split: str, classes, source=None) -> tuple[list[tuple[str, int, int, int]], list[str]]:
    """(relative path, label, size, mtime_ns) of every image file of the split, in class then name order,
    and the relative paths of image names that are no regular file (a broken link, a FIFO): bad images.

    ``source`` names where the classes came from (default: the folder's train/).
    """
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{root} has no {split}/ sub-folder (expected {folder}/<class>/<image>).")
    unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and p.name not in classes)
    if unknown:
        if source is not None:
            raise DataError(f"{folder} holds class folder(s) {', '.join(unknown)} that {source} lacks "
                            f"(its classes: {', '.join(classes)}).")
        raise DataError(f"{folder} holds class folder(s) {', '.join(unknown)} that {root / 'train'} lacks; "
                        "the classes come from train/.")
    entries, unreadable = [], []
    for label, name in enumerate(classes):
        class_dir = folder / name
        named = sorted(p for p in class_dir.iterdir() if is_image_file(p)) if class_dir.is_dir() else []
        files = [p for p in named if p.is_file()]
        unreadable += [str(p.relative_to(root)) for p in named if not p.is_file() and not p.is_dir()]
        if not files and split == "train":
            raise DataError(f"class folder {class_dir} holds no image files; add images or remove the folder.")
        for path in files:
            stat = path.stat()
            entries.append((str(path.relative_to(root)), label, stat.st_size, stat.st_mtime_ns))
    if not entries:
        raise DataError(f"{folder} holds no image files.")
    return entries, unreadable


def _cache_path(root: Path, split: str, image_size: int, grey: bool, cache_dir=None) -> Path:
    key = hashlib.sha256(f"{root.resolve()}|{image_size}|{'L' if grey else 'RGB'}".encode()).hexdigest()[:16]
    return datasets.cache_root(cache_dir) / CACHE_SUBDIR / key / f"{split}.npz"


def _read_cache(path: Path, manifest: dict, shape) -> tuple[np.ndarray, np.ndarray, list] | None:
    """(images, labels, skipped) from the cache when it was written for exactly this manifest, else None.

    ``shape`` is (C, S, S) of one image. A damaged cache (cut short, a flipped bit: the
    npz's CRC catches it, a damaged header) warns and gives None: the images are decoded again.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored = json.loads(str(npz["manifest"]))
            if stored != manifest:
                return None
            images, labels = npz["images"], npz["labels"].astype(np.int64)
            skipped = list(json.loads(str(npz["skipped"])))
    except (FileNotFoundError, NotADirectoryError):
        return None   # no cache yet
    except Exception as exc:  # noqa: BLE001 - zipfile, NumPy's header parser and json raise many kinds
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    else:
        expected = len(manifest["files"]) - (len(skipped) - len(manifest["unreadable"]))  # decoding failures
        if images.dtype == np.uint8 and images.shape == (expected, *shape) and labels.shape == (expected,) and \
                (expected == 0 or 0 <= labels.min() <= labels.max() < len(manifest["classes"])):
            return images, labels, skipped
        reason = f"it holds images {images.dtype} {images.shape} and labels {labels.shape}, not {expected} images"
    warnings.warn(f"the image cache {path} is damaged ({reason}); decoding the images again.", stacklevel=3)
    return None


def _write_cache(path: Path, manifest: dict, images, labels, skipped) -> None:
    """Write the cache file atomically and durably (fsynced); a failure only warns (the data are fine)."""
    def write(f):
        np.savez(f, manifest=np.array(json.dumps(manifest)), images=images, labels=labels,
                 skipped=np.array(json.dumps(skipped)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, write)
        remove_stale_temporaries(path)  # a run killed while writing the cache left one behind
    except OSError as exc:
        warnings.warn(f"could not cache the decoded images in {path.parent} ({exc}); the next run decodes "
                      f"them again (set {datasets.CACHE_DIR_ENV} to a writable folder).", stacklevel=3)


def load_image_folder(root, split: str = "train", image_size: int = 32, grey: bool = False,
                      skip_bad_images: bool = False, cache_dir=None, use_cache: bool = True,
                      progress=False, classes=None) -> FolderSplit:
    """Load ``root/<split>/<class>/*`` as uint8 (N, C, image_size, image_size) with C = 3 (RGB) or 1 (grey).

    See the module docstring for the layout, the cache and bad images. ``progress``
    shows a tqdm bar (on stderr) while images are decoded. ``classes`` (a checkpoint's
    class names) label the images in place of train/'s sub-folders: train/ may then be
    missing, but where it exists its classes must be these.
    """
    datasets._check_split(split)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, not {image_size!r}.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder.")
    classes, source = _classes_of(root, classes)
    entries, unreadable = _scan(root, split, classes, source)
    if unreadable and not skip_bad_images:  # before: left out without a word
        raise DataError(f"cannot read image {root / unreadable[0]}: it is a broken link or not a regular file"
                        f"{f' ({len(unreadable)} such)' if len(unreadable) > 1 else ''}. Fix or remove it, or pass "
                        "--skip-bad-images to leave such files out.")
    manifest = {"format": CACHE_FORMAT, "classes": list(classes), "image_size": image_size, "grey": bool(grey),
                "skip_bad_images": bool(skip_bad_images), "files": [list(e) for e in entries],
                "unreadable": unreadable}
    cache = _cache_path(root, split, image_size, grey, cache_dir)
    if use_cache:
        cached = _read_cache(cache, manifest, (1 if grey else 3, image_size, image_size))
        if cached is not None:
            return FolderSplit(*cached[:2], classes, cached[2], from_cache=True)

    require_pillow()
    channels = 1 if grey else 3
    images = np.empty((len(entries), channels, image_size, image_size), np.uint8)
    labels = np.empty(len(entries), np.int64)
    kept, skipped = 0, list(unreadable)
    for relative, label, _, _ in tqdm(entries, desc=f"decoding {split} images", unit="image",
                                      disable=not progress, leave=False):
        try:
            images[kept] = read_image(root / relative, size=image_size, grey=grey)
        except DataError as exc:
            if not skip_bad_images:
                raise DataError(f"{exc} Fix or remove the file, or pass --skip-bad-images to leave such "
                                "files out.") from None
            skipped.append(relative)
            continue
        labels[kept] = label
        kept += 1
    if kept == 0:
        raise DataError(f"no image of {root / split} could be read ({len(skipped)} skipped).")
    images, labels = images[:kept], labels[:kept]
    if use_cache:
        _write_cache(cache, manifest, images, labels, skipped)
    return FolderSplit(images, labels, classes, skipped)
