"""A strict CuPy stand-in for gpucnn's test suite, never for users: arrays live in host memory, raw
kernels run under gpucnn's CUDA emulator, and what CuPy refuses is refused with CuPy's exceptions.

``python -m pytest -q -m gpu --cupy-standin`` (tests/conftest.py) puts this package first on the
path as ``cupy``, so gpucnn's GPU code path (backend, CupyRuntime, the captured step, the CLI with
``--device gpu``, bench/gpu_train.py) runs on the CPU. Results under it are not GPU results: the
device calls itself "CuPy stand-in" (cuda.runtime.getDeviceProperties) and ``__version__`` says so.

Kept from CuPy: the names and signatures that gpucnn uses (tests/test_cupy_standin.py compares them
with an installed cupy). Checked beyond NumPy: see ``_array`` (implicit conversions, NumPy operands)
and ``cuda.stream`` (stream capture, stream order).
"""
from __future__ import annotations

import numpy as np

from cupy import cuda, random  # noqa: F401 - CuPy's submodules
from cupy._array import _refuse, _unwrap, call, ndarray, wrap
from cupy._raw import RawKernel, RawModule  # noqa: F401
from cupy.cuda import stream as _stream

__version__ = "14.2.0+gpucnn.standin"
STANDIN = True  # how a test tells the stand-in from CuPy


def _new(host_array, written=True, what="an allocation"):
    _stream.allocate(host_array, written=written, what=what)
    return wrap(host_array)


def _poisoned(host_array):
    """An uninitialised allocation: NaN (floats) or the maximum (integers), so unwritten reads stand out."""
    if host_array.dtype.kind == "f":
        host_array.fill(np.nan)
    elif host_array.dtype.kind in "iu":
        host_array.fill(np.iinfo(host_array.dtype).max)
    return _new(host_array, written=False, what="cupy.empty")


def empty(shape, dtype=float, order="C"):
    return _poisoned(np.empty(shape, dtype=dtype, order=order))


def empty_like(prototype, dtype=None, order="K", subok=None, shape=None):
    if not isinstance(prototype, ndarray):
        _refuse(prototype)
    return _poisoned(np.empty_like(prototype._a, dtype=dtype, order=order, shape=shape))


def asarray(a, dtype=None, order=None, copy=None, *, blocking=False):
    """A device array of ``a``: itself when it is one already (of that dtype); else a host-to-device copy."""
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    return _new(np.array(_unwrap(a, strict=False), dtype=dtype, order=order or "K"), what="cupy.asarray")


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        return call(np.array, (obj,), {"dtype": dtype, "copy": True, "order": order, "ndmin": ndmin}, "cupy.array")
    return _new(np.array(_unwrap(obj, strict=False), dtype=dtype, order=order, ndmin=ndmin), what="cupy.array")


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out)
    return np.asarray(a, order=order)


def get_array_module(*args):
    return __import__("cupy") if any(isinstance(a, ndarray) for a in args) else np


def get_default_memory_pool():
    return cuda.memory._default_pool


def get_default_pinned_memory_pool():
    return cuda.memory._default_pinned_pool


def __getattr__(name):
    """NumPy's dtypes and constants as they are; its functions and ufuncs as device operations."""
    attr = getattr(np, name, None)
    if attr is None or name.startswith("_") or name in ("testing", "random", "lib", "linalg", "fft"):
        raise AttributeError(f"module 'cupy' (the gpucnn stand-in) has no attribute {name!r}")
    if isinstance(attr, type) or not callable(attr):
        return attr
    return lambda *args, **kwargs: call(attr, args, kwargs, f"cupy.{name}")
