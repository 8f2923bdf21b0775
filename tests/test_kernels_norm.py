"""The kernels issue 20 added (batch norm, global average pooling, the residual sum) under the emulator in
every thread order, against the NumPy reference of gpucnn.ops: awkward shapes (batch 1, odd channel
counts, H*W = 1, planes past a block, channels cut into several slices), the fused ReLU, bitwise equal
reruns, barrier mutations the tests must catch, and the launchers' refusals.
"""
from __future__ import annotations

import numpy as np
import pytest

from gpucnn.cuda import activation as cuda_activation
from gpucnn.cuda import norm as cuda_norm
from gpucnn.cuda import pool as cuda_pool
from gpucnn.ops import activation as ops_activation
from gpucnn.ops import norm as ops_norm
from gpucnn.ops import pool as ops_pool
from tests.helpers import assert_close
from tests.kernel_cases import broken_kernel_copy, caught_under_some_order, remove_barrier

pytestmark = pytest.mark.emulator

TOL = 2e-5           # y, grad_x, mean, invstd, running statistics: relative to max(1, max|reference|)
SUM_TOL = 5e-5       # grad_weight and grad_bias sum over N*L terms

# (N, C, ...) shapes: in brackets, what each one exercises in kernels/batchnorm.cu
NORM_SHAPES = [
    (2, 5, 1, 1),     # H*W = 1: one thread per plane, tx = 1
    (1, 3, 5, 6),     # batch 1
    (600, 5),         # BatchNorm1d (N, C): three slices per channel
    (3, 7, 11),       # (N, C, L)
    (3, 13, 7, 7),    # odd C, L = 49 in a row of 64 threads
    (2, 3, 17, 19),   # L = 323: a row of 256 threads loops over the plane
    (70, 3, 2, 2),    # 64 planes per block, two slices per channel
    (8, 64, 8, 8),    # ResNet-20's last stage
]
GAP_SHAPES = [(1, 1, 1, 1), (2, 5, 1, 1), (3, 7, 5, 3), (2, 3, 17, 19), (1, 300, 2, 2), (4, 64, 8, 8)]
ADD_SHAPES = [(1,), (3, 5, 7), (2, 16, 9, 9), (70_001,)]   # the last loops past the grid


def _channels(rng, C):
    weight = (1 + 0.5 * rng.standard_normal(C)).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32)
    running_mean = rng.standard_normal(C).astype(np.float32)
    running_var = (0.5 + rng.random(C)).astype(np.float32)
    return weight, bias, running_mean, running_var


def _relu_reference(y):
    return ops_activation.relu_forward_reference(y)


def check_batch_norm(shape, runtime, relu, seed=0, offset=3.0, spread=2.0):
    """Training forward (running statistics too), backward and eval forward against gpucnn.ops.norm's
    reference; returns every kernel output, for bitwise comparisons."""
    rng = np.random.default_rng(seed)
    x = (offset + spread * rng.standard_normal(shape)).astype(np.float32)
    grad_y = rng.standard_normal(shape).astype(np.float32)
    weight, bias, running_mean, running_var = _channels(rng, shape[1])
    rm, rv = running_mean.copy(), running_var.copy()
    ref_rm, ref_rv = running_mean.copy(), running_var.copy()

    y, mean, invstd = cuda_norm.batch_norm_forward(x, weight, bias, rm, rv, 0.1, 1e-5, relu=relu, runtime=runtime)
    ref_y, ref_mean, ref_invstd = ops_norm.batch_norm_forward_reference(x, weight, bias, ref_rm, ref_rv, 0.1, 1e-5)
    if relu:
        ref_y = _relu_reference(ref_y)
    for name, actual, reference in (("y", y, ref_y), ("mean", mean, ref_mean), ("invstd", invstd, ref_invstd),
                                    ("running_mean", rm, ref_rm), ("running_var", rv, ref_rv)):
        assert_close(name, actual, reference, TOL)

    # The backward from the reference's statistics, so only the backward's own rounding is compared.
    grads = cuda_norm.batch_norm_backward(grad_y, x, weight, ref_mean, ref_invstd, y=ref_y if relu else None,
                                          runtime=runtime)
    masked = ops_activation.relu_backward_reference(grad_y, ref_y) if relu else grad_y
    references = ops_norm.batch_norm_backward_reference(masked, x, weight, ref_mean, ref_invstd)
    for name, actual, reference, tol in zip(("grad_x", "grad_weight", "grad_bias"), grads, references,
                                            (TOL, SUM_TOL, SUM_TOL)):
        assert_close(name, actual, reference, tol)

    y_eval = cuda_norm.batch_norm_forward_eval(x, weight, bias, running_mean, running_var, 1e-5, relu=relu,
                                               runtime=runtime)
    ref_eval = ops_norm.batch_norm_forward_eval_reference(x, weight, bias, running_mean, running_var, 1e-5)
    assert_close("y_eval", y_eval, _relu_reference(ref_eval) if relu else ref_eval, TOL)
    return (y, mean, invstd, rm, rv, *grads, y_eval)


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_batch_norm_kernels_match_the_reference_and_rerun_bit_for_bit(shape, relu, emulator):
    first = check_batch_norm(shape, emulator, relu)
    second = check_batch_norm(shape, emulator, relu)  # in random order, the threads run in another order
    for a, b in zip(first, second):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("shape", [(20, 5, 3, 3), (600, 7), (3, 6, 17, 19)], ids=str)
