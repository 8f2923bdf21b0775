"""gpucnn's command line: ``gpucnn train | evaluate | predict | summary``.

Every expected failure (no GPU, missing data, a bad checkpoint, an invalid
value, an unwritable folder) ends with one line on stderr and exit status 1;
Click usage errors (an unknown option, a value out of range) exit with 2, also
on one line. An interrupted ``train`` saves a checkpoint and exits with 130.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click
import numpy as np

from gpucnn import __version__, backend, cli_data, cli_viz, distributed
from gpucnn.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from gpucnn.cli_options import (data_dir_option, dataset_option, grey_option, image_size_option,
                                skip_bad_images_option)
from gpucnn.data import DataError
from gpucnn.models import MODEL_HELP, available_models, build_model
from gpucnn.train import CHECKPOINT_FILE, METRICS_FILE, Trainer, TrainingError, evaluate

DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}
DEFAULT_MOMENTUM = 0.9          # SGD only
DEFAULT_ADAMW_WEIGHT_DECAY = 0.01
STEP_GAMMA = 0.1                # --schedule step: lr x0.1 every third of the run
EXIT_INTERRUPTED = 130
# The run settings a resumed run takes from its checkpoint (option name -> config key).
RESUMED_SETTINGS = {"dataset": "dataset", "model": "model_name", "batch_size": "batch_size", "lr": "lr",
                    "optimizer": "optimizer", "momentum": "momentum", "weight_decay": "weight_decay",
                    "schedule": "schedule", "seed": "seed"}
EXPECTED_ERRORS = (backend.DeviceError, DataError, CheckpointError, TrainingError, distributed.DistributedError,
                   ValueError, TypeError, OSError)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _rank_error_text(exc: BaseException) -> str:
    """What a rank of a distributed run writes about the error that aborts the job."""
    if isinstance(exc, EXPECTED_ERRORS):
        return f"Error: {_one_line(exc)}"
    return "".join(traceback.format_exception(exc)).rstrip()


class _App(click.Group):
    """A Click group that turns expected errors into one line on stderr instead of a traceback."""

    def invoke(self, ctx):
        try:
            # Overflow in a diverging run is reported once, as a NaN/Inf loss, not as NumPy warnings.
            with np.errstate(all="ignore"):
                return super().invoke(ctx)
        except EXPECTED_ERRORS as exc:
            raise click.ClickException(_one_line(exc)) from None
        except Exception as exc:  # CuPy's OutOfMemoryError, NumPy's MemoryError
            if not backend.is_out_of_memory(exc):
                raise
            raise click.ClickException(f"out of memory ({_one_line(exc)}); try a smaller --batch-size.") from None

    def main(self, args=None, prog_name=None, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(args, prog_name=prog_name, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"Error: {' '.join(exc.format_message().split())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C outside training (loading data, evaluating)
            click.echo("Aborted.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which pass its range comparisons)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return number


def _device_option(func):
    return click.option("--device", type=click.Choice(backend.DEVICES), default=None,
                        help=f"Where to compute: gpu, cpu, emulator (gpucnn's CUDA kernels on the CPU under its "
                             f"emulator: slow, for tests and kernel debugging), or auto (the GPU when CuPy finds one). "
                             f"[default: ${backend.DEVICE_ENV} or auto]")(func)


def _resolve_device(device) -> str:
    resolved = backend.resolve_device(device)
    click.echo(f"device: {backend.describe(resolved)}")
    return resolved


@click.group(cls=_App, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpucnn")
def cli():
    """gpucnn: train and run CNNs (LeNet-5, a small VGG) on MNIST, CIFAR-10 or your own image folders,
    on an NVIDIA GPU (CuPy) or the CPU (NumPy)."""


# --- train --------------------------------------------------------------------
def _make_optimizer(name, params, lr, momentum, weight_decay):
    from gpucnn import optim  # noqa: PLC0415 - kept out of the import path of summary/predict
    if name == "sgd":
        return optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _make_scheduler(name, optimizer, epochs):
    from gpucnn import optim  # noqa: PLC0415
    if name == "step":
        return optim.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=STEP_GAMMA)
    if name == "cosine":
        return optim.CosineAnnealingLR(optimizer, T_max=epochs)
    return None


def _check_out_dir(out: Path, resuming: bool) -> None:
    """Create ``out`` and prove it writable now, not after the first epoch."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out):
        pass
    if not resuming and ((out / CHECKPOINT_FILE).exists() or (out / METRICS_FILE).exists()):
        raise ValueError(f"{out} already holds a run ({CHECKPOINT_FILE} or {METRICS_FILE}); choose another "
                         f"--out, or continue that run with --resume {out / CHECKPOINT_FILE}.")


