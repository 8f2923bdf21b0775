"""Runtimes that run ``kernels/*.cu`` under the emulator: EmulatorRuntime (NumPy arrays, for tests
that call launchers with a runtime of their own) and the process-wide runtimes of the ``"emulator"``
device, one per thread order, whose allocations are ``gpucnn.backend.EmulatorArray``.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np

from gpucnn import backend
from gpucnn.emulator.build import EmulatorBuildError
from gpucnn.emulator.kernel import ORDERS, EmulatedKernel, EmulatedModule
from gpucnn.kernel_sources import kernels_dir as default_kernels_dir

ORDER_ENV = "GPUCNN_EMULATOR_ORDER"


class EmulatorRuntime:
    """The Runtime contract of docs/design.md, on NumPy arrays, with kernels run by the emulator.

    ``xp`` is numpy; ``function(file, name)`` builds ``kernels/<file>`` once (memoized per file for
    this runtime's order); ``empty`` hands out poisoned arrays (NaN, or the dtype's maximum for
    integers) so that elements a kernel forgot to write stand out.
    """

    xp = np

    def __init__(self, order: str = "forward", seed: int = 0, kernels_dir=None):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise TypeError(f"seed must be a non-negative int, not {seed!r}.")
        self.order = order
        self.seed = int(seed)
        self.kernels_dir = Path(kernels_dir) if kernels_dir is not None else default_kernels_dir()
        self._modules: dict[str, EmulatedModule] = {}
        self._lock = threading.Lock()

    def module(self, file: str) -> EmulatedModule:
        """The EmulatedModule of ``kernels/<file>``, built on first use."""
        if not isinstance(file, str) or not file.endswith(".cu"):
            raise ValueError(f"file must name a .cu file in {self.kernels_dir}, not {file!r}.")
        with self._lock:
            module = self._modules.get(file)
            if module is None:
                module = self._modules[file] = EmulatedModule(self.kernels_dir / file, self.order, self.seed)
            return module

    def function(self, file: str, name: str) -> EmulatedKernel:
        """The kernel ``name`` from ``kernels/<file>``, callable as ``k(grid, block, args, shared_mem=0)``."""
        return self.module(file).get_function(name)

    @staticmethod
    def _dtype(dtype) -> np.dtype:
        dt = np.dtype(dtype)
        if dt.kind not in "fiub":
            raise TypeError(f"the emulator allocates float, integer or bool arrays, not {dt.name}.")
        return dt

    def empty(self, shape, dtype) -> np.ndarray:
        """An array filled with poison: NaN for floats, the maximum (0x7fffffff for int32) for integers."""
        dt = self._dtype(dtype)
        if dt.kind == "f":
            fill = np.nan
        elif dt.kind == "b":
            fill = True
        else:
            fill = np.iinfo(dt).max
        return np.full(shape, fill, dtype=dt)

    def zeros(self, shape, dtype) -> np.ndarray:
        """A zero-filled array."""
        return np.zeros(shape, dtype=self._dtype(dtype))


class EmulatorDeviceRuntime(EmulatorRuntime):
    """EmulatorRuntime whose allocations live on the emulator device (EmulatorArray); a kernel that
    cannot be built (no C++ compiler, bad compiler flags) is a DeviceError of one sentence."""

    def function(self, file: str, name: str):
        try:
            return super().function(file, name)
        except EmulatorBuildError as exc:
            raise backend.DeviceError(build_error_text(exc)) from None

    def empty(self, shape, dtype):
        return super().empty(shape, dtype).view(backend.EmulatorArray)

    def zeros(self, shape, dtype):
        return super().zeros(shape, dtype).view(backend.EmulatorArray)


def build_error_text(exc) -> str:
    """One sentence for a failed emulator build: the compiler's first error line and what to check."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 1:  # no compiler to run: its own sentence says what is needed
        return f"the emulator device could not build its kernels: {lines[0] if lines else type(exc).__name__}"
    first = next((line for line in lines[1:] if "error" in line.lower()), lines[1])
    return (f"the emulator device could not build its kernels: {lines[0].rstrip(':')} ({first}); check $CXX "
            "and $GPUCNN_EMULATOR_CXXFLAGS (it needs a C++20 compiler and flags it accepts).")


_device_runtimes = {}   # thread order -> the emulator device's runtime in that order
_device_lock = threading.Lock()
_order_in_force = None  # the order emulator_order set (None: $GPUCNN_EMULATOR_ORDER, default forward)


def emulator_runtime(order: str | None = None) -> EmulatorDeviceRuntime:
    """The process-wide runtime of the ``"emulator"`` device, outputs as EmulatorArray.

    One per thread order: ``order`` (forward, reverse or random), else the one ``emulator_order``
    sets, else ``$GPUCNN_EMULATOR_ORDER`` (default forward).
    """
    if order is None:
        order = _order_in_force or os.environ.get(ORDER_ENV, "forward").strip() or "forward"
    with _device_lock:
        if order not in _device_runtimes:
            _device_runtimes[order] = EmulatorDeviceRuntime(order=order)
        return _device_runtimes[order]


@contextlib.contextmanager
def emulator_order(order: str):
    """Within the block, ops on emulator arrays run their kernels' threads in ``order``."""
    global _order_in_force
    emulator_runtime(order)  # refuses an unknown order before anything changes
    previous, _order_in_force = _order_in_force, order
    try:
        yield
    finally:
        _order_in_force = previous
