"""Where kernels come from and how launchers prepare their arguments.

A *runtime* gives launchers an array module (``xp``), allocation (``empty``/``zeros``) and
kernels by file and name (``function``). CupyRuntime compiles ``kernels/*.cu`` with
``cupy.RawModule`` on a GPU; gpucnn.testing.emulator.EmulatorRuntime runs the same files on the
CPU. Launchers are written once against this contract.

CuPy is never imported here: gpucnn.backend hands the module over.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np

from gpucnn import backend

# What CupyRuntime passes to cupy.RawModule(options=...).
COMPILE_OPTIONS = ("-std=c++17",)
EMULATOR_ORDER_ENV = "GPUCNN_EMULATOR_ORDER"
# What CuPy itself adds before NVRTC sees them (read in CuPy 15.0.0a1, github.com/cupy/cupy at 6b6d956,
# 2026-08-20): cupy/cuda/compiler.py _compile_with_cache_cuda appends "-ftz=true" (denormals flush to
# zero) and _compile_using_nvrtc "--device-as-default-execution-space" and "-arch=sm_XX" (compute_XX
# past NVRTC's newest sm); cupy/_core/core.pyx assemble_cupy_compiler_options adds "--std=c++17" only
# when no -std is given, and -I paths (its bundled CCCL, its own headers, the CUDA headers), which
# cannot change kernels that include no header. gpucnn.testing.nvrtc compiles with both tuples.
CUPY_NVRTC_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
NVRTC_OPTIONS = COMPILE_OPTIONS + CUPY_NVRTC_OPTIONS
# Thread ids of the last block run past the element count, so counts stay this far below 2**31.
MAX_INT32_ELEMENTS = 2**31 - 1 - 1024


def _candidate_kernel_dirs(package_dir: Path) -> list[Path]:
    """A checkout keeps kernels/ beside the package; a wheel ships them as gpucnn/kernels."""
    return [package_dir.parent / "kernels", package_dir / "kernels"]


def find_kernels_dir(package_dir) -> Path:
    """The first folder holding ``*.cu`` files for the gpucnn package at ``package_dir``."""
    candidates = _candidate_kernel_dirs(Path(package_dir))
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.cu")):
            return folder
    raise FileNotFoundError("no CUDA kernel files (*.cu) were found in "
                            + " or ".join(str(c) for c in candidates) + ".")


def kernels_dir() -> Path:
    """The folder of gpucnn's ``.cu`` files, in a checkout or an installed wheel."""
    return find_kernels_dir(Path(__file__).resolve().parent.parent)


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


_emulators = {}        # thread order -> the emulator device's runtime in that order
_emulator_order = None  # the order in force (None: $GPUCNN_EMULATOR_ORDER, default forward)


def emulator_runtime(order: str | None = None):
    """The process-wide runtime of the ``"emulator"`` device: gpucnn.testing's emulator, outputs as EmulatorArray.

    One per thread order: ``order`` (forward, reverse or random), else the one ``emulator_order``
    sets, else ``$GPUCNN_EMULATOR_ORDER`` (default forward).
    """
    if order is None:
        order = _emulator_order or os.environ.get(EMULATOR_ORDER_ENV, "forward").strip() or "forward"
    with _default_lock:
        if order not in _emulators:
            from gpucnn.testing.emulator import EmulatorRuntime  # noqa: PLC0415 - only the emulator device needs it

            class EmulatorDeviceRuntime(EmulatorRuntime):
                """EmulatorRuntime whose allocations live on the emulator device (EmulatorArray)."""

                def empty(self, shape, dtype):
                    return super().empty(shape, dtype).view(backend.EmulatorArray)

                def zeros(self, shape, dtype):
                    return super().zeros(shape, dtype).view(backend.EmulatorArray)

            _emulators[order] = EmulatorDeviceRuntime(order=order)
        return _emulators[order]


@contextlib.contextmanager
def emulator_order(order: str):
    """Within the block, ops on emulator arrays run their kernels' threads in ``order``."""
    global _emulator_order
    emulator_runtime(order)  # refuses an unknown order before anything changes
    previous, _emulator_order = _emulator_order, order
    try:
        yield
    finally:
        _emulator_order = previous


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

