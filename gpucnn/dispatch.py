"""The one place that picks an op's implementation: by the device its arrays live on.

Every public op in ``gpucnn.ops`` is ``dispatch.run(family, name, check, *args)``:

=============  ==================================  =============================================
device         arrays                              implementation of ``gpucnn.ops.<family>.<name>``
=============  ==================================  =============================================
``cpu``        ``numpy.ndarray``                   ``gpucnn.cpu.<family>.<name>`` when it exists (the fast
                                                   CPU path), else the NumPy reference
                                                   ``gpucnn.ops.<family>.<name>_reference``
``gpu``        ``cupy.ndarray``                    the launcher ``gpucnn.cuda.<family>.<name>`` on the
                                                   CupyRuntime (kernels compiled by RawModule)
``emulator``   ``gpucnn.backend.EmulatorArray``    the same launcher on the emulator runtime (the same
                                                   ``kernels/*.cu`` run on the CPU by gpucnn.emulator)
=============  ==================================  =============================================

Arguments are validated once per path: on the CPU by ``check`` (the op family's checks in
gpucnn.ops), on the kernel devices by the launcher, which calls the same checks and adds the
kernels' own (float32, contiguity, int32 sizes). Modules are imported on first use, so
``gpucnn.ops`` never imports ``gpucnn.cuda`` (nor CuPy) at import time.

``cpu_path("reference")`` makes NumPy arrays run the reference (the oracle the fast path is
tested against); ``cpu_path("fast")`` is the default.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect

from gpucnn import backend

FAMILIES = ("conv", "pool", "activation", "linear", "loss", "tensor", "norm")
CPU_PATHS = ("fast", "reference")

_cpu_path = "fast"
_cache: dict = {}


def _lookup(module_name: str, attribute: str):
    """``module_name.attribute``, or None when the module or the attribute does not exist."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise  # the module exists but one of its own imports is missing
        return None
    return getattr(module, attribute, None)


def cpu_implementation(family: str, name: str, path: str | None = None):
    """The function that runs op ``name`` of ``family`` on NumPy arrays (fast path or reference)."""
    path = _cpu_path if path is None else path
    key = ("cpu", family, name, path)
    if key not in _cache:
        fast = _lookup(f"gpucnn.cpu.{family}", name) if path == "fast" else None
        if fast is not None:  # the fast path's first use: its arrays should not page-fault anew each step
            from gpucnn.cpu.memory import keep_freed_memory  # noqa: PLC0415
            from gpucnn.cpu.threads import check_setting  # noqa: PLC0415
            check_setting()
            keep_freed_memory()
        reference = _lookup(f"gpucnn.ops.{family}", f"{name}_reference")
        if fast is None and reference is None:
            raise LookupError(f"no CPU implementation of gpucnn.ops.{family}.{name}.")
        _cache[key] = fast if fast is not None else reference
    return _cache[key]


def launcher(family: str, name: str):
    """The launcher of op ``name`` in ``gpucnn.cuda.<family>`` (takes ``runtime=``)."""
    key = ("kernel", family, name)
    if key not in _cache:
        found = _lookup(f"gpucnn.cuda.{family}", name)
        if found is None:
            raise LookupError(f"gpucnn.ops.{family}.{name} has no CUDA kernel launcher.")
        _cache[key] = found
    return _cache[key]


def on_kernel_device(*arrays) -> bool:
    """True when the arrays live on a kernel device (gpu, emulator), where the launchers fuse more."""
    return backend.common_device(*arrays) in backend.KERNEL_DEVICES


def write_into(out, result):
    """``result`` copied into ``out`` when out is given (a CPU path's answer to an ``out=`` argument)."""
    if out is None:
        return result
    out[...] = result
    return out


def run(family: str, name: str, check, *args, **kwargs):
    """Run op ``name`` of ``family`` on the device of its array arguments.

    ``check(*args, **kwargs)`` validates for the CPU paths; the launchers validate for theirs.
    Arrays on different devices raise ValueError.
    """
    try:
        device = backend.common_device(*args, *kwargs.values())
    except ValueError:
        raise ValueError(_device_mismatch(check, args, kwargs)) from None
    if device == "cpu":
        check(*args, **kwargs)
        return cpu_implementation(family, name)(*args, **kwargs)
    from gpucnn.cuda.runtime import runtime_for  # noqa: PLC0415 - imported on the first kernel-device op
    return launcher(family, name)(*args, **kwargs, runtime=runtime_for(device))


def _device_mismatch(check, args, kwargs) -> str:
    """The sentence naming the first argument on another device than the first array argument."""
    bound = inspect.signature(check).bind(*args, **kwargs).arguments
    arrays = [(name, value) for name, value in bound.items() if backend.is_array(value)]
    first_name, first = arrays[0]
    for name, value in arrays[1:]:
        if backend.device_of(value) != backend.device_of(first):
            return (f"{name} and {first_name} must be on the same device "
                    f"({backend.device_of(value)} vs {backend.device_of(first)}).")
    return "the arrays live on different devices."


@contextlib.contextmanager
def cpu_path(path: str):
    """Within the block, NumPy arrays run the ``"fast"`` CPU path or the NumPy ``"reference"``."""
    global _cpu_path
    if path not in CPU_PATHS:
        raise ValueError(f"the CPU path must be one of {', '.join(CPU_PATHS)}, not {path!r}.")
    previous, _cpu_path = _cpu_path, path
    try:
        yield
    finally:
        _cpu_path = previous
