"""The files gpucnn writes and reads: replaced atomically with the usual permissions; regular files only.

``write_atomically`` writes a file under a temporary name in the target's folder,
flushes it to disk and renames it over the target, so a reader (or a crash)
never sees half a file. The temporary file is made by ``tempfile.mkstemp``, which
creates it with mode 0600; it gets the mode an ordinary ``open()`` would have
given (0666 less the umask) before it is renamed, so a checkpoint or a cache is
as readable as the user's other files.

``require_regular_file`` refuses a FIFO, a device (``/dev/zero``) or a folder
before anything opens it: reading those blocks forever or never ends.
"""
from __future__ import annotations

import os
import stat
import tempfile
import time
from pathlib import Path

# A temporary file of a write that has not been renamed for this long belongs to a killed process.
STALE_TEMP_S = 600.0


def umask() -> int:
    """The process's umask (read from /proc where possible; os.umask set-and-restore elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path, write, *, durable: bool = True) -> Path:
    """Write ``path`` through ``write(binary file)`` under a temporary name, then rename it over ``path``.

    The temporary file is ``.<name>.<random>.tmp`` in the same folder, gets mode
    0666 less the umask, is fsynced (``durable``) and removed again if anything
    fails (a full disk, an exception in ``write``, Ctrl-C); an OSError is raised
    again naming ``path``. Returns the path.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except OSError as exc:  # named after the target (a full disk's error names no file; NumPy's not even errno)
        Path(tmp_name).unlink(missing_ok=True)
        reason = exc.strerror or f"{exc}; is the disk full?"
        raise OSError(exc.errno, reason, str(path)) from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(directory)
    return path


def require_regular_file(path, what: str, error=ValueError) -> Path:
    """``path`` when it names a regular file (after following links); ``error`` naming it otherwise."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist.") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror}).") from None
    if stat.S_ISDIR(mode):
        raise error(f"{what} {path} is a directory, not a file.")
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise error(f"{what} {path} is {kind}, not a regular file; gpucnn reads only regular files.")
    return path


def remove_stale_temporaries(path) -> None:
    """Delete the ``.<name>.*.tmp`` files of ``path`` that writes killed midway left (never read, only
    clutter) once they are STALE_TEMP_S old: a younger one may belong to a write in progress."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    cutoff = time.time() - STALE_TEMP_S
    for tmp in directory.glob(f".{path.name}.*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except OSError:
            pass  # removed by someone else meanwhile
