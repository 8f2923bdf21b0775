"""The kernels a training step added (tanh, sigmoid, dropout's product, add_into, fill, the loss sums)
under the emulator in every thread order, against the NumPy reference."""
from __future__ import annotations

import numpy as np
import pytest

from gpucnn import dispatch, ops
from gpucnn.cuda import activation as cuda_activation
from gpucnn.cuda import loss as cuda_loss
from gpucnn.cuda import tensor as cuda_tensor
from gpucnn.emulator import ORDERS, EmulatorRuntime

pytestmark = pytest.mark.emulator

SHAPES = [(1,), (3, 5, 7), (2, 6, 14, 14), (70_001,)]  # the last one loops: more elements than the grid


@pytest.fixture(scope="module", params=ORDERS)
def emulator(request):
    return EmulatorRuntime(order=request.param, seed=11)


def _values(shape, seed=0, scale=4.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_activations_match_the_reference(name, shape, emulator):
    x, grad_y = _values(shape), _values(shape, 1, 1.0)
    x.flat[0] = 90.0  # sigmoid/tanh saturate without overflow
    with dispatch.cpu_path("reference"):
        y_ref = getattr(ops, f"{name}_forward")(x)
        grad_ref = getattr(ops, f"{name}_backward")(grad_y, y_ref)
    y = getattr(cuda_activation, f"{name}_forward")(x, runtime=emulator)
    grad_x = getattr(cuda_activation, f"{name}_backward")(grad_y, y_ref, runtime=emulator)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad_x, grad_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
def test_dropout_add_into_and_fill(shape, emulator):
    x, other = _values(shape), _values(shape, 2)
    y, mask = cuda_activation.dropout_forward(x, 0.4, np.random.default_rng(3), True, runtime=emulator)
    with dispatch.cpu_path("reference"):
        y_ref, mask_ref = ops.dropout_forward(x, 0.4, np.random.default_rng(3), True)
    np.testing.assert_array_equal(mask, mask_ref)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(cuda_activation.dropout_backward(other, mask, runtime=emulator), other * mask_ref)
    target = x.copy()
    assert cuda_tensor.add_into(target, other, runtime=emulator) is target
    np.testing.assert_array_equal(target, x + other)
    cuda_tensor.fill(target, 0.0, runtime=emulator)
    assert not target.any()
    with pytest.raises(ValueError, match="C-contiguous"):
        cuda_tensor.add_into(np.zeros((4, 6), np.float32)[:, ::2], np.ones((4, 3), np.float32), runtime=emulator)


@pytest.mark.parametrize("n, k", [(1, 2), (37, 10), (600, 3), (9, 33)])
def test_loss_sums_accumulate_the_loss_and_the_correct_count(n, k, emulator):
    rng = np.random.default_rng(n)
    logits = rng.standard_normal((n, k)).astype(np.float32)
    logits[0, :] = 0.5  # a tie: the first maximum is the prediction, as in numpy.argmax
    labels = rng.integers(0, k, n).astype(np.int32)
    sums = np.array([1.5, 2.0])  # the step adds to what is there
    probs = cuda_loss.softmax_cross_entropy_totals(logits, labels, sums, runtime=emulator)
    with dispatch.cpu_path("reference"):
        loss, probs_ref = ops.softmax_cross_entropy(logits, labels)
    np.testing.assert_allclose(probs, probs_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sums[0], 1.5 + float(loss) * n, rtol=1e-5)
    assert sums[1] == 2.0 + int((logits.argmax(axis=1) == labels).sum())