def test_threads_that_visit_several_planes_keep_their_channel(shape, blocks, emulator, monkeypatch):
    # A small element-wise grid: each thread loops over planes, its channel moving by the stride's remainder.
    monkeypatch.setattr(cuda_norm, "PLANE_BLOCKS", blocks)
    assert cuda_norm.plane_grid(shape[0] * shape[1], int(np.prod(shape[2:])))[1] * cuda_norm.block_shape(
        int(np.prod(shape[2:])))[1] < shape[0] * shape[1]
    check_batch_norm(shape, emulator, relu=True)
    if len(shape) == 4:
        grad_y = np.random.default_rng(1).standard_normal((*shape[:2], 1, 1)).astype(np.float32)
        np.testing.assert_array_equal(cuda_pool.global_avg_pool2d_backward(grad_y, shape, runtime=emulator),
                                      ops_pool.global_avg_pool2d_backward_reference(grad_y, shape))


def test_batch_norm_keeps_the_variance_of_values_far_from_zero(emulator):
    # |mean| / std = 1e4: sums of x and x*x would lose the variance; the kernels sum x - (a value of x).
    check_batch_norm((16, 3, 6, 6), emulator, relu=False, offset=100.0, spread=0.01)


def test_batch_norm_eval_runs_on_a_single_value_per_channel(emulator):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 5, 1, 1)).astype(np.float32)
    weight, bias, running_mean, running_var = _channels(rng, 5)
    y = cuda_norm.batch_norm_forward_eval(x, weight, bias, running_mean, running_var, 1e-3, runtime=emulator)
    assert_close("y", y, ops_norm.batch_norm_forward_eval_reference(x, weight, bias, running_mean, running_var, 1e-3),
                 TOL)


def test_relu_fusion_keeps_nan_and_zeroes_the_gradient_at_the_kink(emulator):
    x = np.array([[1.0, -1.0], [np.nan, 3.0], [2.0, 5.0]], np.float32)  # channel 0 is all NaN statistics
    ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)
    y, _, _ = cuda_norm.batch_norm_forward(x, ones, zeros, zeros.copy(), ones.copy(), 0.1, 1e-5, relu=True,
                                           runtime=emulator)
    assert np.isnan(y[:, 0]).all() and (y[:, 1] >= 0).all() and y[0, 1] == 0
    x = np.array([[1.0, -1.0], [4.0, 3.0], [2.0, 5.0]], np.float32)
    saved_y = np.array([[0, 0], [1, 0], [1, 1]], np.float32)  # the rows where the ReLU passed
    _, grad_weight, grad_bias = cuda_norm.batch_norm_backward(np.ones_like(x), x, ones, zeros, ones, y=saved_y,
                                                              runtime=emulator)
    assert grad_bias.tolist() == [2.0, 1.0] and grad_weight.tolist() == [6.0, 5.0]


