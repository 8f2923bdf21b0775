"""A CPU training step whose batch is split between this process and a worker process.

Threads share one interpreter lock: at batch 64 every NumPy call of LeNet-5 is short, so two
threads spend much of a step waiting for the lock or for each other (1.3 cores busy), and the
step ran barely faster than on one thread. Two processes hold a lock each. ``SplitStep`` keeps a
replica of the model in a worker process; per step it copies the parameters and the second part
of the batch into shared memory, computes the first part's forward and backward here while the
worker does the second's, and adds the worker's gradients after its own (fixed parts, fixed
order: seeded runs repeat bit for bit). The loss is the batch mean, so each part's gradient is
scaled by its share of the batch; the sum is the whole batch's gradient up to float rounding.
Measured on LeNet-5, 2 cores, batch 64, five back-to-back pairs: 2.9-5.2 ms a step against 3.6-6.1 ms
with two threads (1.1-1.5x).

The optimizer is not involved: the caller zeroes the gradients before and steps after, as
around ``model.backward``. Layers that draw random numbers (Dropout) would draw them in two
processes, so ``splittable`` refuses models holding one; so it does BatchNorm, whose statistics are
the whole batch's.
"""
from __future__ import annotations

import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from gpucnn import nn
from gpucnn.cpu import threads
from gpucnn.ops import softmax_cross_entropy, softmax_cross_entropy_backward

MIN_SPLIT_BATCH = 32  # smaller batches run in this process only: too little work to hand over
POLL_S = 0.25           # how often a wait for the worker looks whether it is still running
STOPPED_GRACE_S = 2.0   # a worker stopped (SIGSTOP) this long is given up on: it would hang the step


class WorkerError(RuntimeError):
    """The worker process of a split step died, was killed or stopped: the step cannot finish."""


def processes() -> int:
    """How many processes a CPU training step uses: $GPUCNN_CPU_PROCESSES (1 or 2), by default 2 when
    the fast path has two threads or more (the cores this process may use), else 1."""
    text = os.environ.get("GPUCNN_CPU_PROCESSES")
    if not text:
        return 2 if threads.THREADS >= 2 and os.name == "posix" else 1  # the worker needs pass_fds
    if text.strip() not in ("1", "2"):
        raise ValueError(f"GPUCNN_CPU_PROCESSES must be 1 or 2, not {text!r}.")
    return int(text)


def splittable(model) -> bool:
    """Whether a step of ``model`` can be split: NumPy parameters, no active Dropout and no BatchNorm.

    BatchNorm normalises with the statistics of the whole batch and updates its running statistics:
    two halves would each normalise with their own, and the worker's updates would be lost.
    """
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return False
    if any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules()):
        return False
    return all(type(p.data) is np.ndarray for p in model.parameters())


