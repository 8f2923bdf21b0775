"""Activations, dropout, linear and softmax cross-entropy: values, finite-difference gradients, validation."""
import math

import numpy as np
import pytest

from gpucnn import backend
from gpucnn.ops import (
    dropout_backward,
    dropout_forward,
    linear_backward,
    linear_forward,
    relu_backward,
    relu_forward,
    sigmoid_backward,
    sigmoid_forward,
    softmax_cross_entropy,
    softmax_cross_entropy_backward,
    tanh_backward,
    tanh_forward,
)
from gpucnn.testing.gradcheck import assert_gradient_close


@pytest.fixture(params=["cpu"])
def device(request):
    """Where the op under test runs; add a CuPy entry (marked gpu): these ops are array-module generic."""
    return request.param


def on(device, array):
    return backend.to_device(array, device)


def cpu(result):
    return tuple(None if r is None else backend.to_numpy(r) for r in result) if isinstance(result, tuple) \
        else backend.to_numpy(result)


# ------------------------------------------------------------------ activations

ACTIVATIONS = {
    "relu": (relu_forward, relu_backward, lambda v: max(v, 0.0)),
    "tanh": (tanh_forward, tanh_backward, math.tanh),
    "sigmoid": (sigmoid_forward, sigmoid_backward, lambda v: 1 / (1 + math.exp(-v))),
}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_values_and_gradient(device, name):
    forward, backward, scalar = ACTIVATIONS[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5)) * 3
    x[np.abs(x) < 0.05] = 0.5  # keep finite differences away from relu's kink
    y = cpu(forward(on(device, x)))
    np.testing.assert_allclose(y, np.vectorize(scalar)(x), rtol=1e-13, atol=1e-15)
    gy = rng.standard_normal(x.shape)
    grad_x = cpu(backward(on(device, gy), on(device, y)))
    assert_gradient_close(lambda: float((cpu(forward(on(device, x))) * gy).sum()), x, grad_x)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_keeps_float32(device, name):
    forward, backward, _ = ACTIVATIONS[name]
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    y = forward(on(device, x))
    assert y.dtype == np.float32 and backward(y, y).dtype == np.float32


def test_sigmoid_is_stable_for_large_inputs(device):
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        y = cpu(sigmoid_forward(on(device, x)))
    np.testing.assert_allclose(y, [0.0, math.exp(-50), 0.5, 1.0, 1.0], rtol=1e-12, atol=0)


def test_relu_backward_zero_at_kink_and_nan_propagates(device):
    y = cpu(relu_forward(on(device, np.array([-1.0, 0.0, 2.0, np.nan]))))
    assert y[0] == 0 and y[1] == 0 and y[2] == 2 and np.isnan(y[3])
    grad = cpu(relu_backward(on(device, np.ones(4)), on(device, np.array([0.0, 0.0, 2.0, 1.0]))))
    np.testing.assert_array_equal(grad, [0, 0, 1, 1])


# ------------------------------------------------------------------ dropout

def test_dropout_mask_is_inverted_and_reproducible(device):
    x = np.ones((200, 50), np.float32)
    y, mask = dropout_forward(on(device, x), 0.3, np.random.default_rng(7), training=True)
    y, mask = cpu(y), cpu(mask)
    assert mask.dtype == np.float32
    assert set(np.unique(mask)) == {np.float32(0), np.float32(1 / 0.7)}
    assert abs((mask == 0).mean() - 0.3) < 0.02  # 10,000 draws: 4.6 standard deviations
    np.testing.assert_array_equal(y, x * mask)
    _, again = dropout_forward(on(device, x), 0.3, np.random.default_rng(7), training=True)
    np.testing.assert_array_equal(cpu(again), mask)


def test_dropout_gradient_with_fixed_mask(device):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6))
    _, mask = dropout_forward(on(device, x), 0.5, np.random.default_rng(2), training=True)
    gy = rng.standard_normal(x.shape)
    grad_x = cpu(dropout_backward(on(device, gy), mask))
    np.testing.assert_array_equal(grad_x, gy * cpu(mask))
    assert_gradient_close(lambda: float((x * cpu(mask) * gy).sum()), x, grad_x)