def _settings_from_checkpoint(ctx, resume, given: dict) -> dict:
    """The run settings stored in the checkpoint; refuses explicit options that contradict them."""
    config = load_checkpoint(resume).get("config") or {}
    missing = [key for key in RESUMED_SETTINGS.values() if key not in config]
    if missing:
        raise CheckpointError(f"checkpoint {resume} lacks the run settings {', '.join(missing)}; "
                              "it was not written by 'gpucnn train'.")
    settings = {option: config[key] for option, key in RESUMED_SETTINGS.items()}
    for option, value in given.items():
        source = ctx.get_parameter_source(option)
        explicit = source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")
        if explicit and value != settings[option]:
            flag = "--" + option.replace("_", "-")
            raise ValueError(f"{flag} {value} differs from the checkpoint's {settings[option]}; a resumed run "
                             f"keeps the settings it started with (drop {flag}).")
    settings["planned_epochs"] = config.get("epochs")
    return settings


def _training_data(dataset, model, data_dir, no_download, quiet, image_size, grey, skip_bad_images, resume):
    """cli_data.training_data with a resumed run's stored data settings (image mode, statistics)."""
    stored = None
    if resume is not None:
        config = load_checkpoint(resume).get("config") or {}
        if "normalization" in config:
            stored = cli_data.DataSettings.from_config(config, where=f"checkpoint {resume}")
    return cli_data.training_data(dataset, model, data_dir, download=not no_download, progress=not quiet,
                                  image_size=image_size, grey=grey, skip_bad_images=skip_bad_images, stored=stored)


def _model_option(func):
    return click.option("--model", type=click.Choice(available_models()), default="lenet5", show_default=True,
                        help="The network: " + "; ".join(f"{name}: {text}" for name, text in MODEL_HELP.items())
                             + ".")(func)


@cli.command()
@_device_option
@dataset_option(default="mnist")
@data_dir_option
@image_size_option
@grey_option
@skip_bad_images_option
@_model_option
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Epochs in total (a resumed run counts the checkpoint's epochs; asking a resumed run for "
                   "more epochs than it was planned for stretches its schedule over the new total).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per batch (one training step).")
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Learning rate. [default: 1e-3 for adam/adamw, 0.01 for sgd]")
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default="adam", show_default=True,
              help="sgd (with momentum), adam, or adamw (decoupled weight decay).")
@click.option("--momentum", type=FiniteFloatRange(min=0, max=1, max_open=True), default=None,
              help=f"SGD momentum (sgd only). [default: {DEFAULT_MOMENTUM}]")
@click.option("--weight-decay", type=FiniteFloatRange(min=0), default=None,
              help=f"L2 penalty (decoupled for adamw). [default: {DEFAULT_ADAMW_WEIGHT_DECAY} for adamw, else 0]")
@click.option("--schedule", type=click.Choice(["none", "step", "cosine"]), default="cosine", show_default=True,
              help="Per-epoch learning-rate schedule: cosine to 0 over the run, or x0.1 every third of it.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seeds the initial weights and the batch order.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write the results: a folder for checkpoint.npz, best.npz and metrics.jsonl. "
                   "[default: runs/<dataset>-<timestamp>, or the checkpoint's folder with --resume]")
