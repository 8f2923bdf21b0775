"""What the commands need to know about a run's data: loading, normalising, and the checkpoint record.

``train`` stores ``data_record(...)`` in the checkpoint's config: the data set,
its class names, the per-channel normalisation of its training split and, for
image folders, the image size, colour mode and the folder itself (its absolute
path, so the other commands find it without ``--data-dir`` while it exists). ``evaluate``, ``predict``,
``visualize`` and ``features`` read it back with ``DataSettings.from_config`` so
they feed the model exactly what it was trained on. Checkpoints written before
the record existed (MNIST family only) get the data set's published statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpucnn.checkpoint import CheckpointError
from gpucnn.data import DATASETS, channel_stats, load_split, normalize, standardize
from gpucnn.data.sources import FOLDER, check_dataset, default_classes, native_input_shape
from gpucnn.models import default_input_shape


@dataclass
class DataSettings:
    """How a model sees its data: data set, classes, mean/std per channel, input (C, H, W), folder image mode."""
    dataset: str
    classes: tuple
    mean: tuple
    std: tuple
    input_shape: tuple
    image_size: int | None = None   # image folders: the resize target
    grey: bool = False              # image folders: read as grey
    folder: str | None = None       # image folders: the absolute path trained on

    def record(self) -> dict:
        """The JSON-able entries train adds to the checkpoint config."""
        image = {"size": self.image_size, "grey": self.grey, "shape": list(self.input_shape)}
        if self.folder is not None:
            image["folder"] = self.folder
        return {"dataset": self.dataset, "classes": list(self.classes),
                "normalization": {"mean": list(self.mean), "std": list(self.std)}, "image": image}

    def remembered_folder(self, where: str = "the checkpoint") -> Path:
        """The image folder this model was trained on; ValueError when none is recorded or it is gone."""
        if self.folder is None:
            raise ValueError(f"{where} does not record its image folder (trained before gpucnn remembered it); "
                             "pass --data-dir DIR.")
        folder = Path(self.folder)
        if not folder.is_dir():
            raise ValueError(f"the image folder {folder} that {where} was trained on is gone; pass --data-dir DIR.")
        return folder

    @classmethod
    def from_config(cls, config: dict, where: str = "the checkpoint") -> "DataSettings":
        """The settings recorded by train in a checkpoint's config (older MNIST checkpoints: the defaults)."""
        config = config or {}
        dataset = config.get("dataset")
        if not isinstance(dataset, str):
            raise ValueError(f"{where} does not say which data set it was trained on; pass --dataset.")
        check_dataset(dataset)
        model_config = config.get("model") or {}
        C, H, _ = default_input_shape(model_config.get("name", "lenet5"))
        size = model_config.get("input_size", H)
        model_shape = (model_config.get("in_channels", C), size, size)
        normalization = config.get("normalization")
        image = config.get("image") or {}
        if normalization is None:
            if dataset not in DATASETS:
                raise ValueError(f"{where} holds no normalisation statistics for {dataset}.")
            spec = DATASETS[dataset]
            mean, std = (spec.mean,), (spec.std,)
        else:
            try:
                mean, std = tuple(normalization["mean"]), tuple(normalization["std"])
            except (TypeError, KeyError):
                raise CheckpointError(f"{where} is damaged: its normalisation record is malformed.") from None
        classes = tuple(config.get("classes") or default_classes(dataset) or ())
        if not classes:
            raise ValueError(f"{where} does not record the class names of its image folder.")
        shape = tuple(image.get("shape") or model_shape)
        _check_record(where, classes, model_config.get("num_classes"), mean, std)
        return cls(dataset, classes, mean, std, shape, image.get("size"), bool(image.get("grey", False)),
                   image.get("folder"))


