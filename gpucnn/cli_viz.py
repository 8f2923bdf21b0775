"""The ``visualize`` and ``features`` commands, as Click commands to register in the main app.

``gpucnn visualize CHECKPOINT`` draws the first layer's filters, the top input
patches of every channel of the conv layers, and the training curves;
``gpucnn features CHECKPOINT --layer NAME`` saves one layer's activations for a
data set as .npy. Each command turns expected failures into one line on stderr
and exit status 1 by itself, so it behaves the same in any Click group.
"""
from __future__ import annotations

import functools
from pathlib import Path

import click
import numpy as np

from gpucnn import backend
from gpucnn.checkpoint import load_checkpoint, model_from_checkpoint
from gpucnn.data import DATASETS, load_dataset, normalize
from gpucnn.features import DEFAULT_BATCH_SIZE, conv_layer_names, layer_features, named_layers, top_patches
from gpucnn.viz import MissingDependencyError

METRICS_FILE = "metrics.jsonl"   # the trainer's per-epoch log, looked for beside the checkpoint
EXPECTED_ERRORS = (backend.DeviceError, MissingDependencyError, ValueError, TypeError, OSError)


def _one_line_errors(func):
    """Report expected errors as ``Error: <one line>`` with exit status 1 instead of a traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EXPECTED_ERRORS as exc:
            if isinstance(exc, OSError) and exc.strerror and exc.filename:
                text = f"{exc.filename}: {exc.strerror}"
            else:
                text = str(exc) or type(exc).__name__
            raise click.ClickException(" ".join(text.split())) from None
    return wrapper


def _data_options(func):
    """--data, --split, --data-dir, --limit, --batch-size, --device, --no-download, --quiet."""
    options = [
        click.option("--data", "dataset", type=click.Choice(sorted(DATASETS)), default=None,
                     help="The data set to run. [default: the checkpoint's]"),
        click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True),
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="A folder holding the IDX files (or <folder>/<dataset>/)."),
        click.option("--limit", type=click.IntRange(min=1), default=None,
                     help="Use only the first N images of the split. [default: all]"),
        click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True),
        click.option("--device", type=click.Choice(backend.DEVICES), default=None,
                     help=f"Where to compute: gpu, cpu, or auto. [default: ${backend.DEVICE_ENV} or auto]"),
        click.option("--no-download", is_flag=True, help="Fail instead of downloading missing data."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load(checkpoint, dataset, split, data_dir, limit, device, no_download, quiet, layers=None):
    """(model on the device, normalised images (N, 1, H, W), labels (N,), dataset name).

    ``layers`` (names) are checked against the model before any data is loaded.
    """
    resolved = backend.resolve_device(device)
    click.echo(f"device: {backend.describe(resolved)}")
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, resolved)
    names = [name for name, _ in named_layers(model)]
    unknown = [name for name in layers or () if name not in names]
    if unknown:
        raise ValueError(f"the model has no layer named {unknown[0]!r}; its layers are {names}.")
    dataset = dataset or (ckpt.get("config") or {}).get("dataset")
    if dataset not in DATASETS:
        raise ValueError(f"checkpoint {checkpoint} does not name a known data set; pass --data.")
    spec = DATASETS[dataset]
    images, labels = load_dataset(dataset, split, data_dir=data_dir, download=not no_download, progress=not quiet)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    click.echo(f"data: {dataset} {split}, {len(labels):,} images")
    return model, normalize(images, spec.mean, spec.std), labels, dataset


def _layer_list(values) -> list[str] | None:
    """``("conv1,conv2", "pool1")`` -> ["conv1", "conv2", "pool1"]; None when no --layers was given."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return names or None


@click.command(name="visualize")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@_data_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the PNG files and patch data. [default: <checkpoint folder>/viz]")
@click.option("--top-k", type=click.IntRange(min=1), default=9, show_default=True,
              help="Patches per channel.")
@click.option("--layers", multiple=True,
              help="Layers whose channels get top patches, comma-separated or repeated. [default: every conv layer]")
@click.option("--all-positions", is_flag=True,
              help="Let one image give several of a channel's patches (default: k different images).")
