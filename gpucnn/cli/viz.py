"""The ``visualize`` and ``features`` commands, registered in the main app by gpucnn/cli/__init__.py.

``gpucnn visualize CHECKPOINT`` draws the first layer's filters (in colour for an
RGB model), the top input patches of every channel of every conv layer (conv1,
conv2, conv3, ...; in true colour), and the training curves;
``gpucnn features CHECKPOINT --layer NAME`` saves one layer's activations for a
data set as .npy. Each command turns expected failures into one line on stderr
and exit status 1 by itself, so it behaves the same in any Click group.
"""
from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from gpucnn import backend
from gpucnn.checkpoint import load_checkpoint, model_from_checkpoint
from gpucnn.cli import data as cli_data
from gpucnn.cli.errors import EXPECTED_ERRORS, one_line_errors  # noqa: F401 - EXPECTED_ERRORS: the one list
from gpucnn.cli.options import (apply_options, data_dir_option, dataset_option, device_option, renamed,
                                skip_bad_images_option, use_device)
from gpucnn.features import (DEFAULT_BATCH_SIZE, conv_layer_names, layer_features, layer_names, named_layers,
                             top_patches)
from gpucnn.files import write_atomically
from gpucnn.metrics import METRICS_FILE, confusion_matrix
from gpucnn.train import evaluate

DEFAULT_MAX_CHANNELS = 16        # rows of a patch figure (the .npz keeps every channel)


def _data_options(func):
    """--dataset, --split, --data-dir, --skip-bad-images, --limit, --batch-size, --device, --no-download, --quiet."""
    options = [
        dataset_option(),
        renamed("--data", "--dataset"),
        click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True,
                     help="Which split of the data set to run."),
        data_dir_option,
        skip_bad_images_option,
        click.option("--limit", type=click.IntRange(min=1), default=None,
                     help="Use only the first N images of the split. [default: all]"),
        click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True,
                     help="Images per batch (one forward pass)."),
        device_option,
        click.option("--no-download", is_flag=True, help="Fail instead of downloading missing data."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
    ]
    return apply_options(options)(func)


def _load(checkpoint, dataset, split, data_dir, skip_bad_images, limit, device, no_download, quiet, layers=None):
    """(model on the resolved ``device``, normalised images (N, C, H, W), labels (N,), dataset name, data settings).

    ``layers`` (names) are checked against the model before any data is loaded.
    """
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, device)
    names = layer_names(model)
    unknown = [name for name in layers or () if name not in names]
    if unknown:
        raise ValueError(f"the model has no layer named {unknown[0]!r}; its layers are {names}.")
    settings = cli_data.checkpoint_settings(ckpt, checkpoint, dataset)
    images, labels, dataset, note = cli_data.evaluation_data(settings, dataset, split, data_dir,
                                                             download=not no_download, progress=not quiet,
                                                             skip_bad_images=skip_bad_images, limit=limit)
    click.echo(f"data: {dataset} {split}, {len(labels):,} images" + (f" ({note})" if note else ""))
    return model, images, labels, dataset, settings


def _layer_list(values) -> list[str] | None:
    """``("conv1,conv2", "pool1")`` -> ["conv1", "conv2", "pool1"]; None when no --layers was given."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return names or None


def _metrics_path(checkpoint: Path, metrics: Path | None) -> Path:
    """--metrics, which must exist, or the metrics log beside the checkpoint, which may not."""
    if metrics is None:
        return checkpoint.parent / METRICS_FILE
    if not metrics.is_file():
        raise ValueError(f"metrics file {metrics} does not exist.")
    return metrics


def _draw_curves(viz, metrics: Path, out: Path) -> list[Path]:
    """The training curves as out/curves.png; [] (and a note on stderr) without a metrics log."""
    if not metrics.is_file():
        click.echo(f"no {metrics.name} beside the checkpoint; no training curves (pass --metrics PATH)", err=True)
        return []
    return [viz.training_curves(viz.read_metrics(metrics), out / "curves.png")]


def _draw_filters(viz, model, out: Path) -> list[Path]:
    """The first conv layer's filters as out/filters_<layer>.png (colour for an RGB model); [] without convs."""
    convs = conv_layer_names(model)
    if not convs:
        return []
    first = convs[0]
    weight = backend.to_numpy(dict(named_layers(model))[first].weight.data)
    title = f"{first}: {weight.shape[0]} learned filters, {weight.shape[2]}x{weight.shape[3]}"
    draw = viz.colour_filter_grid if weight.shape[1] == 3 else viz.filter_grid
    return [draw(weight, out / f"filters_{first}.png", title=title)]


def _draw_confusion(viz, model, images, labels, settings, batch_size: int, out: Path, source: str) -> list[Path]:
    """The confusion matrix of the model on these images as out/confusion.png (classes named from the checkpoint)."""
    device = model.device
    result = evaluate(model, backend.to_device(images, device), backend.to_device(labels, device), batch_size,
                      return_predictions=True)
    K = getattr(model, "num_classes", len(settings.classes))
    classes = tuple(settings.classes) if len(settings.classes) == K else tuple(str(k) for k in range(K))
    matrix = confusion_matrix(labels, result["predictions"], K)
    title = f"confusion matrix, {source}: accuracy {result['accuracy']:.2%}"
    return [viz.confusion_figure(matrix, classes, out / "confusion.png", title=title)]


def _draw_patches(viz, name: str, found, top_k: int, out: Path, max_channels: int, pixel_stats) -> list[Path]:
    """One layer's top patches as out/patches_<layer>.npz (all channels) and .png (the first max_channels)."""
    info = found.info
    shown = min(max_channels, found.channels)
    channels = f"channels 0-{shown - 1} of {found.channels}, " if shown < found.channels else ""
    source = f"{info['dataset']} {info['split']}, {info['images']:,} images"
    title = f"{name}: top {top_k} patches per channel ({channels}{source})"
    return [found.save(out / f"patches_{name}.npz"),
            viz.patch_figure(found, out / f"patches_{name}.png", max_channels=max_channels, pixel_stats=pixel_stats,
                             title=title)]


