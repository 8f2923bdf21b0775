"""Max and average pooling against nested loops and finite differences; max-pool tie and NaN rules."""
import numpy as np
import pytest

from gpucnn import backend
from gpucnn.ops import avg_pool2d_backward, avg_pool2d_forward, max_pool2d_backward, max_pool2d_forward
from gpucnn.testing.gradcheck import assert_gradient_close
from tests.loops import (
    avg_pool2d_backward_loops,
    avg_pool2d_loops,
    max_pool2d_backward_loops,
    max_pool2d_loops,
    pooled_shape,
)


@pytest.fixture(params=["cpu"])
def device(request):
    """Where the op under test runs; a CuPy entry (marked gpu) can join once gpucnn.cuda supports these dtypes."""
    return request.param


def on(device, array):
    return backend.to_device(array, device)


def max_pool(device, x, *args, **kw):
    y, argmax = max_pool2d_forward(on(device, x), *args, **kw)
    return backend.to_numpy(y), backend.to_numpy(argmax)


def max_pool_backward(device, gy, argmax, *args, **kw):
    return backend.to_numpy(max_pool2d_backward(on(device, gy), on(device, argmax), *args, **kw))


def avg_pool(device, x, *args, **kw):
    return backend.to_numpy(avg_pool2d_forward(on(device, x), *args, **kw))


def avg_pool_backward(device, gy, *args, **kw):
    return backend.to_numpy(avg_pool2d_backward(on(device, gy), *args, **kw))


def tie_free(shape, rng):
    """Distinct values at least 0.1 apart in random order, so finite differences never swap a maximum."""
    return rng.permutation(np.arange(np.prod(shape)) * 0.1 - 3.0).reshape(shape)


# (x shape, kernel_size, stride, padding)
POOL_CASES = [
    ((2, 3, 8, 8), 2, None, 0),         # LeNet's 2x2 stride 2 (the fast path)
    ((2, 3, 7, 9), 2, 2, 0),            # 2x2 stride 2 on odd sizes: last row/column unused
    ((1, 2, 7, 7), 3, 2, 1),            # overlapping windows with padding
    ((2, 1, 6, 5), 3, 1, 0),            # stride 1: heavy overlap
    ((2, 3, 9, 8), (3, 2), (2, 1), (1, 1)),  # everything non-square
    ((1, 4, 5, 6), (5, 6), None, 0),    # kernel as large as the input
    ((2, 2, 10, 7), 4, 3, 2),           # padding = kernel // 2
    ((1, 1, 4, 4), 1, 1, 0),            # 1x1: identity
]


def pool_id(case):
    shape, k, s, p = case
    return f"{'x'.join(map(str, shape))}-k{k}-s{s}-p{p}".replace(" ", "")


@pytest.mark.parametrize("case", POOL_CASES, ids=pool_id)
def test_max_pool_matches_loops(device, case):
    shape, k, s, p = case
    x = np.random.default_rng(0).standard_normal(shape)
    y, argmax = max_pool(device, x, k, s, p)
    expected_y, expected_argmax = max_pool2d_loops(x, k, s, p)
    assert argmax.dtype == np.int32
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(argmax, expected_argmax)


@pytest.mark.parametrize("with_nans", [False, True], ids=["ties", "ties+nan+inf"])
@pytest.mark.parametrize("case", POOL_CASES, ids=pool_id)
def test_max_pool_ties_and_nans_match_loops(device, case, with_nans):
    """Few distinct values (many ties), optionally NaNs and -inf: argmax names the first max / first NaN."""
    shape, k, s, p = case
    rng = np.random.default_rng(1)
    x = rng.integers(-2, 2, size=shape).astype(np.float32)
    if with_nans:
        x[rng.random(shape) < 0.08] = np.nan
        x[rng.random(shape) < 0.08] = -np.inf
    y, argmax = max_pool(device, x, k, s, p)
    expected_y, expected_argmax = max_pool2d_loops(x, k, s, p)
    np.testing.assert_array_equal(y, expected_y)  # NaN == NaN for this helper
    np.testing.assert_array_equal(argmax, expected_argmax)


