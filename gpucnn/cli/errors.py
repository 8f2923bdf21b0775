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


@contextlib.contextmanager
def expected_errors():
    """Turn the expected errors raised inside into a one-line click.ClickException."""
    try:
        yield
    except BrokenPipeError:  # the reader went away (`| head`): gpucnn.cli.app.main ends quietly
        raise
    except EXPECTED_ERRORS as exc:
        raise click.ClickException(one_line(exc)) from None
    except Exception as exc:  # CuPy's OutOfMemoryError, NumPy's MemoryError
        if not backend.is_out_of_memory(exc):
            raise
        raise click.ClickException(f"out of memory ({one_line(exc)}); try a smaller --batch-size.") from None


def one_line_errors(func):
    """Decorator: run a command inside ``expected_errors()``, so it reports alike in any Click group."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with expected_errors():
            return func(*args, **kwargs)
    return wrapper