@click.command(name="visualize")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@_data_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write the results: a folder for the PNG files and patch data. "
                   "[default: <checkpoint folder>/viz]")
@click.option("--patches", type=click.IntRange(min=1), default=9, show_default=True,
              help="Input patches shown per channel (the strongest first).")
@renamed("--top-k", "--patches")
@click.option("--max-channels", type=click.IntRange(min=1), default=DEFAULT_MAX_CHANNELS, show_default=True,
              help="Channels drawn per patch figure (the first ones; the .npz keeps every channel).")
@click.option("--layers", multiple=True,
              help="Layers whose channels get top patches, comma-separated or repeated. [default: every conv layer]")
@click.option("--all-positions", is_flag=True,
              help="Let one image give several of a channel's patches (default: k different images).")
@click.option("--metrics", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"The run's metrics log for the training curves. [default: {METRICS_FILE} beside the checkpoint]")
@one_line_errors
def visualize(checkpoint, dataset, split, data_dir, skip_bad_images, limit, batch_size, device, no_download, quiet,
              out, patches, max_channels, layers, all_positions, metrics):
    """Draw a checkpoint's first-layer filters, the top input patches per channel, its training curves and
    its confusion matrix.

    \b
    Writes into --out:
      filters_<layer>.png   the first conv layer's filters: grey models per input
                            channel (blue negative, red positive), RGB models as
                            colour images (grey = 0)
      patches_<layer>.png   per channel (the first --max-channels), the --patches input
                            patches with the highest activation (the conv output before
                            ReLU), each cropped to the channel's receptive field, in
                            the image's own colours
      patches_<layer>.npz   their activations, image indexes, positions and crops
      curves.png            loss and accuracy per epoch, train and test
      confusion.png         the confusion matrix on the split: rows true classes,
                            columns predicted ones, with counts

    \b
    Example:
      gpucnn visualize runs/fashion-mnist/checkpoint.npz --out viz/
      gpucnn visualize runs/cifar10/checkpoint.npz --dataset cifar10 --limit 2000
    """
    from gpucnn import viz  # noqa: PLC0415 - keeps matplotlib out of the other commands' imports
    viz.require_matplotlib()
    metrics = _metrics_path(checkpoint, metrics)
    out = out if out is not None else checkpoint.parent / "viz"
    layers = _layer_list(layers)
    model, images, labels, dataset_name, settings = _load(checkpoint, dataset, split, data_dir, skip_bad_images, limit,
                                                     use_device(device), no_download, quiet, layers)
    out.mkdir(parents=True, exist_ok=True)
    written = _draw_filters(viz, model, out)
    found = top_patches(model, images, k=patches, layers=layers, batch_size=batch_size,
                        distinct_images=not all_positions, progress=not quiet)
    info = {"checkpoint": str(checkpoint), "dataset": dataset_name, "split": split, "images": len(images),
            "distinct_images": not all_positions, "mean": list(settings.mean), "std": list(settings.std)}
    for name, found_patches in found.items():
        found_patches.info = info
        written += _draw_patches(viz, name, found_patches, patches, out, max_channels,
                                 (settings.mean, settings.std))
    written += _draw_curves(viz, metrics, out)
    written += _draw_confusion(viz, model, images, labels, settings, batch_size, out,
                               f"{dataset_name} {split}, {len(images):,} images")
    for path in written:
        click.echo(f"wrote {path}")


@click.command(name="features")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--layer", required=True, help="The layer whose output to save, e.g. flatten (LeNet-5: 400 values).")
@_data_options
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the results: the .npy file for the activations, shape (N, ...) float32.")
@click.option("--labels", "labels_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also save the images' labels (N,) int64 to this .npy file.")
@one_line_errors
def features(checkpoint, layer, dataset, split, data_dir, skip_bad_images, limit, batch_size, device, no_download,
             quiet, out, labels_out):
    """Save the activations of one layer of a checkpoint's model for a data set, as .npy.

    \b
    Example:
      gpucnn features runs/mnist/checkpoint.npz --layer flatten --out feats.npy --labels labels.npy
    """
    _check_feature_paths(out, labels_out)
    model, images, labels, _, _ = _load(checkpoint, dataset, split, data_dir, skip_bad_images, limit,
                                        use_device(device), no_download, quiet, [layer])
    activations = layer_features(model, images, layer, batch_size=batch_size, progress=not quiet)
    write_atomically(out, lambda f: np.save(f, activations.astype(np.float32, copy=False)))
    click.echo(f"wrote {out}: {layer} activations, shape {activations.shape}")
    if labels_out is not None:
        write_atomically(labels_out, lambda f: np.save(f, np.asarray(labels, dtype=np.int64)))
        click.echo(f"wrote {labels_out}: labels, shape {labels.shape}")


def _check_feature_paths(out: Path, labels_out: Path | None) -> None:
    """Refuse what would write less than asked, before any work: names without .npy (np.save would add it),
    one file for both arrays; create the folders, so a missing one cannot fail after the features are written."""
    for option, path in (("--out", out), ("--labels", labels_out)):
        if path is not None and path.suffix != ".npy":
            raise ValueError(f"{option} must name a .npy file, not {path}.")
    if labels_out is not None and labels_out.resolve() == out.resolve():
        raise ValueError(f"--out and --labels both name {out}; the labels would overwrite the features.")
    for path in (out, labels_out):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
