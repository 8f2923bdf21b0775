"""The fast CPU path (gpucnn.cpu) against the NumPy reference (gpucnn.ops): values, gradients, layouts,
and bit-for-bit repeatability whatever the number of threads."""
from __future__ import annotations

import numpy as np
import pytest

from gpucnn import dispatch, models, ops
from gpucnn.cpu import activation as fast_activation
from gpucnn.cpu import conv as fast_conv
from gpucnn.cpu import pool as fast_pool
from gpucnn.cpu import threads
from gpucnn.ops import activation as reference_activation
from gpucnn.ops import conv as reference_conv
from gpucnn.ops import pool as reference_pool


@pytest.fixture
def threaded(monkeypatch):
    """Hand even tiny chunks to threads, so the threaded code runs on test-sized shapes."""
    monkeypatch.setattr(threads, "MIN_PARALLEL_WORK", 0)
    monkeypatch.setattr(threads, "THREADS", 3)


def _chwn(a):
    """The same values as a, in CHWN memory order (what the fast convolution returns)."""
    return np.ascontiguousarray(a.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)


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
def test_conv_matches_reference(case, dtype, threaded):
    N, C, H, W, OC, KH, KW, stride, padding, dilation = case
    rng = np.random.default_rng(sum(map(hash, map(str, case))) % 2**32)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    weight = rng.standard_normal((OC, C, KH, KW)).astype(dtype)
    bias = rng.standard_normal(OC).astype(dtype)
    tol = {"rtol": 1e-11, "atol": 1e-11} if dtype == np.float64 else {"rtol": 2e-4, "atol": 2e-4}
    for relu in (False, True):
        expected = reference_conv.conv2d_forward_reference(x, weight, bias, stride, padding, dilation, relu=relu)
        for x_in in (x, _chwn(x)):
            y = fast_conv.conv2d_forward(x_in, weight, bias, stride, padding, dilation, relu=relu)
            assert y.shape == expected.shape and y.dtype == dtype
            np.testing.assert_allclose(y, expected, **tol)
    grad_y = rng.standard_normal(expected.shape).astype(dtype)
    expected = reference_conv.conv2d_backward_reference(grad_y, x, weight, stride, padding, dilation)
    for grad_y_in, x_in in ((grad_y, x), (_chwn(grad_y), _chwn(x))):
        grads = fast_conv.conv2d_backward(grad_y_in, x_in, weight, stride, padding, dilation)
        for got, want in zip(grads, expected):
            assert got.shape == want.shape and got.dtype == dtype
            np.testing.assert_allclose(got, want, **tol)
    grad_x, grad_weight, grad_bias = fast_conv.conv2d_backward(grad_y, x, weight, stride, padding, dilation,
                                                               with_bias=False, with_grad_x=False)
    assert grad_x is None and grad_bias is None
    np.testing.assert_allclose(grad_weight, expected[1], **tol)


def test_conv_without_bias_and_a_batch_larger_than_one_chunk(threaded):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 6, 14, 14)).astype(np.float32)
    weight = rng.standard_normal((16, 6, 5, 5)).astype(np.float32)
    y = fast_conv.conv2d_forward(x, weight, None)
    np.testing.assert_allclose(y, reference_conv.conv2d_forward_reference(x, weight, None), rtol=1e-4, atol=1e-4)
    grad_y = rng.standard_normal(y.shape).astype(np.float32)
    for got, want in zip(fast_conv.conv2d_backward(grad_y, x, weight, with_bias=False),
                         reference_conv.conv2d_backward_reference(grad_y, x, weight, with_bias=False)):
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)


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
def test_max_pool_matches_reference_exactly(shape, kernel, stride, padding, threaded):
    rng = np.random.default_rng(3)
    for x in _pool_inputs(rng, shape, np.float32):
        y_ref, argmax_ref = reference_pool.max_pool2d_forward_reference(x, kernel, stride, padding)
        grad_y = rng.standard_normal(y_ref.shape).astype(np.float32)
        grad_ref = reference_pool.max_pool2d_backward_reference(grad_y, argmax_ref, x.shape, kernel, stride, padding)
        for x_in in (x, _chwn(x)):
            y, argmax = fast_pool.max_pool2d_forward(x_in, kernel, stride, padding)
            assert argmax.dtype == np.int32
            np.testing.assert_array_equal(y, y_ref)
            np.testing.assert_array_equal(argmax, argmax_ref)
            for grad_y_in in (grad_y, _chwn(grad_y)):
                grad_x = fast_pool.max_pool2d_backward(grad_y_in, argmax, x.shape, kernel, stride, padding)
                np.testing.assert_array_equal(grad_x, grad_ref)


def test_relu_matches_reference_exactly_and_keeps_the_memory_order():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 6, 13, 7)).astype(np.float32)
    x[0, 0, 0, :3] = [np.nan, 0.0, -0.0]
    for x_in in (x, _chwn(x), x[:, :, ::2]):
        y = fast_activation.relu_forward(x_in)
        np.testing.assert_array_equal(y, reference_activation.relu_forward_reference(x_in))
        if x_in.flags.c_contiguous or _chwn(x_in) is x_in:
            assert y.strides == x_in.strides
    flat = rng.standard_normal(1000).astype(np.float64)
    np.testing.assert_array_equal(fast_activation.relu_forward(flat), np.maximum(flat, 0))