@pytest.mark.parametrize("case", POOL_CASES, ids=pool_id)
def test_max_pool_backward_matches_loops_and_finite_differences(device, case):
    shape, k, s, p = case
    rng = np.random.default_rng(2)
    x = tie_free(shape, rng)
    _, argmax = max_pool(device, x, k, s, p)
    gy = rng.standard_normal(argmax.shape)
    grad_x = max_pool_backward(device, gy, argmax, shape, k, s, p)
    np.testing.assert_allclose(grad_x, max_pool2d_backward_loops(gy, argmax, shape, k, s, p), rtol=1e-14, atol=0)
    assert_gradient_close(lambda: float((max_pool(device, x, k, s, p)[0] * gy).sum()), x, grad_x)


@pytest.mark.parametrize("case", POOL_CASES, ids=pool_id)
def test_avg_pool_matches_loops_and_finite_differences(device, case):
    shape, k, s, p = case
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    y = avg_pool(device, x, k, s, p)
    np.testing.assert_allclose(y, avg_pool2d_loops(x, k, s, p), rtol=1e-12, atol=1e-15)
    gy = rng.standard_normal(y.shape)
    grad_x = avg_pool_backward(device, gy, shape, k, s, p)
    np.testing.assert_allclose(grad_x, avg_pool2d_backward_loops(gy, shape, k, s, p), rtol=1e-12, atol=1e-15)
    assert_gradient_close(lambda: float((avg_pool(device, x, k, s, p) * gy).sum()), x, grad_x)


def test_first_maximum_wins_ties(device):
    window = np.array([[[[1.0, 5.0, 2.0], [5.0, 0.0, 5.0], [3.0, 5.0, 4.0]]]])  # 5 at offsets 1, 3, 5, 7
    y, argmax = max_pool(device, window, 3)
    assert y[0, 0, 0, 0] == 5.0 and argmax[0, 0, 0, 0] == 1
    constant = np.full((2, 3, 6, 6), 7.0, np.float32)
    for k, s, p in [(2, 2, 0), (3, 1, 1), (3, 2, 0)]:
        y, argmax = max_pool(device, constant, k, s, p)
        # Without padding every window starts at offset 0; with padding, at its first inside pixel.
        np.testing.assert_array_equal(argmax, max_pool2d_loops(constant, k, s, p)[1])
        assert (y == 7.0).all()
    _, argmax = max_pool(device, constant, 2)
    assert (argmax == 0).all()


@pytest.mark.parametrize("k, s", [(2, 2), (3, 3)])
def test_nan_propagates_and_argmax_names_the_first_nan(device, k, s):
    x = np.arange(2 * 1 * 6 * 6, dtype=np.float32).reshape(2, 1, 6, 6)
    x[0, 0, 1, 1] = np.nan           # window (0, 0): a NaN at offset k+1 after numbers
    x[0, 0, 0, k + 1] = np.nan       # window (0, 1): two NaNs, the first at offset 1
    x[0, 0, 1, k] = np.nan
    y, argmax = max_pool(device, x, k, s)
    assert np.isnan(y[0, 0, 0, 0]) and argmax[0, 0, 0, 0] == k + 1
    assert np.isnan(y[0, 0, 0, 1]) and argmax[0, 0, 0, 1] == 1
    assert np.isnan(y).sum() == 2  # no other window is touched
    assert y[1, 0, -1, -1] == x[1, 0].max()


def test_all_minus_inf_window_points_inside_the_input(device):
    """Padding is -inf too, but the argmax must name a real pixel so the gradient is not lost."""
    x = np.full((1, 1, 4, 4), -np.inf)
    y, argmax = max_pool(device, x, 3, 2, 1)
    assert (y == -np.inf).all()
    np.testing.assert_array_equal(argmax[0, 0], [[4, 3], [1, 0]])  # first pixel inside each window
    grad_x = max_pool_backward(device, np.ones(y.shape), argmax, x.shape, 3, 2, 1)
    assert grad_x.sum() == y.size


