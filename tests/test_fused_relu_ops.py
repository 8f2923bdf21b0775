"""The ops' fusion arguments (issue 18's leaner step) on the CPU and the emulator: a ReLU's forward in
linear and max-pool (relu=), its backward in the next layer's data gradient (input_relu=), and
gradients written into given arrays (grad_weight_out=, grad_bias_out=). Each must equal the unfused
ops run one after the other."""
from __future__ import annotations

import numpy as np
import pytest

from gpucnn import backend, ops

pytestmark = pytest.mark.emulator

DEVICES = ["cpu", "emulator"]


def _rng_arrays(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize("device", DEVICES)
def test_linear_and_pool_relu_equal_a_relu_after_them(device):
    x, w, b, img = _rng_arrays((9, 70), (33, 70), (33,), (2, 3, 7, 6))
    img[0, 0, 0, 0] = np.nan
    dev = [backend.to_device(a, device) for a in (x, w, b, img)]
    y = backend.to_numpy(ops.linear_forward(*dev[:3], relu=True))
    np.testing.assert_allclose(y, np.maximum(ops.linear_forward(x, w, b), 0), rtol=1e-5, atol=1e-5)
    pooled, argmax = ops.max_pool2d_forward(dev[3], 2, relu=True)
    ref_y, ref_argmax = ops.max_pool2d_forward(img, 2)
    np.testing.assert_array_equal(backend.to_numpy(pooled), ops.relu_forward(ref_y))  # NaN kept, as relu_forward
    np.testing.assert_array_equal(backend.to_numpy(argmax), ref_argmax)
    np.testing.assert_array_equal(backend.to_numpy(ops.max_pool2d(dev[3], 2, relu=True)), ops.relu_forward(ref_y))


@pytest.mark.parametrize("device", DEVICES)
def test_input_relu_and_gradient_outputs(device):
    gy, x, w = _rng_arrays((3, 5, 6, 6), (3, 4, 8, 8), (5, 4, 3, 3), seed=1)
    x = np.maximum(x, 0)     # a ReLU's output: zeros where its input was not positive
    x[0, 0, 0, :3] = np.nan
    ref_x, ref_w, ref_b = ops.conv2d_backward(gy, x, w)
    ref_x = ops.relu_backward(ref_x, x)
    to = lambda a: backend.to_device(a, device)  # noqa: E731
    w_out, b_out = to(np.full((5, 4, 3, 3), 7, np.float32)), to(np.full(5, 7, np.float32))
    got_x, got_w, got_b = ops.conv2d_backward(to(gy), to(x), to(w), input_relu=True, grad_weight_out=w_out,
                                              grad_bias_out=b_out)
    assert got_w is w_out and got_b is b_out
    np.testing.assert_allclose(backend.to_numpy(got_x), ref_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(backend.to_numpy(w_out), ref_w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(backend.to_numpy(b_out), ref_b, rtol=1e-4, atol=1e-4)

    gy2, x2, w2 = _rng_arrays((6, 10), (6, 20), (10, 20), seed=2)
    x2 = np.maximum(x2, 0)
    ref = ops.linear_backward(gy2, x2, w2)
    w_out, b_out = to(np.zeros((10, 20), np.float32)), to(np.zeros(10, np.float32))
    got = ops.linear_backward(to(gy2), to(x2), to(w2), input_relu=True, grad_weight_out=w_out, grad_bias_out=b_out)
    assert got[1] is w_out and got[2] is b_out
    np.testing.assert_allclose(backend.to_numpy(got[0]), ops.relu_backward(ref[0], x2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(backend.to_numpy(w_out), ref[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(backend.to_numpy(b_out), ref[2], rtol=1e-5, atol=1e-5)


def test_a_wrong_output_array_is_refused_before_any_launch():
    from tests.helpers import assert_refused_before_launch
    from gpucnn.cuda import conv as cuda_conv
    gy, x, w = _rng_arrays((1, 2, 3, 3), (1, 1, 5, 5), (2, 1, 3, 3))
    assert_refused_before_launch(
        lambda rt: cuda_conv.conv2d_backward(gy, x, w, grad_weight_out=np.zeros((2, 9), np.float32), runtime=rt),
        ValueError, "grad_weight_out must have shape")
