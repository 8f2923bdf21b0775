"""The lecture's worked examples, computed with the ops."""
import numpy as np
import pytest

from gpucnn import backend
from gpucnn.ops import conv2d_forward, max_pool2d_backward, max_pool2d_forward


@pytest.fixture(params=["cpu"])
def device(request):
    """Where the op under test runs; a CuPy entry (marked gpu) can join once gpucnn.cuda exists."""
    return request.param


def as_nchw(device, rows):
    return backend.to_device(np.array(rows, np.float32)[None, None], device)


LECTURE_POOL_INPUT = [[1, 1, 1, 4],
                      [2, 6, 5, 8],
                      [3, 2, 1, 0],
                      [1, 1, 3, 5]]


def test_max_pooling_2x2_stride_2(device):
    y, argmax = max_pool2d_forward(as_nchw(device, LECTURE_POOL_INPUT), 2, 2)
    np.testing.assert_array_equal(backend.to_numpy(y)[0, 0], [[6, 8], [3, 5]])
    # 6 sits at (1, 1) of its window, 8 at (1, 1), 3 at (0, 0), 5 at (1, 1).
    np.testing.assert_array_equal(backend.to_numpy(argmax)[0, 0], [[3, 3], [0, 3]])


def test_max_pooling_backward_routes_the_gradient_to_the_maximum_only(device):
    x = as_nchw(device, LECTURE_POOL_INPUT)
    _, argmax = max_pool2d_forward(x, 2, 2)
    grad_y = backend.to_device(np.ones((1, 1, 2, 2), np.float32), device)
    grad_x = backend.to_numpy(max_pool2d_backward(grad_y, argmax, x.shape, 2, 2))[0, 0]
    np.testing.assert_array_equal(grad_x, [[0, 0, 0, 0],
                                           [0, 1, 0, 1],
                                           [1, 0, 0, 0],
                                           [0, 0, 0, 1]])


DIAGONAL_KERNEL = [[1, 0], [0, 1]]


@pytest.mark.parametrize("ones_at, expected", [
    ([(2, 2), (3, 3)], [[0, 0, 0], [0, 1, 0], [0, 0, 2]]),
    ([(0, 0), (1, 1)], [[2, 0, 0], [0, 1, 0], [0, 0, 0]]),
])
def test_cross_correlation_with_a_diagonal_kernel(device, ones_at, expected):
    image = np.zeros((4, 4), np.float32)
    for row, col in ones_at:
        image[row, col] = 1
    kernel = as_nchw(device, DIAGONAL_KERNEL)
    y = backend.to_numpy(conv2d_forward(as_nchw(device, image), kernel, None))[0, 0]
    np.testing.assert_array_equal(y, expected)
    assert y.max() == 2  # the feature is found wherever it sits


@pytest.mark.parametrize("in_channels, out_channels, kernel", [(1, 6, 5), (6, 16, 5), (3, 8, 3), (2, 4, (3, 5))])
def test_conv_parameter_count(device, in_channels, out_channels, kernel):
    KH, KW = (kernel, kernel) if isinstance(kernel, int) else kernel
    weight = backend.to_device(np.zeros((out_channels, in_channels, KH, KW), np.float32), device)
    bias = backend.to_device(np.zeros(out_channels, np.float32), device)
    x = backend.to_device(np.zeros((1, in_channels, KH + 2, KW + 2), np.float32), device)
    assert conv2d_forward(x, weight, bias).shape == (1, out_channels, 3, 3)  # shapes the op accepts
    assert weight.size + bias.size == (KW * KH * in_channels + 1) * out_channels
    # ...and the only ones: one bias per output channel, one kernel per (output, input) channel pair.
    with pytest.raises(ValueError):
        conv2d_forward(x, weight, backend.to_device(np.zeros(out_channels + 1, np.float32), device))
    with pytest.raises(ValueError):
        conv2d_forward(x, weight[:, :-1] if in_channels > 1 else weight.repeat(2, axis=1), bias)