@pytest.mark.parametrize("shape", GAP_SHAPES, ids=str)
def test_global_average_pooling_matches_the_reference_and_reruns_bit_for_bit(shape, emulator):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    grad_y = rng.standard_normal((shape[0], shape[1], 1, 1)).astype(np.float32)
    y = cuda_pool.global_avg_pool2d_forward(x, runtime=emulator)
    assert_close("y", y, ops_pool.global_avg_pool2d_forward_reference(x), TOL)
    assert np.array_equal(y, cuda_pool.global_avg_pool2d_forward(x, runtime=emulator))
    grad_x = cuda_pool.global_avg_pool2d_backward(grad_y, shape, runtime=emulator)
    np.testing.assert_array_equal(grad_x, ops_pool.global_avg_pool2d_backward_reference(grad_y, shape))


@pytest.mark.parametrize("shape", ADD_SHAPES, ids=str)
def test_residual_sum_matches_the_reference(shape, emulator):
    rng = np.random.default_rng(6)
    a, b = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    a.reshape(-1)[::13] = np.nan
    np.testing.assert_array_equal(cuda_activation.add_forward(a, b, runtime=emulator), a + b)
    np.testing.assert_array_equal(cuda_activation.add_relu_forward(a, b, runtime=emulator),
                                  ops_activation.add_relu_forward_reference(a, b))


@pytest.mark.parametrize("file, kernel, index, check", [
    ("batchnorm.cu", "block_sum2", 0,
     lambda rt: check_batch_norm((4, 3, 5, 5), rt, relu=False)),
    ("global_pool.cu", "global_avg_pool2d_forward", 1,
     lambda rt: test_global_average_pooling_matches_the_reference_and_reruns_bit_for_bit((3, 7, 5, 3), rt)),
    ("global_pool.cu", "global_avg_pool2d_forward", 0,
     lambda rt: test_global_average_pooling_matches_the_reference_and_reruns_bit_for_bit((3, 7, 5, 3), rt)),
], ids=["block_sum2", "gap_tree", "gap_before_tree"])
def test_a_missing_barrier_is_caught(tmp_path, file, kernel, index, check):
    folder = broken_kernel_copy(tmp_path, file, remove_barrier(kernel, index))
    assert caught_under_some_order(folder, check)


def test_launchers_refuse_what_the_kernels_cannot_take(emulator):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    weight, bias, running_mean, running_var = _channels(rng, 3)
    with pytest.raises(TypeError, match="float32"):
        cuda_norm.batch_norm_forward(x.astype(np.float64), weight.astype(np.float64), bias.astype(np.float64),
                                     running_mean.astype(np.float64), running_var.astype(np.float64), 0.1, 1e-5,
                                     runtime=emulator)
    strided = np.zeros(6, np.float32)[::2]
    with pytest.raises(ValueError, match="running_var is updated in place"):
        cuda_norm.batch_norm_forward(x, weight, bias, running_mean, strided, 0.1, 1e-5, runtime=emulator)
    with pytest.raises(ValueError, match="more than one value per channel"):
        cuda_norm.batch_norm_forward(x[:1, :, :1, :1], weight, bias, running_mean, running_var, 0.1, 1e-5,
                                     runtime=emulator)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        cuda_norm.batch_norm_forward_eval(x, weight, bias[:2], running_mean, running_var, 1e-5, runtime=emulator)
    with pytest.raises(ValueError, match="y has shape"):
        cuda_norm.batch_norm_backward(x, x, weight, running_mean, running_var, y=x[:2], runtime=emulator)
    with pytest.raises(ValueError, match="x_shape"):
        cuda_pool.global_avg_pool2d_backward(x[:, :, :1, :1], (4, 3, 2), runtime=emulator)
    with pytest.raises(ValueError, match="must match"):
        cuda_activation.add_forward(x, x[:2], runtime=emulator)
