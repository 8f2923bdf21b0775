"""Launchers for the element-wise kernels in ``kernels/elementwise.cu`` (ReLU forward and backward).

Same signatures as gpucnn.ops.activation's relu functions plus ``runtime`` (None: the process-wide
CupyRuntime). The code is the same for CuPy arrays on a GPU and NumPy arrays under the emulator.
"""
from __future__ import annotations

import numpy as np

from gpucnn.cuda.runtime import ceil_div, check_int32_count, default_runtime, kernel_array

KERNEL_FILE = "elementwise.cu"
THREADS_PER_BLOCK = 256
MAX_BLOCKS = 4096  # the kernels loop over the rest (grid-stride)


def _grid(count: int) -> tuple[int, int, int]:
    return (max(1, min(ceil_div(count, THREADS_PER_BLOCK), MAX_BLOCKS)), 1, 1)


def relu_forward(x, *, runtime=None):
    """y = max(x, 0), any shape, float32; NaN stays NaN."""
    rt = runtime if runtime is not None else default_runtime()
    x = kernel_array(rt, x, "x")
    check_int32_count("x", x.size)
    y = rt.empty(x.shape, np.float32)
    if x.size:
        # writes y: a grid-stride loop over the elements
        rt.function(KERNEL_FILE, "relu_forward")(_grid(x.size), (THREADS_PER_BLOCK, 1, 1), (x, y, np.int32(x.size)))
    return y


def relu_backward(grad_y, y, *, runtime=None):
    """grad_x = grad_y where the saved output y > 0, else 0; grad_y and y of one shape, float32."""
    rt = runtime if runtime is not None else default_runtime()
    grad_y = kernel_array(rt, grad_y, "grad_y")
    y = kernel_array(rt, y, "y")
    if tuple(grad_y.shape) != tuple(y.shape):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)} but y has {tuple(y.shape)}; they must match.")
    check_int32_count("y", y.size)
    grad_x = rt.empty(y.shape, np.float32)
    if y.size:
        # writes grad_x: a grid-stride loop over the elements
        rt.function(KERNEL_FILE, "relu_backward")(_grid(y.size), (THREADS_PER_BLOCK, 1, 1),
                                                  (grad_y, y, grad_x, np.int32(y.size)))
    return grad_x