@click.option("--resume", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Continue the run saved in this checkpoint, with its settings, up to --epochs.")
@click.option("--no-download", is_flag=True, help="Fail instead of downloading missing data.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, and no per-epoch lines.")
@click.option("--distributed", "data_parallel", is_flag=True,
              help="Train data-parallel on every rank of an MPI job (mpirun -n N gpucnn train --distributed ...): "
                   "gradients averaged by MPI (cpu) or NCCL (gpu, one GPU per rank); --batch-size is per rank. "
                   "Needs gpucnn[mpi].")
@click.option("--graph/--no-graph", "graph", default=None,
              help="Replay each training step as one recorded CUDA graph (gpu, emulator) instead of running it "
                   "op by op. [default: --graph on the gpu, --no-graph on the emulator; ignored on the cpu]")
@click.pass_context
@distributed.abort_on_error(describe=_rank_error_text, passthrough=(click.exceptions.Exit,))
def train(ctx, device, dataset, data_dir, image_size, grey, skip_bad_images, model, epochs, batch_size, lr,
          optimizer, momentum, weight_decay, schedule, seed, out, resume, no_download, quiet, data_parallel, graph):
    """Train a model, writing metrics and checkpoints to --out.

    Each epoch appends a line to metrics.jsonl and rewrites checkpoint.npz (and
    best.npz when the test accuracy improved). Ctrl-C saves checkpoint.npz after
    the current step and exits with status 130; --resume continues exactly there.

    \b
    Examples:
      gpucnn train --dataset fashion-mnist --epochs 5 --device cpu
      gpucnn train --dataset cifar10 --model vgg-small --device cpu
      gpucnn train --dataset folder --data-dir photos/ --epochs 10
      gpucnn train --resume runs/fashion-mnist-20250101-120000/checkpoint.npz --epochs 10
    """
    given = {"dataset": dataset, "model": model, "batch_size": batch_size, "lr": lr, "optimizer": optimizer,
             "momentum": momentum, "weight_decay": weight_decay, "schedule": schedule, "seed": seed}
    planned_epochs, extended = epochs, False
    if resume is not None:
        settings = _settings_from_checkpoint(ctx, resume, given)
        stored_plan = settings.pop("planned_epochs") or epochs
        # Extending a run: the schedule spans the new total (a cosine fitted to the old one would be at 0).
        extended = epochs > stored_plan
        planned_epochs = epochs if extended else stored_plan
        dataset, model, batch_size, lr = settings["dataset"], settings["model"], settings["batch_size"], settings["lr"]
        optimizer, momentum, weight_decay = settings["optimizer"], settings["momentum"], settings["weight_decay"]
        schedule, seed = settings["schedule"], settings["seed"]
        out = out if out is not None else resume.parent
    else:
        if momentum is not None and optimizer != "sgd":
            raise ValueError(f"--momentum applies to --optimizer sgd only, not {optimizer}.")
        lr = DEFAULT_LR[optimizer] if lr is None else lr
        momentum = (DEFAULT_MOMENTUM if momentum is None else momentum) if optimizer == "sgd" else None
        if weight_decay is None:
            weight_decay = DEFAULT_ADAMW_WEIGHT_DECAY if optimizer == "adamw" else 0.0
        out = out if out is not None else Path("runs") / f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"

    comm = distributed.init(device) if data_parallel else distributed.Communicator()
    main_rank = comm.rank == 0  # the only rank that prints and writes files
    quiet = quiet or not main_rank
    resolved = _resolve_device(device) if main_rank else backend.resolve_device(device)
    if data_parallel and main_rank:
        click.echo(f"distributed: {comm.describe()}; batch {batch_size} per rank, {batch_size * comm.size} per step")
    if main_rank:
        _check_out_dir(out, resuming=resume is not None)

    if not main_rank:
        comm.barrier()  # rank 0 reads the data first, so that a download happens once
    data = _training_data(dataset, model, data_dir, no_download, quiet, image_size, grey, skip_bad_images, resume)
    if main_rank:
        comm.barrier()
    if not quiet:
        click.echo(data.summary)

    network = build_model(model, seed=seed, **data.model_kwargs).to(resolved)
    opt = _make_optimizer(optimizer, list(network.parameters()), lr, momentum or 0.0, weight_decay)
    scheduler = _make_scheduler(schedule, opt, planned_epochs)
    config = {"dataset": dataset, "model_name": model, "optimizer": optimizer, "lr": lr, "momentum": momentum,
              "weight_decay": weight_decay, "schedule": schedule, "epochs": planned_epochs, **data.settings.record()}
    trainer = Trainer(network, opt, scheduler, device=resolved, out_dir=out, seed=seed, config=config, comm=comm,
                      graph=graph)
    if not quiet:
        click.echo(f"run: {model}, {optimizer} lr {lr:g}, schedule {schedule}, batch {batch_size}, seed {seed}, "
                   f"epochs {epochs}; writing to {out}")
    if extended and not quiet:
        click.echo(f"extending the run to {epochs} epochs: the {schedule} schedule now spans all {epochs}")
    history = trainer.fit(data.train, data.test, epochs=epochs, batch_size=batch_size, resume=resume,
                          reschedule=extended, progress=not quiet)
    if trainer.interrupted:
        if main_rank:
            command = f"mpirun -n {comm.size} gpucnn train --distributed" if data_parallel else "gpucnn train"
            click.echo(f"interrupted; continue with: {command} --resume {trainer.checkpoint_path} --epochs {epochs}",
                       err=True)
        ctx.exit(EXIT_INTERRUPTED)
    last = history[-1]
    if main_rank:
        click.echo(f"done: epoch {last['epoch']} test accuracy {last['test_acc']:.2%} "
                   f"(best {trainer.best_accuracy:.2%}); checkpoint {out / CHECKPOINT_FILE}, "
                   f"metrics {out / METRICS_FILE}")


# --- evaluate -----------------------------------------------------------------
def _load_model(checkpoint, device):
    """(model on the device, the checkpoint dict)."""
    ckpt = load_checkpoint(checkpoint)
    return model_from_checkpoint(ckpt, device), ckpt


@cli.command(name="evaluate")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@dataset_option()
@data_dir_option
@skip_bad_images_option
@_device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=500, show_default=True,
              help="Images per batch (one forward pass).")
