"""Convolution: conv2d_forward / conv2d_backward on every backend against the loops of tests/loops.py
and float64 finite differences; the launcher's own rules (tiles, grid, int32 limits, refusals) and
mutation tests of conv2d.cu under the emulator.

The float32 kernel cases (tests/kernel_cases.py) run on every backend of the ``backend`` fixture;
on the GPU twice, which must give the same bits (no float atomics). The float64 cases run on the
CPU paths (the kernels are float32).
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import pytest

from gpucnn import backend as gpucnn_backend
from gpucnn.cpu import conv as fast_conv
from gpucnn.cuda import conv as cuda_conv
from gpucnn import kernel_sources
from gpucnn.cuda import runtime as cuda_runtime
from gpucnn.ops import conv as conv_module
from gpucnn.ops import conv as ops_conv
from gpucnn.ops import conv2d_backward, conv2d_forward
from gpucnn.emulator import EmulatorBuildError, EmulatorError, EmulatorRuntime
from gpucnn.testing.gradcheck import assert_gradient_close, relative_error
from tests.conftest import EMULATOR_ORDERS
from tests.helpers import assert_kernel_case, assert_same_bits, assert_refused_before_launch, chwn, f32
from tests.kernel_cases import (
    CONV_CASES,
    FORWARD_TOL,
    GRAD_PARAM_TOL,
    GRAD_X_TOL,
    ConvCase,
    case_id,
    check_conv,
    conv_inputs,
)
from tests.loops import conv2d_backward_taps, conv2d_loops, conv2d_taps

KERNELS = cuda_runtime.kernels_dir()
FLOAT64 = pytest.mark.backends("reference", "fast")


def run_forward(backend, x, w, b, **kw):
    return backend.host(conv2d_forward(backend.to(x), backend.to(w), backend.to(b), **kw))


def run_backward(backend, gy, x, w, **kw):
    return backend.host(conv2d_backward(backend.to(gy), backend.to(x), backend.to(w), **kw))


# ------------------------------------------------------------------ float32 kernel cases, every backend

@lru_cache(maxsize=None)
def expected_conv(case: ConvCase):
    """The loops' y (ReLU applied when fused), grad_x, grad_weight, grad_bias (None without bias), float32."""
    x, weight, bias, grad_y = conv_inputs(case)
    geometry = dict(stride=case.stride, padding=case.padding, dilation=case.dilation)
    y = conv2d_taps(x, weight, bias, **geometry)
    y = np.maximum(y, 0) if case.relu else y
    grad_x, grad_weight, grad_bias = conv2d_backward_taps(grad_y, x, weight, **geometry)
    outputs = (y, grad_x, grad_weight, grad_bias if case.bias else None)
    return tuple(None if o is None else o.astype(np.float32) for o in outputs)


def run_conv_case(backend, case: ConvCase):
    x, weight, bias, grad_y = conv_inputs(case)
    geometry = dict(stride=case.stride, padding=case.padding, dilation=case.dilation)
    y = run_forward(backend, x, weight, bias, relu=case.relu, **geometry)
    return (y, *run_backward(backend, grad_y, x, weight, with_bias=case.bias, **geometry))


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv2d_kernel_cases_match_loops(case, backend):
    assert_kernel_case(backend, lambda: run_conv_case(backend, case), expected_conv(case), (FORWARD_TOL, GRAD_X_TOL, GRAD_PARAM_TOL, GRAD_PARAM_TOL))


# ------------------------------------------------------------------ float64 against loops and finite differences

