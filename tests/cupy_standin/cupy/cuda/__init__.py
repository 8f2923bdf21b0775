"""CuPy's cupy.cuda for the stand-in: one device (0), streams, events, graphs, the memory pool."""
from __future__ import annotations

from cupy.cuda import graph, memory, nvrtc, runtime, stream  # noqa: F401 - CuPy's submodules
from cupy.cuda.graph import Graph
from cupy.cuda.memory import MemoryPool, PinnedMemoryPool  # noqa: F401
from cupy.cuda.stream import Event, Stream, get_current_stream, get_elapsed_time  # noqa: F401


class Device:
    """CuPy's cupy.cuda.Device: the stand-in has device 0 only."""

    def __init__(self, device=None):
        device = 0 if device is None else int(device)
        if device != 0:
            raise runtime.CUDARuntimeError(101)
        self.id = device

    def use(self):
        return self

    def synchronize(self):
        stream.synchronize_all("cudaDeviceSynchronize")

    @property
    def compute_capability(self):
        return "90"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id} (stand-in)>"


def is_available():
    return True


def get_device_id():
    return 0
