"""Batch normalisation, global average pooling and the residual add: the public ops against the loops of
tests/loops.py and float64 finite differences, the running statistics updated in place, the refusals.

NORM_BACKENDS lists the backends the float32 bodies run on: all of them (the kernel devices through
gpucnn/cuda/norm.py and the pool and activation additions; tests/test_kernels_norm.py checks those
launchers on awkward shapes, the fused ReLU and bitwise reruns).
"""
from __future__ import annotations

import numpy as np
import pytest

from gpucnn import nn, ops
from gpucnn.testing.gradcheck import assert_gradient_close
from tests.helpers import assert_close, chwn
from tests.loops import batch_norm_eval_loops, batch_norm_loops, global_avg_pool2d_loops

NORM_BACKENDS = pytest.mark.backends("cpu", "emulator", "gpu")  # every backend: the kernel launchers exist
FLOAT64 = pytest.mark.backends("reference", "fast")
TOL = 2e-5
SHAPES = [(8, 3), (4, 3, 5), (2, 3, 4, 5), (3, 16, 7, 7), (64, 5, 1, 1)]


def _channels(rng, C, dtype=np.float32):
    weight = (1 + 0.5 * rng.standard_normal(C)).astype(dtype)
    bias = rng.standard_normal(C).astype(dtype)
    running_mean = rng.standard_normal(C).astype(dtype)
    running_var = (0.5 + rng.random(C)).astype(dtype)
    return weight, bias, running_mean, running_var


@NORM_BACKENDS
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_norm_forward_matches_loops_and_updates_running_statistics(backend, shape):
    rng = np.random.default_rng(1)
    x = (3 + 2 * rng.standard_normal(shape)).astype(np.float32)
    weight, bias, running_mean, running_var = _channels(rng, shape[1])
    expected = batch_norm_loops(x, weight, bias, running_mean, running_var, 0.1, 1e-5)
    rm, rv = backend.to(running_mean), backend.to(running_var)
    y, mean, invstd = ops.batch_norm_forward(backend.to(x), backend.to(weight), backend.to(bias), rm, rv, 0.1, 1e-5)
    for name, actual, reference in zip(("y", "mean", "invstd", "running_mean", "running_var"),
                                       backend.host((y, mean, invstd, rm, rv)), expected):
        assert_close(name, actual, reference.astype(np.float32), TOL)


@NORM_BACKENDS
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_norm_eval_matches_loops_and_updates_nothing(backend, shape):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(np.float32)
    weight, bias, running_mean, running_var = _channels(rng, shape[1])
    rm, rv = backend.to(running_mean), backend.to(running_var)
    y = ops.batch_norm_forward_eval(backend.to(x), backend.to(weight), backend.to(bias), rm, rv, 1e-5)
    assert_close("y", backend.host(y), batch_norm_eval_loops(x, weight, bias, running_mean, running_var, 1e-5)
                 .astype(np.float32), TOL)
    assert np.array_equal(backend.host(rm), running_mean) and np.array_equal(backend.host(rv), running_var)


@NORM_BACKENDS
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_norm_backward_matches_float64_backward(backend, shape):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    weight, bias, running_mean, running_var = _channels(rng, shape[1], np.float64)
    grad_y = rng.standard_normal(shape)
    with_float64 = ops.batch_norm_forward(x, weight, bias, running_mean.copy(), running_var.copy(), 0.1, 1e-5)
    expected = ops.batch_norm_backward(grad_y, x, weight, *with_float64[1:])
    f = [a.astype(np.float32) for a in (x, weight, bias, running_mean, running_var, grad_y)]
    _, mean, invstd = ops.batch_norm_forward(*(backend.to(a) for a in f[:5]), 0.1, 1e-5)
    actual = backend.host(ops.batch_norm_backward(backend.to(f[5]), backend.to(f[0]), backend.to(f[1]), mean, invstd))
    M = x.size // shape[1]
    for name, a, e, tol in zip(("grad_x", "grad_weight", "grad_bias"), actual, expected, (TOL, TOL * M, TOL * M)):
        assert_close(name, a, e.astype(np.float32), tol)


