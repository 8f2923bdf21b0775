"""Winograd F(2x2, 3x3) on the fast CPU path (gpucnn/cpu/winograd.py): the float32 3x3 stride-1 pad-1
convolutions with enough channels. Forward and both gradients against the float64 NumPy reference within
the stated error bound, chunk boundaries, results bit for bit the same on 1, 2 or 3 threads, and the
convolutions it must leave to im2col; and the input gradient of smaller 'same' convolutions as the forward
convolution with flipped kernels (gpucnn/cpu/conv.py)."""
from __future__ import annotations

import numpy as np
import pytest

from gpucnn.cpu import conv as fast_conv
from gpucnn.cpu import threads
from gpucnn.cpu import winograd
from gpucnn.ops import conv as ops_conv

# The error bound stated in gpucnn/cpu/winograd.py (measured worst on these cases: 1.3e-7).
BOUND = 1e-6


def _per_tile(measure):
    """The largest of each 2x2 output tile's four values, at all four positions."""
    N, C, H, W = measure.shape
    largest = measure.reshape(N, C, H // 2, 2, W // 2, 2).max(axis=(3, 5))
    return largest.repeat(2, axis=2).repeat(2, axis=3)


def _case(N, C, OC, H, W, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    weight = (rng.standard_normal((OC, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
    bias = rng.standard_normal(OC).astype(np.float32)
    grad_y = rng.standard_normal((N, OC, H, W)).astype(np.float32)
    return x, weight, bias, grad_y


def _f64(*arrays):
    return [a.astype(np.float64) for a in arrays]


def _all_winograd(monkeypatch):
    monkeypatch.setattr(fast_conv, "WINOGRAD_MIN_CHANNELS", {"forward": 1, "weight": 1, "input": 1})


def _count_calls(monkeypatch):
    calls = []
    for name in ("conv3x3", "weight_gradient"):
        original = getattr(winograd, name)
        monkeypatch.setattr(winograd, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    return calls


def _check_against_reference(x, weight, bias, grad_y, relu=False):
    """Forward and both gradients of the fast path against the float64 reference, within BOUND x: the
    largest sum of |products| of the tile's four outputs (y, grad_x), of the kernel's nine taps (grad_weight),
    of the channel (grad_bias)."""
    x64, w64, b64, gy64 = _f64(x, weight, bias, grad_y)
    y = fast_conv.conv2d_forward(x, weight, bias, 1, 1, relu=relu)
    want = ops_conv.conv2d_forward_reference(x64, w64, b64, 1, 1, relu=relu)
    measure = _per_tile(ops_conv.conv2d_forward_reference(np.abs(x64), np.abs(w64), np.abs(b64), 1, 1))
    assert y.dtype == np.float32
    assert np.all(np.abs(y - want) <= BOUND * measure)
    grads = fast_conv.conv2d_backward(grad_y, x, weight, 1, 1)
    wanted = ops_conv.conv2d_backward_reference(gy64, x64, w64, 1, 1)
    measure_x, measure_w, measure_b = ops_conv.conv2d_backward_reference(np.abs(gy64), np.abs(x64), np.abs(w64), 1, 1)
    measures = (_per_tile(measure_x), measure_w.sum(axis=(2, 3), keepdims=True), measure_b)
    for got, want, measure in zip(grads, wanted, measures):
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.all(np.abs(got - want) <= BOUND * measure)


@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 8), (3, 8, 4, 10, 4), (1, 16, 16, 2, 2), (5, 6, 7, 12, 14)])
def test_forward_and_gradients_within_the_bound(monkeypatch, shape, threaded):
    _all_winograd(monkeypatch)
    calls = _count_calls(monkeypatch)
    N, C, OC, H, W = shape
    for relu in (False, True):
        _check_against_reference(*_case(N, C, OC, H, W, seed=sum(shape)), relu=relu)
    assert calls.count("weight_gradient") == 2 and calls.count("conv3x3") == 4  # every part went through it


def test_vgg_sized_channels_take_winograd_without_patching(monkeypatch):
    calls = _count_calls(monkeypatch)
    x, weight, bias, grad_y = _case(2, 256, 16, 8, 8)
    assert all(fast_conv._winograd(x, weight, ops_conv.conv2d_geometry(x, weight, bias, 1, 1), part)
               for part in ("forward", "weight"))
    x2, w2, b2, gy2 = _case(2, 16, 128, 8, 8, seed=1)
    assert fast_conv._winograd(x2, w2, ops_conv.conv2d_geometry(x2, w2, b2, 1, 1), "input")
    assert not fast_conv._winograd(x2, w2, ops_conv.conv2d_geometry(x2, w2, b2, 1, 1), "forward")
    _check_against_reference(x, weight, bias, grad_y)
    _check_against_reference(x2, w2, b2, gy2)
    # 256 -> 16 channels: forward and weight gradient; 16 -> 128: the input gradient only
    assert sorted(calls) == ["conv3x3", "conv3x3", "weight_gradient"]


def test_small_chunks_and_batch_slices_give_the_same_values(monkeypatch):
    _all_winograd(monkeypatch)
    x, weight, bias, grad_y = _case(7, 5, 6, 12, 8, seed=3)
    whole = (fast_conv.conv2d_forward(x, weight, bias, 1, 1), *fast_conv.conv2d_backward(grad_y, x, weight, 1, 1))
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 16 * 6 * 4 * 7 * 4 // 3)  # one tile row of 7 images: 3 slices
    assert len(winograd.chunks(6, 4, 7, 6)) == 6 * 3
    chunked = (fast_conv.conv2d_forward(x, weight, bias, 1, 1), *fast_conv.conv2d_backward(grad_y, x, weight, 1, 1))
    for got, want in zip(chunked, whole):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    _check_against_reference(x, weight, bias, grad_y)


def test_results_repeat_bit_for_bit_on_any_number_of_threads(monkeypatch):
    _all_winograd(monkeypatch)
    monkeypatch.setattr(threads, "MIN_PARALLEL_WORK", 0)
    x, weight, bias, grad_y = _case(4, 12, 10, 8, 8, seed=4)
    runs = []
    for count in (1, 2, 3):
        monkeypatch.setattr(threads, "THREADS", count)
        runs.append((fast_conv.conv2d_forward(x, weight, bias, 1, 1, relu=True),
                     *fast_conv.conv2d_backward(grad_y, x, weight, 1, 1)))
    for run in runs[1:]:
        for got, want in zip(run, runs[0]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kwargs, shape, dtype", [
    ({"stride": 2, "padding": 1}, (2, 8, 8), np.float32),     # stride 2
    ({"stride": 1, "padding": 0}, (2, 8, 8), np.float32),     # no padding
    ({"stride": 1, "padding": 1}, (2, 7, 8), np.float32),     # odd height: no whole tiles
    ({"stride": 1, "padding": 1}, (2, 8, 8), np.float64),     # float64 keeps im2col's summation
])
def test_other_convolutions_stay_on_im2col(monkeypatch, kwargs, shape, dtype):
    _all_winograd(monkeypatch)
    calls = _count_calls(monkeypatch)
    N, H, W = shape
    x, weight, bias, grad_y = (a.astype(dtype) for a in _case(N, 4, 4, H, W))
    y = fast_conv.conv2d_forward(x, weight, bias, **kwargs)
    np.testing.assert_allclose(y, ops_conv.conv2d_forward_reference(x, weight, bias, **kwargs), rtol=2e-4, atol=2e-4)
    fast_conv.conv2d_backward(np.ones_like(y), x, weight, **kwargs)
    assert calls == []


def test_weight_transform_is_g_w_g_transposed_with_the_bias_at_its_position():
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    U = winograd.weight_transform(weight, bias)
    G = winograd._G
    for o in range(3):
        for c in range(2):
            np.testing.assert_allclose(U[:, o, c].reshape(4, 4), G @ weight[o, c] @ G.T, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(U[winograd.BIAS_POSITION, :, 2], bias)
    assert not np.delete(U[:, :, 2], winograd.BIAS_POSITION, axis=0).any()


@pytest.mark.parametrize("dtype, kernel, padding", [(np.float64, 3, 1), (np.float32, 3, 1), (np.float64, 5, 2),
                                                    (np.float32, (3, 5), (1, 2))])
def test_same_size_input_gradient_is_the_flipped_forward_convolution(monkeypatch, dtype, kernel, padding, threaded):
    """Below Winograd's channels (and in float64) a stride-1 'same' convolution's input gradient runs as the
    forward convolution of grad_y with the flipped kernels: the reference's values at float tolerance."""
    calls = []
    original = fast_conv.conv2d_forward
    monkeypatch.setattr(fast_conv, "conv2d_forward", lambda *a, **k: calls.append(a[2] is None) or original(*a, **k))
    rng = np.random.default_rng(6)
    KH, KW = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = rng.standard_normal((3, 16, 9, 7)).astype(dtype)
    weight = rng.standard_normal((5, 16, KH, KW)).astype(dtype)
    grad_y = rng.standard_normal((3, 5, 9, 7)).astype(dtype)
    got = fast_conv.conv2d_backward(grad_y, x, weight, 1, padding)
    want = ops_conv.conv2d_backward_reference(grad_y, x, weight, 1, padding)
    tol = {"rtol": 1e-11, "atol": 1e-11} if dtype == np.float64 else {"rtol": 2e-4, "atol": 2e-4}
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **tol)
    assert calls == [True]  # one forward convolution, without bias: the input gradient's
    x15 = x[:, :15]  # 15 channels: col2im as before
    calls.clear()
    fast_conv.conv2d_backward(grad_y, x15, np.ascontiguousarray(weight[:, :15]), 1, padding)
    assert calls == []
