"""Launchers for the convolution kernels in ``kernels/conv2d.cu``.

Same signatures as gpucnn.ops.conv plus ``runtime`` (None: the process-wide CupyRuntime). The
code is the same for CuPy arrays on a GPU and NumPy arrays under the emulator.
"""
from __future__ import annotations

import numpy as np

from gpucnn.cuda.runtime import ceil_div, check_int32_count, check_int32_extent, active_runtime, kernel_array
from gpucnn.ops.conv import conv2d_geometry

KERNEL_FILE = "conv2d.cu"
OC_PER_THREAD = 8               # OCB in kernels/conv2d.cu
SHARED_LIMIT_BYTES = 48 * 1024  # the default dynamic shared memory a block may ask for
THREADS_PER_BLOCK = 256         # 1-D launches
MAX_GRID_YZ = 65535
MIN_SLICE_LEN = 64              # output positions summed by one block row for weight/bias grads
MAX_SLICES = 1024               # bounds the partial-sum scratch buffer


def _geometry(x, weight, bias, stride, padding, dilation):
    """The sizes (gpucnn.ops.conv.ConvGeometry) after the reference's checks and the int32 limits."""
    g = conv2d_geometry(x, weight, bias, stride, padding, dilation)
    for name, count in (("x", g.N * g.C * g.H * g.W), ("weight", g.OC * g.C * g.KH * g.KW),
                        ("y", g.N * g.OC * g.OH * g.OW)):
        check_int32_count(name, count)
    # Every coordinate the kernels form (oy*SH - PH + ky*DH, iy + PH - ky*DH, ...) lies below these sums.
    check_int32_extent("the padded height plus the stride, H + 2*PH + SH,", g.H + 2 * g.PH + g.SH)
    check_int32_extent("the padded width plus the stride, W + 2*PW + SW,", g.W + 2 * g.PW + g.SW)
    check_int32_extent("the dilation", max(g.DH, g.DW))  # unbounded by the above for a 1-wide kernel
    return g


def _int32_args(g):
    """The geometry as the kernels take it: n, c, h, w, oc, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow."""
    return tuple(np.int32(getattr(g, name)) for name in
                 ("N", "C", "H", "W", "OC", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "OH", "OW"))


def _pow2_at_least(v: int) -> int:
    p = 1
    while p < v:
        p *= 2
    return p


def _tile_shared_bytes(block, kh, kw, sh, sw, dh, dw) -> int:
    """Bytes of the input tile with its halo plus OC_PER_THREAD filters (as the kernel lays them)."""
    bx, by = block
    tile_h = (by - 1) * sh + (kh - 1) * dh + 1
    tile_w = (bx - 1) * sw + (kw - 1) * dw + 1
    return 4 * (tile_h * tile_w + OC_PER_THREAD * kh * kw)


