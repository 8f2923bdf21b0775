"""Emulated kernels called like CuPy's: EmulatedModule (a ``.cu`` file, built by gpucnn.emulator.build)
and its EmulatedKernel, ``k(grid, block, args, shared_mem=0)``, with arguments checked against the C
signature and threads run in a chosen order.
"""
from __future__ import annotations

import ctypes
import itertools
import threading
from pathlib import Path

import numpy as np

from gpucnn.emulator.build import (MAX_DYNAMIC_SHARED, EmulatorBuildError, EmulatorError, KernelSpec, Param,
                                   SharedMemoryError, build_library, cache_dir)

ORDERS = {"forward": 0, "reverse": 1, "random": 2}
MAX_BLOCK_THREADS = 1024
MAX_BLOCK_DIMS = (1024, 1024, 64)
MAX_GRID_DIMS = (2**31 - 1, 65535, 65535)
_ERRBUF_BYTES = 2048
# The ctypes holder of each scalar argument type.
_CTYPES = {
    np.float32: ctypes.c_float, np.float64: ctypes.c_double, np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32,
    np.int64: ctypes.c_int64, np.uint64: ctypes.c_uint64, np.int16: ctypes.c_int16, np.uint16: ctypes.c_uint16,
    np.int8: ctypes.c_int8, np.uint8: ctypes.c_uint8, np.bool_: ctypes.c_bool,
}

_LIBRARIES: dict[Path, ctypes.CDLL] = {}
_LIBRARIES_LOCK = threading.Lock()
_DIM3 = ctypes.c_uint * 3


def _load(path: Path) -> ctypes.CDLL:
    with _LIBRARIES_LOCK:
        lib = _LIBRARIES.get(path)
        if lib is None:
            lib = _LIBRARIES[path] = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
        return lib


def _dims(value, what: str, limits: tuple[int, int, int]) -> tuple[int, int, int]:
    """A grid or block as a 3-tuple of positive ints within the CUDA limits."""
    items = (value,) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"{what} must be an int or a tuple of up to 3 ints, not {value!r}.") from None
    if not 1 <= len(items) <= 3 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in items):
        raise TypeError(f"{what} must be an int or a tuple of up to 3 ints, not {value!r}.")
    dims = tuple(int(v) for v in items) + (1,) * (3 - len(items))
    for axis, (size, limit) in enumerate(zip(dims, limits)):
        if not 1 <= size <= limit:
            raise ValueError(f"{what} dimension {'xyz'[axis]} is {size}; it must be from 1 to {limit}.")
    return dims


class EmulatedKernel:
    """One kernel of an EmulatedModule, called like CuPy's RawKernel: ``k(grid, block, args, shared_mem=0)``."""

    def __init__(self, module: "EmulatedModule", spec: KernelSpec, lib: ctypes.CDLL):
        self.module = module
        self.name = spec.name
        self.spec = spec
        self._launch = getattr(lib, f"emu_launch_{spec.name}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [_DIM3, _DIM3, ctypes.c_uint, ctypes.c_int, ctypes.c_ulonglong,
                                 ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_uint]
        compiled_signature = getattr(lib, f"emu_signature_{spec.name}")
        compiled_signature.restype = ctypes.c_char_p
        if compiled_signature().decode() != spec.signature:
            raise EmulatorBuildError(f"kernel {spec.name}: the built library expects ({compiled_signature().decode()}) "
                                     f"but the source parses as ({spec.signature}); clear {cache_dir()}.")

    @property
    def signature(self) -> str:
        return self.spec.signature

    def __repr__(self) -> str:
        return f"<EmulatedKernel {self.name}({self.signature}) order={self.module.order}>"

    def _argument(self, index: int, param: Param, value):
        """The ctypes object holding one argument's value, after checking it against the C type."""
        where = f"kernel {self.name}: argument {index} ({param.name}: {param.code})"
        if param.pointer:
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{where} must be a numpy.ndarray, not {type(value).__name__}.")
            if value.dtype != np.dtype(param.dtype):
                raise TypeError(f"{where} must be an array of {np.dtype(param.dtype).name}, not "
                                f"{value.dtype.name}.")
            if not value.flags.c_contiguous:
                raise ValueError(f"{where} must be C-contiguous (raw kernels ignore strides); pass "
                                 "np.ascontiguousarray(...).")
            if not param.const and not value.flags.writeable:
                raise ValueError(f"{where} is written by the kernel but the array is read-only.")
            if param.lanes > 1 and (value.size % param.lanes or value.ctypes.data % (value.itemsize * param.lanes)):
                raise ValueError(f"{where} must hold whole {param.lanes}-vectors on a "
                                 f"{value.itemsize * param.lanes}-byte boundary.")
            return ctypes.c_void_p(value.ctypes.data)
        if type(value) is not param.dtype:
            if type(value) in (int, float, bool):
                raise TypeError(f"{where} must be a numpy.{param.dtype.__name__} scalar, not Python "
                                f"{type(value).__name__} (CuPy would pass it as a 64-bit value).")
            raise TypeError(f"{where} must be a numpy.{param.dtype.__name__} scalar, not {type(value).__name__}.")
        return _CTYPES[param.dtype](value)

    def __call__(self, grid, block, args, shared_mem=0):
        """Run the kernel over ``grid`` blocks of ``block`` threads; arrays in ``args`` are updated in place."""
        grid3 = _dims(grid, "grid", MAX_GRID_DIMS)
        block3 = _dims(block, "block", MAX_BLOCK_DIMS)
        threads = block3[0] * block3[1] * block3[2]
        if threads > MAX_BLOCK_THREADS:
            raise ValueError(f"kernel {self.name}: a block of {block3} is {threads} threads; at most "
                             f"{MAX_BLOCK_THREADS} are allowed.")
        if isinstance(shared_mem, bool) or not isinstance(shared_mem, (int, np.integer)) or shared_mem < 0:
            raise TypeError(f"kernel {self.name}: shared_mem must be a non-negative int, not {shared_mem!r}.")
        if shared_mem > MAX_DYNAMIC_SHARED:
            raise SharedMemoryError(f"kernel {self.name}: shared_mem={shared_mem} bytes exceeds the 48 KiB "
                                    f"({MAX_DYNAMIC_SHARED} bytes) of dynamic shared memory a block may have.")
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"kernel {self.name}: args must be a tuple, not {type(args).__name__}.")
        params = self.spec.params
        if len(args) != len(params):
            raise TypeError(f"kernel {self.name} takes {len(params)} arguments ({self.signature}), "
                            f"got {len(args)}.")
        holders = [self._argument(i, p, v) for i, (p, v) in enumerate(zip(params, args))]
        argv = (ctypes.c_void_p * max(1, len(holders)))(*[ctypes.addressof(h) for h in holders])
        errbuf = ctypes.create_string_buffer(_ERRBUF_BYTES)
        rc = self._launch(_DIM3(*grid3), _DIM3(*block3), int(shared_mem), ORDERS[self.module.order],
                          self.module._next_seed(), argv, errbuf, _ERRBUF_BYTES)
        if rc != 0:
            message = errbuf.value.decode(errors="replace")
            if "dynamic shared memory" in message:
                raise SharedMemoryError(message)
            raise EmulatorError(message)


