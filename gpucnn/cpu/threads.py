"""The thread pool of the fast CPU path: fixed chunks shared out to a few threads, BLAS at one thread.

The chunks of an op depend on its shapes only. Each chunk writes its own part of the
result (or its own partial sum, which the op adds in chunk order), so the results do
not depend on which thread ran which chunk, nor on how many threads there are.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:  # a dependency of gpucnn; should it be missing, BLAS keeps its own threads inside ours
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover
    ThreadpoolController = None


SETTING = "GPUCNN_CPU_THREADS"


def _setting_error(text: str | None) -> str | None:
    """Why $GPUCNN_CPU_THREADS is unusable (not a whole number from 1 up), or None when unset or usable."""
    if not text:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value >= 1:
        return None
    return f"{SETTING} must be a whole number of threads from 1 up, not {text!r}; unset it to use every core."


def _thread_count() -> int:
    """GPUCNN_CPU_THREADS when usable, else the number of cores this process may use, at most 8.

    An unusable setting is not an error here (importing gpucnn, or --help, must work):
    ``check_setting`` raises it when the fast CPU path is first used.
    """
    text = os.environ.get(SETTING)
    if text and _setting_error(text) is None:
        return int(text.strip())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def check_setting() -> None:
    """ValueError should $GPUCNN_CPU_THREADS be set to something other than a whole number from 1 up."""
    error = _setting_error(os.environ.get(SETTING))
    if error is not None:
        raise ValueError(error)


THREADS = _thread_count()
# Below this many float operations per chunk, handing chunks to threads costs more than it saves.
MIN_PARALLEL_WORK = 1 << 16

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_blas = None  # lazily: the BLAS libraries threadpoolctl found (empty list without it)
_local = threading.local()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=THREADS - 1, thread_name_prefix="gpucnn-cpu")
        return _pool


def _blas_libraries():
    global _blas
    if _blas is None:
        _blas = [] if ThreadpoolController is None else \
            ThreadpoolController().select(user_api="blas").lib_controllers
    return _blas


class _OneBlasThread:
    """Context manager: every BLAS library at one thread inside, its own count restored after.

    Two of our threads each running a narrow matmul beat one matmul on two BLAS threads
    (measured: 0.92 ms against 1.64 ms for conv1's forward product at batch 256), and
    BLAS threads inside ours would oversubscribe the cores.
    """

    def __enter__(self):
        self.saved = [(lib, lib.get_num_threads()) for lib in _blas_libraries()]
        for lib, _ in self.saved:
            lib.set_num_threads(1)

    def __exit__(self, *exc_info):
        for lib, count in self.saved:
            lib.set_num_threads(count)


def run_chunks(work, count: int, work_per_chunk: float = float("inf")) -> None:
    """Call work(i) for every chunk i in range(count), on up to THREADS threads (this one included).

    Threads take the next chunk from a shared counter, so uneven chunks balance out, and this
    thread returns as soon as every chunk is done: a helper thread the scheduler has not run yet
    (the cores are shared) finds nothing left and costs no wait. BLAS runs at one thread inside
    either way (its results can depend on its thread count). work_per_chunk (float operations)
    below MIN_PARALLEL_WORK runs everything here, in order. The first exception raised by a chunk
    is raised here once every chunk has finished.
    """
    threads = min(THREADS, count)
    if threads <= 1 or work_per_chunk < MIN_PARALLEL_WORK or getattr(_local, "serial", False):
        with _OneBlasThread():  # the same BLAS arithmetic as in threads: bit-for-bit equal results
            for i in range(count):
                work(i)
        return
    chunks = iter(range(count))
    lock = threading.Lock()
    finished = threading.Condition(lock)
    state = {"done": 0, "error": None}

    def loop():
        while True:
            with lock:
                i = next(chunks, None)
            if i is None:
                return
            try:
                work(i)
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                with lock:
                    state["error"] = state["error"] or exc
            with finished:
                state["done"] += 1
                if state["done"] == count:
                    finished.notify_all()

    with _OneBlasThread():
        for _ in range(threads - 1):
            # The caller's context variables go along: NumPy keeps np.errstate in one, so a
            # caller's errstate(all="ignore") also holds in the helper threads.
            _executor().submit(contextvars.copy_context().run, loop)
        loop()
        with finished:
            while state["done"] < count:
                finished.wait()
    if state["error"] is not None:
        raise state["error"]


def shared_here() -> bool:
    """Whether run_chunks called on this thread now may hand chunks to other threads (else they run here,
    in order, and an op need not cut its work into more chunks than its cache budget asks for)."""
    return THREADS > 1 and not getattr(_local, "serial", False)


@contextlib.contextmanager
def one_thread():
    """Within the block, run_chunks on this thread runs every chunk here, in order (the same chunks)."""
    outer = getattr(_local, "serial", False)
    _local.serial = True
    try:
        yield
    finally:
        _local.serial = outer


def run_tasks(tasks, work_per_task: float = float("inf")) -> None:
    """Call independent functions side by side, one per thread, each running its own chunks in order.

    For the parts of an op that share no output (a convolution's weight and input gradients):
    two whole tasks need one hand-over between the threads where their chunks would need one per
    chunk, which at small batches cost more than the second core gave back. The arithmetic is the
    tasks' own, so results do not depend on the threads.
    """
    def work(i):
        with one_thread():
            tasks[i]()

    run_chunks(work, len(tasks), work_per_task)


def scratch(name: str, shape, dtype) -> np.ndarray:
    """A reusable per-thread buffer of the given shape: fresh arrays per chunk would page-fault anew.

    The contents are undefined; a later call with the same name in the same thread reuses it.
    """
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    buffer = buffers.get(name)
    if buffer is None or buffer.size < size:
        buffer = buffers[name] = np.empty(size, np.uint8)
    return buffer[:size].view(dtype).reshape(shape)


def even_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) pairs cutting range(total) into `parts` near-equal pieces (fewer if total is small)."""
    parts = max(1, min(parts, total))
    bounds = [total * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def chwn(x) -> np.ndarray | None:
    """The (C, H, W, N) view of an (N, C, H, W) array whose memory is in that order, else None."""
    view = x.transpose(1, 2, 3, 0)
    return view if view.flags.c_contiguous else None


def memory_order(a) -> list[int]:
    """a's axes from the largest stride to the smallest (the order its memory is laid out in)."""
    return sorted(range(a.ndim), key=lambda axis: -a.strides[axis])


def empty_in_order(shape, dtype, order) -> np.ndarray:
    """An uninitialised array of this shape whose memory follows the axes order `order`."""
    memory = np.empty(tuple(shape[axis] for axis in order), dtype)
    return memory.transpose(np.argsort(order))