# (N, C, H, W, OC, (KH, KW), stride, padding, dilation)
FORWARD_CASES = [
    (1, 1, 5, 5, 1, (3, 3), 1, 0, 1),            # batch 1, one channel
    (2, 3, 7, 6, 4, (1, 1), 1, 0, 1),            # 1x1 kernel, non-square input
    (2, 2, 9, 8, 3, (7, 7), 1, 3, 1),            # 7x7 kernel, "same" padding
    (2, 2, 9, 8, 3, (7, 7), 1, 6, 1),            # padding = kernel - 1
    (3, 5, 11, 7, 2, (3, 3), 2, 1, 1),           # stride 2, odd channel counts
    (2, 3, 10, 13, 5, (3, 2), 3, (2, 1), 1),     # stride 3, non-square kernel and padding
    (2, 3, 9, 9, 4, (3, 3), 1, 2, 2),            # dilation 2
    (2, 3, 12, 10, 3, (3, 2), (2, 3), (1, 1), (2, 1)),  # every pair different per axis
    (2, 2, 4, 3, 3, (6, 5), 1, 1, 1),            # kernel exactly the padded input: 1x1 output
    (2, 3, 6, 7, 2, (6, 7), 1, 0, 1),            # kernel exactly the input
    (3, 7, 5, 6, 5, (3, 3), 2, 2, 1),            # stride 2 with padding kernel - 1
    (2, 1, 28, 28, 6, (5, 5), 1, 2, 1),          # LeNet layer 1
    (2, 6, 14, 14, 16, (5, 5), 1, 0, 1),         # LeNet layer 2
]


def shape_id(case):
    N, C, H, W, OC, k, s, p, d = case
    return f"N{N}C{C}{H}x{W}OC{OC}k{k}s{s}p{p}d{d}".replace(" ", "")