class EmulatedModule:
    """The kernels of one ``.cu`` file, built for the CPU (cached) and run under a thread order.

    ``order``: ``"forward"`` (thread and block indexes ascending), ``"reverse"`` or ``"random"``
    (a fresh permutation of threads at every synchronisation phase and of blocks, from ``seed``).
    """

    def __init__(self, path, order: str = "forward", seed: int = 0):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise TypeError(f"seed must be a non-negative int, not {seed!r}.")
        self.path = Path(path).resolve()
        self.order = order
        self.seed = int(seed)
        self.library_path, self._info = build_library(self.path)
        self._lib = _load(self.library_path)
        self._kernels: dict[str, EmulatedKernel] = {}
        self._launches = itertools.count()
        self._lock = threading.Lock()

    @property
    def kernel_names(self) -> tuple[str, ...]:
        """The ``extern "C" __global__`` kernels of the file, in source order."""
        return tuple(k.name for k in self._info.kernels)

    def get_function(self, name: str) -> EmulatedKernel:
        """The kernel ``name``, callable as ``k(grid, block, args, shared_mem=0)``."""
        with self._lock:
            kernel = self._kernels.get(name)
            if kernel is None:
                spec = next((k for k in self._info.kernels if k.name == name), None)
                if spec is None:
                    raise ValueError(f"{self.path.name} has no kernel {name!r}; it has "
                                     f"{', '.join(self.kernel_names) or 'none'}.")
                kernel = self._kernels[name] = EmulatedKernel(self, spec, self._lib)
            return kernel

    def get_global(self, name: str) -> np.ndarray:
        """A writable NumPy view of the ``__constant__`` variable ``name`` (shared by all launches)."""
        spec = next((c for c in self._info.constants if c.name == name), None)
        if spec is None:
            names = ", ".join(c.name for c in self._info.constants) or "none"
            raise ValueError(f"{self.path.name} has no __constant__ variable {name!r}; it has {names}.")
        address = getattr(self._lib, f"emu_symbol_{name}")
        address.restype = ctypes.c_void_p
        size = getattr(self._lib, f"emu_symbol_size_{name}")
        size.restype = ctypes.c_ulong
        raw = np.frombuffer((ctypes.c_ubyte * size()).from_address(address()), dtype=np.uint8)
        if spec.dtype is None:
            return raw
        view = raw.view(spec.dtype)
        return view.reshape(spec.shape) if spec.shape is not None and spec.shape != () else view

    def _next_seed(self) -> int:
        # Each launch gets its own reproducible permutation stream.
        return (self.seed * 0x9E3779B97F4A7C15 + next(self._launches) * 0xBF58476D1CE4E5B9) % 2**64

    def __repr__(self) -> str:
        return f"<EmulatedModule {self.path.name} order={self.order} kernels={list(self.kernel_names)}>"

