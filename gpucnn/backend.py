"""The one place that decides between NumPy (CPU) and CuPy (GPU).

Nothing else in gpucnn imports CuPy: it asks this module for the array module
(``xp``) of an array or of a device. CuPy is imported lazily, only when the GPU
is asked for or an array's module is inspected, so ``import gpucnn`` works on
any machine.

Devices are named ``"cpu"``, ``"gpu"``, ``"emulator"`` and ``"auto"`` (the GPU
when CuPy and a CUDA device are usable, else the CPU). On the ``"emulator"``
arrays live in host memory as ``EmulatorArray`` (a NumPy subclass that only
marks where they live) and every op runs gpucnn's CUDA kernels under the CPU
emulator of ``gpucnn.emulator``: slow on purpose, for tests, learning and
debugging kernels. The default device comes from the environment variable
``GPUCNN_DEVICE`` (``auto`` when unset).
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

DEVICES = ("auto", "cpu", "gpu", "emulator")
KERNEL_DEVICES = ("gpu", "emulator")  # the devices whose ops run gpucnn's CUDA kernels
DEVICE_ENV = "GPUCNN_DEVICE"


class DeviceError(RuntimeError):
    """A device was asked for that this machine cannot provide."""


_cupy = None          # the cupy module once imported successfully
_cupy_problem = None  # why CuPy or a GPU is unusable, once known


def _probe_cupy():
    """Import CuPy and check that a CUDA device answers; remember the outcome."""
    global _cupy, _cupy_problem
    if _cupy is not None or _cupy_problem is not None:
        return
    try:
        import cupy  # noqa: PLC0415 - the only CuPy import in gpucnn
    except Exception as exc:  # ImportError, or a broken CUDA install
        _cupy_problem = (f"CuPy is not installed or cannot be imported ({type(exc).__name__}: {exc}); "
                         "install gpucnn[cuda12] or gpucnn[cuda13] to use the GPU")
        return
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        _cupy_problem = f"CuPy is installed but no CUDA device is usable ({exc})"
        return
    if count < 1:
        _cupy_problem = "CuPy is installed but no CUDA device was found"
        return
    _cupy = cupy


def gpu_available() -> bool:
    """True when CuPy imports and at least one CUDA device answers."""
    _probe_cupy()
    return _cupy is not None


def gpu_unavailable_reason() -> str | None:
    """Why the GPU cannot be used, or None when it can."""
    _probe_cupy()
    return _cupy_problem


def cupy_module():
    """The CuPy module; raises DeviceError with the reason when the GPU is unusable."""
    _probe_cupy()
    if _cupy is None:
        raise DeviceError(f"the GPU was asked for, but {_cupy_problem}.")
    return _cupy


def nccl_module():
    """CuPy's NCCL binding (``cupy.cuda.nccl``, a submodule ``import cupy`` does not load).

    Raises DeviceError when the GPU is unusable and ImportError when CuPy cannot import it.
    """
    import importlib  # noqa: PLC0415

    return importlib.import_module(f"{cupy_module().__name__}.cuda.nccl")


def default_device() -> str:
    """The device named by GPUCNN_DEVICE, or ``"auto"``."""
    name = os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"
    if name not in DEVICES:
        raise DeviceError(f"{DEVICE_ENV}={name!r} is not a device; use one of {', '.join(DEVICES)}.")
    return name


def resolve_device(device: str | None = None) -> str:
    """Turn ``None``/``"auto"``/``"cpu"``/``"gpu"``/``"emulator"`` into ``"cpu"``, ``"gpu"`` or ``"emulator"``.

    ``"gpu"`` on a machine without a usable GPU raises DeviceError with one clear
    sentence; ``"auto"`` falls back to the CPU.
    """
    name = default_device() if device is None else str(device).strip().lower()
    if name not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}.")
    if name == "auto":
        return "gpu" if gpu_available() else "cpu"
    if name == "gpu":
        cupy_module()
    return name


def xp_for(device: str):
    """The array module (numpy or cupy) of a resolved device name."""
    return cupy_module() if resolve_device(device) == "gpu" else np


class EmulatorArray(np.ndarray):
    """A NumPy array on the ``"emulator"`` device: gpucnn's ops on it run the CUDA kernels under the emulator.

    The data are ordinary host memory; the subclass marks where the array lives so that dispatch
    tells it from a CPU array (like a CuPy array from a NumPy one). NumPy's own functions still
    work on it, as CuPy's own kernels work on GPU arrays, but each is reported to the active
    ``emulator_guard`` (see there), which is how a recorded training step proves that it launches
    only gpucnn's kernels, allocates nothing and never reads back to the host.
    """

    def __array_finalize__(self, obj):
        if _emulator_guard is not None and self.base is None:
            _emulator_guard("allocation", f"a new {self.dtype} array of shape {self.shape}")

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if _emulator_guard is not None:
            _emulator_guard("numpy", f"numpy.{ufunc.__name__}" + ("" if method == "__call__" else f".{method}"))
        inputs = tuple(_plain(a) for a in inputs)
        if out is not None:
            kwargs["out"] = tuple(_plain(a) for a in out)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        if isinstance(result, tuple):
            return tuple(_on_emulator(r) for r in result)
        return _on_emulator(result)

    def __array_function__(self, func, types, args, kwargs):
        if _emulator_guard is not None:
            _emulator_guard("numpy", f"numpy.{func.__name__}")
        return super().__array_function__(func, types, args, kwargs)

    def _host_read(self, what: str):
        if _emulator_guard is not None:
            _emulator_guard("host read", what)

    def __float__(self):
        self._host_read("float()")
        return float(self.view(np.ndarray))

    def __int__(self):
        self._host_read("int()")
        return int(self.view(np.ndarray))

    def __bool__(self):
        self._host_read("bool()")
        return bool(self.view(np.ndarray))

    def item(self, *args):
        self._host_read(".item()")
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        self._host_read(".tolist()")
        return self.view(np.ndarray).tolist()


def _plain(a):
    return a.view(np.ndarray) if isinstance(a, EmulatorArray) else a


def _on_emulator(result):
    return result.view(EmulatorArray) if isinstance(result, np.ndarray) else result


_emulator_guard = None  # called as guard(kind, what) for every NumPy operation on an EmulatorArray


@contextlib.contextmanager
def emulator_guard(guard):
    """While active, ``guard(kind, what)`` hears of every NumPy use of an ``EmulatorArray``.

    kind is ``"numpy"`` (a NumPy function or ufunc: on a GPU, a kernel that is not gpucnn's),
    ``"allocation"`` (a new array owning memory), ``"host read"`` (``float()``, ``.item()``,
    ``to_numpy``, ...) or ``"synchronize"``. The guard counts them or raises. Guards do not nest.
    """
    global _emulator_guard
    if _emulator_guard is not None:
        raise RuntimeError("an emulator guard is already active; guards do not nest.")
    _emulator_guard = guard
    try:
        yield
    finally:
        _emulator_guard = None


def is_gpu_array(x) -> bool:
    """True for a CuPy ndarray, without importing CuPy when it was never imported."""
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def is_array(x) -> bool:
    """True for an array of any device: NumPy (cpu and emulator) or CuPy (gpu)."""
    return isinstance(x, np.ndarray) or is_gpu_array(x)


def get_array_module(*arrays):
    """numpy or cupy, whichever holds the given arrays (numpy for scalars, lists and the emulator)."""
    for a in arrays:
        if is_gpu_array(a):
            return _cupy
    return np


def device_of(x) -> str:
    """``"gpu"`` for a CuPy array, ``"emulator"`` for an EmulatorArray, ``"cpu"`` otherwise."""
    if type(x) is np.ndarray:  # the common case first: every op asks, several times
        return "cpu"
    if isinstance(x, EmulatorArray):
        return "emulator"
    return "gpu" if is_gpu_array(x) else "cpu"


def common_device(*arrays) -> str:
    """The one device of the given arrays (None and non-arrays skipped; ``"cpu"`` when none is an array).

    Raises ValueError when they live on different devices.
    """
    devices = {device_of(a) for a in arrays if type(a) is np.ndarray or is_array(a)}
    if len(devices) > 1:
        raise ValueError(f"the arrays live on different devices ({', '.join(sorted(devices))}); "
                         "move them to one device first.")
    return devices.pop() if devices else "cpu"


def to_device(x, device: str):
    """Copy (or pass through) an array to ``"cpu"``, ``"gpu"`` or ``"emulator"``."""
    target = resolve_device(device)
    if target == "gpu":
        return cupy_module().asarray(x)
    if target == "emulator":
        if isinstance(x, EmulatorArray):
            return x
        if _emulator_guard is not None:
            _emulator_guard("allocation", f"to_device(..., 'emulator') of a {type(x).__name__}")
        return np.array(to_numpy(x)).view(EmulatorArray)
    return to_numpy(x)


def to_numpy(x):
    """A NumPy array holding the values of x (copied from the GPU when needed; a plain view of an emulator array)."""
    if is_gpu_array(x):
        return _cupy.asnumpy(x)
    if isinstance(x, EmulatorArray):
        x._host_read("to_numpy()")
        return x.view(np.ndarray)
    return np.asarray(x)


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` says an allocation failed: host memory (MemoryError) or GPU memory.

    On the GPU that is CuPy's ``cupy.cuda.memory.OutOfMemoryError`` or a CUDA runtime error
    ``cudaErrorMemoryAllocation``. The CuPy class is matched by module and name, so this
    works (and can be tested) without importing CuPy.
    """
    if isinstance(exc, MemoryError):
        return True
    for cls in type(exc).__mro__:
        if cls.__name__ == "OutOfMemoryError" and cls.__module__.split(".")[0] == "cupy":
            return True
    return "cudaErrorMemoryAllocation" in str(exc) and type(exc).__module__.split(".")[0].startswith("cupy")


def synchronize(device: str = "gpu") -> None:
    """Wait for queued GPU work (no-op on the CPU; on the emulator, kernels have finished when they return)."""
    if device == "emulator" and _emulator_guard is not None:
        _emulator_guard("synchronize", "backend.synchronize()")
    if device == "gpu" and _cupy is not None:
        _cupy.cuda.get_current_stream().synchronize()


def describe(device: str) -> str:
    """A one-line description of a resolved device, for logs and the CLI."""
    if device == "gpu":
        cp = cupy_module()
        dev = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"gpu ({name}, CuPy {cp.__version__})"
    if device == "emulator":
        return f"emulator (gpucnn's CUDA kernels on the CPU, NumPy {np.__version__})"
    return f"cpu (NumPy {np.__version__})"