def make_case(case, rng, dtype=np.float64):
    N, C, H, W, OC, (KH, KW), stride, padding, dilation = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((OC, C, KH, KW)).astype(dtype)
    b = rng.standard_normal(OC).astype(dtype)
    return x, w, b, dict(stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize("case", FORWARD_CASES, ids=shape_id)
@FLOAT64
def test_forward_matches_loops(backend, case):
    x, w, b, hyper = make_case(case, np.random.default_rng(0))
    y = run_forward(backend, x, w, b, **hyper)
    expected = conv2d_loops(x, w, b, **hyper)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", FORWARD_CASES[::3], ids=shape_id)
@FLOAT64
def test_forward_float32_keeps_dtype_and_matches_loops(backend, case):
    x, w, b, hyper = make_case(case, np.random.default_rng(1), np.float32)
    y = run_forward(backend, x, w, b, **hyper)
    assert y.dtype == np.float32
    assert relative_error(y, conv2d_loops(x, w, b, **hyper)) < 1e-5


@FLOAT64
def test_forward_without_bias_and_with_fused_relu(backend):
    x, w, b, hyper = make_case((2, 3, 8, 7, 4, (3, 3), 1, 1, 1), np.random.default_rng(2))
    plain = conv2d_loops(x, w, None, **hyper)
    np.testing.assert_allclose(run_forward(backend, x, w, None, **hyper), plain, rtol=1e-12, atol=1e-12)
    with_relu = run_forward(backend, x, w, b, relu=True, **hyper)
    expected = np.maximum(conv2d_loops(x, w, b, **hyper), 0)
    assert (expected == 0).any() and (expected > 0).any()
    np.testing.assert_allclose(with_relu, expected, rtol=1e-12, atol=1e-12)


@FLOAT64
def test_forward_accepts_non_contiguous_input(backend):
    rng = np.random.default_rng(3)
    x_wide = rng.standard_normal((2, 3, 9, 16))
    x = x_wide[:, :, :, ::2]  # a strided view
    w, b = rng.standard_normal((2, 3, 3, 3)), rng.standard_normal(2)
    np.testing.assert_allclose(run_forward(backend, x, w, b, padding=1), conv2d_loops(x, w, b, padding=1),
                               rtol=1e-12, atol=1e-12)


# (N, C, H, W, OC, (KH, KW), stride, padding, dilation) small enough for finite differences
GRADIENT_CASES = [
    (2, 3, 6, 5, 4, (3, 3), 1, 0, 1),
    (2, 2, 6, 7, 3, (3, 3), 1, 1, 1),
    (2, 2, 7, 6, 3, (3, 2), 2, (2, 1), 1),
    (1, 3, 8, 7, 2, (2, 3), 3, 1, 1),
    (2, 2, 7, 7, 2, (3, 3), 1, 2, 2),
    (2, 2, 9, 8, 2, (2, 2), (2, 1), (1, 0), (2, 3)),
    (1, 1, 5, 5, 2, (5, 5), 1, 4, 1),
]


@pytest.mark.parametrize("case", GRADIENT_CASES, ids=shape_id)
@FLOAT64
def test_backward_matches_finite_differences(backend, case):
    rng = np.random.default_rng(4)
    x, w, b, hyper = make_case(case, rng)
    projection = rng.standard_normal(conv2d_loops(x, w, b, **hyper).shape)
    grad_x, grad_w, grad_b = run_backward(backend, projection, x, w, **hyper)

    def loss():
        return float((run_forward(backend, x, w, b, **hyper) * projection).sum())

    assert_gradient_close(loss, x, grad_x)
    assert_gradient_close(loss, w, grad_w)
    assert_gradient_close(loss, b, grad_b)


@FLOAT64
def test_backward_without_bias_gives_none_and_same_other_gradients(backend):
    x, w, _, hyper = make_case((2, 3, 6, 6, 2, (3, 3), 2, 1, 1), np.random.default_rng(5))
    gy = np.random.default_rng(6).standard_normal((2, 2, 3, 3))
    with_bias = run_backward(backend, gy, x, w, with_bias=True, **hyper)
    without_bias = run_backward(backend, gy, x, w, with_bias=False, **hyper)
    assert without_bias[2] is None
    np.testing.assert_allclose(with_bias[2], gy.sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(without_bias[0], with_bias[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(without_bias[1], with_bias[1], rtol=1e-12, atol=1e-12)


@FLOAT64
def test_backward_can_skip_grad_x(backend):
    x, w, _, hyper = make_case((3, 2, 7, 6, 4, (3, 3), 2, 1, 1), np.random.default_rng(11))
    gy = np.random.default_rng(12).standard_normal((3, 4, 4, 3))
    full = run_backward(backend, gy, x, w, **hyper)
    skipped = run_backward(backend, gy, x, w, with_grad_x=False, **hyper)
    assert full[0] is not None and skipped[0] is None
    np.testing.assert_array_equal(skipped[1], full[1])
    np.testing.assert_array_equal(skipped[2], full[2])


@FLOAT64
def test_backward_float32_keeps_dtype_and_agrees_with_float64(backend):
    x, w, _, hyper = make_case((3, 6, 14, 14, 16, (5, 5), 1, 0, 1), np.random.default_rng(7))
    gy = np.random.default_rng(8).standard_normal((3, 16, 10, 10))
    grads64 = run_backward(backend, gy, x, w, **hyper)
    grads32 = run_backward(backend, gy.astype(np.float32), x.astype(np.float32), w.astype(np.float32), **hyper)
    for g32, g64 in zip(grads32, grads64):
        assert g32.dtype == np.float32
        assert relative_error(g32, g64) < 1e-5


@FLOAT64
def test_batch_chunks_give_the_same_result(backend, monkeypatch):
    """A batch split into several chunks (the last one shorter) matches one chunk."""
    x, w, b, hyper = make_case((7, 3, 9, 8, 4, (3, 3), 1, 1, 1), np.random.default_rng(9))
    gy = np.random.default_rng(10).standard_normal((7, 4, 9, 8))
    whole_y = run_forward(backend, x, w, b, **hyper)
    whole_grads = run_backward(backend, gy, x, w, **hyper)
    per_image = (3 * 9 + 1) * 9 * 8 * x.itemsize
    monkeypatch.setattr(conv_module, "COLUMN_CHUNK_BYTES", 3 * per_image)  # chunks of 3, 3, 1
    np.testing.assert_allclose(run_forward(backend, x, w, b, **hyper), whole_y, rtol=1e-12, atol=1e-12)
    for chunked, whole in zip(run_backward(backend, gy, x, w, **hyper), whole_grads):
        np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ the fast CPU path (gpucnn.cpu) against the NumPy reference
# Called directly: float32 and float64, inputs in NCHW and in CHWN memory order, chunks on helper threads.

def _conv_cases(count, seed):
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        C, OC = (int(c) for c in rng.choice([1, 2, 3, 6, 16, 64], 2))
        KH, KW = (int(k) for k in rng.integers(1, 6, 2))
        stride = tuple(int(s) for s in rng.integers(1, 4, 2))
        dilation = tuple(int(d) for d in rng.integers(1, 3, 2))
        padding = (int(rng.integers(0, KH)), int(rng.integers(0, KW)))
        H = int(rng.integers(dilation[0] * (KH - 1) + 1, 16))
        W = int(rng.integers(dilation[1] * (KW - 1) + 1, 16))
        cases.append((int(rng.integers(1, 9)), C, H, W, OC, KH, KW, stride, padding, dilation))
    return cases


@pytest.mark.parametrize("case", _conv_cases(24, seed=12))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fast_conv_matches_reference(case, dtype, threaded):
    N, C, H, W, OC, KH, KW, stride, padding, dilation = case
    rng = np.random.default_rng(sum(map(hash, map(str, case))) % 2**32)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    weight = rng.standard_normal((OC, C, KH, KW)).astype(dtype)
    bias = rng.standard_normal(OC).astype(dtype)
    tol = {"rtol": 1e-11, "atol": 1e-11} if dtype == np.float64 else {"rtol": 2e-4, "atol": 2e-4}
    for relu in (False, True):
        expected = ops_conv.conv2d_forward_reference(x, weight, bias, stride, padding, dilation, relu=relu)
        for x_in in (x, chwn(x)):
            y = fast_conv.conv2d_forward(x_in, weight, bias, stride, padding, dilation, relu=relu)
            assert y.shape == expected.shape and y.dtype == dtype
            np.testing.assert_allclose(y, expected, **tol)
    grad_y = rng.standard_normal(expected.shape).astype(dtype)
    expected = ops_conv.conv2d_backward_reference(grad_y, x, weight, stride, padding, dilation)
    for grad_y_in, x_in in ((grad_y, x), (chwn(grad_y), chwn(x))):
        grads = fast_conv.conv2d_backward(grad_y_in, x_in, weight, stride, padding, dilation)
        for got, want in zip(grads, expected):
            assert got.shape == want.shape and got.dtype == dtype
            np.testing.assert_allclose(got, want, **tol)
    grad_x, grad_weight, grad_bias = fast_conv.conv2d_backward(grad_y, x, weight, stride, padding, dilation,
                                                               with_bias=False, with_grad_x=False)
    assert grad_x is None and grad_bias is None
    np.testing.assert_allclose(grad_weight, expected[1], **tol)


def test_fast_conv_without_bias_and_a_batch_larger_than_one_chunk(threaded):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 6, 14, 14)).astype(np.float32)
    weight = rng.standard_normal((16, 6, 5, 5)).astype(np.float32)
    y = fast_conv.conv2d_forward(x, weight, None)
    np.testing.assert_allclose(y, ops_conv.conv2d_forward_reference(x, weight, None), rtol=1e-4, atol=1e-4)
    grad_y = rng.standard_normal(y.shape).astype(np.float32)
    for got, want in zip(fast_conv.conv2d_backward(grad_y, x, weight, with_bias=False),
                         ops_conv.conv2d_backward_reference(grad_y, x, weight, with_bias=False)):
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)


# ------------------------------------------------------------------ input validation

def arrays(shape_x=(2, 3, 8, 8), shape_w=(4, 3, 3, 3), dtype=np.float32):
    return np.zeros(shape_x, dtype), np.zeros(shape_w, dtype), np.zeros(shape_w[0], dtype)


def test_rejects_wrong_ndim():
    x, w, b = arrays()
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        conv2d_forward(x[0], w, b)
    with pytest.raises(ValueError, match="weight must have 4 dimensions"):
        conv2d_forward(x, w[0], b)
    with pytest.raises(ValueError, match="bias must have 1 dimensions"):
        conv2d_forward(x, w, b[:, None])


def test_rejects_channel_mismatch_and_a_bias_of_wrong_length():
    x, w, b = arrays(shape_w=(4, 2, 3, 3))
    with pytest.raises(ValueError, match="2 input channels .* x has 3"):
        conv2d_forward(x, w, b)
    x, w, _ = arrays()
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        conv2d_forward(x, w, np.zeros(3, np.float32))


def test_rejects_kernel_larger_than_padded_input():
    x, w, b = arrays(shape_x=(2, 3, 4, 4), shape_w=(4, 3, 5, 5))
    with pytest.raises(ValueError, match="larger than the padded input 4x4"):
        conv2d_forward(x, w, b)
    conv2d_forward(x, w, b, padding=1)  # 6x6 padded: fits
    with pytest.raises(ValueError, match="dilated"):
        conv2d_forward(x, w, b, padding=1, dilation=2)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float16, np.bool_])
