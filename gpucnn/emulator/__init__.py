"""The ``emulator`` device: run the CUDA kernels of ``kernels/*.cu`` on the CPU, from the very same source files.

Each ``.cu`` file is compiled by g++ with ``cuda_emu.h`` force-included, into a shared library
with one C launcher per ``extern "C" __global__`` kernel; every CUDA thread runs as a fiber
(``emu_runtime.cpp``). Kernels are called like CuPy's RawKernel::

    module = EmulatedModule("kernels/conv2d.cu", order="reverse")
    kernel = module.get_function("conv2d_forward_direct")
    kernel((blocks, 1, 1), (256, 1, 1), (x, weight, bias, y, np.int32(n), ...), shared_mem=0)

Arguments are checked before launch exactly as the C signature demands: arrays C-contiguous with
the exact dtype, scalars as the exact NumPy type (``np.int32`` for ``int``, ``np.float32`` for
``float``; a Python int or float is refused because CuPy would pass it as a 64-bit value).

What the emulator catches: a barrier not reached by every thread of a block, warp intrinsics with
a bad mask or in divergent code, deadlocks (all raised as EmulatorError with kernel, block and
thread), and, through poisoning and thread orders, missing barriers and reads of memory nobody
wrote: shared memory is filled with 0xFF bytes (NaN) before each block, ``EmulatorRuntime.empty``
hands out NaN-filled arrays, and ``order="reverse"``/``"random"`` changes the order in which threads
(and blocks) run between synchronisation points.

Built libraries are cached by content hash in ``$GPUCNN_EMULATOR_CACHE`` (default
``~/.cache/gpucnn/emulator``). ``$CXX`` picks the compiler (default g++);
``$GPUCNN_EMULATOR_THREADS`` sets the number of OS threads that run blocks (default: the CPUs);
``$GPUCNN_EMULATOR_CXXFLAGS`` adds compiler flags:

- ``-g -fsanitize=undefined``: UBSan reports, e.g., int32 index overflow at the ``.cu`` line;
- ``-g -fsanitize=address``: AddressSanitizer reports out-of-bounds global memory accesses at the
  ``.cu`` line; Python must then start with ``LD_PRELOAD=$(g++ -print-file-name=libasan.so)``
  and ``ASAN_OPTIONS=detect_leaks=0``;
- ``-DGPUCNN_EMU_UCONTEXT``: portable ``ucontext`` fibers instead of the x86-64 switch (several
  times slower; the default on other CPUs).

What it cannot catch: weak memory ordering, fences, spin-waits (they hang), out-of-bounds shared
memory, register or occupancy limits, fused multiply-add differences (compare with tolerances).

Modules: ``build`` (parse a ``.cu`` file, generate its C launchers, compile and cache the library),
``kernel`` (EmulatedModule and EmulatedKernel, called like CuPy's RawModule and RawKernel) and
``runtime`` (EmulatorRuntime for tests on NumPy arrays, and the process-wide runtimes of the
``"emulator"`` device, whose arrays are ``gpucnn.backend.EmulatorArray``).
"""
from gpucnn.emulator.build import EmulatorBuildError, EmulatorError, SharedMemoryError, build_library, cache_dir
from gpucnn.emulator.kernel import ORDERS, EmulatedKernel, EmulatedModule
from gpucnn.emulator.runtime import EmulatorRuntime, emulator_order, emulator_runtime

__all__ = [
    "ORDERS", "EmulatedKernel", "EmulatedModule", "EmulatorBuildError", "EmulatorError", "EmulatorRuntime",
    "SharedMemoryError", "build_library", "cache_dir", "emulator_order", "emulator_runtime",
]
