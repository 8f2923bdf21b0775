"""The parameter names of the CuPy API that gpucnn and its tests use, read from whatever ``cupy`` imports:
``python tests/cupy_signatures.py`` prints them as JSON (tests/test_cupy_standin.py runs it against the
stand-in and, where it imports, the real CuPy)."""
from __future__ import annotations

import importlib
import inspect
import json
import re
import sys

NAMES = (
    "asarray", "asnumpy", "empty", "empty_like", "get_array_module", "get_default_memory_pool",
    "ndarray", "ndarray.get", "ndarray.set", "ndarray.fill",
    "RawModule", "RawModule.get_function", "RawKernel", "RawKernel.__call__",
    "cuda.Device", "cuda.Device.use", "cuda.Device.synchronize",
    "cuda.Stream", "cuda.Stream.use", "cuda.Stream.synchronize", "cuda.Stream.record", "cuda.Stream.wait_event",
    "cuda.Stream.begin_capture", "cuda.Stream.end_capture", "cuda.Stream.is_capturing",
    "cuda.Event", "cuda.Event.record", "cuda.Event.synchronize", "cuda.get_elapsed_time", "cuda.get_current_stream",
    "cuda.graph.Graph.launch", "cuda.graph.Graph.upload",
    "cuda.MemoryPool", "cuda.MemoryPool.used_bytes", "cuda.MemoryPool.total_bytes", "cuda.MemoryPool.free_all_blocks",
    "cuda.MemoryPool.set_limit", "cuda.MemoryPool.get_limit",
    "cuda.memory.OutOfMemoryError", "cuda.runtime.CUDARuntimeError",
    "cuda.runtime.getDeviceCount", "cuda.runtime.getDeviceProperties", "cuda.runtime.driverGetVersion",
    "cuda.runtime.runtimeGetVersion", "cuda.runtime.memcpyAsync", "cuda.runtime.deviceSynchronize",
    "cuda.nvrtc.getVersion",
    "random.RandomState", "random.RandomState.seed", "random.RandomState.standard_normal",
    "random.RandomState.normal", "random.RandomState.uniform", "random.RandomState.random_sample",
    "random.RandomState.rand", "random.RandomState.randn", "random.RandomState.randint",
)
# Exceptions and their first base outside CuPy; constants by value.
EXCEPTIONS = {"cuda.runtime.CUDARuntimeError": "RuntimeError", "cuda.memory.OutOfMemoryError": "MemoryError"}
CONSTANTS = ("cuda.runtime.memcpyDeviceToDevice", "cuda.runtime.memcpyHostToDevice", "cuda.runtime.memcpyDeviceToHost")


def resolve(cupy, dotted: str):
    obj = cupy
    for part in dotted.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(f"{obj.__name__}.{part}")
    return obj


def parameters(obj) -> list[str]:
    """Parameter names (without self): from inspect, else from a Cython docstring's first line."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        names = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        names = []
    if names in ([], ["args", "kwargs"], ["self", "args", "kwargs"]):  # a Cython signature: read the docstring
        for doc in (obj.__doc__, target.__doc__):
            first = (doc or "").strip().splitlines()[:1]
            match = re.match(r"[\w.]+\((.*)\)", first[0]) if first else None
            if match:
                names = [re.split(r"[=:]", p.strip())[0].split()[-1].lstrip("*") for p in match.group(1).split(",")
                         if p.strip() and p.strip() not in ("*", "/")]
                break
    return [n for n in names if n != "self"]


def main() -> None:
    import cupy

    report = {"parameters": {name: parameters(resolve(cupy, name)) for name in NAMES},
              "bases": {name: next(c.__name__ for c in resolve(cupy, name).__mro__[1:]
                                   if not c.__module__.startswith(("cupy", "cupy_backends")))
                        for name in EXCEPTIONS},
              "constants": {name: int(resolve(cupy, name)) for name in CONSTANTS},
              "nccl_available_is_bool": isinstance(resolve(cupy, "cuda.nccl").available, bool)}
    json.dump(report, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
