"""A training run's folder: one run owns it for its whole life, and what a folder holds is told truly.

``claim(folder)`` takes an exclusive ``flock`` on ``<folder>/.gpucnn-run.lock`` and
keeps it until the process ends (or ``release``): a second run into the same
folder, started while the first lives, is refused with the owner's process id.
The kernel drops the lock of a process that dies however it dies (SIGKILL, the
out-of-memory killer), so a killed run never leaves its folder stuck; the lock
file itself stays and is harmless. Claims are per process and re-entrant: the
command line claims the folder before it loads data, the Trainer again in ``fit``.

``describe_run`` says which run files a folder holds and what a user can do
with them (resume from checkpoint.npz, or from best.npz when a run stopped,
say on a full disk, before its first checkpoint).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: folders are not locked
    fcntl = None

LOCK_FILE = ".gpucnn-run.lock"
RUN_FILES = ("checkpoint.npz", "best.npz", "metrics.jsonl")

_held: dict[Path, list] = {}  # resolved folder -> [file descriptor, claim count]


class FolderInUseError(ValueError):
    """Another living training run owns the folder."""


def claim(folder) -> Path:
    """Own ``folder`` (created if missing) until ``release`` or the end of the process; returns it.

    FolderInUseError naming the other process when a living run owns it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _held:
        _held[key][1] += 1
        return folder
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise FolderInUseError(f"{folder} is in use by another training run (process {owner}); wait for "
                                       "it to end, or choose another --out.") from None
            except OSError as exc:  # a file system without locks (some network and FUSE ones): run unguarded
                warnings.warn(f"cannot lock {folder / LOCK_FILE} ({exc.strerror}); nothing stops another run "
                              "from writing into this folder meanwhile.", stacklevel=2)
        try:  # who owns it, for the message a second run gets (a full disk may refuse these bytes)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
    except BaseException:
        os.close(fd)
        raise
    _held[key] = [fd, 1]
    return folder


def release(folder) -> None:
    """Give up one claim of ``folder``; the last one unlocks it (a folder not claimed: nothing happens)."""
    key = Path(folder).resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        os.close(entry[0])  # closing the descriptor drops the flock


def run_files(folder) -> list[str]:
    """The names of RUN_FILES present in ``folder``."""
    folder = Path(folder)
    return [name for name in RUN_FILES if (folder / name).exists()]


def describe_run(folder) -> str | None:
    """A sentence on the run ``folder`` holds and how to continue it; None when it holds none."""
    folder = Path(folder)
    present = run_files(folder)
    if not present:
        return None
    held = ", ".join(present)
    if "checkpoint.npz" in present:
        return f"{folder} already holds a run ({held}); continue it with --resume {folder / 'checkpoint.npz'}"
    if "best.npz" in present:
        return (f"{folder} holds {held} but no checkpoint.npz (its run stopped before saving one, e.g. on a "
                f"full disk); continue it with --resume {folder / 'best.npz'}")
    return (f"{folder} holds {held} of a run that saved no checkpoint; delete {held} to start afresh "
            "there")
