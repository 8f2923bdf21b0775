"""Launchers for the element-wise kernels: ReLU, tanh, sigmoid, dropout (``kernels/elementwise.cu``) and the
residual sum (``kernels/residual.cu``).

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


def _elementwise(name, arrays, names, runtime, count_type=np.int64):
    """Launch kernel ``name`` over equally shaped float32 ``arrays`` plus a new output; returns the output."""
    rt = active_runtime(runtime)
    arrays = [kernel_array(rt, a, n) for a, n in zip(arrays, names)]
    shape = tuple(arrays[0].shape)
    for array, array_name in zip(arrays[1:], names[1:]):
        if tuple(array.shape) != shape:
            raise ValueError(f"{names[0]} has shape {shape} but {array_name} has {tuple(array.shape)}; they must match.")
    if count_type is np.int32:
        check_int32_count(names[-1], arrays[0].size)
    out = rt.empty(shape, np.float32)
    if out.size:
        # writes out: a grid-stride loop over the elements
        rt.function(KERNEL_FILE, name)(grid_for(out.size), (THREADS_PER_BLOCK, 1, 1),
                                       (*arrays, out, count_type(out.size)))
    return out


def relu_forward(x, *, runtime=None):
    """y = max(x, 0), any shape, float32; NaN stays NaN."""
    return _elementwise("relu_forward", (x,), ("x",), runtime, np.int32)


def relu_backward(grad_y, y, *, runtime=None):
    """grad_x = grad_y where the saved output y > 0, else 0; grad_y and y of one shape, float32."""
    return _elementwise("relu_backward", (grad_y, y), ("grad_y", "y"), runtime, np.int32)


def tanh_forward(x, *, runtime=None):
    """y = tanh(x), any shape, float32."""
    return _elementwise("tanh_forward", (x,), ("x",), runtime)


def tanh_backward(grad_y, y, *, runtime=None):
    """grad_x = grad_y * (1 - y**2) from the saved output y."""
    return _elementwise("tanh_backward", (grad_y, y), ("grad_y", "y"), runtime)


def sigmoid_forward(x, *, runtime=None):
    """y = 1 / (1 + exp(-x)), any shape, float32, without overflow for large |x|."""
    return _elementwise("sigmoid_forward", (x,), ("x",), runtime)


def sigmoid_backward(grad_y, y, *, runtime=None):
    """grad_x = grad_y * y * (1 - y) from the saved output y."""
    return _elementwise("sigmoid_backward", (grad_y, y), ("grad_y", "y"), runtime)


def multiply(a, b, *, runtime=None):
    """out = a * b for two float32 arrays of one shape."""
    return _elementwise("multiply", (a, b), ("a", "b"), runtime)


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
    host_mask = (keep * scale).astype(np.float32)
    mask = rt.empty(x.shape, np.float32)
    if isinstance(mask, np.ndarray):
        mask[...] = host_mask  # the emulator: host memory
    else:
        mask.set(host_mask)  # CuPy refuses mask[...] = <NumPy array>; set() is its host-to-device copy
    return multiply(x, mask, runtime=rt), mask


def dropout_backward(grad_y, mask, *, runtime=None):
    """grad_x = grad_y * mask (None: dropout was off, grad_y itself)."""
    if mask is None:
        return grad_y
    return multiply(grad_y, mask, runtime=runtime)


def _residual_sum(a, b, relu, runtime):
    """y = a + b (then max(y, 0) when ``relu``) for two float32 arrays of one shape, by kernels/residual.cu."""
    rt = active_runtime(runtime)
    a, b = kernel_array(rt, a, "a"), kernel_array(rt, b, "b")
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"a has shape {tuple(a.shape)} but b has {tuple(b.shape)}; they must match.")
    y = rt.empty(tuple(a.shape), np.float32)
    if y.size:
        # writes y: a 64-bit grid-stride loop over the elements
        rt.function("residual.cu", "add_forward")(grid_for(y.size), (THREADS_PER_BLOCK, 1, 1),
                                                  (a, b, y, np.int64(y.size), np.int32(bool(relu))))
    return y


def add_forward(a, b, *, runtime=None):
    """y = a + b (a residual connection's sum), a and b float32 of one shape."""
    return _residual_sum(a, b, False, runtime)


def add_relu_forward(a, b, *, runtime=None):
    """y = max(a + b, 0), NaN stays NaN; its gradient for a and b is relu_backward(grad_y, y)."""
    return _residual_sum(a, b, True, runtime)