def test_dropout_is_identity_when_off(device):
    x = on(device, np.arange(6.0).reshape(2, 3))
    for p, training in [(0.5, False), (0.0, True)]:
        y, mask = dropout_forward(x, p, np.random.default_rng(0), training=training)
        assert y is x and mask is None
    gy = on(device, np.ones((2, 3)))
    assert dropout_backward(gy, None) is gy
    y, mask = dropout_forward(x, 1.0, np.random.default_rng(0), training=True)
    assert (cpu(y) == 0).all()


def test_dropout_rejects_bad_arguments():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\]"):
        dropout_forward(x, 1.5, np.random.default_rng(0), True)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        dropout_forward(x, 0.5, np.random.RandomState(0), True)
    with pytest.raises(ValueError, match="mask has shape"):
        dropout_backward(x, np.ones((3, 2), np.float32))


# ------------------------------------------------------------------ linear

def test_linear_values_and_gradients(device):
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((5, 7)), rng.standard_normal((4, 7)), rng.standard_normal(4)
    y = cpu(linear_forward(on(device, x), on(device, w), on(device, b)))
    expected = np.array([[sum(x[n, i] * w[o, i] for i in range(7)) + b[o] for o in range(4)] for n in range(5)])
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    np.testing.assert_allclose(cpu(linear_forward(on(device, x), on(device, w), None)), expected - b, rtol=1e-12)
    gy = rng.standard_normal(y.shape)
    grad_x, grad_w, grad_b = cpu(linear_backward(on(device, gy), on(device, x), on(device, w)))

    def loss():
        return float((cpu(linear_forward(on(device, x), on(device, w), on(device, b))) * gy).sum())

    for array, grad in [(x, grad_x), (w, grad_w), (b, grad_b)]:
        assert_gradient_close(loss, array, grad)
    assert linear_backward(on(device, gy), on(device, x), on(device, w), with_bias=False)[2] is None


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


# ------------------------------------------------------------------ softmax cross-entropy

def test_softmax_cross_entropy_value_and_gradient(device):
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((6, 5)) * 2
    labels = np.array([0, 4, 2, 2, 1, 3])
    loss, probs = cpu(softmax_cross_entropy(on(device, logits), on(device, labels)))
    expected = np.mean([math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(logits, labels)])
    assert loss.shape == () and abs(float(loss) - expected) < 1e-13
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-14)
    grad = cpu(softmax_cross_entropy_backward(on(device, probs), on(device, labels)))
    assert_gradient_close(lambda: float(cpu(softmax_cross_entropy(on(device, logits), on(device, labels)))[0]),
                          logits, grad)


def test_softmax_cross_entropy_is_stable_for_huge_logits(device):
    logits = np.array([[1000.0, 0.0, -1000.0], [-5000.0, -5000.0, -4990.0]], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        loss, probs = cpu(softmax_cross_entropy(on(device, logits), on(device, np.array([0, 2]))))
    assert loss.dtype == np.float32 and probs.dtype == np.float32
    assert abs(float(loss) - math.log1p(2 * math.exp(-10)) / 2) < 1e-6
    np.testing.assert_allclose(probs[0], [1, 0, 0], atol=1e-30)


def test_softmax_cross_entropy_rejects_bad_labels():
    logits = np.zeros((3, 4), np.float32)
    with pytest.raises(TypeError, match="labels must be an integer array"):
        softmax_cross_entropy(logits, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        softmax_cross_entropy(logits, np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), but range over \[0, 4\]"):
        softmax_cross_entropy(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        softmax_cross_entropy(logits[0], np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="labels must lie in"):
        softmax_cross_entropy_backward(logits, np.array([0, -1, 1]))


def test_activations_reject_non_float_and_mismatched_shapes():
    with pytest.raises(TypeError, match="x must be a float32 or float64 array, not int64"):
        relu_forward(np.arange(3))
    with pytest.raises(ValueError, match="grad_y has shape"):
        tanh_backward(np.zeros(3), np.zeros(4))
    with pytest.raises(TypeError, match="grad_y has dtype float32 but y has float64"):
        sigmoid_backward(np.zeros(3, np.float32), np.zeros(3))