def _check_record(where, classes, num_classes, mean, std) -> None:
    """CheckpointError unless the class names fit the model's outputs and the statistics are usable numbers."""
    if not all(isinstance(name, str) for name in classes):
        raise CheckpointError(f"{where} is damaged: its class names are not all text.")
    if isinstance(num_classes, int) and len(classes) != num_classes:
        raise CheckpointError(f"{where} is damaged: it names {len(classes)} classes but its model has "
                              f"{num_classes} outputs.")
    numbers = [*mean, *std]
    if not mean or len(mean) != len(std) or not all(isinstance(v, (int, float)) and math.isfinite(v)
                                                    for v in numbers) or min(std) <= 0:
        raise CheckpointError(f"{where} is damaged: its normalisation statistics (mean {list(mean)}, std "
                              f"{list(std)}) are not finite numbers with positive std.")


def checkpoint_settings(ckpt: dict, checkpoint, dataset=None) -> DataSettings:
    """The data settings stored in a loaded checkpoint (``dataset`` stands in where it names none)."""
    config = dict(ckpt.get("config") or {})
    if dataset is not None and "dataset" not in config:
        config["dataset"] = dataset
    return DataSettings.from_config(config, where=f"checkpoint {checkpoint}")


def _describe_skipped(split, skipped) -> str:
    if not skipped:
        return ""
    return f"; skipped {len(skipped)} unreadable {split} image{'s' if len(skipped) != 1 else ''} (first: {skipped[0]})"


@dataclass
class TrainingData:
    """Normalised splits, ready for Trainer.fit, plus the settings and a console line."""
    train: tuple
    test: tuple
    settings: DataSettings
    summary: str
    val: tuple | None = None    # the validation split held out of the training images (--val-split)

    @property
    def model_kwargs(self) -> dict:
        C, H, _ = self.settings.input_shape
        return {"num_classes": len(self.settings.classes), "in_channels": C, "input_size": H}


def hold_out(images, labels, fraction: float, seed: int):
    """((train images, labels), (validation images, labels)): ``fraction`` of the images, drawn by ``seed``.

    The same (images, fraction, seed) always give the same split, so a resumed run holds out the same images;
    both parts keep the images' order.
    """
    n = len(labels)
    n_val = int(round(n * fraction))
    if not 1 <= n_val < n:
        raise ValueError(f"--val-split {fraction} of {n} training images leaves {n_val} for validation and "
                         f"{n - n_val} for training; each needs at least one.")
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return (images[~chosen], labels[~chosen]), (images[chosen], labels[chosen])