@click.option("--metrics", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"The run's metrics log for the training curves. [default: {METRICS_FILE} beside the checkpoint]")
@_one_line_errors
def visualize(checkpoint, dataset, split, data_dir, limit, batch_size, device, no_download, quiet, out, top_k,
              layers, all_positions, metrics):
    """Draw a checkpoint's first-layer filters, the top input patches per channel, and its training curves.

    \b
    Writes into --out:
      filters_<layer>.png   the first conv layer's filters (blue negative, red positive)
      patches_<layer>.png   per channel, the --top-k input patches with the highest
                            activation (the conv output before ReLU), each cropped to
                            the channel's receptive field
      patches_<layer>.npz   their activations, image indexes, positions and crops
      curves.png            loss and accuracy per epoch, train and test

    \b
    Example:
      gpucnn visualize runs/fashion-mnist/checkpoint.npz --out viz/
    """
    from gpucnn import viz  # noqa: PLC0415 - keeps matplotlib out of the other commands' imports
    viz.require_matplotlib()
    metrics_given = metrics is not None
    metrics = metrics if metrics_given else checkpoint.parent / METRICS_FILE
    if metrics_given and not metrics.is_file():
        raise ValueError(f"metrics file {metrics} does not exist.")
    out = out if out is not None else checkpoint.parent / "viz"
    layers = _layer_list(layers)
    model, images, _, dataset_name = _load(checkpoint, dataset, split, data_dir, limit, device, no_download, quiet,
                                           layers)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    convs = conv_layer_names(model)
    if convs:
        first = convs[0]
        weight = backend.to_numpy(dict(named_layers(model))[first].weight.data)
        written.append(viz.filter_grid(weight, out / f"filters_{first}.png",
                                       title=f"{first}: {weight.shape[0]} learned filters, "
                                             f"{weight.shape[2]}x{weight.shape[3]}"))

    found = top_patches(model, images, k=top_k, layers=layers, batch_size=batch_size,
                        distinct_images=not all_positions, progress=not quiet)
    source = f"{dataset_name} {split}, {len(images):,} images"
    for name, patches in found.items():
        patches.info = {"checkpoint": str(checkpoint), "dataset": dataset_name, "split": split,
                        "images": len(images), "distinct_images": not all_positions}
        written.append(patches.save(out / f"patches_{name}.npz"))
        written.append(viz.patch_figure(patches, out / f"patches_{name}.png",
                                        title=f"{name}: top {top_k} patches per channel ({source})"))

    if metrics.is_file():
        written.append(viz.training_curves(viz.read_metrics(metrics), out / "curves.png"))
    else:
        click.echo(f"no {metrics.name} beside the checkpoint; no training curves (pass --metrics PATH)", err=True)
    for path in written:
        click.echo(f"wrote {path}")


@click.command(name="features")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--layer", required=True, help="The layer whose output to save, e.g. flatten (LeNet-5: 400 values).")
@_data_options
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The .npy file for the activations, shape (N, ...) float32.")
@click.option("--labels", "labels_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also save the images' labels (N,) int64 to this .npy file.")
@_one_line_errors
def features(checkpoint, layer, dataset, split, data_dir, limit, batch_size, device, no_download, quiet, out,
             labels_out):
    """Save the activations of one layer of a checkpoint's model for a data set, as .npy.

    \b
    Example:
      gpucnn features runs/mnist/checkpoint.npz --layer flatten --out feats.npy --labels labels.npy
    """
    if out.suffix != ".npy":
        raise ValueError(f"--out must name a .npy file, not {out}.")
    model, images, labels, _ = _load(checkpoint, dataset, split, data_dir, limit, device, no_download, quiet,
                                     [layer])
    activations = layer_features(model, images, layer, batch_size=batch_size, progress=not quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, activations.astype(np.float32, copy=False))
    click.echo(f"wrote {out}: {layer} activations, shape {activations.shape}")
    if labels_out is not None:
        np.save(labels_out, np.asarray(labels, dtype=np.int64))
        click.echo(f"wrote {labels_out}: labels, shape {labels.shape}")
