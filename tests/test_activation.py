"""Activations and dropout: values on every backend against element-wise loops (tests/loops.py) and
float64 finite differences; the grid-stride loops under the emulator; the launchers' refusals."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gpucnn.cpu import activation as fast_activation
from gpucnn.cuda import activation as cuda_activation
from gpucnn.cuda import optim as cuda_optim
from gpucnn.ops import activation as ops_activation
from gpucnn.ops import dropout_backward, dropout_forward, relu_backward, relu_forward
from gpucnn.ops import sigmoid_backward, sigmoid_forward, tanh_backward, tanh_forward
from gpucnn.testing.gradcheck import assert_gradient_close
from tests.helpers import assert_same_bits, assert_refused_before_launch, chwn, f32
from tests.kernel_cases import OPTIM_CASES, RELU_SHAPES, check_fused_optimizer, check_relu
from tests.loops import relu_backward_loops, relu_loops
from tests.test_conv import run_twice_on_gpu

FLOAT64 = pytest.mark.backends("reference", "fast")


# ------------------------------------------------------------------ ReLU kernel cases, every backend

def relu_case_inputs(shape, seed: int = 0):
    """x with zeros (the kink) and NaNs, and grad_y, as check_relu draws them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[::7] = 0.0   # the kink: the gradient there is 0
    x.reshape(-1)[3::11] = np.nan
    return x, rng.standard_normal(shape).astype(np.float32)


def run_relu_case(backend, shape):
    x, grad_y = relu_case_inputs(shape)
    y = relu_forward(backend.to(x))
    return backend.host((y, relu_backward(backend.to(grad_y), y)))


@pytest.mark.parametrize("shape", RELU_SHAPES, ids=str)
def test_relu_kernel_cases_match_loops(shape, backend):
    """Exact: ReLU does no arithmetic."""
    x, grad_y = relu_case_inputs(shape)
    outputs = y, grad_x = run_relu_case(backend, shape)
    np.testing.assert_array_equal(y, relu_loops(x))
    np.testing.assert_array_equal(grad_x, relu_backward_loops(grad_y, relu_loops(x)))
    if backend.device == "gpu":
        assert_same_bits(outputs, run_relu_case(backend, shape))


# ------------------------------------------------------------------ float64 against loops and finite differences

ACTIVATIONS = {
    "relu": (relu_forward, relu_backward, lambda v: max(v, 0.0)),
    "tanh": (tanh_forward, tanh_backward, math.tanh),
    "sigmoid": (sigmoid_forward, sigmoid_backward, lambda v: 1 / (1 + math.exp(-v))),
}


@pytest.mark.parametrize("name", ACTIVATIONS)
@FLOAT64
def test_activation_values_and_gradient(backend, name):
    forward, backward, scalar = ACTIVATIONS[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5)) * 3
    x[np.abs(x) < 0.05] = 0.5  # keep finite differences away from relu's kink
    y = backend.host(forward(backend.to(x)))
    np.testing.assert_allclose(y, np.vectorize(scalar)(x), rtol=1e-13, atol=1e-15)
    gy = rng.standard_normal(x.shape)
    grad_x = backend.host(backward(backend.to(gy), backend.to(y)))
    assert_gradient_close(lambda: float((backend.host(forward(backend.to(x))) * gy).sum()), x, grad_x)


@pytest.mark.parametrize("name", ACTIVATIONS)
@FLOAT64
def test_activation_keeps_float32(backend, name):
    forward, backward, _ = ACTIVATIONS[name]
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    y = forward(backend.to(x))
    assert y.dtype == np.float32 and backward(y, y).dtype == np.float32


@FLOAT64
def test_sigmoid_is_stable_for_large_inputs(backend):
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        y = backend.host(sigmoid_forward(backend.to(x)))
    np.testing.assert_allclose(y, [0.0, math.exp(-50), 0.5, 1.0, 1.0], rtol=1e-12, atol=0)


@FLOAT64
def test_relu_backward_zero_at_kink_and_nan_propagates(backend):
    y = backend.host(relu_forward(backend.to(np.array([-1.0, 0.0, 2.0, np.nan]))))
    assert y[0] == 0 and y[1] == 0 and y[2] == 2 and np.isnan(y[3])
    grad = backend.host(relu_backward(backend.to(np.ones(4)), backend.to(np.array([0.0, 0.0, 2.0, 1.0]))))
    np.testing.assert_array_equal(grad, [0, 0, 1, 1])


# ------------------------------------------------------------------ the fast CPU path (gpucnn.cpu) against the NumPy reference
# Called directly: float32 and float64, inputs in NCHW and in CHWN memory order, chunks on helper threads.

