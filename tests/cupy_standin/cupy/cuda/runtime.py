"""``cupy.cuda.runtime`` of the stand-in: one device, CuPy's CUDARuntimeError, the memcpy kinds."""
from __future__ import annotations

import ctypes

memcpyHostToHost, memcpyHostToDevice, memcpyDeviceToHost, memcpyDeviceToDevice, memcpyDefault = 0, 1, 2, 3, 4
streamCaptureModeGlobal, streamCaptureModeThreadLocal, streamCaptureModeRelaxed = 0, 1, 2

# The CUDA errors the stand-in raises (status, name, CUDA's own text).
ERRORS = {
    900: ("cudaErrorStreamCaptureUnsupported", "operation not permitted when stream is capturing"),
    901: ("cudaErrorStreamCaptureInvalidated", "operation failed due to a previous error during capture"),
    904: ("cudaErrorStreamCaptureImplicit",
          "operation would make the legacy stream depend on a capturing blocking stream"),
    905: ("cudaErrorCapturedEvent", "operation not permitted on an event last recorded in a capturing stream"),
    1: ("cudaErrorInvalidValue", "invalid argument"),
}
CAPTURE_UNSUPPORTED, CAPTURE_INVALIDATED, CAPTURE_IMPLICIT = 900, 901, 904


class CUDARuntimeError(RuntimeError):
    """CuPy's cupy_backends.cuda.api.runtime.CUDARuntimeError: ``str`` is "<name>: <text>"."""

    def __init__(self, status):
        self.status = status
        name, text = ERRORS.get(status, (f"cudaError{status}", "unknown error"))
        super().__init__(f"{name}: {text}")

    def __reduce__(self):
        return (type(self), (self.status,))


def getDeviceCount():
    return 1


def getDevice():
    return 0


def setDevice(device):
    if device != 0:
        raise CUDARuntimeError(101)


def getDeviceProperties(device):
    if device != 0:
        raise CUDARuntimeError(101)
    return {"name": b"CuPy stand-in (gpucnn tests, on the CPU; not a GPU)", "major": 9, "minor": 0,
            "multiProcessorCount": 2, "totalGlobalMem": 8 * 2**30, "sharedMemPerBlock": 48 * 1024,
            "sharedMemPerBlockOptin": 227 * 1024, "regsPerBlock": 65536, "warpSize": 32,
            "maxThreadsPerBlock": 1024, "clockRate": 1_000_000, "memoryClockRate": 1_000_000,
            "memoryBusWidth": 64, "l2CacheSize": 2**20}


def driverGetVersion():
    return 13000


def runtimeGetVersion():
    return 13000


def deviceSynchronize():
    from cupy.cuda import stream as _device  # noqa: PLC0415 - stream imports this module

    _device.synchronize_all("cudaDeviceSynchronize")


def memcpyAsync(dst, src, size, kind, stream):
    """Copy ``size`` bytes between two pointers, as an operation on ``stream`` (a pointer; 0: legacy)."""
    from cupy.cuda import stream as _device  # noqa: PLC0415

    if kind not in (memcpyHostToHost, memcpyHostToDevice, memcpyDeviceToHost, memcpyDeviceToDevice, memcpyDefault):
        raise CUDARuntimeError(1)
    _device.launch(lambda: ctypes.memmove(dst, src, size), (), (), stream=_device.stream_of_pointer(stream),
                   what="cudaMemcpyAsync")