@click.option("--no-download", is_flag=True, help="Fail instead of downloading missing data.")
def evaluate_command(checkpoint, dataset, data_dir, skip_bad_images, device, batch_size, no_download):
    """Print a checkpoint's test loss and accuracy (normalised with the statistics stored in it)."""
    resolved = _resolve_device(device)
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


# --- predict ------------------------------------------------------------------
def read_pgm(path) -> np.ndarray:
    """A PGM image (P2 text or P5 binary) as float32 (H, W) intensities in [0, 1] (value / maxval)."""
    path = Path(path)
    data = path.read_bytes()
    if data[:2] not in (b"P2", b"P5"):
        raise ValueError(f"{path} is not a PGM image (it starts with {data[:2]!r}, not P2 or P5).")
    fields, pos = [], 2
    while len(fields) < 3:  # width, height, maxval; '#' starts a comment running to the end of the line
        while pos < len(data) and (data[pos:pos + 1].isspace() or data[pos:pos + 1] == b"#"):
            if data[pos:pos + 1] == b"#":
                end = data.find(b"\n", pos)
                pos = len(data) if end < 0 else end
            pos += 1
        start = pos
        while pos < len(data) and data[pos:pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise ValueError(f"{path} has a malformed PGM header (expected width, height and maxval).")
        fields.append(int(data[start:pos]))
    width, height, maxval = fields
    if width < 1 or height < 1 or not 1 <= maxval <= 65535:
        raise ValueError(f"{path} has an invalid PGM header: {width}x{height}, maxval {maxval}.")
    count = width * height
    if data[:2] == b"P5":
        dtype = np.dtype("u1") if maxval < 256 else np.dtype(">u2")
        raster = data[pos + 1:pos + 1 + count * dtype.itemsize]  # one whitespace byte follows maxval
        if len(raster) < count * dtype.itemsize:
            raise ValueError(f"{path} is truncated: {width}x{height} pixels need {count * dtype.itemsize} bytes.")
        values = np.frombuffer(raster, dtype=dtype).astype(np.float32)
    else:
        tokens = data[pos:].split()
        if len(tokens) < count:
            raise ValueError(f"{path} is truncated: {width}x{height} pixels, found {len(tokens)} values.")
        try:
            values = np.array([int(t) for t in tokens[:count]], dtype=np.float32)
        except ValueError:
            raise ValueError(f"{path} holds a non-integer pixel value.") from None
    if values.max() > maxval:
        raise ValueError(f"{path} holds a pixel value above its maxval {maxval}.")
    return (values / np.float32(maxval)).reshape(height, width)


PREDICT_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def _read_images(path: Path, input_shape) -> np.ndarray:
    """The images of one file as float32 pixels in [0, 1], shaped (N, C, H, W) = (N, *input_shape).

    PNG/JPEG/... (Pillow) are converted to the model's colour mode and resized and
    centre-cropped to its size; PGM and .npy must already have its size. A grey
    PGM given to a colour model is repeated over the three channels.
    """
    from gpucnn.data.images import read_image  # noqa: PLC0415 - Pillow only when a picture is read
    C, H, W = input_shape
    suffix = path.suffix.lower()
    if suffix in PREDICT_IMAGE_SUFFIXES:
        return read_image(path, size=H, grey=C == 1)[None].astype(np.float32) / np.float32(255)
    if suffix == ".pgm":
        pixels = read_pgm(path)
        if pixels.shape != (H, W):
            raise ValueError(f"{path} is a {pixels.shape[1]}x{pixels.shape[0]} image; the model takes {W}x{H} "
                             "(convert it to PNG to have it resized).")
        return np.repeat(pixels[None, None], C, axis=1)
    if suffix != ".npy":
        raise ValueError(f"{path}: predict reads PNG/JPEG/BMP/GIF/TIFF/WebP images (Pillow), .pgm images and "
                         f".npy arrays, not {path.suffix or 'this file'}.")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path} is not a readable .npy array ({exc}).") from None
    if C == 1 and array.shape == (H, W):
        array = array[None, None]
    elif C == 1 and array.ndim == 3 and array.shape[1:] == (H, W):
        array = array[:, None]
    elif array.shape == (C, H, W):
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != (C, H, W) or len(array) == 0:
        accepted = f"({H}, {W}), (N, {H}, {W}) or " if C == 1 else ""
        raise ValueError(f"{path} holds an array of shape {array.shape}; predict takes {accepted}"
                         f"({C}, {H}, {W}) or (N, {C}, {H}, {W}).")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255)
    if array.dtype.kind != "f":
        raise TypeError(f"{path} holds {array.dtype} values; predict takes uint8 pixels (0-255) or floats in [0, 1].")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError(f"{path} holds floats outside [0, 1]; scale them to [0, 1] or save uint8 pixels (0-255).")
    return array.astype(np.float32)


