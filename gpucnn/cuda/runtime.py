"""Where kernels come from and how launchers prepare their arguments.

A *runtime* gives launchers an array module (``xp``), allocation (``empty``/``zeros``) and
kernels by file and name (``function``). CupyRuntime compiles ``kernels/*.cu`` with
``cupy.RawModule`` on a GPU; gpucnn.emulator's runtimes run the same files on the CPU. Launchers
are written once against this contract, and ask here for the runtime of the device their arrays
live on (``device_runtime``, ``runtime_for``).

CuPy is never imported here: gpucnn.backend hands the module over.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from gpucnn import backend
from gpucnn.emulator.runtime import emulator_runtime
from gpucnn.kernel_sources import COMPILE_OPTIONS, kernels_dir

# Thread ids of the last block run past the element count, so counts stay this far below 2**31.
MAX_INT32_ELEMENTS = 2**31 - 1 - 1024


class CupyRuntime:
    """Kernels compiled by CuPy's RawModule, each file once per process and device.

    ``xp`` is the CuPy module (by default gpucnn.backend's; tests pass a stand-in).
    """

    def __init__(self, kernels_folder=None, xp=None):
        self.xp = xp if xp is not None else backend.cupy_module()
        self.kernels_folder = Path(kernels_folder) if kernels_folder is not None else kernels_dir()
        self._modules = {}
        self._functions = {}
        self._lock = threading.Lock()

    def function(self, file: str, name: str):
        """The kernel ``name`` from ``kernels/<file>``, callable as ``k(grid, block, args, shared_mem=0)``.

        Handles are cached per (file, name, device): ``RawModule.get_function`` builds a new
        RawKernel on every call, which a launch per layer per step cannot afford.
        """
        key = (file, name, self.xp.cuda.Device().id)
        kernel = self._functions.get(key)
        if kernel is not None:
            return kernel
        with self._lock:
            kernel = self._functions.get(key)
            if kernel is None:
                module_key = (file, key[2])
                module = self._modules.get(module_key)
                if module is None:
                    source = (self.kernels_folder / file).read_text()
                    module = self.xp.RawModule(code=source, options=COMPILE_OPTIONS)
                    self._modules[module_key] = module
                kernel = self._functions[key] = module.get_function(name)
        return kernel

    def empty(self, shape, dtype):
        """An uninitialised device array."""
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        """A zero-filled device array."""
        return self.xp.zeros(shape, dtype=dtype)


_default = None
_default_lock = threading.Lock()
_active = []  # the wrapping runtimes in force (a recording step's), innermost last


def default_runtime() -> CupyRuntime:
    """The process-wide CupyRuntime (DeviceError, via gpucnn.backend, when no GPU is usable)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = CupyRuntime()
        return _default


def active_runtime(runtime=None):
    """The runtime a launcher uses: ``runtime`` (None: the CupyRuntime), or the wrapper in force around it.

    A recording training step wraps the runtime of its device (see gpucnn.cuda.graph); every
    launcher asks here, so the launches of the layers, the loss and the optimizer all go through it.
    """
    base = runtime if runtime is not None else default_runtime()
    for wrapper in reversed(_active):
        if wrapper.base is base:
            return wrapper
    return base


def device_runtime(device: str):
    """The process-wide runtime of a kernel device (``"gpu"``: CupyRuntime, ``"emulator"``)."""
    if device == "gpu":
        return default_runtime()
    if device == "emulator":
        return emulator_runtime()
    raise ValueError(f"the {device!r} device runs no CUDA kernels; kernel devices are gpu and emulator.")


def runtime_for(device: str):
    """The runtime that runs the kernels for arrays on ``device`` now (a recording wrapper while one is in force)."""
    for wrapper in reversed(_active):
        if getattr(wrapper, "device", None) == device:
            return wrapper
    return active_runtime(device_runtime(device))


@contextlib.contextmanager
def wrapping(wrapper):
    """Route every launch on ``wrapper.base`` through ``wrapper`` while the block runs."""
    _active.append(wrapper)
    try:
        yield wrapper
    finally:
        _active.remove(wrapper)


# Launch helpers shared by the launchers.

def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints: the number of blocks covering ``a`` items."""
    return -(-a // b)


def kernel_array(runtime, array, name: str, dtype=np.float32, ndim: int | None = None):
    """``array`` as a C-contiguous array of exactly ``dtype`` on the runtime's device.

    Refuses (TypeError) arrays of another array module or dtype, and (ValueError) a wrong ndim;
    a non-contiguous array is copied to a contiguous one, since raw kernels ignore strides.
    """
    if not isinstance(array, runtime.xp.ndarray):
        raise TypeError(f"{name} must be a {runtime.xp.__name__}.ndarray for this runtime, "
                        f"not {type(array).__module__}.{type(array).__name__}.")
    if array.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, not {array.dtype.name}.")
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, not {array.ndim} (shape {tuple(array.shape)}).")
    # Only a strided array is copied: an ascontiguousarray call would be a NumPy/CuPy op of its own.
    return array if array.flags.c_contiguous else runtime.xp.ascontiguousarray(array)


def kernel_inout_array(runtime, array, name: str, dtype=np.float32, ndim: int | None = None):
    """``array`` itself, for a kernel that updates it in place: checked like kernel_array, never copied.

    A non-contiguous array is refused (ValueError): the kernel would update a contiguous copy
    and the caller's array would silently keep its old values.
    """
    kernel_array(runtime, array, name, dtype, ndim)
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} is updated in place, so it must be C-contiguous (strides "
                         f"{tuple(array.strides)} for shape {tuple(array.shape)}); pass a contiguous array.")
    return array


def output_array(runtime, out, shape, name: str):
    """A new output array of ``shape`` (float32), or ``out`` itself, checked to be one a kernel can write.

    ``out`` must be a C-contiguous float32 array of exactly ``shape`` on the runtime's device
    (a view of a flat gradient buffer, say), else ValueError/TypeError: writing a copy would lose the result.
    """
    if out is None:
        return runtime.empty(tuple(shape), np.float32)
    kernel_inout_array(runtime, out, name)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, not {tuple(out.shape)}.")
    return out


def kernel_matrix(runtime, array, name: str):
    """A non-empty 2-D float32 kernel argument (see kernel_array) small enough for int32 indexing."""
    array = kernel_array(runtime, array, name, ndim=2)
    if 0 in array.shape:
        raise ValueError(f"{name} has a zero-length dimension (shape {tuple(array.shape)}); sizes must be positive.")
    check_int32_count(name, array.size)
    return array


def check_int32_count(name: str, count: int) -> None:
    """Refuse an element count too large for the kernels' int32 indexing."""
    if count > MAX_INT32_ELEMENTS:
        raise ValueError(f"{name} would hold {count} elements, more than the {MAX_INT32_ELEMENTS} "
                         "that the kernels' int32 indexing allows.")


def check_int32_extent(what: str, value: int) -> None:
    """Refuse a size or coordinate sum (e.g. ``H + 2*PH + SH``) that the kernels' int32 arithmetic would overflow."""
    if value > MAX_INT32_ELEMENTS:
        raise ValueError(f"{what} is {value}, more than the {MAX_INT32_ELEMENTS} that the kernels' int32 "
                         "arithmetic allows; use smaller padding, stride, dilation or kernel sizes.")

