"""Every kernels/*.cu compiles with NVRTC itself (what CuPy uses), without spills and within 48 KiB."""
from __future__ import annotations

import re

import pytest

from gpucnn.cuda.runtime import COMPILE_OPTIONS, kernels_dir
from gpucnn.testing import nvrtc

try:
    nvrtc.find_library()
except nvrtc.NvrtcUnavailable as exc:
    pytest.skip(f"NVRTC is not available: {exc}", allow_module_level=True)

pytestmark = pytest.mark.nvrtc

ARCHS = ("sm_80", "sm_90")
KERNEL_FILES = sorted(kernels_dir().glob("*.cu"))
STATIC_SHARED_LIMIT = 48 * 1024


def test_kernel_files_are_found():
    assert {"conv2d.cu", "pool2d.cu"} <= {p.name for p in KERNEL_FILES}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_kernel_file_compiles_without_spills(path, arch):
    result = nvrtc.compile_file(path, arch=arch)
    declared = set(re.findall(r'extern "C" __global__ void (\w+)\(', path.read_text()))
    assert declared, f"{path.name} declares no extern \"C\" __global__ kernels"
    assert set(result.kernels) == declared, \
        f"ptxas reported {sorted(result.kernels)}, the file declares {sorted(declared)}"
    assert result.cubin_bytes > 0
    for kernel in result.kernels.values():
        assert kernel.registers > 0, kernel
        assert kernel.spill_stores == 0 and kernel.spill_loads == 0, kernel
        assert kernel.shared_bytes <= STATIC_SHARED_LIMIT, kernel


def test_options_are_what_cupy_compiles_cupy_runtime_kernels_with():
    assert nvrtc.BASE_OPTIONS[:len(COMPILE_OPTIONS)] == COMPILE_OPTIONS
    assert "-ftz=true" in nvrtc.BASE_OPTIONS and "--device-as-default-execution-space" in nvrtc.BASE_OPTIONS


def test_kernel_files_include_no_header():
    # CuPy also adds -I paths (its CCCL, its headers, the CUDA headers); NVRTC_OPTIONS leaves them out,
    # which is only the same compile while no kernel file includes a header.
    for path in KERNEL_FILES:
        assert not re.search(r"^\s*#\s*include", path.read_text(), re.M), f"{path.name} includes a header"


def test_float_arithmetic_flushes_denormals_as_under_cupy():
    source = 'extern "C" __global__ void scale(float* y, float a) { y[threadIdx.x] = y[threadIdx.x] * a; }'
    flushed = nvrtc.compile_source(source, "scale.cu", arch="sm_90").ptx
    kept = nvrtc.compile_source(source, "scale.cu", arch="sm_90", options=COMPILE_OPTIONS).ptx
    assert "mul.ftz.f32" in flushed and "mul.f32" not in flushed
    assert "mul.f32" in kept and ".ftz" not in kept


def test_report_reads_static_shared_memory():
    source = """
    extern "C" __global__ void staged(const float* x, float* y) {
        __shared__ float tile[256];
        tile[threadIdx.x] = x[threadIdx.x];
        __syncthreads();
        y[threadIdx.x] = tile[255 - threadIdx.x];
    }
    """
    result = nvrtc.compile_source(source, "staged.cu", arch="sm_80")
    assert result.kernels["staged"].shared_bytes == 1024


def test_bad_source_gives_a_clear_compile_error():
    source = 'extern "C" __global__ void broken(float* y) { y[0] = FLT_MAX; }'
    with pytest.raises(nvrtc.NvrtcCompileError, match="FLT_MAX") as info:
        nvrtc.compile_source(source, "broken.cu", arch="sm_90")
    assert "broken.cu" in str(info.value) and "undefined" in info.value.log


def test_arch_must_be_a_real_architecture():
    with pytest.raises(ValueError, match="real architecture"):
        nvrtc.compile_source("", arch="compute_90")
