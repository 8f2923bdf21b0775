"""The one place that decides between NumPy (CPU) and CuPy (GPU).

Nothing else in gpucnn imports CuPy: it asks this module for the array module
(``xp``) of an array or of a device. CuPy is imported lazily, only when the GPU
is asked for or an array's module is inspected, so ``import gpucnn`` works on
any machine.

Devices are named ``"cpu"``, ``"gpu"`` and ``"auto"`` (the GPU when CuPy and a
CUDA device are usable, else the CPU). The default device comes from the
environment variable ``GPUCNN_DEVICE`` (``auto`` when unset).
"""
from __future__ import annotations

import os

import numpy as np

DEVICES = ("auto", "cpu", "gpu")
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
    """Turn ``None``/``"auto"``/``"cpu"``/``"gpu"`` into ``"cpu"`` or ``"gpu"``.

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


def is_gpu_array(x) -> bool:
    """True for a CuPy ndarray, without importing CuPy when it was never imported."""
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def get_array_module(*arrays):
    """numpy or cupy, whichever holds the given arrays (numpy for scalars and lists)."""
    for a in arrays:
        if is_gpu_array(a):
            return _cupy
    return np


def device_of(x) -> str:
    """``"gpu"`` for a CuPy array, ``"cpu"`` otherwise."""
    return "gpu" if is_gpu_array(x) else "cpu"


def to_device(x, device: str):
    """Copy (or pass through) an array to ``"cpu"`` or ``"gpu"``."""
    target = resolve_device(device)
    if target == "gpu":
        return cupy_module().asarray(x)
    return to_numpy(x)


def to_numpy(x):
    """A NumPy array holding the values of x (copied from the GPU when needed)."""
    if is_gpu_array(x):
        return _cupy.asnumpy(x)
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
    """Wait for queued GPU work (no-op on the CPU)."""
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
    return f"cpu (NumPy {np.__version__})"
