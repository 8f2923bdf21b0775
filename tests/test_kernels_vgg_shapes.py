"""Our CUDA kernels at vgg-small's shapes (3x3, pad 1, 64 to 256 channels) under the emulator.

The emulator is slow, so the channel counts are vgg-small's and the batch and images are
small; the launcher's GEMM plan is checked at the real shapes (batch 64 to 256) too.
"""
import numpy as np
import pytest

from gpucnn.cuda import conv as cuda_conv
from gpucnn.cuda import gemm
from gpucnn.emulator import EmulatorRuntime
from tests.conftest import EMULATOR_ORDERS
from tests.kernel_cases import ConvCase, PoolCase, case_id, check_conv, check_max_pool

# (N, C, H, W, OC): every stage's pair of convolutions, at reduced size
VGG_CONV_CASES = [
    ConvCase("conv1_1_3to64_relu", 4, 3, 16, 16, 64, (3, 3), padding=(1, 1), relu=True),
    ConvCase("conv1_2_64to64", 2, 64, 12, 12, 64, (3, 3), padding=(1, 1)),
    ConvCase("conv2_1_64to128", 2, 64, 8, 8, 128, (3, 3), padding=(1, 1)),
    ConvCase("conv2_2_128to128_relu", 2, 128, 8, 8, 128, (3, 3), padding=(1, 1), relu=True),
    ConvCase("conv3_1_128to256", 2, 128, 4, 4, 256, (3, 3), padding=(1, 1)),
    ConvCase("conv3_2_256to256", 2, 256, 4, 4, 256, (3, 3), padding=(1, 1)),
]
VGG_POOL_CASES = [PoolCase(f"pool_{c}", 1, c, 4, 4, (2, 2)) for c in (64, 128, 256)]
# vgg-small's convolutions at their real size, batch 128: (name, N, C, H, OC)
VGG_FULL_SHAPES = [("conv1_1", 128, 3, 32, 64), ("conv1_2", 128, 64, 32, 64), ("conv2_1", 128, 64, 16, 128),
                   ("conv2_2", 128, 128, 16, 128), ("conv3_1", 128, 128, 8, 256), ("conv3_2", 128, 256, 8, 256)]


class LaunchLog:
    """A runtime that forwards to the emulator and records the names of the kernels launched."""

    def __init__(self, inner):
        self.inner, self.xp, self.names = inner, inner.xp, []

    def function(self, file, name):
        self.names.append(name)
        return self.inner.function(file, name)

    def empty(self, shape, dtype):
        return self.inner.empty(shape, dtype)

    def zeros(self, shape, dtype):
        return self.inner.zeros(shape, dtype)


@pytest.fixture(scope="module", params=EMULATOR_ORDERS)
def emulator(request):
    return EmulatorRuntime(order=request.param, seed=5)


@pytest.mark.emulator
@pytest.mark.parametrize("case", VGG_CONV_CASES, ids=case_id)
def test_conv2d_at_vgg_channel_counts_matches_the_reference_on_the_gemm_path(case, emulator):
    log = LaunchLog(emulator)
    check_conv(case, runtime=log)
    # conv1_1's 3 input channels and 64 x 28 weight gradient (32 thread tiles) take the small kernels
    small = case.c == 3
    assert log.names[:3] == ["conv2d_gemm_forward",
                             "conv2d_small_backward_data" if small else "conv2d_gemm_backward_data",
                             "conv2d_small_backward_weight" if small else "conv2d_gemm_backward_weight"]


@pytest.mark.emulator
@pytest.mark.parametrize("case", VGG_POOL_CASES, ids=case_id)
def test_max_pool_at_vgg_channel_counts_matches_the_reference(case, emulator):
    check_max_pool(case, runtime=emulator)


@pytest.mark.parametrize("batch", [64, 256])
@pytest.mark.parametrize("name, n, c, size, oc", VGG_FULL_SHAPES, ids=[s[0] for s in VGG_FULL_SHAPES])
def test_the_gemm_plans_fill_the_gpu_at_the_full_vgg_shapes(name, n, c, size, oc, batch):
    for rows, cols, depth, split in ((oc, batch * size * size, c * 9, False),      # forward
                                     (c, batch * size * size, oc * 9, False),      # data gradient
                                     (oc, c * 9 + 1, batch * size * size, True)):  # weight (+ bias) gradient
        plan = gemm.plan(rows, cols, depth, split=split)
        blocks = plan.grid[0] * plan.grid[1] * plan.grid[2]
        assert plan.shared_bytes <= cuda_conv.SHARED_LIMIT_BYTES and plan.slices <= gemm.MAX_SLICES
        assert blocks >= gemm.SMS or rows * cols < gemm.SMS * 64 * 64, (name, rows, cols, depth, plan)


@pytest.mark.emulator
def test_a_full_vgg_spatial_size_runs_on_the_gemm():
    """conv1_2's 32x32 images with vgg-small's 64 channels (one image, so the emulator stays quick)."""
    log = LaunchLog(EmulatorRuntime(order="reverse", seed=2))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64, 32, 32)).astype(np.float32)
    weight = rng.standard_normal((64, 64, 3, 3)).astype(np.float32) * 0.05
    bias = rng.standard_normal(64).astype(np.float32)
    y = cuda_conv.conv2d_forward(x, weight, bias, padding=1, runtime=log)
    assert log.names == ["conv2d_gemm_forward"]
    from gpucnn.ops import conv as ops_conv
    reference = ops_conv.conv2d_forward(x, weight, bias, padding=1)
    assert np.abs(y - reference).max() <= 1e-5 * max(1.0, float(np.abs(reference).max()))


# ---- the per-op GPU benchmark's vgg-small rows ---------------------------------------------------

def test_gpu_benchmark_vgg_rows_are_vgg_small_layers():
    import subprocess
    import sys
    import types

    from gpucnn import backend
    from gpucnn.models import VGGSmall
    from gpucnn.receptive import layer_geometry
    from tests.test_bench_scripts import ROOT, _load

    gpu_ops = _load("gpu_ops")
    calls = []
    recorder = types.SimpleNamespace(conv=lambda *args: calls.append(("conv", *args)),
                                     pool=lambda *args: calls.append(("pool", *args)))
    gpu_ops.build_rows(recorder, gpu_ops.parse_args(["--only", "vgg"]))
    rows = {row.name: row for row in layer_geometry(VGGSmall(), (3, 32, 32))}
    convs = [call for call in calls if call[0] == "conv"]
    assert len(convs) == 6 and len(calls) == 9
    channels = 3                                   # each convolution takes the previous one's output
    for _, label, n, c, h, w, oc, k, padding in convs:
        layer = label.split()[-1]
        assert n == 128 and (k, padding) == (3, 1) and c == channels
        assert rows[layer].output_shape == (oc, h, w)   # 3x3 pad 1 keeps the size it receives
        channels = oc
    if not backend.gpu_available():
        result = subprocess.run([sys.executable, "bench/gpu_ops.py", "--only", "vgg"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("no GPU: ")