@NORM_BACKENDS
@pytest.mark.parametrize("shape", [(8, 3), (2, 3, 4, 5), (3, 16, 7, 7)], ids=str)
def test_batch_norm_with_a_fused_relu_equals_batch_norm_then_relu(backend, shape):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape).astype(np.float32)
    grad_y = rng.standard_normal(shape).astype(np.float32)
    weight, bias, running_mean, running_var = _channels(rng, shape[1])
    plain = ops.norm.batch_norm_forward_reference(x, weight, bias, running_mean.copy(), running_var.copy(), 0.1, 1e-5)
    expected_y = np.maximum(plain[0], 0)
    expected_grads = ops.norm.batch_norm_backward_reference(grad_y * (expected_y > 0), x, weight, *plain[1:])
    rm, rv = backend.to(running_mean), backend.to(running_var)
    y, mean, invstd = ops.batch_norm_forward(backend.to(x), backend.to(weight), backend.to(bias), rm, rv, 0.1, 1e-5,
                                             relu=True)
    assert_close("y", backend.host(y), expected_y, TOL)
    assert backend.host(y).min() >= 0
    grads = ops.batch_norm_backward(backend.to(grad_y), backend.to(x), backend.to(weight), mean, invstd, y=y)
    M = x.size // shape[1]
    for name, a, e, tol in zip(("grad_x", "grad_weight", "grad_bias"), backend.host(grads), expected_grads,
                               (TOL, TOL * M, TOL * M)):
        assert_close(name, a, e, tol)
    y_eval = ops.batch_norm_forward_eval(backend.to(x), backend.to(weight), backend.to(bias), rm, rv, 1e-5, relu=True)
    expected_eval = ops.norm.batch_norm_forward_eval_reference(x, weight, bias, backend.host(rm), backend.host(rv),
                                                               1e-5)
    assert_close("y_eval", backend.host(y_eval), np.maximum(expected_eval, 0), TOL)


def test_a_fused_relu_in_a_sequential_gives_the_unfused_gradients():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 3, 5, 5)).astype(np.float32)
    grad = rng.standard_normal((6, 3, 5, 5)).astype(np.float32)
    fused = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    fused[0].weight.data[...] = [1.5, -0.5, 1.0]
    y = fused(x)
    assert fused._last_fused == {1} and "y" in fused[0]._cache and fused[0]._cache["y"] is not None
    bn = nn.BatchNorm2d(3)
    bn.weight.data[...] = fused[0].weight.data
    relu = nn.ReLU()
    expected_y = relu(bn(x))
    np.testing.assert_array_equal(y, expected_y)
    grad_x = fused.backward(grad)
    expected_grad_x = bn.backward(relu.backward(grad))
    assert_close("grad_x", grad_x, expected_grad_x, TOL)
    assert_close("grad_weight", fused[0].weight.grad, bn.weight.grad, TOL * 150)
    assert_close("grad_bias", fused[0].bias.grad, bn.bias.grad, TOL * 150)
    np.testing.assert_array_equal(fused[0].running_mean, bn.running_mean)


@FLOAT64
@pytest.mark.parametrize("shape", [(5, 2), (3, 2, 4), (2, 3, 3, 4)], ids=str)
def test_batch_norm_gradients_match_finite_differences(backend, shape):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    weight, bias, running_mean, running_var = _channels(rng, shape[1], np.float64)
    R = rng.standard_normal(shape)

    def f():
        return float((ops.batch_norm_forward(x, weight, bias, running_mean, running_var, 0.1, 1e-5)[0] * R).sum())

    _, mean, invstd = ops.batch_norm_forward(x, weight, bias, running_mean, running_var, 0.1, 1e-5)
    grad_x, grad_weight, grad_bias = ops.batch_norm_backward(R, x, weight, mean, invstd)
    assert_gradient_close(f, x, grad_x, rtol=1e-6)
    assert_gradient_close(f, weight, grad_weight, rtol=1e-6)
    assert_gradient_close(f, bias, grad_bias, rtol=1e-6)


@pytest.mark.backends("fast")
def test_batch_norm_fast_path_keeps_chwn_memory_and_results(backend):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 4, 5, 5)).astype(np.float32)
    weight, bias, running_mean, running_var = _channels(rng, 4)
    args = (weight, bias, running_mean.copy(), running_var.copy(), 0.1, 1e-5)
    y, mean, invstd = ops.batch_norm_forward(chwn(x), *args)
    expected = batch_norm_loops(x, weight, bias, running_mean, running_var, 0.1, 1e-5)
    assert_close("y", np.ascontiguousarray(y), expected[0].astype(np.float32), TOL)
    grad = ops.batch_norm_backward(chwn(x), chwn(x), weight, mean, invstd)[0]
    reference = ops.norm.batch_norm_backward_reference(x, x, weight, mean, invstd)[0]
    assert_close("grad_x", np.ascontiguousarray(grad), reference, TOL)


