"""Launchers for the pooling kernels in ``kernels/pool2d.cu`` and ``kernels/global_pool.cu``.

Same signatures as gpucnn.ops.pool plus ``runtime`` (None: the process-wide CupyRuntime). The
code is the same for CuPy arrays on a GPU and NumPy arrays under the emulator.
"""
from __future__ import annotations

import numpy as np

from gpucnn.cuda.runtime import (active_runtime, ceil_div, check_int32_count, check_int32_extent,
                                 kernel_array)
from gpucnn.cuda.norm import block_shape, plane_grid
from gpucnn.ops import check_float_array
from gpucnn.ops.pool import _check_global_backward as check_global_backward
from gpucnn.ops.pool import pool2d_geometry

KERNEL_FILE = "pool2d.cu"
THREADS_PER_BLOCK = 256


def _geometry(x_shape, kernel_size, stride, padding):
    """The sizes (gpucnn.ops.pool.PoolGeometry) after the reference's checks and the int32 limits."""
    g = pool2d_geometry(x_shape, kernel_size, stride, padding)
    check_int32_count("x", g.N * g.C * g.H * g.W)
    check_int32_count("y", g.N * g.C * g.OH * g.OW)
    # Coordinates such as iy + PH - KH + 1 + SH - 1 (the backward's first window) stay below these sums.
    check_int32_extent("the padded height plus the stride, H + 2*PH + SH,", g.H + 2 * g.PH + g.SH)
    check_int32_extent("the padded width plus the stride, W + 2*PW + SW,", g.W + 2 * g.PW + g.SW)
    check_int32_extent("the window size KH*KW (argmax holds ky*KW + kx)", g.KH * g.KW)
    return g


def _int32_args(g):
    """The geometry as the kernels take it: n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow."""
    return tuple(np.int32(getattr(g, name)) for name in
                 ("N", "C", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "OH", "OW"))


def _grad_y_array(rt, grad_y, g):
    grad_y = kernel_array(rt, grad_y, "grad_y", ndim=4)
    if tuple(grad_y.shape) != (g.N, g.C, g.OH, g.OW):
        raise ValueError(f"grad_y must have shape {(g.N, g.C, g.OH, g.OW)} for x_shape and this window, "
                         f"not {tuple(grad_y.shape)}.")
    return grad_y


def _launch_1d(rt, name, count, args):
    rt.function(KERNEL_FILE, name)((ceil_div(count, THREADS_PER_BLOCK), 1, 1), (THREADS_PER_BLOCK, 1, 1), args)


def max_pool2d_forward(x, kernel_size, stride=None, padding=0, relu=False, *, runtime=None):
    """Max pooling: x (N, C, H, W) float32 -> (y (N, C, OH, OW) float32, argmax (N, C, OH, OW) int32).

    OH = (H + 2*PH - KH) // SH + 1; stride None means kernel_size; padding <= kernel_size // 2 and
    counts as -inf. argmax is the window-local index KY*KW + KX of the first maximum (NaN wins).
    relu=True: y = max(0, .) in the same kernel (NaN kept).
    """
    rt = active_runtime(runtime)
    x = kernel_array(rt, x, "x", ndim=4)
    g = _geometry(x.shape, kernel_size, stride, padding)
    y = rt.empty((g.N, g.C, g.OH, g.OW), np.float32)
    argmax = rt.empty((g.N, g.C, g.OH, g.OW), np.int32)
    # writes y and argmax: one thread per output element
    _launch_1d(rt, "max_pool2d_forward", y.size, (x, y, argmax, *_int32_args(g), np.int32(1 if relu else 0)))
    return y, argmax


def max_pool2d(x, kernel_size, stride=None, padding=0, relu=False, *, runtime=None):
    """Max pooling without argmax: max_pool2d_forward's y (the same kernel; its argmax is dropped)."""
    return max_pool2d_forward(x, kernel_size, stride, padding, relu, runtime=runtime)[0]