def test_max_pool_backward_routes_only_to_the_maximum(device):
    x = np.array([[[[1.0, 2.0, 9.0, 0.0], [3.0, 4.0, 1.0, 1.0]]]])
    _, argmax = max_pool(device, x, 2)
    grad_x = max_pool_backward(device, np.array([[[[10.0, 20.0]]]]), argmax, x.shape, 2)
    np.testing.assert_array_equal(grad_x, [[[[0, 0, 20, 0], [0, 10, 0, 0]]]])


def test_overlapping_windows_accumulate(device):
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 5.0  # the maximum of all four 2x2 stride-1 windows
    y, argmax = max_pool(device, x, 2, 1)
    np.testing.assert_array_equal(argmax[0, 0], [[3, 2], [1, 0]])
    grad_x = max_pool_backward(device, np.array([[[[1.0, 2.0], [3.0, 4.0]]]]), argmax, x.shape, 2, 1)
    assert grad_x[0, 0, 1, 1] == 10.0 and grad_x.sum() == 10.0


def test_float32_keeps_dtype(device):
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    for k, s, p in [(2, None, 0), (3, 2, 1)]:
        y, argmax = max_pool(device, x, k, s, p)
        assert y.dtype == np.float32 and argmax.dtype == np.int32
        assert max_pool_backward(device, y, argmax, x.shape, k, s, p).dtype == np.float32
        assert avg_pool(device, x, k, s, p).dtype == np.float32
        assert avg_pool_backward(device, y, x.shape, k, s, p).dtype == np.float32


# ------------------------------------------------------------------ input validation

def test_rejects_wrong_ndim_and_dtype():
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        max_pool2d_forward(np.zeros((3, 8, 8), np.float32), 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        max_pool2d_forward(np.zeros((1, 3, 8, 8), np.int32), 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        avg_pool2d_forward(np.zeros((1, 3, 8, 8), np.float16), 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel_size=3, padding=2), "padding 2 must be between 0 and half the kernel size"),
    (dict(kernel_size=(2, 4), padding=(1, 3)), "half the kernel size"),
    (dict(kernel_size=2, padding=-1), "between 0 and half"),
    (dict(kernel_size=0), "kernel_size must be positive"),
    (dict(kernel_size=2, stride=0), "stride must be positive"),
    (dict(kernel_size=9), "larger than the padded input 8x8"),
])
@pytest.mark.parametrize("op", [max_pool2d_forward, avg_pool2d_forward])
def test_rejects_bad_sizes(op, kwargs, message):
    with pytest.raises(ValueError, match=message):
        op(np.zeros((1, 3, 8, 8), np.float32), **kwargs)


def test_backward_rejects_mismatched_arguments():
    gy = np.zeros((1, 3, 4, 4), np.float32)
    argmax = np.zeros((1, 3, 4, 4), np.int32)
    with pytest.raises(ValueError, match=r"grad_y must have the pooled shape \(1, 3, 3, 3\)"):
        max_pool2d_backward(gy, argmax, (1, 3, 7, 7), 2)
    with pytest.raises(ValueError, match="argmax has shape"):
        max_pool2d_backward(gy, argmax[:, :, :3], (1, 3, 8, 8), 2)
    with pytest.raises(TypeError, match="argmax must be an integer array"):
        max_pool2d_backward(gy, argmax.astype(np.float32), (1, 3, 8, 8), 2)
    with pytest.raises(ValueError, match="four ints"):
        avg_pool2d_backward(gy, (3, 8, 8), 2)
    with pytest.raises(ValueError, match="must be positive"):
        avg_pool2d_backward(gy, (1, 0, 8, 8), 2)
    assert pooled_shape((1, 3, 8, 8), 2) == gy.shape