def test_batch_norm_refusals():
    x = np.zeros((4, 3, 2, 2), np.float32)
    c3 = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="more than one value per channel"):
        ops.batch_norm_forward(np.zeros((1, 3), np.float32), c3, c3, c3, c3, 0.1, 1e-5)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        ops.batch_norm_forward(x, np.ones(4, np.float32), c3, c3, c3, 0.1, 1e-5)
    with pytest.raises(ValueError, match="momentum"):
        ops.batch_norm_forward(x, c3, c3, c3, c3, 1.5, 1e-5)
    with pytest.raises(ValueError, match="eps"):
        ops.batch_norm_forward_eval(x, c3, c3, c3, c3, 0)
    with pytest.raises(TypeError, match="running_var has dtype float64"):
        ops.batch_norm_forward(x, c3, c3, c3, np.ones(3), 0.1, 1e-5)
    with pytest.raises(ValueError, match="shape"):
        ops.batch_norm_forward(np.zeros((2, 3, 2, 2, 2), np.float32), c3, c3, c3, c3, 0.1, 1e-5)
    with pytest.raises(ValueError, match="grad_y has shape"):
        ops.batch_norm_backward(np.zeros((4, 3), np.float32), x, c3, c3, c3)
    with pytest.raises(ValueError, match="y has shape"):
        ops.batch_norm_backward(x, x, c3, c3, c3, y=np.zeros((4, 3), np.float32))
    with pytest.raises(TypeError, match="relu must be True or False"):
        ops.batch_norm_forward(x, c3, c3, c3, c3, 0.1, 1e-5, relu=1)


# ------------------------------------------------------------------ global average pooling


@NORM_BACKENDS
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 64, 8, 8), (1, 2, 1, 1)], ids=str)
def test_global_avg_pool_matches_loops(backend, shape):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape).astype(np.float32)
    y = backend.host(ops.global_avg_pool2d_forward(backend.to(x)))
    assert_close("y", y, global_avg_pool2d_loops(x).astype(np.float32), TOL)
    grad_y = rng.standard_normal((shape[0], shape[1], 1, 1)).astype(np.float32)
    grad_x = backend.host(ops.global_avg_pool2d_backward(backend.to(grad_y), shape))
    expected = np.broadcast_to(grad_y.astype(np.float64) / (shape[2] * shape[3]), shape)
    assert_close("grad_x", grad_x, expected.astype(np.float32), TOL)


@FLOAT64
def test_global_avg_pool_gradient_matches_finite_differences(backend):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 3, 4))
    R = rng.standard_normal((2, 3, 1, 1))
    assert_gradient_close(lambda: float((ops.global_avg_pool2d_forward(x) * R).sum()), x,
                          ops.global_avg_pool2d_backward(R, x.shape))


def test_global_avg_pool_refusals():
    with pytest.raises(ValueError, match="4 dimensions"):
        ops.global_avg_pool2d_forward(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"grad_y must have shape \(2, 3, 1, 1\)"):
        ops.global_avg_pool2d_backward(np.zeros((2, 3, 2, 1), np.float32), (2, 3, 4, 4))
    with pytest.raises(ValueError, match="x_shape"):
        ops.global_avg_pool2d_backward(np.zeros((2, 3, 1, 1), np.float32), (2, 3, 0, 4))


# ------------------------------------------------------------------ the residual add


@NORM_BACKENDS
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (7,), (3, 65)], ids=str)
def test_add_and_add_relu(backend, shape):
    rng = np.random.default_rng(8)
    a, b = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    a.reshape(-1)[0] = np.nan
    total = a + b
    assert_close("add", backend.host(ops.add_forward(backend.to(a), backend.to(b))), total, 0)
    expected = np.where(np.isnan(total) | (total > 0), total, 0).astype(np.float32)
    assert_close("add_relu", backend.host(ops.add_relu_forward(backend.to(a), backend.to(b))), expected, 0)


def test_add_refusals():
    with pytest.raises(ValueError, match="they must match"):
        ops.add_forward(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        ops.add_relu_forward(np.zeros(3, np.float32), np.zeros(3))