def test_rejects_non_float32_64_dtypes(dtype):
    x, w, b = arrays(dtype=dtype)
    with pytest.raises(TypeError, match="float32 or float64"):
        conv2d_forward(x, w, b)


def test_rejects_mixed_dtypes_and_non_arrays():
    x, w, b = arrays()
    with pytest.raises(TypeError, match="weight has dtype float64 but x has float32"):
        conv2d_forward(x, w.astype(np.float64), b)
    with pytest.raises(TypeError, match="must be a NumPy or CuPy array"):
        conv2d_forward(x.tolist(), w, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stride=0), "stride must be positive"),
    (dict(stride=(1, -1)), "stride must be positive"),
    (dict(padding=-1), "padding must be non-negative"),
    (dict(dilation=0), "dilation must be positive"),
    (dict(stride=1.5), "stride must be an int or a pair"),
])
def test_rejects_bad_hyperparameters(kwargs, message):
    x, w, b = arrays()
    with pytest.raises((ValueError, TypeError), match=message):
        conv2d_forward(x, w, b, **kwargs)


def test_rejects_empty_dimensions():
    x, w, b = arrays(shape_x=(0, 3, 8, 8))
    with pytest.raises(ValueError, match="zero-length dimension"):
        conv2d_forward(x, w, b)


