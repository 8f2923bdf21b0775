"""Where gpucnn's CUDA C sources (``kernels/*.cu``) are, and the options that compile them.

Shared by every runtime that runs them: CupyRuntime (gpucnn.cuda.runtime), the emulator
(gpucnn.emulator) and the NVRTC checks (gpucnn.testing.nvrtc).
"""
from __future__ import annotations

from pathlib import Path

# What CupyRuntime passes to cupy.RawModule(options=...).
COMPILE_OPTIONS = ("-std=c++17",)
# What CuPy itself adds before NVRTC sees them (read in CuPy 15.0.0a1, github.com/cupy/cupy at 6b6d956,
# 2026-08-20): cupy/cuda/compiler.py _compile_with_cache_cuda appends "-ftz=true" (denormals flush to
# zero) and _compile_using_nvrtc "--device-as-default-execution-space" and "-arch=sm_XX" (compute_XX
# past NVRTC's newest sm); cupy/_core/core.pyx assemble_cupy_compiler_options adds "--std=c++17" only
# when no -std is given, and -I paths (its bundled CCCL, its own headers, the CUDA headers), which
# cannot change kernels that include no header. gpucnn.testing.nvrtc compiles with both tuples.
CUPY_NVRTC_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
NVRTC_OPTIONS = COMPILE_OPTIONS + CUPY_NVRTC_OPTIONS


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
    return find_kernels_dir(Path(__file__).resolve().parent)
