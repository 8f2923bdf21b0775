"""``gpucnn evaluate`` and ``gpucnn predict``: a checkpoint's model on a test split or on image files."""
from __future__ import annotations

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
def evaluate_command(checkpoint, dataset, data_dir, skip_bad_images, device, batch_size, no_download):
    """Print a checkpoint's test loss and accuracy (normalised with the statistics stored in it)."""
    resolved = use_device(device)
    network, ckpt = _load_model(checkpoint, resolved)
    settings = cli_data.checkpoint_settings(ckpt, checkpoint, dataset)
    images, labels, dataset, note = cli_data.evaluation_data(settings, dataset, "test", data_dir,
                                                             download=not no_download,
                                                             skip_bad_images=skip_bad_images)
    if note:
        click.echo(note, err=True)
    x = backend.to_device(images, resolved)
    result = evaluate(network, x, backend.to_device(labels, resolved), batch_size)
    click.echo(f"{dataset} test: loss {result['loss']:.4f}  accuracy {result['accuracy']:.2%}  "
               f"({len(labels):,} images, epoch {ckpt.get('epoch')})")


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