def test_the_dispatch_picks_the_fast_path_for_numpy_arrays():
    for family, module, name in (("conv", fast_conv, "conv2d_forward"), ("conv", fast_conv, "conv2d_backward"),
                                 ("pool", fast_pool, "max_pool2d_forward"), ("pool", fast_pool, "max_pool2d_backward"),
                                 ("activation", fast_activation, "relu_forward")):
        assert dispatch.cpu_implementation(family, name) is getattr(module, name)
        assert dispatch.cpu_implementation(family, name, "reference").__name__ == name + "_reference"


def _train(steps, seed=0, batch=40):
    from gpucnn import optim  # noqa: PLC0415
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((steps * batch, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, steps * batch)
    model = models.LeNet5(seed=seed)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    losses, first_grads = [], None
    for step in range(steps):
        x, y = images[step * batch: (step + 1) * batch], labels[step * batch: (step + 1) * batch]
        opt.zero_grad()
        loss, probs = ops.softmax_cross_entropy(model(x), y)
        model.backward(ops.softmax_cross_entropy_backward(probs, y))
        if first_grads is None:
            first_grads = [p.grad.copy() for p in model.parameters()]
        opt.step()
        losses.append(float(loss))
    return losses, [p.data.copy() for p in model.parameters()], first_grads


def test_lenet_training_repeats_bit_for_bit_and_follows_the_reference(monkeypatch):
    with dispatch.cpu_path("reference"):
        losses_ref, _, grads_ref = _train(3)
    monkeypatch.setattr(threads, "MIN_PARALLEL_WORK", 0)
    runs = []
    for thread_count in (1, 2, 3):
        monkeypatch.setattr(threads, "THREADS", thread_count)
        runs.append(_train(3))
    for losses, weights, _ in runs[1:]:
        assert losses == runs[0][0]
        for got, want in zip(weights, runs[0][1]):
            np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(runs[0][0], losses_ref, rtol=1e-5)
    for got, want in zip(runs[0][2], grads_ref):  # the first step's gradients, from the same weights
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_a_failing_chunk_raises_after_every_thread_stops(monkeypatch):
    monkeypatch.setattr(threads, "THREADS", 3)
    done = []

    def work(i):
        if i == 2:
            raise RuntimeError("chunk 2 failed")
        done.append(i)

    with pytest.raises(RuntimeError, match="chunk 2 failed"):
        threads.run_chunks(work, 6)
    assert sorted(done) == [0, 1, 3, 4, 5]


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_lenet_runs_max_pool_before_relu_with_the_same_results_as_the_declared_order(path):
    """LeNet5 (modern) runs pool1/pool2 before act1/act2; Sequential's declared order must give the
    very same logits and gradients (ties from a constant image, NaN-free), and features() still
    reports the declared layers."""
    from gpucnn import nn  # noqa: PLC0415
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 1, 28, 28)).astype(np.float32)
    x[0] = 0.5  # flat image: ties in every pooling window
    labels = rng.integers(0, 10, 6)
    grads = []
    with dispatch.cpu_path(path):
        for run in (models.LeNet5.forward, nn.Sequential.forward):
            model = models.LeNet5(seed=3)
            logits = run(model, x)
            _, probs = ops.softmax_cross_entropy(logits, labels)
            backward = models.LeNet5.backward if run is models.LeNet5.forward else nn.Sequential.backward
            backward(model, ops.softmax_cross_entropy_backward(probs, labels), input_grad=False)
            grads.append((logits, [p.grad for p in model.parameters()]))
        assert models.LeNet5(seed=3)._run_order()[:6] == ["conv1", "pool1", "act1", "conv2", "pool2", "act2"]
        assert models.LeNet5(seed=3).features(x, "act1").shape == (6, 6, 28, 28)
    np.testing.assert_array_equal(grads[0][0], grads[1][0])
    for got, want in zip(grads[0][1], grads[1][1]):
        np.testing.assert_array_equal(got, want)
    classic = models.LeNet5(variant="classic")
    assert classic._run_order() == list(classic._modules)  # tanh and average pooling do not commute
    vgg = models.VGGSmall(width=2, hidden=4)
    assert vgg._run_order()[:6] == ["conv1_1", "act1_1", "conv1_2", "pool1", "act1_2", "conv2_1"]


def test_the_callers_numpy_error_state_holds_in_the_helper_threads(threaded):
    x = np.full((8, 3, 9, 9), 3e38, np.float32)
    weight = np.full((4, 3, 3, 3), 3e38, np.float32)
    with np.errstate(all="raise"):
        with pytest.raises(FloatingPointError):
            fast_conv.conv2d_forward(x, weight, None)
    with np.errstate(all="ignore"):
        import warnings  # noqa: PLC0415
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert np.isinf(fast_conv.conv2d_forward(x, weight, None)).all()
