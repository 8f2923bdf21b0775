"""The CUDA kernels, run on the CPU by gpucnn's emulator through the real launchers, against gpucnn.ops.

Every case runs under several thread orders: a missing barrier that one order hides shows up
under another. Mutation tests check that the comparison catches deliberately broken kernels.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from gpucnn import backend
from gpucnn.cuda import conv as cuda_conv
from gpucnn.cuda import pool as cuda_pool
from gpucnn.cuda import runtime as cuda_runtime
from gpucnn.ops import conv as ops_conv
from gpucnn.ops import pool as ops_pool
from gpucnn.testing.emulator import EmulatorBuildError, EmulatorError, EmulatorRuntime
from tests.kernel_cases import (NoLaunchRuntime, CONV_CASES, POOL_CASES, ConvCase, PoolCase, case_id, check_avg_pool, check_conv,
                                check_max_pool, conv_inputs)

ORDERS = ("forward", "reverse", "random")
KERNELS = cuda_runtime.kernels_dir()


@pytest.fixture(scope="module", params=ORDERS)
def emulator(request):
    return EmulatorRuntime(order=request.param, seed=3)


@pytest.mark.emulator
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv2d_matches_reference(case, emulator):
    check_conv(case, runtime=emulator)


@pytest.mark.emulator
@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_max_pool2d_matches_reference(case, emulator):
    check_max_pool(case, runtime=emulator)


@pytest.mark.emulator
@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_avg_pool2d_matches_reference(case, emulator):
    check_avg_pool(case, runtime=emulator)


@pytest.mark.emulator
def test_max_pool2d_ties_keep_first_maximum(emulator):
    case = PoolCase("ties", 1, 2, 6, 7, (3, 3), (2, 2), (1, 1))
    x = np.round(np.random.default_rng(5).standard_normal((1, 2, 6, 7))).astype(np.float32)  # many ties
    x[0, 1] = 1.0  # every window of channel 1 is one tie
    _, argmax, _ = check_max_pool(case, x=x, runtime=emulator)
    # Channel 1: the first real element of each window, which is (1, 1) where padding covers row/column 0.
    assert argmax[0, 1, 0, 0] == 4 and argmax[0, 1, 1, 1] == 0


@pytest.mark.emulator
def test_max_pool2d_nan_wins_and_first_nan_is_kept(emulator):
    x = np.array([[[[1.0, np.nan, 3.0, np.nan],
                    [3.0, 2.0, np.nan, 1.0]]]], dtype=np.float32)
    y, argmax = cuda_pool.max_pool2d_forward(x, 2, runtime=emulator)
    assert np.isnan(y).all()
    np.testing.assert_array_equal(argmax, [[[[1, 1]]]])
    ref_y, ref_argmax = ops_pool.max_pool2d_forward(x, 2)
    np.testing.assert_array_equal(argmax, ref_argmax)
    assert np.isnan(ref_y).all()

    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 7, 8)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    check_max_pool(PoolCase("nan", 2, 3, 7, 8, (3, 3), (2, 2), (1, 1)), x=x, runtime=emulator)


@pytest.mark.emulator
def test_max_pool2d_padding_never_wins(emulator):
    # The last window (columns 2..4, column 4 padding) holds only -inf inputs: it picks the first of them.
    x = np.full((1, 1, 2, 4), 2.0, dtype=np.float32)
    x[0, 0, :, 2:] = -np.inf
    y, argmax = cuda_pool.max_pool2d_forward(x, 3, stride=1, padding=1, runtime=emulator)
    np.testing.assert_array_equal(y, [[[[2, 2, 2, -np.inf], [2, 2, 2, -np.inf]]]])
    np.testing.assert_array_equal(argmax, [[[[4, 3, 3, 3], [1, 0, 0, 0]]]])
    grad_x = cuda_pool.max_pool2d_backward(np.ones((1, 1, 2, 4), np.float32), argmax, x.shape, 3, 1, 1,
                                           runtime=emulator)
    np.testing.assert_array_equal(grad_x, [[[[4, 2, 2, 0], [0, 0, 0, 0]]]])


@pytest.mark.emulator
def test_conv2d_tiled_kernel_walks_grid_z(emulator, monkeypatch):
    # With gridDim.z capped below N * channel groups, each block must loop over several jobs.
    monkeypatch.setattr(cuda_conv, "MAX_GRID_YZ", 2)
    check_conv(ConvCase("grid_z_loop", 3, 2, 6, 6, 11, (3, 3), padding=(1, 1)), runtime=emulator)


@pytest.mark.emulator
def test_conv2d_results_are_bitwise_identical_across_thread_orders():
    case = ConvCase("orders", 2, 3, 9, 9, 5, (3, 3), stride=(2, 1), padding=(1, 1))
    x, weight, bias, grad_y = conv_inputs(case)
    results = []
    for order in ORDERS:
        rt = EmulatorRuntime(order=order, seed=9)
        y = cuda_conv.conv2d_forward(x, weight, bias, (2, 1), (1, 1), runtime=rt)
        results.append((y, *cuda_conv.conv2d_backward(grad_y, x, weight, (2, 1), (1, 1), runtime=rt)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


# Mutation tests: a broken copy of conv2d.cu must be caught.

# OW = 16 fills the 16-wide block exactly and, without padding, the last halo column holds input.
MUTATION_CASE = ConvCase("mutation", 2, 3, 10, 18, 4, (3, 3))


def _mutated_kernels(tmp_path, mutate):
    source = (KERNELS / "conv2d.cu").read_text()
    broken = mutate(source)
    assert broken != source, "the mutation did not change the kernel source"
    (tmp_path / "conv2d.cu").write_text(broken)
    return tmp_path


def _forward_is_caught(kernels_folder) -> bool:
    """True when the forward differs from the reference (or the emulator refuses it) under some order."""
    x, weight, bias, _ = conv_inputs(MUTATION_CASE)
    geometry = dict(stride=MUTATION_CASE.stride, padding=MUTATION_CASE.padding)
    reference = ops_conv.conv2d_forward(x, weight, bias, **geometry)
    for order in ORDERS:
        rt = EmulatorRuntime(order=order, seed=1, kernels_dir=kernels_folder)
        try:
            y = cuda_conv.conv2d_forward(x, weight, bias, runtime=rt, **geometry)
        except EmulatorBuildError:
            raise  # a mutation that does not compile proves nothing
        except EmulatorError:
            return True
        if not np.allclose(y, reference, rtol=0, atol=1e-5 * max(1.0, float(np.abs(reference).max()))):
            return True
    return False


def _tiled_kernel_body(source: str) -> tuple[int, int]:
    start = source.index("conv2d_forward_tiled(")
    return start, source.index("conv2d_forward_direct(")


@pytest.mark.emulator
@pytest.mark.parametrize("barrier", [0, 1], ids=["before_compute", "before_next_load"])
def test_mutation_missing_barrier_is_caught(tmp_path, barrier):
    def remove_barrier(source):
        start, end = _tiled_kernel_body(source)
        body = source[start:end]
        spots = [m.start() for m in re.finditer(r"__syncthreads\(\);", body)]
        assert len(spots) == 2
        cut = start + spots[barrier]
        return source[:cut] + source[cut + len("__syncthreads();"):]
    assert _forward_is_caught(_mutated_kernels(tmp_path, remove_barrier))


@pytest.mark.emulator
def test_mutation_halo_off_by_one_is_caught(tmp_path):
    def shrink_halo(source):
        return source.replace("const int tile_w = ((int)blockDim.x - 1) * sw + (kw - 1) * dw + 1;",
                              "const int tile_w = ((int)blockDim.x - 1) * sw + (kw - 1) * dw;")
    assert _forward_is_caught(_mutated_kernels(tmp_path, shrink_halo))


@pytest.mark.emulator
def test_unmutated_copy_is_not_flagged(tmp_path):
    # The detector itself must pass a correct kernel, or the mutation tests prove nothing.
    (tmp_path / "conv2d.cu").write_text((KERNELS / "conv2d.cu").read_text())
    assert not _forward_is_caught(tmp_path)


# Launcher checks that need no kernel run.

def _f32(*shape):
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("call, error, words", [
    (lambda rt: cuda_conv.conv2d_forward(_f32(1, 2, 5, 5).astype(np.float64), _f32(3, 2, 3, 3), None, runtime=rt),
     TypeError, "float32"),
    (lambda rt: cuda_conv.conv2d_forward(_f32(2, 5, 5), _f32(3, 2, 3, 3), None, runtime=rt), ValueError, "4 dim"),
    (lambda rt: cuda_conv.conv2d_forward(_f32(1, 2, 5, 5), _f32(3, 4, 3, 3), None, runtime=rt), ValueError,
     "input channels"),
    (lambda rt: cuda_conv.conv2d_forward(_f32(1, 2, 5, 5), _f32(3, 2, 3, 3), _f32(4), runtime=rt), ValueError, "bias"),
    (lambda rt: cuda_conv.conv2d_forward(_f32(1, 2, 5, 5), _f32(3, 2, 7, 3), None, runtime=rt), ValueError,
     "larger than the padded input"),
    (lambda rt: cuda_conv.conv2d_forward(_f32(1, 2, 5, 5), _f32(3, 2, 3, 3), None, stride=0, runtime=rt),
     ValueError, "stride"),
    (lambda rt: cuda_conv.conv2d_forward(_f32(1, 1, 1, 1), _f32(1, 1, 1, 1), None, padding=30000, runtime=rt),
     ValueError, "int32"),
    (lambda rt: cuda_conv.conv2d_backward(_f32(1, 3, 4, 4), _f32(1, 2, 5, 5), _f32(3, 2, 3, 3), runtime=rt),
     ValueError, "grad_y"),
    (lambda rt: cuda_conv.conv2d_forward([[1.0]], _f32(3, 2, 3, 3), None, runtime=rt), TypeError, "ndarray"),
    (lambda rt: cuda_pool.max_pool2d_forward(_f32(1, 1, 4, 4), 3, padding=2, runtime=rt), ValueError, "padding"),
    (lambda rt: cuda_pool.max_pool2d_forward(_f32(1, 1, 2, 2), 3, runtime=rt), ValueError, "larger than"),
    (lambda rt: cuda_pool.max_pool2d_forward(_f32(1, 1, 4, 4).astype(np.float16), 2, runtime=rt), TypeError,
     "float32"),
    (lambda rt: cuda_pool.max_pool2d_backward(_f32(1, 1, 2, 2), np.zeros((1, 1, 2, 2), np.int64), (1, 1, 4, 4), 2,
                                              runtime=rt), TypeError, "int32"),
    (lambda rt: cuda_pool.avg_pool2d_backward(_f32(1, 1, 3, 2), (1, 1, 4, 4), 2, runtime=rt), ValueError, "grad_y"),
    (lambda rt: cuda_pool.avg_pool2d_backward(_f32(1, 1, 2, 2), (1, 1, 4), 2, runtime=rt), ValueError, "input shape"),
])
def test_launchers_refuse_bad_inputs_before_launch(call, error, words):
    with pytest.raises(error, match=words):
        call(NoLaunchRuntime())


def test_check_int32_count_limit():
    cuda_runtime.check_int32_count("y", cuda_runtime.MAX_INT32_ELEMENTS)
    with pytest.raises(ValueError, match="int32"):
        cuda_runtime.check_int32_count("y", 2**31)


def test_oc_per_thread_matches_kernel_define():
    source = (KERNELS / "conv2d.cu").read_text()
    assert int(re.search(r"#define OCB (\d+)", source).group(1)) == cuda_conv.OC_PER_THREAD


def test_kernels_dir_finds_checkout_and_installed_layouts(tmp_path):
    assert (cuda_runtime.kernels_dir() / "conv2d.cu").is_file()
    installed = tmp_path / "site-packages" / "gpucnn"
    (installed / "kernels").mkdir(parents=True)
    (installed / "kernels" / "pool2d.cu").write_text("// shipped copy\n")
    assert cuda_runtime.find_kernels_dir(installed) == installed / "kernels"
    with pytest.raises(FileNotFoundError, match="no CUDA kernel files"):
        cuda_runtime.find_kernels_dir(tmp_path / "empty" / "gpucnn")


@pytest.mark.skipif(backend.gpu_available(), reason="checks the path taken without a GPU")
def test_default_runtime_needs_a_gpu():
    with pytest.raises(backend.DeviceError, match="GPU"):
        cuda_conv.conv2d_forward(_f32(1, 1, 4, 4), _f32(1, 1, 3, 3), None)
