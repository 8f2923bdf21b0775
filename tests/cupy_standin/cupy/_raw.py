"""CuPy's RawModule and RawKernel for the stand-in: the source is built by gpucnn's emulator, and a
launch is an operation on a stream (kept while the stream captures)."""
from __future__ import annotations

import hashlib
import os
import threading

import numpy as np

from cupy._array import _refuse, ndarray
from cupy.cuda import stream as _stream

_modules = {}
_lock = threading.Lock()


def _emulated_module(source: str):
    from gpucnn.emulator import EmulatedModule  # noqa: PLC0415
    from gpucnn.emulator.build import cache_dir  # noqa: PLC0415

    order = os.environ.get("GPUCNN_EMULATOR_ORDER", "forward").strip() or "forward"
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    with _lock:
        module = _modules.get((digest, order))
        if module is None:
            folder = cache_dir() / "cupy-standin"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"raw_{digest}.cu"
            if not path.exists():
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(source)
                os.replace(tmp, path)
            module = _modules[(digest, order)] = EmulatedModule(path, order=order)
        return module


class RawModule:
    """CuPy's RawModule(code=None, *, path=None, options=(), ...): compiled here by the emulator.

    ``options`` must be a tuple of strings, as CuPy's typed signature demands; they are kept as
    ``options`` (the emulator compiles with g++, so NVRTC's options cannot change anything here).
    """

    def __init__(self, code=None, *, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, jitify=None):
        if not isinstance(options, tuple):
            raise TypeError(f"Argument 'options' has incorrect type (expected tuple, got {type(options).__name__})")
        if not all(isinstance(option, str) for option in options):
            raise TypeError("RawModule options must be strings.")
        if (code is None) == (path is None):
            raise TypeError("Exactly one of `code` and `path` keyword arguments must be given.")
        if code is not None and not isinstance(code, str):
            raise TypeError(f"Argument 'code' has incorrect type (expected str, got {type(code).__name__})")
        self.code = code if code is not None else open(path).read()
        self.options = options
        self.backend = backend
        self._module = _emulated_module(self.code)

    def get_function(self, name):
        return RawKernel._from_module(self, name)


class RawKernel:
    """CuPy's RawKernel: ``kernel(grid, block, args, *, shared_mem=0, stream=None)``."""

    def __init__(self, code, name, options=(), backend="nvrtc", translate_cucomplex=False, *,
                 enable_cooperative_groups=False, jitify=None):
        module = RawModule(code=code, options=options, backend=backend)
        self._init(module, name)

    @classmethod
    def _from_module(cls, module, name):
        kernel = object.__new__(cls)
        kernel._init(module, name)
        return kernel

    def _init(self, module, name):
        self.name = name
        self.code = module.code
        self.options = module.options
        self._kernel = module._module.get_function(name)

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None, enable_cooperative_groups=False):
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"args must be tuple or list, not {type(args).__name__}")
        params = self._kernel.spec.params
        host_args, reads, writes = [], [], []
        for param, value in zip(params, args):
            if isinstance(value, ndarray):
                host_args.append(value._a)
                (reads if param.const else writes).append(value._a)
            elif isinstance(value, np.ndarray):
                _refuse(value)
            else:
                host_args.append(value)
        host_args.extend(args[len(params):])  # the emulator reports a wrong count
        kernel = self._kernel
        _stream.launch(lambda: kernel(grid, block, tuple(host_args), shared_mem=shared_mem), reads, writes,
                       stream=stream, what=f"kernel {self.name}")
