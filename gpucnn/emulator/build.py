"""Build a ``.cu`` file for the emulator: parse its kernels, generate one C launcher per kernel,
compile with ``cuda_emu.h`` force-included and link ``emu_runtime.cpp``; libraries are cached by
content hash in ``$GPUCNN_EMULATOR_CACHE`` (see gpucnn.emulator for the environment variables).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_DYNAMIC_SHARED = 48 * 1024  # bytes of dynamic shared memory a block may have

HEADER = Path(__file__).with_name("cuda_emu.h")
RUNTIME_SOURCE = Path(__file__).with_name("emu_runtime.cpp")
CACHE_ENV = "GPUCNN_EMULATOR_CACHE"
CXXFLAGS_ENV = "GPUCNN_EMULATOR_CXXFLAGS"
BASE_FLAGS = ("-std=c++20", "-O2", "-fPIC", "-pthread", "-fvisibility=hidden", "-fno-strict-aliasing")
_KEEP_PER_SOURCE = 8          # cached builds kept per .cu file name (and of the runtime object)
_STALE_TEMP_SECONDS = 3600    # a temp file this old belongs to a build that died
# Bump when the generated wrapper or the build commands change, so old cache entries are not reused.
_WRAPPER_VERSION = "3"


class EmulatorError(RuntimeError):
    """A kernel misbehaved under the emulator (divergent barrier, bad warp mask, deadlock, ...)."""


class EmulatorBuildError(EmulatorError):
    """A .cu file could not be parsed or compiled for the emulator."""


class SharedMemoryError(EmulatorError, ValueError):
    """A launch asked for more dynamic shared memory than a block can have (48 KiB)."""


# ---- parsing kernel signatures --------------------------------------------------------------

# C spelling (whitespace-normalised, without const) -> (code, numpy dtype, lanes per element)
_BASE_TYPES = {
    "float": ("f32", np.float32, 1), "double": ("f64", np.float64, 1),
    "int": ("i32", np.int32, 1), "signed": ("i32", np.int32, 1), "signed int": ("i32", np.int32, 1),
    "unsigned": ("u32", np.uint32, 1), "unsigned int": ("u32", np.uint32, 1),
    "long long": ("i64", np.int64, 1), "long long int": ("i64", np.int64, 1),
    "signed long long": ("i64", np.int64, 1), "long": ("i64", np.int64, 1), "long int": ("i64", np.int64, 1),
    "unsigned long long": ("u64", np.uint64, 1), "unsigned long long int": ("u64", np.uint64, 1),
    "unsigned long": ("u64", np.uint64, 1), "size_t": ("u64", np.uint64, 1),
    "short": ("i16", np.int16, 1), "unsigned short": ("u16", np.uint16, 1),
    "char": ("i8", np.int8, 1), "signed char": ("i8", np.int8, 1), "unsigned char": ("u8", np.uint8, 1),
    "bool": ("bool", np.bool_, 1),
    "float2": ("f32x2", np.float32, 2), "float4": ("f32x4", np.float32, 4),
    "int2": ("i32x2", np.int32, 2), "int4": ("i32x4", np.int32, 4), "double2": ("f64x2", np.float64, 2),
}

_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_LAUNCH_BOUNDS = r"(?:__launch_bounds__\s*\([^()]*\)\s*)?"
_KERNEL = re.compile(r'extern\s+"C"\s+' + _LAUNCH_BOUNDS + r"__global__\s+" + _LAUNCH_BOUNDS + r"void\s+"
                     + _LAUNCH_BOUNDS + r"([A-Za-z_]\w*)\s*\(([^()]*)\)")
_ALIGN = r"(?:__align__\s*\((?:[^()]|\([^()]*\))*\)\s*)?"
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+" + _ALIGN + r"([A-Za-z_][\w\s]*?)\s*" + _ALIGN
                            + r"\b([A-Za-z_]\w*)\s*\[\s*\]")
_CONSTANT = re.compile(r"__constant__\s+(?:const\s+)?([A-Za-z_][\w\s]*?)\s+([A-Za-z_]\w*)\s*((?:\[[^\]]*\]\s*)*)[=;]")


@dataclass(frozen=True)
class Param:
    """One kernel parameter: its C type (without top-level const) and what Python must pass."""
    name: str
    ctype: str        # C++ spelling used in the generated wrapper, e.g. "const float*"
    code: str         # "f32*", "const f32*", "i32", ...
    dtype: type       # numpy scalar type of the value or of the array elements
    lanes: int        # elements of dtype per C element (2 for float2)
    pointer: bool
    const: bool       # pointee is const (the kernel does not write through it)


@dataclass(frozen=True)
class KernelSpec:
    name: str
    params: tuple[Param, ...]

    @property
    def signature(self) -> str:
        """The parameter codes joined by commas, e.g. ``"const f32*,f32*,i32"``."""
        return ",".join(p.code for p in self.params)


@dataclass(frozen=True)
class ConstantSpec:
    name: str
    dtype: type | None   # None when the element type is not a plain scalar
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class SourceInfo:
    kernels: tuple[KernelSpec, ...]
    extern_shared: tuple[str, str] | None   # (C type, name) of the one extern __shared__ array
    constants: tuple[ConstantSpec, ...]


def _parse_param(text: str, kernel: str, index: int) -> Param:
    words = text.replace("*", " * ").replace("&", " & ").split()
    if "&" in words or not words:
        raise EmulatorBuildError(f"kernel {kernel}: parameter {index} ({text.strip()!r}) is not a plain "
                                 "scalar or pointer.")
    name = words[-1]
    if not re.fullmatch(r"[A-Za-z_]\w*", name) or name in _BASE_TYPES:
        raise EmulatorBuildError(f"kernel {kernel}: parameter {index} ({text.strip()!r}) has no name.")
    words = [w for w in words[:-1] if w not in ("__restrict__", "__restrict", "volatile")]
    stars = words.count("*")
    if stars > 1:
        raise EmulatorBuildError(f"kernel {kernel}: parameter {name} is a pointer to a pointer, which "
                                 "cannot be passed from NumPy.")
    pointer = stars == 1
    if pointer:
        star = words.index("*")
        const = "const" in words[:star]
        words = words[:star]
    else:
        const = False
    base = " ".join(w for w in words if w != "const")
    if base not in _BASE_TYPES:
        raise EmulatorBuildError(f"kernel {kernel}: parameter {name} has type {base!r}, which the emulator "
                                 f"does not support (use one of {', '.join(sorted(_BASE_TYPES))}).")
    code, dtype, lanes = _BASE_TYPES[base]
    if lanes > 1 and not pointer:
        raise EmulatorBuildError(f"kernel {kernel}: parameter {name} passes a {base} by value; pass "
                                 "vector types through pointers.")
    if pointer:
        return Param(name, ("const " if const else "") + base + "*", ("const " if const else "") + code + "*",
                     dtype, lanes, True, const)
    return Param(name, base, code, dtype, 1, False, False)


def parse_source(source: str) -> SourceInfo:
    """Find the ``extern "C" __global__`` kernels, the extern shared array and ``__constant__`` data.

    Raises EmulatorBuildError for a ``__global__`` function not declared ``extern "C"``, a parameter
    type the emulator cannot pass, or more than one ``extern __shared__`` array name.
    """
    text = _COMMENTS.sub(" ", source)
    kernels = []
    for match in _KERNEL.finditer(text):
        name, params_text = match.group(1), match.group(2).strip()
        items = [] if params_text in ("", "void") else params_text.split(",")
        kernels.append(KernelSpec(name, tuple(_parse_param(p, name, i) for i, p in enumerate(items))))
    if len(kernels) != len(re.findall(r"\b__global__\b", text)):
        raise EmulatorBuildError('every kernel must be declared as extern "C" __global__ void name(...) '
                                 "(not templated, no function-pointer parameters); some __global__ function "
                                 "in this file is not.")
    names = [k.name for k in kernels]
    if len(set(names)) != len(names):
        raise EmulatorBuildError(f"a kernel name appears twice: {names}.")

    shared = {(" ".join(m.group(1).split()), m.group(2)) for m in _EXTERN_SHARED.finditer(text)}
    if len(shared) > 1:
        raise EmulatorBuildError("the file declares more than one extern __shared__ array "
                                 f"({', '.join(n for _, n in sorted(shared))}); use one and carve it up.")

    constants = []
    for match in _CONSTANT.finditer(text):
        base = " ".join(match.group(1).split())
        dims = re.findall(r"\[([^\]]*)\]", match.group(3))
        entry = _BASE_TYPES.get(base)
        dtype = entry[1] if entry is not None and entry[2] == 1 else None
        shape = tuple(int(d, 0) for d in dims) if all(re.fullmatch(r"\s*\d+\s*", d) for d in dims) else None
        constants.append(ConstantSpec(match.group(2), dtype, shape))
    return SourceInfo(tuple(kernels), next(iter(shared)) if shared else None, tuple(constants))


def generate_wrapper(source_path: Path, info: SourceInfo) -> str:
    """The C++ translation unit that includes the .cu file and exports one launcher per kernel."""
    lines = [f"// Generated by gpucnn.emulator for {source_path}; do not edit.",
             '#define EMU_EXPORT extern "C" __attribute__((visibility("default")))']
    dynamic_shared = "nullptr"
    if info.extern_shared is not None:
        ctype, name = info.extern_shared
        # The one extern __shared__ array, defined at the 48 KiB maximum, thread-local like all shared memory.
        lines += [f"thread_local {ctype} {name}[{MAX_DYNAMIC_SHARED} / sizeof({ctype})] __attribute__((aligned(16)));",
                  f"static_assert(sizeof({name}) == {MAX_DYNAMIC_SHARED}, \"gpucnn emulator: the extern __shared__ "
                  f"element type must divide {MAX_DYNAMIC_SHARED} bytes\");",
                  f"static void* emu_dynamic_shared() {{ return (void*){name}; }}"]
        dynamic_shared = "emu_dynamic_shared"
    quoted = str(source_path).replace("\\", "\\\\").replace('"', '\\"')
    lines.append(f'#include "{quoted}"')
    for k in info.kernels:
        ctypes_list = ", ".join(p.ctype for p in k.params) or "void"
        unpack = ", ".join(f"*({p.ctype}*)a[{i}]" for i, p in enumerate(k.params))
        lines += [
            f"static_assert(emu::same_type<decltype(&{k.name}), void (*)({ctypes_list})>::value,",
            f'              "gpucnn emulator: the parameters parsed for {k.name} ({ctypes_list}) do not match '
            'its declaration");',
            f"static void emu_kernel_{k.name}(void** a) {{ (void)a; {k.name}({unpack}); }}",
            f'EMU_EXPORT const char* emu_signature_{k.name}(void) {{ return "{k.signature}"; }}',
            f"EMU_EXPORT int emu_launch_{k.name}(const unsigned* grid, const unsigned* block, unsigned shared_bytes,",
            "                                int order, unsigned long long seed, void** args, char* err,",
            "                                unsigned errlen) {",
            f'    return emu::launch("{k.name}", emu_kernel_{k.name}, grid, block, shared_bytes, {dynamic_shared},',
            "                       order, seed, args, err, errlen);",
            "}",
        ]
    for c in info.constants:
        lines += [f"EMU_EXPORT void* emu_symbol_{c.name}(void) {{ return (void*)&{c.name}; }}",
                  f"EMU_EXPORT unsigned long emu_symbol_size_{c.name}(void) {{ return sizeof({c.name}); }}"]
    return "\n".join(lines) + "\n"


# ---- building --------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where built libraries are kept: ``$GPUCNN_EMULATOR_CACHE`` or ``~/.cache/gpucnn/emulator``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpucnn" / "emulator"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX", "").strip() or "g++")


def _flags() -> list[str]:
    return [*BASE_FLAGS, *shlex.split(os.environ.get(CXXFLAGS_ENV, ""))]


def _run_compiler(command: list[str], what: str) -> None:
    """Run one compiler command; EmulatorBuildError with the compiler's messages when it fails."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError:
        raise EmulatorBuildError(f"the C++ compiler {command[0]!r} was not found; the emulator needs g++ "
                                 "(C++20) or $CXX naming another.") from None
    if result.returncode != 0:
        messages = "\n".join((result.stderr or result.stdout).strip().splitlines()[:60])
        raise EmulatorBuildError(f"compiling {what} for the emulator failed:\n{messages}")


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _prune(target: Path, pattern: str) -> None:
    """Keep the most recently used builds matching ``pattern`` (a regex) beside ``target``; drop stale temps.

    Unlinking a library another process has loaded is harmless: its mapping stays valid.
    """
    now = time.time()
    entries = []
    for entry in target.parent.iterdir():
        try:
            mtime = entry.stat().st_mtime
            if entry.name.endswith(".tmp") and now - mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            elif re.fullmatch(pattern, entry.name) and entry != target:
                entries.append((mtime, entry))
        except OSError:
            pass  # another process pruned or renamed it first
    for _, entry in sorted(entries, reverse=True)[_KEEP_PER_SOURCE - 1:]:
        with contextlib.suppress(OSError):
            entry.unlink()