def test_fast_relu_matches_reference_exactly_and_keeps_the_memory_order():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 6, 13, 7)).astype(np.float32)
    x[0, 0, 0, :3] = [np.nan, 0.0, -0.0]
    for x_in in (x, chwn(x), x[:, :, ::2]):
        y = fast_activation.relu_forward(x_in)
        np.testing.assert_array_equal(y, ops_activation.relu_forward_reference(x_in))
        if x_in.flags.c_contiguous or chwn(x_in) is x_in:
            assert y.strides == x_in.strides
    flat = rng.standard_normal(1000).astype(np.float64)
    np.testing.assert_array_equal(fast_activation.relu_forward(flat), np.maximum(flat, 0))


# ------------------------------------------------------------------ dropout

def test_dropout_mask_is_inverted_and_reproducible(backend):
    x = np.ones((200, 50), np.float32)
    y, mask = dropout_forward(backend.to(x), 0.3, np.random.default_rng(7), training=True)
    y, mask = backend.host(y), backend.host(mask)
    assert mask.dtype == np.float32
    assert set(np.unique(mask)) == {np.float32(0), np.float32(1 / 0.7)}
    assert abs((mask == 0).mean() - 0.3) < 0.02  # 10,000 draws: 4.6 standard deviations
    np.testing.assert_array_equal(y, x * mask)
    _, again = dropout_forward(backend.to(x), 0.3, np.random.default_rng(7), training=True)
    np.testing.assert_array_equal(backend.host(again), mask)


@FLOAT64
def test_dropout_gradient_with_fixed_mask(backend):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6))
    _, mask = dropout_forward(backend.to(x), 0.5, np.random.default_rng(2), training=True)
    gy = rng.standard_normal(x.shape)
    grad_x = backend.host(dropout_backward(backend.to(gy), mask))
    np.testing.assert_array_equal(grad_x, gy * backend.host(mask))
    assert_gradient_close(lambda: float((x * backend.host(mask) * gy).sum()), x, grad_x)


@FLOAT64
def test_dropout_is_identity_when_off(backend):
    x = backend.to(np.arange(6.0).reshape(2, 3))
    for p, training in [(0.5, False), (0.0, True)]:
        y, mask = dropout_forward(x, p, np.random.default_rng(0), training=training)
        assert y is x and mask is None
    gy = backend.to(np.ones((2, 3)))
    assert dropout_backward(gy, None) is gy
    y, mask = dropout_forward(x, 1.0, np.random.default_rng(0), training=True)
    assert (backend.host(y) == 0).all()


def test_dropout_rejects_bad_arguments():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\]"):
        dropout_forward(x, 1.5, np.random.default_rng(0), True)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        dropout_forward(x, 0.5, np.random.RandomState(0), True)
    with pytest.raises(ValueError, match="mask has shape"):
        dropout_backward(x, np.ones((3, 2), np.float32))


def test_activations_reject_non_float_and_mismatched_shapes():
    with pytest.raises(TypeError, match="x must be a float32 or float64 array, not int64"):
        relu_forward(np.arange(3))
    with pytest.raises(ValueError, match="grad_y has shape"):
        tanh_backward(np.zeros(3), np.zeros(4))
    with pytest.raises(TypeError, match="grad_y has dtype float32 but y has float64"):
        sigmoid_backward(np.zeros(3, np.float32), np.zeros(3))


# ------------------------------------------------------------------ the launchers under the emulator and on a GPU

@pytest.mark.emulator
def test_grid_stride_loops_cover_every_element(emulator, monkeypatch):
    # One block (256 threads) must walk thousands of elements.
    monkeypatch.setattr(cuda_activation, "MAX_BLOCKS", 1)
    monkeypatch.setattr(cuda_optim, "MAX_BLOCKS", 1)
    check_relu((3, 1000), runtime=emulator)
    check_fused_optimizer(OPTIM_CASES[0], runtime=emulator, steps=2)



MULTI_GRID_RELU = [(4096, 6, 28, 28)]



@pytest.mark.gpu
@pytest.mark.parametrize("shape", MULTI_GRID_RELU, ids=str)
def test_relu_on_many_gpu_blocks(shape):
    run_twice_on_gpu(check_relu, shape)


# ------------------------------------------------------------------ launcher refusals: before any kernel runs

@pytest.mark.parametrize("call, error, message", [
    (lambda rt: cuda_activation.relu_backward(f32(3, 4), f32(4, 3), runtime=rt), ValueError, "must match"),
    (lambda rt: cuda_activation.relu_forward(np.zeros(3, np.int32), runtime=rt), TypeError, "float32"),
])
def test_launchers_refuse_bad_inputs_before_any_kernel_is_launched(call, error, message):
    assert_refused_before_launch(call, error, message)
