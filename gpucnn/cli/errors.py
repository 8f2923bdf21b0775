"""The command line's expected errors, and the one wrapper that turns them into one line on stderr.

Every command runs inside ``expected_errors()`` (the main app's ``invoke``; a
command registered in another Click group gets it from ``one_line_errors``): an
expected failure (no GPU, missing data, a bad checkpoint, an invalid value, an
unwritable folder, a missing optional dependency, memory running out) becomes a
``click.ClickException`` holding one line, which Click prints as ``Error: ...``
with exit status 1. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import functools
import traceback

import click

from gpucnn import backend, distributed
from gpucnn.checkpoint import CheckpointError
from gpucnn.data import DataError
from gpucnn.train import TrainingError
from gpucnn.viz import MissingDependencyError

EXIT_INTERRUPTED = 130   # Ctrl-C: a run saved and stopped, or an aborted command
EXIT_TERMINATED = 143    # SIGTERM (Slurm, `docker stop`, `timeout`): a run saved and stopped (SIGHUP: 129)
EXIT_BROKEN_PIPE = 141   # what a shell reports for a tool ended by SIGPIPE (`gpucnn summary | head`)

EXPECTED_ERRORS = (backend.DeviceError, DataError, CheckpointError, TrainingError, distributed.DistributedError,
                   MissingDependencyError, ValueError, TypeError, OSError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (an OSError as ``<file>: <reason>``)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def rank_error_text(exc: BaseException) -> str:
    """What a rank of a distributed run writes about the error that aborts the job."""
    if isinstance(exc, EXPECTED_ERRORS):
        return f"Error: {one_line(exc)}"
    return "".join(traceback.format_exception(exc)).rstrip()


# What to change when memory runs out, per command (one without --batch-size must not be told to lower it).
MEMORY_HINTS = {
    "train": "try a smaller --batch-size",
    "evaluate": "try a smaller --batch-size",
    "visualize": "try a smaller --batch-size or --limit",
    "features": "try a smaller --batch-size or --limit",
    "predict": "try fewer or smaller images per .npy file",
    "summary": "the model for this --input-shape does not fit in memory; try a smaller --input-shape",
}


def memory_hint(command: str | None) -> str:
    return MEMORY_HINTS.get(command or "", "try smaller inputs")


@contextlib.contextmanager
def expected_errors(command=None):
    """Turn the expected errors raised inside into a one-line click.ClickException.

    ``command``: the command's name, or a callable giving it once an error comes (the
    app's subcommand is known only once it runs); it picks the out-of-memory advice.
    """
    try:
        yield
    except BrokenPipeError:  # the reader went away (`| head`): gpucnn.cli.app.main ends quietly
        raise
    except EXPECTED_ERRORS as exc:
        raise click.ClickException(one_line(exc)) from None
    except Exception as exc:  # CuPy's OutOfMemoryError, NumPy's MemoryError
        if not backend.is_out_of_memory(exc):
            raise
        name = command() if callable(command) else command
        raise click.ClickException(f"out of memory ({one_line(exc)}); {memory_hint(name)}.") from None


def one_line_errors(func):
    """Decorator: run a command inside ``expected_errors()``, so it reports alike in any Click group."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with expected_errors(lambda: click.get_current_context().info_name):
            return func(*args, **kwargs)
    return wrapper
