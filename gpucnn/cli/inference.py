"""``gpucnn evaluate`` and ``gpucnn predict``: a checkpoint's model on a test split or on image files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import click
import numpy as np

from gpucnn import backend
from gpucnn.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from gpucnn.cli import data as cli_data
from gpucnn.cli.options import (data_dir_option, dataset_option, device_option, skip_bad_images_option,
                                use_device)
from gpucnn.data import read_model_input
from gpucnn.grad_mode import no_grad
from gpucnn.metrics import confusion_matrix, per_class_accuracy
from gpucnn.ops.loss import softmax
from gpucnn.train import evaluate


def _load_model(checkpoint, device):
    """(model on the device, the checkpoint dict)."""
    ckpt = load_checkpoint(checkpoint)
    return model_from_checkpoint(ckpt, device), ckpt


@click.command(name="evaluate")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@dataset_option()
@data_dir_option
@skip_bad_images_option
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=500, show_default=True,
              help="Images per batch (one forward pass).")
@click.option("--no-download", is_flag=True, help="Fail instead of downloading missing data.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (loss, accuracy, per-class accuracy, confusion matrix) for scripts.")
def evaluate_command(checkpoint, dataset, data_dir, skip_bad_images, device, batch_size, no_download, as_json):
    """Print a checkpoint's test loss and accuracy, each class's accuracy, and the confusion matrix.

    Images are normalised with the statistics stored in the checkpoint; classes are
    named as in its training data. Row i of the confusion matrix counts the images of
    class i by the class they were predicted as (the diagonal is right).

    \b
    Examples:
      gpucnn evaluate runs/fm/checkpoint.npz --device cpu
      gpucnn evaluate runs/fm/best.npz --json > results.json
    """
    resolved = use_device(device, echo=not as_json)
    network, ckpt = _load_model(checkpoint, resolved)
    settings = cli_data.checkpoint_settings(ckpt, checkpoint, dataset)
    images, labels, dataset, note = cli_data.evaluation_data(settings, dataset, "test", data_dir,
                                                             download=not no_download,
                                                             skip_bad_images=skip_bad_images)
    if note:
        click.echo(note, err=True)
    x = backend.to_device(images, resolved)
    result = evaluate(network, x, backend.to_device(labels, resolved), batch_size, return_predictions=True)
    classes = _class_names(settings.classes, dataset, network)
    matrix = confusion_matrix(labels, result["predictions"], len(classes))
    per_class = per_class_accuracy(labels, result["predictions"], len(classes))
    if as_json:
        click.echo(json.dumps({
            "checkpoint": str(checkpoint), "dataset": dataset, "split": "test", "images": len(labels),
            "epoch": ckpt.get("epoch"), "loss": result["loss"], "accuracy": result["accuracy"],
            "classes": list(classes), "class_images": matrix.sum(axis=1).tolist(),
            "per_class_accuracy": [None if math.isnan(v) else float(v) for v in per_class],
            "confusion_matrix": matrix.tolist()}))
        return
    click.echo(f"{dataset} test: loss {result['loss']:.4f}  accuracy {result['accuracy']:.2%}  "
               f"({len(labels):,} images, epoch {ckpt.get('epoch')})")
    for line in per_class_lines(classes, per_class, matrix) + confusion_lines(classes, matrix):
        click.echo(line)


def _class_names(stored, dataset: str, network) -> tuple:
    """The checkpoint's class names, or the numbers 0..K-1 when evaluated on a data set not its own."""
    K = network.num_classes if hasattr(network, "num_classes") else len(stored)
    return tuple(stored) if len(stored) == K else tuple(str(k) for k in range(K))


def _row_labels(classes) -> list[str]:
    """"label name" per class, padded alike (just the label where the name is the label itself)."""
    named = [f"{k:>3} {name}" if name != str(k) else f"{k:>3}" for k, name in enumerate(classes)]
    width = max(len(text) for text in named)
    return [f"{text:<{width}}" for text in named]


def per_class_lines(classes, per_class, matrix) -> list[str]:
    """The report's per-class table: label, name, accuracy, right of images."""
    lines = ["per class: accuracy (right of images)"]
    for k, (row, accuracy) in enumerate(zip(_row_labels(classes), per_class)):
        text = "   -   " if math.isnan(accuracy) else f"{accuracy:7.2%}"
        lines.append(f"{row}  {text}  ({int(matrix[k, k]):,} of {int(matrix[k].sum()):,})")
    return lines


def confusion_lines(classes, matrix) -> list[str]:
    """The confusion matrix as text: a row per true class, a column per predicted class (by label)."""
    rows = _row_labels(classes)
    corner = "true \\ predicted"
    prefix = max(len(corner), len(rows[0]))
    width = max(len(str(int(matrix.max()))), len(str(len(classes) - 1))) + 1
    lines = ["confusion matrix: rows are the true classes, columns the predicted ones",
             f"{corner:<{prefix}}" + "".join(f"{k:>{width}}" for k in range(len(classes)))]
    for row, counts in zip(rows, matrix):
        lines.append(f"{row:<{prefix}}" + "".join(f"{int(count):>{width}}" for count in counts))
    return lines


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many of the most probable classes to print per image.")
@device_option
def predict(checkpoint, files, top_k, device):
    """Classify images with a checkpoint: PNG, JPEG (and other formats Pillow reads), PGM or .npy.

    Pictures are converted to the model's colour mode (RGB or grey) and resized and
    centre-cropped to its input size (needs Pillow: pip install 'gpucnn[images]').
    A PGM image or a .npy array must have the model's size: (H, W), (N, H, W) or
    (N, 1, H, W) for a grey model, (C, H, W) or (N, C, H, W) for any, holding uint8
    pixels (0-255) or floats in [0, 1]. Pixels are normalised with the statistics
    stored in the checkpoint. Prints one line per image: the most probable classes
    (label, name, probability), named as in the training data (CIFAR-10's classes,
    or the image folder's sub-folders).
    """
    resolved = use_device(device)
    network, ckpt = _load_model(checkpoint, resolved)
    try:
        settings = cli_data.checkpoint_settings(ckpt, checkpoint)
    except CheckpointError:
        raise
    except (ValueError, KeyError):
        raise CheckpointError(f"checkpoint {checkpoint} does not name a known data set, so its pixel "
                              "normalisation and class names are unknown.") from None
    classes = settings.classes
    if top_k > len(classes):
        raise ValueError(f"--top-k {top_k} exceeds the {len(classes)} classes of {settings.dataset}.")
    network.eval()
    for path in files:
        x = cli_data.normalize_pixels(read_model_input(path, tuple(network.input_shape)), settings)
        with no_grad():
            probs = backend.to_numpy(softmax(network(backend.to_device(x, resolved))))
        for i, row in enumerate(probs):
            name = f"{path}[{i}]" if len(probs) > 1 else str(path)
            best = np.argsort(-row, kind="stable")[:top_k]
            ranked = ", ".join(f"{k} {classes[k]!r} {row[k]:.2%}" if classes[k] != str(k)
                               else f"{k} {row[k]:.2%}" for k in best)
            click.echo(f"{name}: {ranked}")
