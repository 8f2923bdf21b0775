"""Record a step's launches once, replay them: a CUDA graph on the GPU, a launch list on the emulator.

A ``StepRuntime`` wraps a device runtime (CupyRuntime or the emulator's) for one kind of step
(say, one training step of one model at one batch size). The step's code runs through it in
three modes:

``plan``    the first run: every buffer a launcher asks for (``empty``/``zeros``) is allocated
            and kept, in order; launches run. The step now holds every buffer it touches.
``reuse``   later eager runs: the launchers get the planned buffers back in the same order (a
            ``zeros`` buffer is zeroed by a ``fill`` launch) and launches run; nothing is allocated.
``record``  one run whose launches are not run but kept (emulator) or captured by CuPy's stream
            capture into a CUDA graph (GPU); ``replay()`` then runs them, batch after batch.

While recording on the emulator, an ``emulator_guard`` refuses, with a ``CaptureError`` naming
the call, everything that would break a CUDA graph: an allocation, a host read or
synchronisation, and any NumPy operation on device arrays (on a GPU, a kernel that is not
gpucnn's). A buffer asked for that the plan does not hold (another shape, one more) is refused
the same way. So a step that records cleanly on the emulator is capturable on a GPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from gpucnn import backend
from gpucnn.cuda.runtime import wrapping

MODES = ("plan", "reuse", "record")


@dataclass
class Launch:
    """One recorded kernel launch: the kernel's name, the callable, and its launch configuration."""
    name: str
    kernel: object
    grid: tuple
    block: tuple
    args: tuple
    shared_mem: int


def replay(launches) -> None:
    """Run recorded launches again, in order, with their recorded arguments."""
    for launch in launches:
        launch.kernel(launch.grid, launch.block, launch.args, shared_mem=launch.shared_mem)


class CaptureError(RuntimeError):
    """A recorded step did what a CUDA graph cannot hold: allocate, read back, sync, or run a foreign op."""


class StepRuntime:
    """A runtime for one step: planned buffers, and launches run, kept or captured (see the module docstring).

    ``base`` is the device runtime being wrapped; ``device`` "gpu" or "emulator". ``launches``
    holds the recorded launches (emulator) and ``kernel_names`` the name of every launch of the
    last run, in order (any mode).
    """

    def __init__(self, base, device: str):
        if device not in backend.KERNEL_DEVICES:
            raise ValueError(f"steps are recorded on a kernel device (gpu or emulator), not {device!r}.")
        self.base = base
        self.xp = base.xp
        self.device = device
        self.mode = "plan"
        self.buffers = []
        self.launches = []
        self.kernel_names = []
        self.graph = None  # the CUDA graph, after recording on the GPU
        self.planned = False
        self._stream = None
        self._next_buffer = 0

    # --- the runtime contract ------------------------------------------------
    def function(self, file: str, name: str):
        kernel = self.base.function(file, name)

        def launch(grid, block, args, shared_mem=0):
            self.kernel_names.append(name)
            if self.mode == "record" and self.device == "emulator":
                self.launches.append(Launch(name, kernel, tuple(grid), tuple(block), tuple(args), int(shared_mem)))
            else:  # run now (on the GPU while recording, the stream capture keeps it instead)
                kernel(grid, block, args, shared_mem=shared_mem)
        return launch

    def empty(self, shape, dtype):
        return self._buffer(shape, dtype, "empty")

    def zeros(self, shape, dtype):
        buffer = self._buffer(shape, dtype, "zeros")
        if self.mode != "plan":
            if np.dtype(dtype) != np.float32:
                raise CaptureError(f"zeros({tuple(shape)}, {np.dtype(dtype).name}) in a replayed step: only "
                                   "float32 buffers are re-zeroed by a launch.")
            from gpucnn.cuda.tensor import fill  # noqa: PLC0415 - tensor imports runtime helpers
            fill(buffer, 0.0, runtime=self)
        return buffer

    def _buffer(self, shape, dtype, what: str):
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        if self.mode == "plan":
            buffer = getattr(self.base, what)(shape, dtype)
            self.buffers.append(buffer)
            return buffer
        index = self._next_buffer
        if index >= len(self.buffers) or self.buffers[index].shape != shape or self.buffers[index].dtype != dtype:
            held = (f"buffer {index} of the plan is {self.buffers[index].dtype} {self.buffers[index].shape}"
                    if index < len(self.buffers) else f"the plan holds only {len(self.buffers)} buffers")
            raise CaptureError(f"{what}({shape}, {dtype.name}) was asked for in a {self.mode} run, but {held}: "
                               "a recorded step must ask for the same buffers, in the same order, every time.")
        self._next_buffer += 1
        return self.buffers[index]

    # --- running the step -----------------------------------------------------
    def run(self, body, mode: str):
        """Run ``body()`` with every launch of its device going through this runtime, in ``mode``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}.")
        if mode != "plan" and not self.planned:
            raise RuntimeError("run the step once in plan mode before reusing or recording it.")
        if mode == "plan" and self.planned:
            raise RuntimeError("this step has its plan already; a new plan needs a new StepRuntime.")
        self.mode, self._next_buffer, self.kernel_names = mode, 0, []
        with wrapping(self), self._guarded():
            if mode == "record" and self.device == "gpu":
                result = self._capture(body)
            else:
                if mode == "record":
                    self.launches = []
                result = body()
        self.planned = True
        if mode != "plan" and self._next_buffer != len(self.buffers):
            raise CaptureError(f"the {mode} run used {self._next_buffer} of the {len(self.buffers)} planned "
                               "buffers: the step must ask for the same buffers every time.")
        return result

    def _capture(self, body):
        stream = self.stream
        with stream:
            stream.begin_capture()
            try:
                result = body()
            except BaseException:
                # End the capture, but raise the body's error: after a refused call CUDA's end_capture
                # only says the capture was invalidated, which would hide what the body did.
                with contextlib.suppress(Exception):
                    stream.end_capture()
                raise
            self.graph = stream.end_capture()
        self.graph.upload(stream)
        return result

    @property
    def stream(self):
        """The CUDA stream the step's copies, capture and replays use (a blocking one: it orders with
        the default stream, on which the learning rate and the input batch are written)."""
        if self._stream is None:
            self._stream = backend.cupy_module().cuda.Stream(non_blocking=False)
        return self._stream

    @contextlib.contextmanager
    def _guarded(self):
        if self.mode != "record" or self.device != "emulator":
            yield
            return

        def refuse(kind, what):
            raise CaptureError(f"{kind} inside a recorded step: {what}. A CUDA graph cannot hold it; allocate "
                               "before recording, read results after replay, and launch only gpucnn's kernels.")
        with backend.emulator_guard(refuse):
            yield

    def replay(self) -> None:
        """Run the recorded launches once more, on whatever the step's buffers hold now."""
        if self.device == "gpu":
            if self.graph is None:
                raise RuntimeError("nothing was recorded: run the step in record mode first.")
            self.graph.launch(self.stream)
            return
        if not self.launches:
            raise RuntimeError("nothing was recorded: run the step in record mode first.")
        replay(self.launches)