def test_backward_rejects_grad_y_of_wrong_shape_or_dtype():
    x, w, _ = arrays()
    with pytest.raises(ValueError, match=r"grad_y must have the output shape \(2, 4, 6, 6\)"):
        conv2d_backward(np.zeros((2, 4, 8, 8), np.float32), x, w)
    with pytest.raises(TypeError, match="grad_y must be a float32 or float64 array"):
        conv2d_backward(np.zeros((2, 4, 6, 6), np.int64), x, w)


# ------------------------------------------------------------------ on a real GPU: sizes that need many blocks

MULTI_GRID_CONV = [
    ConvCase("lenet_conv1_batch64", 64, 1, 28, 28, 6, (5, 5), padding=(2, 2), relu=True),
    ConvCase("lenet_conv2_batch64", 64, 6, 14, 14, 16, (5, 5)),
    ConvCase("wide_channels_batch16", 16, 24, 33, 31, 40, (3, 3), stride=(2, 2), padding=(1, 1)),
]


def run_twice_on_gpu(check, case, **kwargs):
    """A launcher check twice on the GPU: both against the reference, and the same bits."""
    to_gpu = lambda array: gpucnn_backend.to_device(array, "gpu")  # noqa: E731
    first = check(case, runtime=None, to_device=to_gpu, to_host=gpucnn_backend.to_numpy, **kwargs)
    second = check(case, runtime=None, to_device=to_gpu, to_host=gpucnn_backend.to_numpy, **kwargs)
    assert_same_bits(first, second)


@pytest.mark.gpu
@pytest.mark.parametrize("case", MULTI_GRID_CONV, ids=case_id)
def test_conv2d_on_many_gpu_blocks(case):
    run_twice_on_gpu(check_conv, case)


@pytest.mark.gpu
def test_gpu_launchers_refuse_host_arrays():
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(TypeError, match="cupy.ndarray"):
        cuda_conv.conv2d_forward(x, gpucnn_backend.to_device(np.zeros((1, 1, 3, 3), np.float32), "gpu"), None)


