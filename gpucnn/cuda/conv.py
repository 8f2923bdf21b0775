"""Launchers for the convolution kernels in ``kernels/conv2d.cu``.

Same signatures as gpucnn.ops.conv plus ``runtime`` (None: the process-wide CupyRuntime). The
code is the same for CuPy arrays on a GPU and NumPy arrays under the emulator.
"""
from __future__ import annotations

import numpy as np

from gpucnn.cuda import gemm
from gpucnn.cuda.runtime import (ceil_div, check_int32_count, check_int32_extent, active_runtime, kernel_array,
                                  output_array)
from gpucnn.ops.conv import conv2d_geometry

KERNEL_FILE = "conv2d.cu"
OC_PER_THREAD = 8               # OCB in kernels/conv2d.cu
SHARED_LIMIT_BYTES = 48 * 1024  # the default dynamic shared memory a block may ask for
THREADS_PER_BLOCK = 256         # the tiled kernel's largest block
MAX_GRID_YZ = 65535
# Below this many output channels the forward pass takes conv2d_forward_tiled, and below this many
# input channels the data gradient takes conv2d_small_backward_data: a GEMM tile of 64 channels
# would be mostly empty rows (LeNet-5's 6 and 16).
SMALL_OC = 32
# The weight gradient of an output of at most SMALL_TILES 8 x 8 thread tiles takes
# conv2d_small_backward_weight (SMALL_TILES, SMALL_THREADS as #defined in conv2d.cu).
SMALL_TILES = 64
SMALL_THREADS = 256
SMALL_MIN_POSITIONS = 16    # positions per thread per slice, at least


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
    Few output channels (< SMALL_OC) take the direct tiled kernel, everything else the implicit GEMM.
    """
    rt = active_runtime(runtime)
    x = kernel_array(rt, x, "x", ndim=4)
    weight = kernel_array(rt, weight, "weight", ndim=4)
    if bias is not None:
        bias = kernel_array(rt, bias, "bias", ndim=1)
    g = _geometry(x, weight, bias, stride, padding, dilation)
    y = rt.empty((g.N, g.OC, g.OH, g.OW), np.float32)
    tiled = _forward_block(g.OH, g.OW, g.KH, g.KW, g.SH, g.SW, g.DH, g.DW) if g.OC < SMALL_OC else None
    if tiled is not None:
        if bias is None:
            bias = rt.zeros((g.OC,), np.float32)
        bx, by, shared = tiled
        jobs = g.N * ceil_div(g.OC, OC_PER_THREAD)
        grid = (ceil_div(g.OW, bx), ceil_div(g.OH, by), min(jobs, MAX_GRID_YZ))
        # writes y: one block per output tile x (image, channel group), tile and filters in shared memory
        rt.function(KERNEL_FILE, "conv2d_forward_tiled")(
            grid, (bx, by, 1), (x, weight, bias, y, *_int32_args(g), np.int32(1 if relu else 0)), shared_mem=shared)
        return y
    plan = gemm.plan(g.OC, g.N * g.OH * g.OW, g.C * g.KH * g.KW, split=False)
    # writes y: one block per tile of (output channels) x (output positions), bias and ReLU in the epilogue
    rt.function(gemm.KERNEL_FILE, "conv2d_gemm_forward")(
        plan.grid, plan.block, (x, weight, weight if bias is None else bias, y, *_int32_args(g),
                                np.int32(0 if bias is None else 1), np.int32(1 if relu else 0)),
        shared_mem=plan.shared_bytes)
    return y


def conv2d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, with_bias=True, with_grad_x=True,
                    input_relu=False, grad_weight_out=None, grad_bias_out=None, *, runtime=None):
    """Gradients of conv2d_forward (without ReLU) with respect to x, weight and bias.

    grad_y (N, OC, OH, OW), x (N, C, H, W), weight (OC, C, KH, KW) ->
    (grad_x (N, C, H, W) or None when with_grad_x is False (no launch), grad_weight (OC, C, KH, KW),
    grad_bias (OC,) or None when with_bias is False). Both are implicit GEMMs on the core of
    kernels/gemm.cu; the bias gradient is one more column of the weight gradient's product.
    input_relu: x is a ReLU's output; grad_x is zeroed where x is not > 0 (that ReLU's backward, in
    the data gradient's epilogue). grad_weight_out / grad_bias_out: where to write those gradients
    (C-contiguous float32 arrays of their shapes: a flat gradient buffer's views) instead of new arrays.
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
    grad_weight = output_array(rt, grad_weight_out, (g.OC, g.C, g.KH, g.KW), "grad_weight_out")
    grad_bias = output_array(rt, grad_bias_out, (g.OC,), "grad_bias_out") if with_bias else None
    grad_x = None
    if with_grad_x:
        grad_x = rt.empty((g.N, g.C, g.H, g.W), np.float32)
        args = (grad_y, weight, grad_x, *_int32_args(g), x, np.int32(1 if input_relu else 0))
        filters_bytes = 4 * 8 * g.OC * g.KH * g.KW
        if g.C < SMALL_OC and filters_bytes <= SHARED_LIMIT_BYTES:
            # writes grad_x: one thread per input position and group of 8 channels, filters in shared memory
            rt.function(KERNEL_FILE, "conv2d_small_backward_data")(
                (ceil_div(g.N * g.H * g.W, SMALL_THREADS), 1, ceil_div(g.C, 8)), (SMALL_THREADS, 1, 1), args,
                shared_mem=filters_bytes)
        else:
            plan = gemm.plan(g.C, g.N * g.H * g.W, g.OC * g.KH * g.KW, split=False)
            # writes grad_x: one block per tile of (input channels) x (input positions)
            rt.function(gemm.KERNEL_FILE, "conv2d_gemm_backward_data")(plan.grid, plan.block, args,
                                                                     shared_mem=plan.shared_bytes)
    _weight_gradient(rt, g, grad_y, x, grad_weight, grad_bias)
    return grad_x, grad_weight, grad_bias


def small_weight_plan(oc: int, cols: int, positions: int):
    """(slices, depth_slice) for conv2d_small_backward_weight, or None when the output is not small.

    Small: at most SMALL_TILES thread tiles of 8 x 8. Each of the block's position groups gets at
    least SMALL_MIN_POSITIONS positions per slice; at most MAX_SLICES slices.
    """
    tiles = ceil_div(oc, 8) * ceil_div(cols, 8)
    if tiles > SMALL_TILES:
        return None
    groups = SMALL_THREADS // tiles
    slices = max(1, min(gemm.MAX_SLICES, positions // (groups * SMALL_MIN_POSITIONS)))
    depth_slice = ceil_div(positions, slices)
    return ceil_div(positions, depth_slice), depth_slice


def _weight_gradient(rt, g, grad_y, x, grad_weight, grad_bias):
    """grad_weight (and grad_bias, when not None) in one pass, split over positions when the plan says.

    A small output (LeNet-5's) takes conv2d_small_backward_weight, every other the implicit GEMM.
    """
    filter_size = g.C * g.KH * g.KW
    cols = filter_size + (1 if grad_bias is not None else 0)
    positions = g.N * g.OH * g.OW
    has_bias = np.int32(1 if grad_bias is not None else 0)
    bias_out = grad_bias if grad_bias is not None else grad_weight  # never written without the bias column
    small = small_weight_plan(g.OC, cols, positions)
    if small is not None:
        plan = gemm.GemmPlan(0, small[0], small[1], (1, 1, small[0]), (SMALL_THREADS, 1, 1), 0)
        kernel = rt.function(KERNEL_FILE, "conv2d_small_backward_weight")
    else:
        plan = gemm.plan(g.OC, cols, positions)
        kernel = rt.function(gemm.KERNEL_FILE, "conv2d_gemm_backward_weight")
    if plan.slices == 1:
        # writes grad_weight and grad_bias: one block per tile of (output channels) x (filter taps + ones)
        kernel(plan.grid, plan.block, (grad_y, x, grad_weight, bias_out, *_int32_args(g), np.int32(plan.depth_slice),
                                       has_bias), shared_mem=plan.shared_bytes)
        return
    partial = rt.empty((plan.slices, g.OC, cols), np.float32)
    # writes partial: slice z sums the output positions of depth slice z
    kernel(plan.grid, plan.block, (grad_y, x, partial, bias_out, *_int32_args(g), np.int32(plan.depth_slice),
                                   has_bias), shared_mem=plan.shared_bytes)
    gemm.reduce_slices(rt, partial, grad_weight, grad_bias, g.OC, cols, filter_size)
