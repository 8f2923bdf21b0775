"""conv2d_forward / conv2d_backward against nested loops and finite differences."""
import numpy as np
import pytest

from gpucnn import backend
from gpucnn.ops import conv as conv_module
from gpucnn.ops import conv2d_backward, conv2d_forward
from gpucnn.testing.gradcheck import assert_gradient_close, relative_error
from tests.loops import conv2d_loops


@pytest.fixture(params=["cpu"])
def device(request):
    """Where the op under test runs; a CuPy entry (marked gpu) can join once gpucnn.cuda supports these dtypes."""
    return request.param


def run_forward(device, x, w, b, **kw):
    on = lambda a: None if a is None else backend.to_device(a, device)  # noqa: E731
    return backend.to_numpy(conv2d_forward(on(x), on(w), on(b), **kw))


def run_backward(device, gy, x, w, **kw):
    on = lambda a: backend.to_device(a, device)  # noqa: E731
    grads = conv2d_backward(on(gy), on(x), on(w), **kw)
    return tuple(None if g is None else backend.to_numpy(g) for g in grads)


# (N, C, H, W, OC, (KH, KW), stride, padding, dilation)
FORWARD_CASES = [
    (1, 1, 5, 5, 1, (3, 3), 1, 0, 1),            # batch 1, one channel
    (2, 3, 7, 6, 4, (1, 1), 1, 0, 1),            # 1x1 kernel, non-square input
    (2, 2, 9, 8, 3, (7, 7), 1, 3, 1),            # 7x7 kernel, "same" padding
    (2, 2, 9, 8, 3, (7, 7), 1, 6, 1),            # padding = kernel - 1
    (3, 5, 11, 7, 2, (3, 3), 2, 1, 1),           # stride 2, odd channel counts
    (2, 3, 10, 13, 5, (3, 2), 3, (2, 1), 1),     # stride 3, non-square kernel and padding
    (2, 3, 9, 9, 4, (3, 3), 1, 2, 2),            # dilation 2
    (2, 3, 12, 10, 3, (3, 2), (2, 3), (1, 1), (2, 1)),  # every pair different per axis
    (2, 2, 4, 3, 3, (6, 5), 1, 1, 1),            # kernel exactly the padded input: 1x1 output
    (2, 3, 6, 7, 2, (6, 7), 1, 0, 1),            # kernel exactly the input
    (3, 7, 5, 6, 5, (3, 3), 2, 2, 1),            # stride 2 with padding kernel - 1
    (2, 1, 28, 28, 6, (5, 5), 1, 2, 1),          # LeNet layer 1
    (2, 6, 14, 14, 16, (5, 5), 1, 0, 1),         # LeNet layer 2
]


def case_id(case):
    N, C, H, W, OC, k, s, p, d = case
    return f"N{N}C{C}{H}x{W}OC{OC}k{k}s{s}p{p}d{d}".replace(" ", "")