class _Layout:
    """Where each array lives in the shared block: parameters, the worker's gradients, its images,
    its labels and two float64 totals (loss sum, correct count)."""

    def __init__(self, params, image_shape, image_dtype, capacity: int):
        self.image_dtype = np.dtype(image_dtype)
        self.shapes = [p.shape for p in params]
        self.dtypes = [p.data.dtype for p in params]
        self.image_shape = tuple(image_shape)
        self.capacity = capacity
        offset, self.param_offsets, self.grad_offsets = 0, [], []
        for shape, dtype in zip(self.shapes, self.dtypes):
            self.param_offsets.append(offset)
            offset += _aligned(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        for shape, dtype in zip(self.shapes, self.dtypes):
            self.grad_offsets.append(offset)
            offset += _aligned(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        self.image_offset = offset
        offset += _aligned(capacity * int(np.prod(image_shape)) * self.image_dtype.itemsize)
        self.label_offset = offset
        offset += _aligned(capacity * 8)
        self.totals_offset = offset
        self.size = offset + 16

    def views(self, buffer):
        """(params, grads, images, labels, totals) as NumPy views of ``buffer``."""
        def view(shape, dtype, offset):
            return np.ndarray(shape, dtype, buffer=buffer, offset=offset)
        params = [view(s, d, o) for s, d, o in zip(self.shapes, self.dtypes, self.param_offsets)]
        grads = [view(s, d, o) for s, d, o in zip(self.shapes, self.dtypes, self.grad_offsets)]
        images = view((self.capacity, *self.image_shape), self.image_dtype, self.image_offset)
        labels = view((self.capacity,), np.int64, self.label_offset)
        return params, grads, images, labels, view((2,), np.float64, self.totals_offset)


def _aligned(size: int) -> int:
    return -(-size // 64) * 64


def _part_backward(model, x, y, batch: int):
    """Forward and backward of one part of a batch of ``batch`` images; returns (loss sum, correct count)."""
    logits = model(x)
    loss, probs = softmax_cross_entropy(logits, y)
    grad_logits = softmax_cross_entropy_backward(probs, y)
    grad_logits *= np.asarray(len(y) / batch, grad_logits.dtype)  # the part's share of the batch mean
    model.backward(grad_logits, input_grad=False)
    return float(loss) * len(y), int((logits.argmax(axis=1) == y).sum())


def serial_step(model, params, x, y):
    """SplitStep's arithmetic in this process alone: the same two parts, their gradients added in the
    same order, so a seeded run gives the same bits on one core as on two. Returns (loss sum, correct)."""
    batch = len(y)
    if batch < MIN_SPLIT_BATCH:
        return _part_backward(model, x, y, batch)
    half = batch // 2
    loss_sum, correct = _part_backward(model, x[:half], y[:half], batch)
    first = [None if p.grad is None else p.grad.copy() for p in params]
    for p in params:
        if p.grad is not None:
            p.grad[...] = 0  # in place: a fused optimizer's gradients are views of its flat buffer
    other_loss, other_correct = _part_backward(model, x[half:], y[half:], batch)
    for p, grad in zip(params, first):
        second = np.zeros(p.shape, p.data.dtype) if p.grad is None else p.grad.copy()  # the worker's copy
        if grad is None:
            p.grad = None
        else:
            p.grad[...] = grad
        p.accumulate_grad(second)
    return loss_sum + other_loss, correct + other_correct


class SerialStep:
    """``serial_step`` with SplitStep's interface (a step of any batch size; close() does nothing)."""

    capacity = float("inf")

    def __init__(self, model):
        self.model = model
        self.params = list(model.parameters())

    def __call__(self, x, y):
        return serial_step(self.model, self.params, x, y)

    def close(self) -> None:
        """Nothing to stop."""


def _worker_main() -> None:
    """The worker process (``python -c`` started by SplitStep): one part of every step, on a replica
    whose parameters are views of the shared block. argv: the file descriptors of the connection, of
    the shared block and of the pickled model."""
    # Ctrl-C and SIGTERM (Slurm signals every process of a job) are the main process's to handle: it saves
    # and stops, and the worker ends when the connection closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threads.THREADS = 1
    connection, block_fd, model_fd = Connection(int(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
    try:
        with os.fdopen(model_fd, "rb") as f:
            model_bytes = f.read()
        layout = connection.recv()
        block = mmap.mmap(block_fd, layout.size)
        os.close(block_fd)
        _serve(connection, pickle.loads(model_bytes), layout.views(block))
    except (EOFError, OSError):
        pass  # the main process has gone


def _serve(connection, model, views) -> None:
    params, grads, images, labels, totals = views
    own = list(model.parameters())
    for p, shared in zip(own, params):
        p.data = shared  # the main process writes the current values before every step
    while True:
        request = connection.recv()
        if request is None:
            return
        start, stop, batch = request
        try:
            for p in own:
                p.grad = None
            with threads.one_thread():
                totals[:] = _part_backward(model, images[start:stop], labels[start:stop], batch)
            for p, grad in zip(own, grads):
                if p.grad is None:  # a parameter this forward did not use
                    grad[...] = 0
                else:
                    grad[...] = p.grad
            connection.send(None)
        except Exception as exc:  # noqa: BLE001 - sent to the main process, which raises it
            try:
                pickle.dumps(exc)
            except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its text
                exc = RuntimeError(f"the CPU worker process failed: {traceback.format_exc(limit=8)}")
            connection.send(exc)


class SplitStep:
    """Forward and backward of a softmax cross-entropy step, the batch split with one worker process.

    model: a gpucnn Module on the cpu that ``splittable`` accepts; capacity: the largest batch it
    will get (the Trainer's batch size). ``__call__(x, y)`` adds the batch's mean-loss gradient into
    every ``Parameter.grad`` (zero them before) and returns (loss sum, correct count) as Python numbers.
    The worker starts on the first call and stops with ``close()`` or when this object is collected.
    """

    def __init__(self, model, capacity: int):
        if not splittable(model):
            raise ValueError("this model cannot split its steps between processes (Dropout or non-NumPy "
                             "parameters); train it in one process.")
        self.model = model
        self.capacity = int(capacity)
        self.params = list(model.parameters())
        self._worker = None

    def __call__(self, x, y):
        batch = len(y)
        if batch > self.capacity:
            raise ValueError(f"this step takes batches of up to {self.capacity} images, not {batch}.")
        if batch < MIN_SPLIT_BATCH:
            with threads.one_thread():
                return _part_backward(self.model, x, y, batch)
        worker = self._worker or self._start(x)
        layout = worker["layout"]
        if tuple(x.shape[1:]) != layout.image_shape or x.dtype != layout.image_dtype:
            raise ValueError(f"this step was set up for images of shape {layout.image_shape} and dtype "
                             f"{layout.image_dtype}, not {tuple(x.shape[1:])} {x.dtype}.")
        half = batch // 2
        for p, shared in zip(self.params, worker["params"]):
            shared[...] = p.data
        worker["images"][half:batch] = x[half:]
        worker["labels"][half:batch] = y[half:]
        try:
            worker["connection"].send((half, batch, batch))
        except OSError:
            self._worker_stopped()
        try:
            with threads.one_thread():
                loss_sum, correct = _part_backward(self.model, x[:half], y[:half], batch)
        finally:
            self._wait(worker)  # also when this half raised: the worker's answer must not wait for the next step
        for p, grad in zip(self.params, worker["grads"]):
            p.accumulate_grad(grad)
        totals = worker["totals"]
        return loss_sum + float(totals[0]), correct + int(totals[1])

    def _start(self, x) -> dict:
        layout = _Layout(self.params, x.shape[1:], x.dtype, self.capacity)
        caches = [(m, m._cache) for m in self.model.modules()]
        for m, _ in caches:
            m._cache = {}  # the last forward's arrays need not travel
        try:
            model_bytes = pickle.dumps(self.model)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise ValueError(f"the model cannot be copied to the worker process of the split CPU step ({exc}); "
                             "set GPUCNN_CPU_PROCESSES=1 to train in one process.") from None
        finally:
            for m, cache in caches:
                m._cache = cache
        block_fd = _shared_file(layout.size)
        block = mmap.mmap(block_fd, layout.size)
        # The model travels in a file of its own, not through the socket: a send larger than the socket's
        # buffer would block for ever should the worker be stopped (SIGSTOP) before it reads.
        model_fd = _shared_file(len(model_bytes))
        written = 0
        while written < len(model_bytes):
            written += os.pwrite(model_fd, memoryview(model_bytes)[written:], written)
        here, there = socket.socketpair()
        errors = tempfile.TemporaryFile()  # the worker's stderr, quoted should it stop
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", "from gpucnn.cpu.split import _worker_main; _worker_main()",
                 str(there.fileno()), str(block_fd), str(model_fd)],
                pass_fds=(there.fileno(), block_fd, model_fd), env=_worker_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # a worker that hangs must not hold the caller's stdout open
                stderr=errors, start_new_session=True)  # a terminal's Ctrl-C is for the main process
        finally:
            there.close()
            os.close(block_fd)  # the mapping and the worker keep the memory
            os.close(model_fd)
        params, grads, images, labels, totals = layout.views(block)
        self._worker = {"process": process, "connection": Connection(here.detach()), "block": block,
                        "errors": errors, "layout": layout, "params": params, "grads": grads, "images": images,
                        "labels": labels, "totals": totals}
        self._finalizer = weakref.finalize(self, _stop, self._worker)
        try:
            self._worker["connection"].send(layout)
        except OSError:
            self._worker_stopped()
        return self._worker

    def _wait(self, worker) -> None:
        """The worker's answer; WorkerError should it die, or stay stopped (SIGSTOP), meanwhile."""
        connection, process = worker["connection"], worker["process"]
        stopped_since = None
        try:
            while not connection.poll(POLL_S):
                if process.poll() is not None:
                    self._worker_stopped()
                if not _is_suspended(process.pid):
                    stopped_since = None
                elif stopped_since is None:
                    stopped_since = time.monotonic()
                elif time.monotonic() - stopped_since > STOPPED_GRACE_S:
                    self._worker_stopped(suspended=True)
            answer = connection.recv()
        except (EOFError, OSError):
            self._worker_stopped()
        if answer is not None:
            raise answer  # the worker's exception, as it would have been raised here

    def _worker_stopped(self, suspended: bool = False):
        worker = self._worker
        errors = worker["errors"]
        errors.seek(0)
        lines = errors.read().decode(errors="replace").strip().splitlines()
        if suspended:
            how = f" (it was suspended, by SIGSTOP or a debugger, for over {STOPPED_GRACE_S:g} s)"
            worker["process"].kill()
        elif lines:
            how = f" (it said: {lines[-1]})"
        else:
            how = _exit_text(worker["process"])
        self.close()
        raise WorkerError(f"the CPU worker process of the split training step stopped{how}; "
                          "run with GPUCNN_CPU_PROCESSES=1 to train in one process.") from None

    def close(self) -> None:
        """Stop the worker and free the shared memory (a later call starts a new worker)."""
        if self._worker is not None:
            self._finalizer()
            self._worker = None


def _is_suspended(pid: int) -> bool:
    """Whether process ``pid`` is stopped (state T or t in /proc; False where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"T", b"t")


def _exit_text(process) -> str:
    """How the worker ended, e.g. " (killed by SIGKILL, as the out-of-memory killer does)"."""
    try:
        code = process.wait(timeout=1)
    except subprocess.TimeoutExpired:
        return ""
    if code >= 0:
        return f" (exit status {code})"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    oom = ", as the out-of-memory killer does" if -code == signal.SIGKILL else ""
    return f" (killed by {name}{oom})"


def _worker_env() -> dict:
    """This process's environment, with one BLAS thread, one gpucnn thread and this gpucnn importable."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               GPUCNN_CPU_THREADS="1")
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _stop(worker: dict) -> None:
    try:
        worker["connection"].send(None)
    except (OSError, ValueError):
        pass
    try:
        worker["process"].wait(timeout=5)
    except subprocess.TimeoutExpired:
        worker["process"].kill()
        worker["process"].wait()
    for name in ("params", "grads", "images", "labels", "totals"):
        worker[name] = None
    worker["connection"].close()
    worker["block"].close()
    worker["errors"].close()


def _shared_file(size: int) -> int:
    """A file descriptor of ``size`` zeroed bytes of memory that a child process can map: a memfd on
    Linux (no name, freed with its last user), else an unlinked temporary file."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("gpucnn-split-step")
    else:  # pragma: no cover - other systems
        handle = tempfile.TemporaryFile()
        fd = os.dup(handle.fileno())
        handle.close()
    os.ftruncate(fd, size)
    return fd
