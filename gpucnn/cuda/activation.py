"""Launchers for the element-wise kernels in ``kernels/elementwise.cu``: ReLU, tanh, sigmoid, dropout.

Same signatures as gpucnn.ops.activation plus ``runtime`` (None: the process-wide CupyRuntime).
The code is the same for CuPy arrays on a GPU and NumPy arrays under the emulator.
"""
from __future__ import annotations

import numpy as np

from gpucnn.cuda.runtime import active_runtime, ceil_div, check_int32_count, kernel_array

KERNEL_FILE = "elementwise.cu"
THREADS_PER_BLOCK = 256
MAX_BLOCKS = 4096  # the kernels loop over the rest (grid-stride)


def grid_for(count: int) -> tuple[int, int, int]:
    """Blocks for a grid-stride launch over ``count`` elements (at least one, at most MAX_BLOCKS)."""
    return (max(1, min(ceil_div(count, THREADS_PER_BLOCK), MAX_BLOCKS)), 1, 1)


def _unary(name, x, runtime):
    rt = active_runtime(runtime)
    x = kernel_array(rt, x, "x")
    y = rt.empty(x.shape, np.float32)
    if x.size:
        # writes y: a grid-stride loop over the elements
        rt.function(KERNEL_FILE, name)(grid_for(x.size), (THREADS_PER_BLOCK, 1, 1), (x, y, np.int64(x.size)))
    return y


def _backward(name, grad_y, y, runtime):
    rt = active_runtime(runtime)
    grad_y = kernel_array(rt, grad_y, "grad_y")
    y = kernel_array(rt, y, "y")
    if tuple(grad_y.shape) != tuple(y.shape):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)} but y has {tuple(y.shape)}; they must match.")
    grad_x = rt.empty(y.shape, np.float32)
    if y.size:
        # writes grad_x: a grid-stride loop over the elements
        rt.function(KERNEL_FILE, name)(grid_for(y.size), (THREADS_PER_BLOCK, 1, 1),
                                       (grad_y, y, grad_x, np.int64(y.size)))
    return grad_x


def relu_forward(x, *, runtime=None):
    """y = max(x, 0), any shape, float32; NaN stays NaN."""
    rt = active_runtime(runtime)
    x = kernel_array(rt, x, "x")
    check_int32_count("x", x.size)
    y = rt.empty(x.shape, np.float32)
    if x.size:
        # writes y: a grid-stride loop over the elements
        rt.function(KERNEL_FILE, "relu_forward")(grid_for(x.size), (THREADS_PER_BLOCK, 1, 1),
                                                 (x, y, np.int32(x.size)))
    return y


def relu_backward(grad_y, y, *, runtime=None):
    """grad_x = grad_y where the saved output y > 0, else 0; grad_y and y of one shape, float32."""
    rt = active_runtime(runtime)
    grad_y = kernel_array(rt, grad_y, "grad_y")
    y = kernel_array(rt, y, "y")
    if tuple(grad_y.shape) != tuple(y.shape):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)} but y has {tuple(y.shape)}; they must match.")
    check_int32_count("y", y.size)
    grad_x = rt.empty(y.shape, np.float32)
    if y.size:
        # writes grad_x: a grid-stride loop over the elements
        rt.function(KERNEL_FILE, "relu_backward")(grid_for(y.size), (THREADS_PER_BLOCK, 1, 1),
                                                  (grad_y, y, grad_x, np.int32(y.size)))
    return grad_x


def tanh_forward(x, *, runtime=None):
    """y = tanh(x), any shape, float32."""
    return _unary("tanh_forward", x, runtime)


def tanh_backward(grad_y, y, *, runtime=None):
    """grad_x = grad_y * (1 - y**2) from the saved output y."""
    return _backward("tanh_backward", grad_y, y, runtime)


def sigmoid_forward(x, *, runtime=None):
    """y = 1 / (1 + exp(-x)), any shape, float32, without overflow for large |x|."""
    return _unary("sigmoid_forward", x, runtime)


def sigmoid_backward(grad_y, y, *, runtime=None):
    """grad_x = grad_y * y * (1 - y) from the saved output y."""
    return _backward("sigmoid_backward", grad_y, y, runtime)


def multiply(a, b, *, runtime=None):
    """out = a * b for two float32 arrays of one shape."""
    rt = active_runtime(runtime)
    a = kernel_array(rt, a, "a")
    b = kernel_array(rt, b, "b")
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"a has shape {tuple(a.shape)} but b has {tuple(b.shape)}; they must match.")
    out = rt.empty(a.shape, np.float32)
    if a.size:
        # writes out: a grid-stride loop over the elements
        rt.function(KERNEL_FILE, "multiply")(grid_for(a.size), (THREADS_PER_BLOCK, 1, 1), (a, b, out, np.int64(a.size)))
    return out


def dropout_forward(x, p, rng, training, *, runtime=None):
    """Inverted dropout, as gpucnn.ops.dropout_forward: the mask is drawn on the host (rng), copied over.

    Returns (y, mask); (x, None) when not training or p == 0.
    """
    if not training or p == 0:
        return x, None
    rt = active_runtime(runtime)
    x = kernel_array(rt, x, "x")
    keep = rng.random(tuple(x.shape)) >= p
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    mask = rt.empty(x.shape, np.float32)
    mask[...] = (keep * scale).astype(np.float32)  # a host-to-device copy
    return multiply(x, mask, runtime=rt), mask


def dropout_backward(grad_y, mask, *, runtime=None):
    """grad_x = grad_y * mask (None: dropout was off, grad_y itself)."""
    if mask is None:
        return grad_y
    return multiply(grad_y, mask, runtime=runtime)
