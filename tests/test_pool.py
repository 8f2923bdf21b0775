"""Max and average pooling on every backend against the loops of tests/loops.py and float64 finite
differences; the max-pool tie and NaN rules; the launchers' refusals and their NaN/padding rules under
the emulator.

The float32 kernel cases (tests/kernel_cases.py) run on every backend of the ``backend`` fixture, on
tie-free inputs (argmax compared exactly); on the GPU twice, which must give the same bits. The
float64 cases run on the CPU paths (the kernels are float32).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from gpucnn.cpu import pool as fast_pool
from gpucnn.cuda import pool as cuda_pool
from gpucnn.ops import avg_pool2d_backward, avg_pool2d_forward, max_pool2d, max_pool2d_backward, max_pool2d_forward
from gpucnn.ops import pool as ops_pool
from gpucnn.testing.gradcheck import assert_gradient_close
from tests.helpers import assert_same_bits, assert_close, assert_refused_before_launch, chwn, f32, tie_free
from tests.kernel_cases import (
    FORWARD_TOL,
    GRAD_X_TOL,
    POOL_CASES,
    PoolCase,
    case_id,
    check_avg_pool,
    check_max_pool,
    pool_output_shape,
)
from tests.loops import (
    avg_pool2d_backward_loops,
    avg_pool2d_loops,
    max_pool2d_backward_loops,
    max_pool2d_loops,
    pooled_shape,
)
from tests.test_conv import run_twice_on_gpu

FLOAT64 = pytest.mark.backends("reference", "fast")


def max_pool(backend, x, *args, **kw):
    return backend.host(max_pool2d_forward(backend.to(x), *args, **kw))


def max_pool_backward(backend, gy, argmax, *args, **kw):
    return backend.host(max_pool2d_backward(backend.to(gy), backend.to(argmax), *args, **kw))


def avg_pool(backend, x, *args, **kw):
    return backend.host(avg_pool2d_forward(backend.to(x), *args, **kw))


def avg_pool_backward(backend, gy, *args, **kw):
    return backend.host(avg_pool2d_backward(backend.to(gy), *args, **kw))


# ------------------------------------------------------------------ float32 kernel cases, every backend

def pool_case_inputs(case: PoolCase, seed: int = 0):
    """Tie-free x, the max pool's grad_y and the average pool's x and grad_y (as check_max_pool and check_avg_pool)."""
    rng = np.random.default_rng(seed)
    x = tie_free((case.n, case.c, case.h, case.w), rng)
    grad_y = rng.standard_normal(pool_output_shape(case)).astype(np.float32)
    rng = np.random.default_rng(seed)
    avg_x = rng.standard_normal((case.n, case.c, case.h, case.w)).astype(np.float32)
    avg_grad_y = rng.standard_normal(pool_output_shape(case)).astype(np.float32)
    return x, grad_y, avg_x, avg_grad_y


@lru_cache(maxsize=None)
def expected_pool(case: PoolCase):
    x, grad_y, avg_x, avg_grad_y = pool_case_inputs(case)
    window = (case.kernel, case.stride, case.padding)
    y, argmax = max_pool2d_loops(x, *window)
    grad_x = max_pool2d_backward_loops(grad_y, argmax, x.shape, *window)
    avg_y = avg_pool2d_loops(avg_x, *window)
    avg_grad_x = avg_pool2d_backward_loops(avg_grad_y, x.shape, *window)
    return (y.astype(np.float32), argmax, grad_x.astype(np.float32), avg_y.astype(np.float32),
            avg_grad_x.astype(np.float32))


def run_pool_case(backend, case: PoolCase):
    x, grad_y, avg_x, avg_grad_y = pool_case_inputs(case)
    window = (case.kernel, case.stride, case.padding)
    y, argmax = max_pool(backend, x, *window)
    grad_x = max_pool_backward(backend, grad_y, argmax, x.shape, *window)
    return (y, argmax, grad_x, avg_pool(backend, avg_x, *window),
            avg_pool_backward(backend, avg_grad_y, x.shape, *window))


@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_pool2d_kernel_cases_match_loops(case, backend):
    y, argmax, grad_x, avg_y, avg_grad_x = outputs = run_pool_case(backend, case)
    want_y, want_argmax, want_grad_x, want_avg_y, want_avg_grad_x = expected_pool(case)
    assert argmax.dtype == np.int32
    np.testing.assert_array_equal(argmax, want_argmax)
    np.testing.assert_array_equal(y, want_y)  # the maximum is one of the inputs: exact
    assert_close("grad_x", grad_x, want_grad_x, GRAD_X_TOL)
    assert_close("avg y", avg_y, want_avg_y, FORWARD_TOL)
    assert_close("avg grad_x", avg_grad_x, want_avg_grad_x, GRAD_X_TOL)
    if backend.device == "gpu":
        assert_same_bits(outputs, run_pool_case(backend, case))


@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_max_pool2d_without_argmax_is_the_forward_y(case, backend):
    """max_pool2d (no_grad's pooling) gives max_pool2d_forward's y, in the same memory order on the CPU."""
    x = pool_case_inputs(case)[0]
    window = (case.kernel, case.stride, case.padding)
    y = backend.host(max_pool2d(backend.to(x), *window))
    np.testing.assert_array_equal(y, expected_pool(case)[0])


# ------------------------------------------------------------------ float64 against loops and finite differences

# (x shape, kernel_size, stride, padding)
SHAPE_CASES = [
    ((2, 3, 8, 8), 2, None, 0),         # LeNet's 2x2 stride 2 (the fast path)
    ((2, 3, 7, 9), 2, 2, 0),            # 2x2 stride 2 on odd sizes: last row/column unused
    ((1, 2, 7, 7), 3, 2, 1),            # overlapping windows with padding
    ((2, 1, 6, 5), 3, 1, 0),            # stride 1: heavy overlap
    ((2, 3, 9, 8), (3, 2), (2, 1), (1, 1)),  # everything non-square
    ((1, 4, 5, 6), (5, 6), None, 0),    # kernel as large as the input
    ((2, 2, 10, 7), 4, 3, 2),           # padding = kernel // 2
    ((1, 1, 4, 4), 1, 1, 0),            # 1x1: identity
]


def pool_id(case):
    shape, k, s, p = case
    return f"{'x'.join(map(str, shape))}-k{k}-s{s}-p{p}".replace(" ", "")


@pytest.mark.parametrize("case", SHAPE_CASES, ids=pool_id)
@FLOAT64
def test_max_pool_matches_loops(backend, case):
    shape, k, s, p = case
    x = np.random.default_rng(0).standard_normal(shape)
    y, argmax = max_pool(backend, x, k, s, p)
    expected_y, expected_argmax = max_pool2d_loops(x, k, s, p)
    assert argmax.dtype == np.int32
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(argmax, expected_argmax)


@pytest.mark.parametrize("with_nans", [False, True], ids=["ties", "ties+nan+inf"])
@pytest.mark.parametrize("case", SHAPE_CASES, ids=pool_id)
@FLOAT64
def test_max_pool_ties_and_nans_match_loops(backend, case, with_nans):
    """Few distinct values (many ties), optionally NaNs and -inf: argmax names the first max / first NaN."""
    shape, k, s, p = case
    rng = np.random.default_rng(1)
    x = rng.integers(-2, 2, size=shape).astype(np.float32)
    if with_nans:
        x[rng.random(shape) < 0.08] = np.nan
        x[rng.random(shape) < 0.08] = -np.inf
    y, argmax = max_pool(backend, x, k, s, p)
    expected_y, expected_argmax = max_pool2d_loops(x, k, s, p)
    np.testing.assert_array_equal(y, expected_y)  # NaN == NaN for this helper
    np.testing.assert_array_equal(argmax, expected_argmax)


@pytest.mark.parametrize("case", SHAPE_CASES, ids=pool_id)
@FLOAT64
def test_max_pool_backward_matches_loops_and_finite_differences(backend, case):
    shape, k, s, p = case
    rng = np.random.default_rng(2)
    x = tie_free(shape, rng, spacing=0.1, start=-3.0, dtype=np.float64)
    _, argmax = max_pool(backend, x, k, s, p)
    gy = rng.standard_normal(argmax.shape)
    grad_x = max_pool_backward(backend, gy, argmax, shape, k, s, p)
    np.testing.assert_allclose(grad_x, max_pool2d_backward_loops(gy, argmax, shape, k, s, p), rtol=1e-14, atol=0)
    assert_gradient_close(lambda: float((max_pool(backend, x, k, s, p)[0] * gy).sum()), x, grad_x)


@pytest.mark.parametrize("case", SHAPE_CASES, ids=pool_id)
@FLOAT64
def test_avg_pool_matches_loops_and_finite_differences(backend, case):
    shape, k, s, p = case
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    y = avg_pool(backend, x, k, s, p)
    np.testing.assert_allclose(y, avg_pool2d_loops(x, k, s, p), rtol=1e-12, atol=1e-15)
    gy = rng.standard_normal(y.shape)
    grad_x = avg_pool_backward(backend, gy, shape, k, s, p)
    np.testing.assert_allclose(grad_x, avg_pool2d_backward_loops(gy, shape, k, s, p), rtol=1e-12, atol=1e-15)
    assert_gradient_close(lambda: float((avg_pool(backend, x, k, s, p) * gy).sum()), x, grad_x)


@FLOAT64
def test_first_maximum_wins_ties(backend):
    window = np.array([[[[1.0, 5.0, 2.0], [5.0, 0.0, 5.0], [3.0, 5.0, 4.0]]]])  # 5 at offsets 1, 3, 5, 7
    y, argmax = max_pool(backend, window, 3)
    assert y[0, 0, 0, 0] == 5.0 and argmax[0, 0, 0, 0] == 1
    constant = np.full((2, 3, 6, 6), 7.0, np.float32)
    for k, s, p in [(2, 2, 0), (3, 1, 1), (3, 2, 0)]:
        y, argmax = max_pool(backend, constant, k, s, p)
        # Without padding every window starts at offset 0; with padding, at its first inside pixel.
        np.testing.assert_array_equal(argmax, max_pool2d_loops(constant, k, s, p)[1])
        assert (y == 7.0).all()
    _, argmax = max_pool(backend, constant, 2)
    assert (argmax == 0).all()


@pytest.mark.parametrize("k, s", [(2, 2), (3, 3)])
@FLOAT64
def test_nan_propagates_and_argmax_names_the_first_nan(backend, k, s):
    x = np.arange(2 * 1 * 6 * 6, dtype=np.float32).reshape(2, 1, 6, 6)
    x[0, 0, 1, 1] = np.nan           # window (0, 0): a NaN at offset k+1 after numbers
    x[0, 0, 0, k + 1] = np.nan       # window (0, 1): two NaNs, the first at offset 1
    x[0, 0, 1, k] = np.nan
    y, argmax = max_pool(backend, x, k, s)
    assert np.isnan(y[0, 0, 0, 0]) and argmax[0, 0, 0, 0] == k + 1
    assert np.isnan(y[0, 0, 0, 1]) and argmax[0, 0, 0, 1] == 1
    assert np.isnan(y).sum() == 2  # no other window is touched
    assert y[1, 0, -1, -1] == x[1, 0].max()


@FLOAT64
def test_all_minus_inf_window_points_inside_the_input(backend):
    """Padding is -inf too, but the argmax must name a real pixel so the gradient is not lost."""
    x = np.full((1, 1, 4, 4), -np.inf)
    y, argmax = max_pool(backend, x, 3, 2, 1)
    assert (y == -np.inf).all()
    np.testing.assert_array_equal(argmax[0, 0], [[4, 3], [1, 0]])  # first pixel inside each window
    grad_x = max_pool_backward(backend, np.ones(y.shape), argmax, x.shape, 3, 2, 1)
    assert grad_x.sum() == y.size


@FLOAT64
def test_max_pool_backward_routes_only_to_the_maximum(backend):
    x = np.array([[[[1.0, 2.0, 9.0, 0.0], [3.0, 4.0, 1.0, 1.0]]]])
    _, argmax = max_pool(backend, x, 2)
    grad_x = max_pool_backward(backend, np.array([[[[10.0, 20.0]]]]), argmax, x.shape, 2)
    np.testing.assert_array_equal(grad_x, [[[[0, 0, 20, 0], [0, 10, 0, 0]]]])


@FLOAT64
def test_overlapping_windows_accumulate(backend):
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 5.0  # the maximum of all four 2x2 stride-1 windows
    y, argmax = max_pool(backend, x, 2, 1)
    np.testing.assert_array_equal(argmax[0, 0], [[3, 2], [1, 0]])
    grad_x = max_pool_backward(backend, np.array([[[[1.0, 2.0], [3.0, 4.0]]]]), argmax, x.shape, 2, 1)
    assert grad_x[0, 0, 1, 1] == 10.0 and grad_x.sum() == 10.0


@FLOAT64
def test_float32_keeps_dtype(backend):
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    for k, s, p in [(2, None, 0), (3, 2, 1)]:
        y, argmax = max_pool(backend, x, k, s, p)
        assert y.dtype == np.float32 and argmax.dtype == np.int32
        assert max_pool_backward(backend, y, argmax, x.shape, k, s, p).dtype == np.float32
        assert avg_pool(backend, x, k, s, p).dtype == np.float32
        assert avg_pool_backward(backend, y, x.shape, k, s, p).dtype == np.float32


# ------------------------------------------------------------------ the fast CPU path (gpucnn.cpu) against the NumPy reference
# Called directly: float32 and float64, inputs in NCHW and in CHWN memory order, chunks on helper threads.

def _pool_inputs(rng, shape, dtype):
    """Random values, values with ties (few distinct numbers) and values with NaN."""
    plain = rng.standard_normal(shape).astype(dtype)
    ties = rng.integers(-2, 2, shape).astype(dtype)
    with_nan = plain.copy()
    with_nan.reshape(-1)[rng.integers(0, with_nan.size, 3)] = np.nan
    return plain, ties, with_nan


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((3, 6, 28, 28), 2, None, 0), ((2, 5, 11, 9), 2, None, 0), ((4, 16, 10, 10), 2, 2, 0),
    ((2, 3, 9, 8), 3, 2, 1), ((1, 2, 7, 7), (3, 2), 1, 0)])
def test_fast_max_pool_matches_reference_exactly(shape, kernel, stride, padding, threaded):
    rng = np.random.default_rng(3)
    for x in _pool_inputs(rng, shape, np.float32):
        y_ref, argmax_ref = ops_pool.max_pool2d_forward_reference(x, kernel, stride, padding)
        grad_y = rng.standard_normal(y_ref.shape).astype(np.float32)
        grad_ref = ops_pool.max_pool2d_backward_reference(grad_y, argmax_ref, x.shape, kernel, stride, padding)
        for x_in in (x, chwn(x)):
            y, argmax = fast_pool.max_pool2d_forward(x_in, kernel, stride, padding)
            assert argmax.dtype == np.int32
            np.testing.assert_array_equal(y, y_ref)
            np.testing.assert_array_equal(argmax, argmax_ref)
            for grad_y_in in (grad_y, chwn(grad_y)):
                grad_x = fast_pool.max_pool2d_backward(grad_y_in, argmax, x.shape, kernel, stride, padding)
                np.testing.assert_array_equal(grad_x, grad_ref)
            values = fast_pool.max_pool2d(x_in, kernel, stride, padding)  # NaN propagates as in y_ref
            np.testing.assert_array_equal(values, y_ref)
            if not np.isnan(x).any():  # (forward's y comes from the reference for NaN inputs)
                assert values.strides == y.strides


# ------------------------------------------------------------------ input validation

def test_rejects_wrong_ndim_and_dtype():
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        max_pool2d_forward(np.zeros((3, 8, 8), np.float32), 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        max_pool2d_forward(np.zeros((1, 3, 8, 8), np.int32), 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        avg_pool2d_forward(np.zeros((1, 3, 8, 8), np.float16), 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel_size=3, padding=2), "padding 2 must be between 0 and half the kernel size"),
    (dict(kernel_size=(2, 4), padding=(1, 3)), "half the kernel size"),
    (dict(kernel_size=2, padding=-1), "between 0 and half"),
    (dict(kernel_size=0), "kernel_size must be positive"),
    (dict(kernel_size=2, stride=0), "stride must be positive"),
    (dict(kernel_size=9), "larger than the padded input 8x8"),
])
@pytest.mark.parametrize("op", [max_pool2d_forward, avg_pool2d_forward])
def test_rejects_bad_sizes(op, kwargs, message):
    with pytest.raises(ValueError, match=message):
        op(np.zeros((1, 3, 8, 8), np.float32), **kwargs)


def test_backward_rejects_mismatched_arguments():
    gy = np.zeros((1, 3, 4, 4), np.float32)
    argmax = np.zeros((1, 3, 4, 4), np.int32)
    with pytest.raises(ValueError, match=r"grad_y must have the pooled shape \(1, 3, 3, 3\)"):
        max_pool2d_backward(gy, argmax, (1, 3, 7, 7), 2)
    with pytest.raises(ValueError, match="argmax has shape"):
        max_pool2d_backward(gy, argmax[:, :, :3], (1, 3, 8, 8), 2)
    with pytest.raises(TypeError, match="argmax must be an integer array"):
        max_pool2d_backward(gy, argmax.astype(np.float32), (1, 3, 8, 8), 2)
    with pytest.raises(ValueError, match="four ints"):
        avg_pool2d_backward(gy, (3, 8, 8), 2)
    with pytest.raises(ValueError, match="must be positive"):
        avg_pool2d_backward(gy, (1, 0, 8, 8), 2)
    assert pooled_shape((1, 3, 8, 8), 2) == gy.shape


# ------------------------------------------------------------------ on a real GPU: sizes that need many blocks

MULTI_GRID_POOL = [
    PoolCase("lenet_pool_batch64", 64, 6, 28, 28, (2, 2)),
    PoolCase("overlapping_batch32", 32, 16, 31, 29, (3, 3), (2, 2), (1, 1)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", MULTI_GRID_POOL, ids=case_id)
def test_max_pool2d_on_many_gpu_blocks(case):
    run_twice_on_gpu(check_max_pool, case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", MULTI_GRID_POOL, ids=case_id)
def test_avg_pool2d_on_many_gpu_blocks(case):
    run_twice_on_gpu(check_avg_pool, case)


# ------------------------------------------------------------------ the launchers under the emulator: ties, NaN, padding

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


# ------------------------------------------------------------------ launcher refusals: before any kernel runs

@pytest.mark.parametrize("call, error, message", [
    (lambda rt: cuda_pool.max_pool2d_forward(f32(1, 1, 4, 4), 3, padding=2, runtime=rt), ValueError, "padding"),
    (lambda rt: cuda_pool.max_pool2d_forward(f32(1, 1, 2, 2), 3, runtime=rt), ValueError, "larger than"),
    (lambda rt: cuda_pool.max_pool2d_forward(f32(1, 1, 4, 4).astype(np.float16), 2, runtime=rt), TypeError,
     "float32"),
    (lambda rt: cuda_pool.max_pool2d_backward(f32(1, 1, 2, 2), np.zeros((1, 1, 2, 2), np.int64), (1, 1, 4, 4), 2,
                                              runtime=rt), TypeError, "argmax must have dtype int32, not int64"),
    (lambda rt: cuda_pool.avg_pool2d_backward(f32(1, 1, 3, 2), (1, 1, 4, 4), 2, runtime=rt), ValueError, "grad_y"),
    (lambda rt: cuda_pool.avg_pool2d_backward(f32(1, 1, 2, 2), (1, 1, 4), 2, runtime=rt), ValueError, "input shape"),
    # the backward's first window (ty + SH - 1) overflows: the kernel read grad_y[-1] (wrong gradient)
    (lambda rt: cuda_pool.max_pool2d_backward(f32(1, 1, 1, 1), np.zeros((1, 1, 1, 1), np.int32), (1, 1, 4, 4), 2,
                                              stride=2**31 - 1, runtime=rt),
     ValueError, r"H \+ 2\*PH \+ SH, is 2147483651"),
    (lambda rt: cuda_pool.avg_pool2d_forward(f32(1, 1, 4, 4), 2, stride=2**31 - 1, runtime=rt),
     ValueError, "more than the 2147482623"),
], ids=["padding", "window-too-big", "float16", "argmax-dtype", "grad-y", "input-shape", "backward-over-int32",
        "stride-over-int32"])
def test_launchers_refuse_bad_inputs_before_any_kernel_is_launched(call, error, message):
    assert_refused_before_launch(call, error, message)