# ------------------------------------------------------------------ the launcher under the emulator

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
    for order in EMULATOR_ORDERS:
        rt = EmulatorRuntime(order=order, seed=9)
        y = cuda_conv.conv2d_forward(x, weight, bias, (2, 1), (1, 1), runtime=rt)
        results.append((y, *cuda_conv.conv2d_backward(grad_y, x, weight, (2, 1), (1, 1), runtime=rt)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


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
    for order in EMULATOR_ORDERS:
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
    return start, source.index("#define SMALL_TILES")  # the small weight-gradient kernel's part follows


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
    assert kernel_sources.find_kernels_dir(installed) == installed / "kernels"
    with pytest.raises(FileNotFoundError, match="no CUDA kernel files"):
        kernel_sources.find_kernels_dir(tmp_path / "empty" / "gpucnn")


@pytest.mark.skipif(gpucnn_backend.gpu_available(), reason="checks the path taken without a GPU")
def test_default_runtime_needs_a_gpu():
    with pytest.raises(gpucnn_backend.DeviceError, match="GPU"):
        cuda_conv.conv2d_forward(f32(1, 1, 4, 4), f32(1, 1, 3, 3), None)


# ------------------------------------------------------------------ launcher refusals: before any kernel runs

@pytest.mark.parametrize("call, error, message", [
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 2, 5, 5).astype(np.float64), f32(3, 2, 3, 3), None, runtime=rt),
     TypeError, "float32"),
    (lambda rt: cuda_conv.conv2d_forward(np.zeros((1, 1, 5, 5)), f32(1, 1, 3, 3), None, runtime=rt),
     TypeError, "x must have dtype float32, not float64"),
    (lambda rt: cuda_conv.conv2d_forward(f32(2, 5, 5), f32(3, 2, 3, 3), None, runtime=rt), ValueError, "4 dim"),
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 5, 5), f32(1, 1, 3, 3), None, runtime=rt),
     ValueError, r"x must have 4 dimensions, not 3 \(shape \(1, 5, 5\)\)"),
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 2, 5, 5), f32(3, 4, 3, 3), None, runtime=rt), ValueError,
     "input channels"),
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 2, 5, 5), f32(4, 3, 3, 3), None, runtime=rt),
     ValueError, "weight expects 3 input channels"),
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 2, 5, 5), f32(3, 2, 3, 3), f32(4), runtime=rt), ValueError, "bias"),
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 2, 5, 5), f32(3, 2, 7, 3), None, runtime=rt), ValueError,
     "larger than the padded input"),
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 1, 2, 2), f32(1, 1, 3, 3), None, runtime=rt),
     ValueError, "larger than the padded input"),
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 2, 5, 5), f32(3, 2, 3, 3), None, stride=0, runtime=rt),
     ValueError, "stride"),
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 1, 1, 1), f32(1, 1, 1, 1), None, padding=30000, runtime=rt),
     ValueError, "int32"),
    (lambda rt: cuda_conv.conv2d_backward(f32(1, 3, 4, 4), f32(1, 2, 5, 5), f32(3, 2, 3, 3), runtime=rt),
     ValueError, "grad_y"),
    (lambda rt: cuda_conv.conv2d_backward(f32(1, 1, 2, 2), f32(1, 1, 5, 5), f32(1, 1, 3, 3), runtime=rt),
     ValueError, r"grad_y must have shape \(1, 1, 3, 3\) for these inputs, not \(1, 1, 2, 2\)"),
    (lambda rt: cuda_conv.conv2d_forward([[1.0]], f32(3, 2, 3, 3), None, runtime=rt), TypeError, "ndarray"),
    # y would hold 2**32 elements: flat indices overflow int32 (x and weight are tiny)
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 1, 1, 2**16), f32(2**16, 1, 1, 1), None, runtime=rt),
     ValueError, "y would hold 4294967296 elements, more than the 2147482623"),
    # oy*SH reaches 2**31 (padding and stride 2**30): coordinates overflow int32 although every count is small
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 1, 4, 4), f32(1, 1, 1, 1), None, stride=2**30, padding=2**30,
                                         runtime=rt),
     ValueError, r"H \+ 2\*PH \+ SH, is 3221225476, more than the 2147482623"),
    (lambda rt: cuda_conv.conv2d_backward(f32(1, 1, 4, 4), f32(1, 1, 4, 4), f32(1, 1, 1, 1), dilation=2**40,
                                          runtime=rt),
     ValueError, "the dilation is 1099511627776"),
], ids=["float64", "dtype", "3-dim", "ndim", "channels", "channels-named", "bias", "kernel-too-big",
        "kernel-too-big-2", "stride-0", "padding-int32", "grad-y", "grad-shape", "not-an-array", "count-over-int32",
        "coordinates-over-int32", "dilation-over-int32"])
def test_launcher_refuses_bad_inputs_before_any_kernel_is_launched(call, error, message):
    assert_refused_before_launch(call, error, message)