def _build_atomically(target: Path, compile_to, pattern: str) -> Path:
    """Call ``compile_to(tmp_path)`` and rename the result to ``target`` (concurrent builds are safe).

    An existing ``target`` is reused (its mtime refreshed, so pruning keeps recently used builds).
    """
    if target.exists():
        with contextlib.suppress(OSError):
            os.utime(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        compile_to(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _prune(target, pattern)
    return target


def _runtime_object(compiler: list[str], flags: list[str]) -> Path:
    """emu_runtime.cpp compiled once per content hash, shared by every kernel module."""
    key = _digest(_WRAPPER_VERSION, RUNTIME_SOURCE.read_bytes(), HEADER.read_bytes(), compiler, flags)
    target = cache_dir() / f"emu_runtime-{key}.o"
    return _build_atomically(target, lambda tmp: _run_compiler(
        [*compiler, *flags, "-c", str(RUNTIME_SOURCE), "-o", tmp], RUNTIME_SOURCE.name),
        r"emu_runtime-[0-9a-f]{20}\.o")


def _check_sanitizer_runtime() -> None:
    """An ASan-built library can only load when libasan was preloaded into the process."""
    if "-fsanitize=address" not in _flags():
        return
    try:
        loaded = Path("/proc/self/maps").read_text()
    except OSError:
        return
    if "libasan" not in loaded:
        raise EmulatorBuildError(f"{CXXFLAGS_ENV} asks for AddressSanitizer, but libasan is not loaded; start "
                                 "Python with LD_PRELOAD=$(g++ -print-file-name=libasan.so) "
                                 "ASAN_OPTIONS=detect_leaks=0.")


_build_lock = threading.Lock()


def build_library(source_path) -> tuple[Path, SourceInfo]:
    """Compile a .cu file into a cached shared library; returns its path and the parsed source."""
    _check_sanitizer_runtime()
    source_path = Path(source_path).resolve()
    if source_path.suffix != ".cu":
        raise ValueError(f"expected a .cu file, got {source_path}.")
    if not source_path.is_file():
        raise FileNotFoundError(f"no CUDA source file at {source_path}.")
    source = source_path.read_bytes()
    info = parse_source(source.decode("utf-8", errors="replace"))
    wrapper = generate_wrapper(source_path, info)
    compiler, flags = _compiler(), _flags()
    with _build_lock:
        runtime_object = _runtime_object(compiler, flags)
        key = _digest(_WRAPPER_VERSION, source, HEADER.read_bytes(), runtime_object.name, wrapper, compiler, flags)
        target = cache_dir() / f"{source_path.stem}-{key}.so"

        def compile_to(tmp: str) -> None:
            with tempfile.TemporaryDirectory(dir=target.parent, suffix=".tmp") as work:
                wrapper_path = Path(work) / f"{source_path.stem}_emu.cpp"
                wrapper_path.write_text(wrapper)
                _run_compiler([*compiler, *flags, "-shared", "-include", str(HEADER), "-x", "c++",
                               str(wrapper_path), "-x", "none", str(runtime_object), "-o", tmp,
                               "-Wl,-z,defs", "-ldl", "-lm"], str(source_path))

        return _build_atomically(target, compile_to, re.escape(source_path.stem) + r"-[0-9a-f]{20}\.so"), info

