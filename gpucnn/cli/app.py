"""The Click app every command joins (see gpucnn/cli/__init__.py), and ``main``, the console entry point."""
from __future__ import annotations

import os
import sys

import click
import numpy as np

from gpucnn import __version__
from gpucnn.cli.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, expected_errors


class _App(click.Group):
    """A Click group that turns expected errors into one line on stderr instead of a traceback."""

    def invoke(self, ctx):
        # Overflow in a diverging run is reported once, as a NaN/Inf loss, not as NumPy warnings.
        with np.errstate(all="ignore"), expected_errors(lambda: ctx.invoked_subcommand):
            try:
                return super().invoke(ctx)
            except BrokenPipeError:
                _end_quietly_on_closed_pipe()

    def main(self, args=None, prog_name=None, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(args, prog_name=prog_name, standalone_mode=False, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's shutdown
        except BrokenPipeError:
            _end_quietly_on_closed_pipe()
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


def _end_quietly_on_closed_pipe():
    """The reader of stdout went away (`gpucnn summary | head`): stop without a word, as other tools do."""
    # Output still buffered would fail again when Python flushes stdout at exit; send it nowhere instead.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(EXIT_BROKEN_PIPE)


@click.group(cls=_App, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpucnn")
def cli():
    """gpucnn: train and run CNNs (LeNet-5, a small VGG) on MNIST, CIFAR-10 or your own image folders,
    on an NVIDIA GPU (CuPy) or the CPU (NumPy)."""


def main():
    """Entry point of the ``gpucnn`` console script and of ``python cli.py``."""
    cli(prog_name="gpucnn")