def _softmax(logits):
    xp = backend.get_array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many of the most probable classes to print per image.")
@_device_option
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
    resolved = _resolve_device(device)
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
        x = cli_data.normalize_pixels(_read_images(path, tuple(network.input_shape)), settings)
        probs = backend.to_numpy(_softmax(network(backend.to_device(x, resolved))))
        for i, row in enumerate(probs):
            name = f"{path}[{i}]" if len(probs) > 1 else str(path)
            best = np.argsort(-row, kind="stable")[:top_k]
            ranked = ", ".join(f"{k} {classes[k]!r} {row[k]:.2%}" if classes[k] != str(k)
                               else f"{k} {row[k]:.2%}" for k in best)
            click.echo(f"{name}: {ranked}")


# --- summary ------------------------------------------------------------------
def _pair_text(pair) -> str:
    if pair is None:
        return "-"
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


COVER_SIZE = 300   # the lecture's example: how deep until one neuron sees a whole 300x300 image


def _input_shape(value):
    """``"3,32,32"`` -> (3, 32, 32); None stays None."""
    if value is None:
        return None
    try:
        shape = tuple(int(part) for part in value.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise click.BadParameter(f"{value!r} is not C,H,W (three positive ints, e.g. 3,32,32).")
    return shape


@cli.command()
@_model_option
@click.option("--input-shape", callback=lambda ctx, param, value: _input_shape(value), default=None,
              metavar="C,H,W", help="The input to describe the model for, e.g. 3,32,32. [default: the model's own]")
def summary(model, input_shape):
    """Print the layers, parameters and receptive fields of a model.

    Per layer: output shape, parameters ((KW*KH*Cin+1)*Cout for a convolution,
    (IN+1)*OUT for a linear layer), receptive field (rf) and jump; then the total,
    and how many stacked 3x3 layers one neuron needs to see a whole 300x300 image.

    rf is how many input pixels (per axis) one output sees; jump is the distance in
    input pixels between neighbouring outputs. From flatten on, every output sees
    the whole image ("-").

    \b
    Examples:
      gpucnn summary --model vgg-small --input-shape 3,32,32
      gpucnn summary --model lenet5 --input-shape 3,32,32
    """
    from gpucnn.models import default_input_shape  # noqa: PLC0415
    from gpucnn.receptive import layer_geometry, stacked_3x3_layers, window_strides  # noqa: PLC0415
    C, H, W = input_shape or default_input_shape(model)
    if H != W:
        raise ValueError(f"--input-shape {C},{H},{W}: gpucnn's models take square images (H = W).")
    network = build_model(model, in_channels=C, input_size=H)
    rows = layer_geometry(network, tuple(network.input_shape))
    header = f"{'layer':<8} {'type':<10} {'output shape':<16} {'params':>9} {'rf':>4} {'jump':>5}"
    rule = "-" * len(header)
    click.echo(f"{model} for input {tuple(network.input_shape)}")
    click.echo(header)
    click.echo(rule)
    for row in rows:
        shape = "(" + ", ".join(str(d) for d in row.output_shape) + ")"
        click.echo(f"{row.name:<8} {row.type:<10} {shape:<16} {row.num_params:>9,} {_pair_text(row.rf):>4} "
                   f"{_pair_text(row.jump):>5}")
    click.echo(rule)
    total = sum(row.num_params for row in rows)
    spatial = [row for row in rows if row.spatial]
    click.echo(f"total parameters: {total:,}")
    if spatial:
        click.echo(f"largest receptive field: {_pair_text(spatial[-1].rf)} pixels ({spatial[-1].name})")
    strides = window_strides(rows)
    plain = stacked_3x3_layers(COVER_SIZE)
    strided = stacked_3x3_layers(COVER_SIZE, strides)
    click.echo(f"{COVER_SIZE}x{COVER_SIZE} input: one neuron sees all of it after {plain} stacked 3x3 stride-1 "
               f"layers (N layers see 2N+1 pixels), or after {strided} 3x3 layers with this model's strides "
               f"({', '.join(map(str, strides))}, then 1)")


# visualize and features live in their own module (gpucnn.cli_viz); they join the app here.
cli.add_command(cli_viz.visualize)
cli.add_command(cli_viz.features)


def main():
    """Entry point of the ``gpucnn`` console script and of ``python cli.py``."""
    cli(prog_name="gpucnn")