def _forward_block(oh, ow, kh, kw, sh, sw, dh, dw):
    """(block x, block y, shared bytes) for the tiled kernel, or None when no tile fits the limit."""
    bx = min(32, _pow2_at_least(ow))
    by = min(max(1, THREADS_PER_BLOCK // bx), _pow2_at_least(oh))
    for block in ((bx, by), (min(bx, 8), min(by, 8))):
        shared = _tile_shared_bytes(block, kh, kw, sh, sw, dh, dw)
        if shared <= SHARED_LIMIT_BYTES and ceil_div(oh, block[1]) <= MAX_GRID_YZ:
            return block[0], block[1], shared
    return None


def conv2d_forward(x, weight, bias, stride=1, padding=0, dilation=1, relu=False, *, runtime=None):
    """2-D convolution (cross-correlation) with fused bias and optional ReLU, on the GPU kernels.

    x (N, C, H, W), weight (OC, C, KH, KW), bias (OC,) or None -> y (N, OC, OH, OW), all float32;
    OH = (H + 2*PH - DH*(KH-1) - 1) // SH + 1, likewise OW. relu=True applies max(0, .) after the bias.
    """
    rt = active_runtime(runtime)
    x = kernel_array(rt, x, "x", ndim=4)
    weight = kernel_array(rt, weight, "weight", ndim=4)
    if bias is not None:
        bias = kernel_array(rt, bias, "bias", ndim=1)
    g = _geometry(x, weight, bias, stride, padding, dilation)
    if bias is None:
        bias = rt.zeros((g.OC,), np.float32)

    y = rt.empty((g.N, g.OC, g.OH, g.OW), np.float32)
    args = (x, weight, bias, y, *_int32_args(g), np.int32(1 if relu else 0))
    tiled = _forward_block(g.OH, g.OW, g.KH, g.KW, g.SH, g.SW, g.DH, g.DW)
    if tiled is not None:
        bx, by, shared = tiled
        jobs = g.N * ceil_div(g.OC, OC_PER_THREAD)
        grid = (ceil_div(g.OW, bx), ceil_div(g.OH, by), min(jobs, MAX_GRID_YZ))
        # writes y: one block per output tile x (image, channel group), tile and filters in shared memory
        rt.function(KERNEL_FILE, "conv2d_forward_tiled")(grid, (bx, by, 1), args, shared_mem=shared)
    else:
        # writes y: one thread per output element (the tile would not fit in shared memory)
        rt.function(KERNEL_FILE, "conv2d_forward_direct")(
            (ceil_div(y.size, THREADS_PER_BLOCK), 1, 1), (THREADS_PER_BLOCK, 1, 1), args)
    return y


def conv2d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, with_bias=True, with_grad_x=True, *,
                    runtime=None):
    """Gradients of conv2d_forward (without ReLU) with respect to x, weight and bias.

    grad_y (N, OC, OH, OW), x (N, C, H, W), weight (OC, C, KH, KW) ->
    (grad_x (N, C, H, W) or None when with_grad_x is False (no launch), grad_weight (OC, C, KH, KW),
    grad_bias (OC,) or None when with_bias is False).
    Every sum runs in a fixed order, so two calls give bitwise identical results.
    """
    rt = active_runtime(runtime)
    grad_y = kernel_array(rt, grad_y, "grad_y", ndim=4)
    x = kernel_array(rt, x, "x", ndim=4)
    weight = kernel_array(rt, weight, "weight", ndim=4)
    g = _geometry(x, weight, None, stride, padding, dilation)
    if tuple(grad_y.shape) != (g.N, g.OC, g.OH, g.OW):
        raise ValueError(f"grad_y must have shape {(g.N, g.OC, g.OH, g.OW)} for these inputs, "
                         f"not {tuple(grad_y.shape)}.")
    geometry = _int32_args(g)
    positions = g.N * g.OH * g.OW
    slices = min(ceil_div(positions, MIN_SLICE_LEN), MAX_SLICES)
    slice_len = ceil_div(positions, slices)
    slices = ceil_div(positions, slice_len)
    w_count = g.OC * g.C * g.KH * g.KW
    check_int32_count("the weight-gradient scratch buffer", slices * w_count)

    grad_x = None
    if with_grad_x:
        grad_x = rt.empty((g.N, g.C, g.H, g.W), np.float32)
        # writes grad_x: one thread per input element, gathering over the outputs that read it
        rt.function(KERNEL_FILE, "conv2d_backward_data")(
            (ceil_div(grad_x.size, THREADS_PER_BLOCK), 1, 1), (THREADS_PER_BLOCK, 1, 1),
            (grad_y, weight, grad_x, *geometry))

    partial = rt.empty((slices, w_count), np.float32)
    # writes partial: row s holds each weight element's sum over output positions of slice s
    rt.function(KERNEL_FILE, "conv2d_backward_weight_partial")(
        (ceil_div(w_count, THREADS_PER_BLOCK), slices, 1), (THREADS_PER_BLOCK, 1, 1),
        (grad_y, x, partial, *geometry, np.int32(slice_len)))
    grad_weight = rt.empty((g.OC, g.C, g.KH, g.KW), np.float32)
    # writes grad_weight: the slices of partial summed in slice order
    rt.function(KERNEL_FILE, "conv2d_reduce_partials")(
        (ceil_div(w_count, THREADS_PER_BLOCK), 1, 1), (THREADS_PER_BLOCK, 1, 1),
        (partial, grad_weight, np.int32(w_count), np.int32(slices)))

    grad_bias = None
    if with_bias:
        bias_partial = rt.empty((slices, g.OC), np.float32)
        # writes bias_partial: row s holds each channel's grad_y sum over the positions of slice s
        rt.function(KERNEL_FILE, "conv2d_backward_bias_partial")(
            (ceil_div(g.OC, THREADS_PER_BLOCK), slices, 1), (THREADS_PER_BLOCK, 1, 1),
            (grad_y, bias_partial, *map(np.int32, (g.N, g.OC, g.OH, g.OW, slice_len))))
        grad_bias = rt.empty((g.OC,), np.float32)
        # writes grad_bias: the slices of bias_partial summed in slice order
        rt.function(KERNEL_FILE, "conv2d_reduce_partials")(
            (ceil_div(g.OC, THREADS_PER_BLOCK), 1, 1), (THREADS_PER_BLOCK, 1, 1),
            (bias_partial, grad_bias, np.int32(g.OC), np.int32(slices)))
    return grad_x, grad_weight, grad_bias
