"""Compile a ``.cu`` file with NVRTC itself, without a GPU or a driver, and read ptxas's report.

g++ (the emulator's compiler) accepts things NVRTC rejects, so CI compiles every kernel file with
the NVRTC library shipped in the ``nvidia-cuda-nvrtc`` wheel, called through its C API with
ctypes. Compiling for a real architecture (``sm_80``) makes NVRTC run ptxas, whose verbose report
gives, per kernel, registers, spill stores/loads and static shared memory.

    >>> result = compile_file("kernels/conv2d.cu", arch="sm_90")
    >>> result.kernels["conv2d_forward_tiled"].registers
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field
from pathlib import Path

from gpucnn.kernel_sources import NVRTC_OPTIONS

# NVRTC's options as CuPy compiles CupyRuntime's kernels: gpucnn's COMPILE_OPTIONS plus what CuPy
# adds, among them -ftz=true (see gpucnn.kernel_sources.CUPY_NVRTC_OPTIONS for where CuPy adds each);
# compile_source adds a real architecture, as CuPy's -arch=sm_XX, and ptxas's report.
BASE_OPTIONS = NVRTC_OPTIONS
PTXAS_VERBOSE = "--ptxas-options=-v"


class NvrtcUnavailable(RuntimeError):
    """The nvidia-cuda-nvrtc wheel (or its shared library) is not installed."""


class NvrtcCompileError(RuntimeError):
    """NVRTC rejected the source; the message carries NVRTC's log."""

    def __init__(self, name: str, arch: str, log: str):
        super().__init__(f"NVRTC failed to compile {name} for {arch}:\n{log}")
        self.log = log


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one kernel (bytes for memory, a count for registers)."""
    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int


@dataclass
class CompileResult:
    """One successful compilation: the per-kernel report, the full log, the CUBIN (and its size) and the PTX."""
    arch: str
    cubin_bytes: int
    log: str
    ptx: str
    kernels: dict[str, KernelResources] = field(default_factory=dict)
    cubin: bytes = b""


def find_library() -> Path:
    """The path of ``libnvrtc.so*`` inside the installed ``nvidia`` package; NvrtcUnavailable if none."""
    try:
        import nvidia  # noqa: PLC0415 - a namespace package installed by the nvidia-* wheels
    except ImportError:
        raise NvrtcUnavailable("the nvidia-cuda-nvrtc wheel is not installed "
                               "(pip install nvidia-cuda-nvrtc)") from None
    for root in map(Path, nvidia.__path__):
        # cu13 wheels put it in nvidia/cu13/lib, cu12 wheels in nvidia/cuda_nvrtc/lib.
        for lib_dir in (root / "cu13" / "lib", root / "cuda_nvrtc" / "lib"):
            candidates = sorted(p for p in lib_dir.glob("libnvrtc.so*") if "builtins" not in p.name)
            if candidates:
                return candidates[0]
    raise NvrtcUnavailable("the nvidia package is installed but holds no libnvrtc.so*; "
                           "install the nvidia-cuda-nvrtc wheel")


_lib = None


def _library():
    """Load libnvrtc once; its builtins library is loaded first, globally, from the same folder."""
    global _lib
    if _lib is None:
        path = find_library()
        for builtins in sorted(path.parent.glob("libnvrtc-builtins.so*")):
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(str(path))
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        _lib = lib
    return _lib


def version() -> tuple[int, int]:
    """NVRTC's (major, minor) version."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(_library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(status: int, call: str) -> None:
    if status != 0:
        message = _library().nvrtcGetErrorString(status).decode()
        raise RuntimeError(f"{call} failed: {message} (status {status})")


def compile_source(source: str, name: str = "kernel.cu", arch: str = "sm_90",
                   options: tuple[str, ...] = BASE_OPTIONS) -> CompileResult:
    """Compile CUDA C source to a CUBIN for ``arch`` (e.g. ``"sm_80"``) and parse ptxas's report.

    Raises NvrtcCompileError, with NVRTC's log, when the source does not compile.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, not {type(source).__name__}.")
    if not re.fullmatch(r"sm_\d+[a-z]?", arch):
        raise ValueError(f"arch must name a real architecture like 'sm_90', not {arch!r}.")
    lib = _library()
    program = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        all_options = [*options, f"--gpu-architecture={arch}", PTXAS_VERBOSE]
        option_array = (ctypes.c_char_p * len(all_options))(*(o.encode() for o in all_options))
        status = lib.nvrtcCompileProgram(program, len(all_options), option_array)
        log = _program_log(lib, program)
        if status != 0:
            raise NvrtcCompileError(name, arch, log)
        cubin_size = ctypes.c_size_t()
        _check(lib.nvrtcGetCUBINSize(program, ctypes.byref(cubin_size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(cubin_size.value)
        _check(lib.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
        ptx_size = ctypes.c_size_t()
        _check(lib.nvrtcGetPTXSize(program, ctypes.byref(ptx_size)), "nvrtcGetPTXSize")
        ptx = ctypes.create_string_buffer(ptx_size.value)
        _check(lib.nvrtcGetPTX(program, ptx), "nvrtcGetPTX")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))
    return CompileResult(arch=arch, cubin_bytes=cubin_size.value, log=log, ptx=ptx.value.decode(errors="replace"),
                         kernels=parse_ptxas_log(log), cubin=cubin.raw)


def compile_file(path, arch: str = "sm_90", options: tuple[str, ...] = BASE_OPTIONS) -> CompileResult:
    """Compile one ``.cu`` file; see compile_source."""
    path = Path(path)
    return compile_source(path.read_text(), name=path.name, arch=arch, options=options)


def _program_log(lib, program) -> str:
    size = ctypes.c_size_t()
    _check(lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)), "nvrtcGetProgramLogSize")
    buffer = ctypes.create_string_buffer(size.value)
    _check(lib.nvrtcGetProgramLog(program, buffer), "nvrtcGetProgramLog")
    return buffer.value.decode(errors="replace")


_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, KernelResources]:
    """Per kernel name, the resources ptxas reported (``-v``) in an NVRTC log.

    Each kernel's report starts at "Compiling entry function 'name'"; a kernel with no shared
    memory has no "bytes smem" field, which reads as 0.
    """
    reports: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = reports.setdefault(entry.group(1), {"registers": 0, "spill_stores": 0, "spill_loads": 0,
                                                          "stack_bytes": 0, "shared_bytes": 0})
            continue
        if current is None:
            continue
        frame = _FRAME.search(line)
        if frame:
            current["stack_bytes"], current["spill_stores"], current["spill_loads"] = map(int, frame.groups())
        registers = _REGISTERS.search(line)
        if registers:
            current["registers"] = int(registers.group(1))
            smem = _SMEM.search(line)
            current["shared_bytes"] = int(smem.group(1)) if smem else 0
    return {name: KernelResources(name=name, **fields) for name, fields in reports.items()}