def max_pool2d_backward(grad_y, argmax, x_shape, kernel_size, stride=None, padding=0, *, runtime=None):
    """Gradient of max pooling: grad_y and argmax (N, C, OH, OW) -> grad_x of shape x_shape (N, C, H, W)."""
    rt = active_runtime(runtime)
    g = _geometry(x_shape, kernel_size, stride, padding)
    grad_y = _grad_y_array(rt, grad_y, g)
    argmax = kernel_array(rt, argmax, "argmax", dtype=np.int32, ndim=4)
    if argmax.shape != grad_y.shape:
        raise ValueError(f"argmax must have the shape of grad_y {tuple(grad_y.shape)}, not {tuple(argmax.shape)}.")
    grad_x = rt.empty((g.N, g.C, g.H, g.W), np.float32)
    # writes grad_x: one thread per input element, gathering grad_y where argmax points at it
    _launch_1d(rt, "max_pool2d_backward", grad_x.size, (grad_y, argmax, grad_x, *_int32_args(g)))
    return grad_x


def avg_pool2d_forward(x, kernel_size, stride=None, padding=0, *, runtime=None):
    """Average pooling: x (N, C, H, W) float32 -> y (N, C, OH, OW); zero padding counts in the divisor."""
    rt = active_runtime(runtime)
    x = kernel_array(rt, x, "x", ndim=4)
    g = _geometry(x.shape, kernel_size, stride, padding)
    y = rt.empty((g.N, g.C, g.OH, g.OW), np.float32)
    # writes y: one thread per output element
    _launch_1d(rt, "avg_pool2d_forward", y.size, (x, y, *_int32_args(g)))
    return y


def avg_pool2d_backward(grad_y, x_shape, kernel_size, stride=None, padding=0, *, runtime=None):
    """Gradient of average pooling: grad_y (N, C, OH, OW) -> grad_x of shape x_shape (N, C, H, W)."""
    rt = active_runtime(runtime)
    g = _geometry(x_shape, kernel_size, stride, padding)
    grad_y = _grad_y_array(rt, grad_y, g)
    grad_x = rt.empty((g.N, g.C, g.H, g.W), np.float32)
    # writes grad_x: one thread per input element, gathering grad_y / (KH*KW) over its windows
    _launch_1d(rt, "avg_pool2d_backward", grad_x.size, (grad_y, grad_x, *_int32_args(g)))
    return grad_x


# Global average pooling (kernels/global_pool.cu): planes of L = H*W values, one row of threads per plane.

GLOBAL_KERNEL_FILE = "global_pool.cu"
# GAP_THREADS in kernels/global_pool.cu is gpucnn.cuda.norm.THREADS: the two files share block_shape and plane_grid.


def _global_sizes(shape):
    """(planes N*C, L = H*W) of an (N, C, H, W) shape; both must fit the kernels' int sizes (indexes are 64-bit)."""
    N, C, H, W = (int(s) for s in shape)
    check_int32_count("the planes (N*C) of global average pooling", N * C)
    check_int32_count("each plane (H*W) of global average pooling", H * W)
    return N * C, H * W


def global_avg_pool2d_forward(x, *, runtime=None):
    """Global average pooling: x (N, C, H, W) float32 -> y (N, C, 1, 1), each plane's mean."""
    rt = active_runtime(runtime)
    x = kernel_array(rt, x, "x", ndim=4)
    check_float_array(x, "x", ndim=4)
    planes, L = _global_sizes(x.shape)
    y = rt.empty((x.shape[0], x.shape[1], 1, 1), np.float32)
    block = block_shape(L)
    # writes y: a row of threads per plane sums it in a fixed order
    rt.function(GLOBAL_KERNEL_FILE, "global_avg_pool2d_forward")(
        (min(ceil_div(planes, block[1]), 2**31 - 1), 1, 1), block, (x, y, np.int32(planes), np.int32(L)))
    return y


def global_avg_pool2d_backward(grad_y, x_shape, *, runtime=None):
    """Gradient of global average pooling: grad_y (N, C, 1, 1) -> grad_x (x_shape) = grad_y / (H*W)."""
    check_global_backward(grad_y, x_shape)
    rt = active_runtime(runtime)
    grad_y = kernel_array(rt, grad_y, "grad_y", ndim=4)
    planes, L = _global_sizes(x_shape)
    grad_x = rt.empty(tuple(int(s) for s in x_shape), np.float32)
    # writes grad_x: every value of a plane gets its grad_y / L
    rt.function(GLOBAL_KERNEL_FILE, "global_avg_pool2d_backward")(
        plane_grid(planes, L), block_shape(L), (grad_y, grad_x, np.int32(planes), np.int32(L)))
    return grad_x
