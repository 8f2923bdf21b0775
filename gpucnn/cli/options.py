"""Options shared by several commands, defined once so that a name means one thing everywhere.

Every command that reads a data set takes ``--dataset`` and ``--data-dir`` (and,
for image folders, ``--skip-bad-images``; ``train`` also ``--image-size`` and ``--grey``) from here.
The first phrase of an option's help (up to the first ``.``, ``,``, ``:``, ``;``, ``(`` or ``[``)
is its meaning; tests/test_cli_options.py walks every command and fails when one
name carries two meanings or one meaning two names. Names that were renamed stay
as hidden ``RenamedOption``s that stop with a sentence naming the new option.
"""
from __future__ import annotations

from pathlib import Path

import click

from gpucnn import backend
from gpucnn.data.sources import DATASET_NAMES
from gpucnn.models import MODEL_HELP, available_models

MEANING_END = ".,:;(["           # what ends the first phrase of a help text, its meaning
DATASET_MEANING = "The data set to read"
DATA_DIR_MEANING = "Where to look for the data set first"


class RenamedOption(click.Option):
    """A hidden option kept for a name that was renamed: using it is a usage error naming the new name."""

    def __init__(self, param_decls, new_name: str, takes_value: bool = True, **attrs):
        self.new_name = new_name
        super().__init__(param_decls, is_flag=not takes_value, hidden=True, expose_value=False,
                         callback=self._refuse, help=f"Renamed {new_name}.", **attrs)

    def _refuse(self, ctx, param, value):
        if value not in (None, False):
            raise click.UsageError(f"{self.opts[0]} was renamed {self.new_name}; use {self.new_name} instead.",
                                   ctx=ctx)


def meaning(option: click.Option) -> str:
    """The first phrase of an option's help text: what its name means (see the module docstring)."""
    text = " ".join((option.help or "").split())
    cut = min((text.find(mark) for mark in MEANING_END if mark in text), default=len(text))
    return text[:cut].strip()


def renamed(old: str, new: str, takes_value: bool = True):
    """Decorator adding a RenamedOption ``old`` (pointing at ``new``) to a command."""
    return click.option(old, cls=RenamedOption, new_name=new, takes_value=takes_value)


def dataset_option(default=None, default_text: str = "the checkpoint's"):
    """``--dataset NAME`` (one of gpucnn.data.DATASET_NAMES)."""
    return click.option(
        "--dataset", type=click.Choice(DATASET_NAMES), default=default,
        help=f"{DATASET_MEANING}: mnist, fashion-mnist (grey 28x28), cifar10 (colour 32x32), or folder "
             f"(your own images in --data-dir DIR: DIR/train/<class>/*, DIR/test/<class>/*). "
             f"[default: {default if default is not None else default_text}]")


def folder_path(ctx, param, value):
    """Click callback: a folder option as a Path; an empty string (which would mean the current folder) is
    refused, so an unset shell variable (--out "$RUN") does not silently read or write here."""
    if value is not None and not str(value).strip():
        raise click.BadParameter("an empty folder name; name a folder (. for the current one).")
    return None if value is None else Path(value)


def data_dir_option(func):
    """``--data-dir DIR``."""
    return click.option(
        "--data-dir", type=click.Path(file_okay=False), callback=folder_path, default=None,
        help=f"{DATA_DIR_MEANING}: a folder holding the files (or <folder>/<dataset>/); for --dataset folder the "
             "image folder itself. Else $GPUCNN_DATA_DIR, the cache, /usr/share/datasets, then a download.")(func)


def image_size_option(func):
    """``--image-size S`` (image folders)."""
    return click.option("--image-size", type=click.IntRange(min=8), default=None,
                        help="The side a folder's images are resized and centre-cropped to (image folders only). "
                             "[default: the model's input]")(func)


def grey_option(func):
    """``--grey`` (image folders)."""
    return click.option("--grey", is_flag=True, default=False,
                        help="Read a folder's images as grey (1 channel) instead of RGB (image folders only).")(func)


def skip_bad_images_option(func):
    """``--skip-bad-images`` (image folders)."""
    return click.option("--skip-bad-images", is_flag=True, default=False,
                        help="Leave unreadable images out (and count them) instead of stopping (image folders).")(func)


def device_option(func):
    """``--device NAME`` (one of gpucnn.backend.DEVICES; None means $GPUCNN_DEVICE or auto)."""
    return click.option("--device", type=click.Choice(backend.DEVICES), default=None,
                        help=f"Where to compute: gpu, cpu, emulator (gpucnn's CUDA kernels on the CPU under its "
                             f"emulator: slow, for tests and kernel debugging), or auto (the GPU when CuPy finds one). "
                             f"[default: ${backend.DEVICE_ENV} or auto]")(func)


def use_device(device, echo: bool = True) -> str:
    """The one place a command turns its --device into a device name ("cpu", "gpu" or "emulator").

    Commands call this once, at their entry, and pass the name it returns down
    (to models, the trainer, the communicator); ``echo`` prints which device it is.
    """
    resolved = backend.resolve_device(device)
    if echo:
        click.echo(f"device: {backend.describe(resolved)}")
    return resolved


def apply_options(options):
    """Decorator adding a list of option decorators to a command, the first one first in --help."""
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


def model_option(func):
    """``--model NAME`` (one of gpucnn.models.available_models())."""
    return click.option("--model", type=click.Choice(available_models()), default="lenet5", show_default=True,
                        help="The network: " + "; ".join(f"{name}: {text}" for name, text in MODEL_HELP.items())
                             + ".")(func)
