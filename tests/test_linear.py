"""Fully connected layers: linear_forward / linear_backward on every backend against float64 products
(tests/loops.py) and finite differences; matmul's transposes, split-K and the column sums under the
emulator; mutation tests of the GEMM core (gemm.cu); the launchers' refusals.

The float32 kernel cases (tests/kernel_cases.py) run on every backend of the ``backend`` fixture (the
fused ReLU through the launcher on the kernel backends, relu_forward after the op on the CPU); on the GPU
twice, which must give the same bits.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from gpucnn import backend as gpucnn_backend
from gpucnn.cpu import linear as fast_linear
from gpucnn.cuda import gemm
from gpucnn.cuda import linear as cuda_linear
from gpucnn.ops import linear as ops_linear
from gpucnn.ops import linear_backward, linear_forward, relu_forward
from gpucnn.testing.gradcheck import assert_gradient_close
from tests.helpers import assert_kernel_case, assert_close, assert_refused_before_launch, f32
from tests.kernel_cases import (
    FORWARD_TOL,
    GRAD_PARAM_TOL,
    LINEAR_CASES,
    MATMUL_CASES,
    LinearCase,
    broken_kernel_copy,
    caught_under_some_order,
    case_id,
    check_linear,
    check_matmul,
    copy_kernels,
    kernel_define,
    remove_barrier,
)
from tests.loops import linear_backward_loops, linear_loops
from tests.test_conv import run_twice_on_gpu

FLOAT64 = pytest.mark.backends("reference", "fast")


def to_gpu(array):
    return gpucnn_backend.to_device(array, "gpu")


# ------------------------------------------------------------------ float32 kernel cases, every backend

def linear_case_inputs(case: LinearCase, seed: int = 0):
    """x, weight, bias (or None), grad_y as check_linear draws them."""
    rng = np.random.default_rng(seed)
    draw = lambda shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    x, weight = draw((case.n, case.d_in)), draw((case.d_out, case.d_in))
    bias = draw((case.d_out,)) if case.bias else None
    return x, weight, bias, draw((case.n, case.d_out))


@lru_cache(maxsize=None)
def expected_linear(case: LinearCase):
    x, weight, bias, grad_y = linear_case_inputs(case)
    y = linear_loops(x, weight, bias)
    y = np.maximum(y, 0) if case.relu else y
    grad_x, grad_weight, grad_bias = linear_backward_loops(grad_y, x, weight)
    outputs = (y, grad_x, grad_weight, grad_bias if case.bias else None)
    return tuple(None if o is None else o.astype(np.float32) for o in outputs)


def run_linear_case(backend, case: LinearCase):
    x, weight, bias, grad_y = (backend.to(a) for a in linear_case_inputs(case))
    if case.relu and backend.kernels:
        y = backend.launcher("linear", "linear_forward")(x, weight, bias, relu=True)  # the fused ReLU
    else:
        y = linear_forward(x, weight, bias)
        y = relu_forward(y) if case.relu else y
    return backend.host((y, *linear_backward(grad_y, x, weight, with_bias=case.bias)))


@pytest.mark.parametrize("case", LINEAR_CASES, ids=case_id)
def test_linear_kernel_cases_match_loops(case, backend):
    assert_kernel_case(backend, lambda: run_linear_case(backend, case), expected_linear(case), (FORWARD_TOL, FORWARD_TOL, GRAD_PARAM_TOL, GRAD_PARAM_TOL))


# ------------------------------------------------------------------ float64 against loops and finite differences

@FLOAT64
def test_linear_values_and_gradients(backend):
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((5, 7)), rng.standard_normal((4, 7)), rng.standard_normal(4)
    y = backend.host(linear_forward(backend.to(x), backend.to(w), backend.to(b)))
    expected = np.array([[sum(x[n, i] * w[o, i] for i in range(7)) + b[o] for o in range(4)] for n in range(5)])
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    np.testing.assert_allclose(backend.host(linear_forward(backend.to(x), backend.to(w), None)), expected - b, rtol=1e-12)
    gy = rng.standard_normal(y.shape)
    grad_x, grad_w, grad_b = backend.host(linear_backward(backend.to(gy), backend.to(x), backend.to(w)))

    def loss():
        return float((backend.host(linear_forward(backend.to(x), backend.to(w), backend.to(b))) * gy).sum())

    for array, grad in [(x, grad_x), (w, grad_w), (b, grad_b)]:
        assert_gradient_close(loss, array, grad)
    assert linear_backward(backend.to(gy), backend.to(x), backend.to(w), with_bias=False)[2] is None


def test_linear_rejects_bad_inputs():
    x, w, b = np.zeros((5, 7), np.float32), np.zeros((4, 7), np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="7 input features .* x has 6"):
        linear_forward(x[:, :6], w, b)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        linear_forward(x[None], w, b)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        linear_forward(x, w, b[:3])
    with pytest.raises(TypeError, match="float32 or float64"):
        linear_forward(x.astype(np.int64), w, b)
    with pytest.raises(ValueError, match=r"grad_y must have shape \(5, 4\)"):
        linear_backward(np.zeros((5, 3), np.float32), x, w)


# ------------------------------------------------------------------ the fast CPU path (gpucnn.cpu) against the NumPy reference
# Called directly, chunks on helper threads: forward in row chunks (a batch over one chunk), backward's
# three products side by side; the results must not depend on the chunking.

@pytest.mark.parametrize("N", [3, 2 * fast_linear.MIN_CHUNK_ROWS + 5])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fast_linear_matches_reference(N, dtype, threaded):
    rng = np.random.default_rng(N)
    x = rng.standard_normal((N, 37)).astype(dtype)
    weight = rng.standard_normal((11, 37)).astype(dtype)
    bias = rng.standard_normal(11).astype(dtype)
    tol = {"rtol": 1e-11, "atol": 1e-11} if dtype == np.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for b in (bias, None):
        y = fast_linear.linear_forward(x, weight, b)
        expected = ops_linear.linear_forward_reference(x, weight, b)
        assert y.shape == expected.shape and y.dtype == dtype
        np.testing.assert_allclose(y, expected, **tol)
    grad_y = rng.standard_normal((N, 11)).astype(dtype)
    for flags in ({}, {"with_bias": False}, {"with_grad_x": False}):
        got = fast_linear.linear_backward(grad_y, x, weight, **flags)
        want = ops_linear.linear_backward_reference(grad_y, x, weight, **flags)
        for g, w in zip(got, want):
            if w is None:
                assert g is None
            else:
                assert g.shape == w.shape and g.dtype == dtype
                np.testing.assert_allclose(g, w, **tol)


# ------------------------------------------------------------------ the launchers under the emulator: matmul, split-K, column sums

@pytest.mark.emulator
@pytest.mark.parametrize("case", MATMUL_CASES, ids=case_id)
def test_matmul_transposes_bias_relu(case, emulator):
    check_matmul(case, runtime=emulator)


def test_gemm_plan_covers_the_depth_exactly_in_at_most_32_slices():
    for rows, cols, depth in [(1, 1, 1), (5, 3, 1000), (10, 84, 4096), (4096, 120, 400), (64, 64, 16), (3, 7, 17),
                              (6, 26, 3_211_264), (256, 2305, 16384), (2048, 4096, 64)]:
        plan = gemm.plan(rows, cols, depth)
        assert 1 <= plan.slices <= gemm.MAX_SLICES
        assert plan.tile in (64, 128) and plan.block == (plan.tile // 8, plan.tile // 8, 1)
        assert plan.depth_slice % (plan.tile // 8) == 0
        assert (plan.slices - 1) * plan.depth_slice < depth <= plan.slices * plan.depth_slice, (rows, cols, depth)
        assert plan.grid == (-(-cols // plan.tile), -(-rows // plan.tile), plan.slices)
        assert plan.shared_bytes == 4 * 4 * (plan.tile // 8) * plan.tile <= 48 * 1024
    assert gemm.plan(5, 3, 1000).slices > 1 and gemm.plan(4096, 4096, 64).slices == 1
    assert gemm.plan(2048, 4096, 64).tile == 128 and gemm.plan(120, 4096, 400).tile == 64
    assert gemm.plan(5, 3, 100_000, split=False).slices == 1


@pytest.mark.emulator
@pytest.mark.parametrize("rows, depth", [(77, 45), (3, 1000)], ids=["one_slice", "split"])
def test_row_sums_ride_along_as_a_column_of_ones(emulator, rows, depth):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((depth, rows)).astype(np.float32), rng.standard_normal((depth, 9)).astype(np.float32)
    c, sums = cuda_linear.matmul(a, b, trans_a=True, row_sums=True, runtime=emulator)
    assert_close("c", c, (a.T.astype(np.float64) @ b).astype(np.float32), 1e-5)
    assert_close("row sums", sums, a.astype(np.float64).sum(axis=0).astype(np.float32), 1e-5)


# ------------------------------------------------------------------ mutation tests: a broken copy of gemm.cu must be caught

# in = 50 takes seven depth steps of 8, so the barrier after each step matters too.
MUTATION_LINEAR = LinearCase("mutation", 40, 50, 70)


@pytest.mark.emulator
@pytest.mark.parametrize("index", [0, 1], ids=["before_the_first_step", "after_each_step"])
def test_mutation_missing_barrier_is_caught(tmp_path, index):
    assert caught_under_some_order(broken_kernel_copy(tmp_path, "gemm.cu", remove_barrier("gemm_tile", index)),
                                   lambda rt: check_linear(MUTATION_LINEAR, runtime=rt))


@pytest.mark.emulator
def test_unmutated_copy_is_not_flagged(tmp_path):
    assert not caught_under_some_order(copy_kernels(tmp_path), lambda rt: check_linear(MUTATION_LINEAR, runtime=rt))


def test_python_constants_match_the_kernel_defines():
    assert kernel_define("gemm.cu", "THREAD_TILE") == gemm.THREAD_TILE


# ------------------------------------------------------------------ on a real GPU: sizes that need many blocks

MULTI_GRID_LINEAR = [
    LinearCase("batch4096_fc1_relu", 4096, 400, 120, relu=True),
    LinearCase("batch4096_fc3", 4096, 84, 10),
    LinearCase("square_513", 513, 513, 513, relu=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", MATMUL_CASES, ids=case_id)
def test_matmul_on_gpu(case):
    run_twice_on_gpu(lambda c, **kw: [check_matmul(c, **kw)], case)


@pytest.mark.gpu
def test_split_k_product_is_bitwise_reproducible_on_many_blocks():
    cp = gpucnn_backend.cupy_module()
    a = cp.random.RandomState(1).standard_normal((120, 8192), dtype=cp.float32)
    b = cp.random.RandomState(2).standard_normal((8192, 84), dtype=cp.float32)
    assert gemm.plan(120, 84, 8192).slices > 1
    first, second = cuda_linear.matmul(a, b), cuda_linear.matmul(a, b)
    assert first.get().tobytes() == second.get().tobytes()
    assert_close("c", first.get(), (a.get().astype(np.float64) @ b.get()).astype(np.float32), 1e-5)


@pytest.mark.gpu
def test_gpu_launchers_refuse_host_arrays():
    with pytest.raises(TypeError, match="cupy.ndarray"):
        cuda_linear.linear_forward(np.zeros((2, 3), np.float32), to_gpu(np.zeros((4, 3), np.float32)), None)



@pytest.mark.gpu
@pytest.mark.parametrize("case", MULTI_GRID_LINEAR, ids=case_id)
def test_linear_on_many_gpu_blocks(case):
    run_twice_on_gpu(check_linear, case)


# ------------------------------------------------------------------ launcher refusals: before any kernel runs

@pytest.mark.parametrize("call, error, message", [
    (lambda rt: cuda_linear.linear_forward(f32(2, 3).astype(np.float64), f32(4, 3), None, runtime=rt),
     TypeError, "float32"),
    (lambda rt: cuda_linear.linear_forward(f32(2, 3, 1), f32(4, 3), None, runtime=rt), ValueError, "2 dim"),
    (lambda rt: cuda_linear.linear_forward(f32(2, 3), f32(4, 5), None, runtime=rt), ValueError, "input features"),
    (lambda rt: cuda_linear.linear_forward(f32(2, 3), f32(4, 3), f32(5), runtime=rt), ValueError, "bias"),
    (lambda rt: cuda_linear.linear_forward(f32(0, 3), f32(4, 3), None, runtime=rt), ValueError, "zero-length"),
    (lambda rt: cuda_linear.linear_forward([[1.0]], f32(4, 1), None, runtime=rt), TypeError, "ndarray"),
    (lambda rt: cuda_linear.linear_backward(f32(2, 5), f32(2, 3), f32(4, 3), runtime=rt), ValueError, "grad_y"),
    (lambda rt: cuda_linear.matmul(f32(2, 3), f32(2, 3), runtime=rt), ValueError, "must match"),
    (lambda rt: cuda_linear.matmul(f32(2, 3), f32(3, 4), bias=f32(3), runtime=rt), ValueError, "bias"),
    (lambda rt: cuda_linear.matmul(f32(3), f32(3, 4), runtime=rt), ValueError, "2 dim"),
    (lambda rt: cuda_linear.linear_forward(f32(2, 3), f32(4, 5), None, runtime=rt),
     ValueError, r"weight expects 5 input features \(shape \(4, 5\)\) but x has 3"),
])
def test_launchers_refuse_bad_inputs_before_any_kernel_is_launched(call, error, message):
    assert_refused_before_launch(call, error, message)