def make_case(case, rng, dtype=np.float64):
    N, C, H, W, OC, (KH, KW), stride, padding, dilation = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((OC, C, KH, KW)).astype(dtype)
    b = rng.standard_normal(OC).astype(dtype)
    return x, w, b, dict(stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize("case", FORWARD_CASES, ids=case_id)
def test_forward_matches_loops(device, case):
    x, w, b, hyper = make_case(case, np.random.default_rng(0))
    y = run_forward(device, x, w, b, **hyper)
    expected = conv2d_loops(x, w, b, **hyper)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", FORWARD_CASES[::3], ids=case_id)
def test_forward_float32_keeps_dtype_and_matches_loops(device, case):
    x, w, b, hyper = make_case(case, np.random.default_rng(1), np.float32)
    y = run_forward(device, x, w, b, **hyper)
    assert y.dtype == np.float32
    assert relative_error(y, conv2d_loops(x, w, b, **hyper)) < 1e-5


def test_forward_without_bias_and_with_fused_relu(device):
    x, w, b, hyper = make_case((2, 3, 8, 7, 4, (3, 3), 1, 1, 1), np.random.default_rng(2))
    plain = conv2d_loops(x, w, None, **hyper)
    np.testing.assert_allclose(run_forward(device, x, w, None, **hyper), plain, rtol=1e-12, atol=1e-12)
    with_relu = run_forward(device, x, w, b, relu=True, **hyper)
    expected = np.maximum(conv2d_loops(x, w, b, **hyper), 0)
    assert (expected == 0).any() and (expected > 0).any()
    np.testing.assert_allclose(with_relu, expected, rtol=1e-12, atol=1e-12)


def test_forward_accepts_non_contiguous_input(device):
    rng = np.random.default_rng(3)
    x_wide = rng.standard_normal((2, 3, 9, 16))
    x = x_wide[:, :, :, ::2]  # a strided view
    w, b = rng.standard_normal((2, 3, 3, 3)), rng.standard_normal(2)
    np.testing.assert_allclose(run_forward(device, x, w, b, padding=1), conv2d_loops(x, w, b, padding=1),
                               rtol=1e-12, atol=1e-12)


# (N, C, H, W, OC, (KH, KW), stride, padding, dilation) small enough for finite differences
GRADIENT_CASES = [
    (2, 3, 6, 5, 4, (3, 3), 1, 0, 1),
    (2, 2, 6, 7, 3, (3, 3), 1, 1, 1),
    (2, 2, 7, 6, 3, (3, 2), 2, (2, 1), 1),
    (1, 3, 8, 7, 2, (2, 3), 3, 1, 1),
    (2, 2, 7, 7, 2, (3, 3), 1, 2, 2),
    (2, 2, 9, 8, 2, (2, 2), (2, 1), (1, 0), (2, 3)),
    (1, 1, 5, 5, 2, (5, 5), 1, 4, 1),
]


@pytest.mark.parametrize("case", GRADIENT_CASES, ids=case_id)
def test_backward_matches_finite_differences(device, case):
    rng = np.random.default_rng(4)
    x, w, b, hyper = make_case(case, rng)
    projection = rng.standard_normal(conv2d_loops(x, w, b, **hyper).shape)
    grad_x, grad_w, grad_b = run_backward(device, projection, x, w, **hyper)

    def loss():
        return float((run_forward(device, x, w, b, **hyper) * projection).sum())

    assert_gradient_close(loss, x, grad_x)
    assert_gradient_close(loss, w, grad_w)
    assert_gradient_close(loss, b, grad_b)


def test_backward_without_bias_gives_none_and_same_other_gradients(device):
    x, w, _, hyper = make_case((2, 3, 6, 6, 2, (3, 3), 2, 1, 1), np.random.default_rng(5))
    gy = np.random.default_rng(6).standard_normal((2, 2, 3, 3))
    with_bias = run_backward(device, gy, x, w, with_bias=True, **hyper)
    without_bias = run_backward(device, gy, x, w, with_bias=False, **hyper)
    assert without_bias[2] is None
    np.testing.assert_allclose(with_bias[2], gy.sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(without_bias[0], with_bias[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(without_bias[1], with_bias[1], rtol=1e-12, atol=1e-12)


def test_backward_can_skip_grad_x(device):
    x, w, _, hyper = make_case((3, 2, 7, 6, 4, (3, 3), 2, 1, 1), np.random.default_rng(11))
    gy = np.random.default_rng(12).standard_normal((3, 4, 4, 3))
    full = run_backward(device, gy, x, w, **hyper)
    skipped = run_backward(device, gy, x, w, with_grad_x=False, **hyper)
    assert full[0] is not None and skipped[0] is None
    np.testing.assert_array_equal(skipped[1], full[1])
    np.testing.assert_array_equal(skipped[2], full[2])


def test_backward_float32_keeps_dtype_and_agrees_with_float64(device):
    x, w, _, hyper = make_case((3, 6, 14, 14, 16, (5, 5), 1, 0, 1), np.random.default_rng(7))
    gy = np.random.default_rng(8).standard_normal((3, 16, 10, 10))
    grads64 = run_backward(device, gy, x, w, **hyper)
    grads32 = run_backward(device, gy.astype(np.float32), x.astype(np.float32), w.astype(np.float32), **hyper)
    for g32, g64 in zip(grads32, grads64):
        assert g32.dtype == np.float32
        assert relative_error(g32, g64) < 1e-5


def test_batch_chunks_give_the_same_result(device, monkeypatch):
    """A batch split into several chunks (the last one shorter) matches one chunk."""
    x, w, b, hyper = make_case((7, 3, 9, 8, 4, (3, 3), 1, 1, 1), np.random.default_rng(9))
    gy = np.random.default_rng(10).standard_normal((7, 4, 9, 8))
    whole_y = run_forward(device, x, w, b, **hyper)
    whole_grads = run_backward(device, gy, x, w, **hyper)
    per_image = (3 * 9 + 1) * 9 * 8 * x.itemsize
    monkeypatch.setattr(conv_module, "COLUMN_CHUNK_BYTES", 3 * per_image)  # chunks of 3, 3, 1
    np.testing.assert_allclose(run_forward(device, x, w, b, **hyper), whole_y, rtol=1e-12, atol=1e-12)
    for chunked, whole in zip(run_backward(device, gy, x, w, **hyper), whole_grads):
        np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ input validation

def arrays(shape_x=(2, 3, 8, 8), shape_w=(4, 3, 3, 3), dtype=np.float32):
    return np.zeros(shape_x, dtype), np.zeros(shape_w, dtype), np.zeros(shape_w[0], dtype)


def test_rejects_wrong_ndim():
    x, w, b = arrays()
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        conv2d_forward(x[0], w, b)
    with pytest.raises(ValueError, match="weight must have 4 dimensions"):
        conv2d_forward(x, w[0], b)
    with pytest.raises(ValueError, match="bias must have 1 dimensions"):
        conv2d_forward(x, w, b[:, None])


def test_rejects_channel_mismatch():
    x, w, b = arrays(shape_w=(4, 2, 3, 3))
    with pytest.raises(ValueError, match="2 input channels .* x has 3"):
        conv2d_forward(x, w, b)


def test_rejects_bias_of_wrong_length():
    x, w, _ = arrays()
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        conv2d_forward(x, w, np.zeros(3, np.float32))


def test_rejects_kernel_larger_than_padded_input():
    x, w, b = arrays(shape_x=(2, 3, 4, 4), shape_w=(4, 3, 5, 5))
    with pytest.raises(ValueError, match="larger than the padded input 4x4"):
        conv2d_forward(x, w, b)
    conv2d_forward(x, w, b, padding=1)  # 6x6 padded: fits
    with pytest.raises(ValueError, match="dilated"):
        conv2d_forward(x, w, b, padding=1, dilation=2)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float16, np.bool_])
def test_rejects_non_float32_64_dtypes(dtype):
    x, w, b = arrays(dtype=dtype)
    with pytest.raises(TypeError, match="float32 or float64"):
        conv2d_forward(x, w, b)


def test_rejects_mixed_dtypes_and_non_arrays():
    x, w, b = arrays()
    with pytest.raises(TypeError, match="weight has dtype float64 but x has float32"):
        conv2d_forward(x, w.astype(np.float64), b)
    with pytest.raises(TypeError, match="must be a NumPy or CuPy array"):
        conv2d_forward(x.tolist(), w, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stride=0), "stride must be positive"),
    (dict(stride=(1, -1)), "stride must be positive"),
    (dict(padding=-1), "padding must be non-negative"),
    (dict(dilation=0), "dilation must be positive"),
    (dict(stride=1.5), "stride must be an int or a pair"),
])
def test_rejects_bad_hyperparameters(kwargs, message):
    x, w, b = arrays()
    with pytest.raises((ValueError, TypeError), match=message):
        conv2d_forward(x, w, b, **kwargs)


def test_rejects_empty_dimensions():
    x, w, b = arrays(shape_x=(0, 3, 8, 8))
    with pytest.raises(ValueError, match="zero-length dimension"):
        conv2d_forward(x, w, b)


def test_backward_rejects_grad_y_of_wrong_shape_or_dtype():
    x, w, _ = arrays()
    with pytest.raises(ValueError, match=r"grad_y must have the output shape \(2, 4, 6, 6\)"):
        conv2d_backward(np.zeros((2, 4, 8, 8), np.float32), x, w)
    with pytest.raises(TypeError, match="grad_y must be a float32 or float64 array"):
        conv2d_backward(np.zeros((2, 4, 6, 6), np.int64), x, w)