def training_data(dataset, model_name, data_dir=None, download=True, progress=True, image_size=None, grey=False,
                  skip_bad_images=False, stored: DataSettings | None = None, val_split=None,
                  seed: int = 0) -> TrainingData:
    """Both splits of ``dataset`` for training ``model_name``, normalised with the training split's statistics.

    ``stored`` (a resumed run's settings) fixes the image mode and the statistics. ``val_split`` (a
    fraction) holds out that share of the training images, drawn by ``seed``, as a validation split;
    the statistics then come from the rest.
    """
    check_dataset(dataset)
    if dataset != FOLDER and (image_size is not None or grey):
        raise ValueError("--image-size and --grey apply to --dataset folder only; "
                         f"{dataset} images are {'x'.join(map(str, native_input_shape(dataset)))}.")
    if stored is not None and stored.dataset == FOLDER:
        if (image_size is not None and image_size != stored.image_size) or (grey and not stored.grey):
            raise ValueError(f"a resumed run keeps its image settings ({stored.image_size}x{stored.image_size}, "
                             f"{'grey' if stored.grey else 'RGB'}); drop --image-size and --grey.")
        image_size, grey = stored.image_size, stored.grey
        if data_dir is None:
            data_dir = stored.remembered_folder()
    if dataset == FOLDER and image_size is None:
        image_size = default_input_shape(model_name)[1]
    options = dict(data_dir=data_dir, download=download, progress=progress, image_size=image_size, grey=grey,
                   skip_bad_images=skip_bad_images)
    train, test = load_split(dataset, "train", **options), load_split(dataset, "test", **options)
    if test.classes != train.classes:
        raise ValueError(f"the {dataset} test split has classes {test.classes}, the training split {train.classes}.")
    if stored is not None and tuple(train.classes) != tuple(stored.classes):
        raise ValueError(f"the training data's classes {tuple(train.classes)} are not the resumed run's "
                         f"{tuple(stored.classes)} (renamed, added or removed class folders would relabel the "
                         "images); resume on the data the run started with.")
    train_images, train_labels, val = train.images, train.labels, None
    if val_split:
        (train_images, train_labels), val = hold_out(train_images, train_labels, val_split, seed)
    if stored is not None:
        mean, std = stored.mean, stored.std
    else:
        mean, std = channel_stats(train_images)
    input_shape = tuple(train.images.shape[1:])
    folder = str(Path(data_dir).resolve()) if dataset == FOLDER and data_dir is not None else None
    settings = DataSettings(dataset, train.classes, tuple(mean), tuple(std), input_shape,
                            image_size if dataset == FOLDER else None, bool(grey) if dataset == FOLDER else False,
                            folder)
    cached = " (decoded earlier, read from the cache)" if train.from_cache and test.from_cache else ""
    held = f" ({len(val[1]):,} more held out for validation)" if val is not None else ""
    summary = (f"data: {dataset}, {len(train_labels):,} training{held} and {len(test.labels):,} test images of "
               f"{'x'.join(map(str, input_shape))}, {len(train.classes)} classes{cached}"
               f"{_describe_skipped('training', train.skipped)}{_describe_skipped('test', test.skipped)}")
    return TrainingData((normalize(train_images, mean, std), train_labels),
                        (normalize(test.images, mean, std), test.labels), settings, summary,
                        None if val is None else (normalize(val[0], mean, std), val[1]))


def evaluation_data(settings: DataSettings, dataset=None, split="test", data_dir=None, download=True, progress=True,
                    skip_bad_images=False, limit=None):
    """(images normalised as in training (N, C, H, W), labels (N,), dataset name, console note) of one split.

    ``dataset`` (default: the checkpoint's) must give images of the model's input
    shape; an image folder is read with the checkpoint's image size and colour mode,
    from ``data_dir`` or else from the folder the checkpoint was trained on.
    """
    dataset = dataset or settings.dataset
    check_dataset(dataset)
    remembered = dataset == FOLDER == settings.dataset and data_dir is None
    if remembered:
        data_dir = settings.remembered_folder()
    if dataset == FOLDER:
        C, H, _ = settings.input_shape
        image_size, grey = settings.image_size or H, C == 1
    else:
        image_size, grey = None, False
        native = native_input_shape(dataset)
        if native != tuple(settings.input_shape):
            raise ValueError(f"the checkpoint's model takes {'x'.join(map(str, settings.input_shape))} images, but "
                             f"{dataset} images are {'x'.join(map(str, native))}.")
    # An image folder is labelled by the checkpoint's class names: its test/ needs no train/ beside it,
    # and class folders the checkpoint does not know are refused, not scored under other names.
    part = load_split(dataset, split, data_dir=data_dir, download=download, progress=progress,
                      image_size=image_size, grey=grey, skip_bad_images=skip_bad_images,
                      classes=tuple(settings.classes) if dataset == FOLDER else None)
    if len(part.classes) != len(settings.classes):
        raise ValueError(f"{dataset} has {len(part.classes)} classes but the checkpoint's model "
                         f"{len(settings.classes)}; it cannot score them.")
    images, labels = part.images, part.labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    note = _describe_skipped(split, part.skipped).lstrip("; ")
    if remembered:
        note = "; ".join(filter(None, [f"images from {data_dir}, the checkpoint's folder", note]))
    return normalize(images, settings.mean, settings.std), labels, dataset, note


def normalize_pixels(pixels, settings: DataSettings):
    """Floats in [0, 1] (N, C, H, W) -> the model's input, with the checkpoint's statistics."""
    return standardize(pixels, settings.mean, settings.std)
