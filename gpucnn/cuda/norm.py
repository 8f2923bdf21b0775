"""Launchers for the batch-normalisation kernels in ``kernels/batchnorm.cu``.

Same signatures as gpucnn.ops.norm plus ``runtime`` (None: the process-wide CupyRuntime) and a fused
ReLU: ``relu=True`` on the forwards returns max(y, 0); ``y=`` on the backward (that forward's output)
takes grad_y as 0 where y <= 0, as relu_backward would. The code is the same for CuPy arrays on a GPU
and NumPy arrays under the emulator.

x is seen as (N, C, L), L the product of the sizes after C. The statistics and the gradient sums run
in two passes: a grid of (C, SLICES) blocks sums slices of each channel's images, then one thread per
channel adds its slices in order; no atomics, so every result is bitwise reproducible.
"""
from __future__ import annotations

import numpy as np

from gpucnn.cuda.runtime import active_runtime, ceil_div, check_int32_count, kernel_array, kernel_inout_array
from gpucnn.ops import norm as ops_norm

KERNEL_FILE = "batchnorm.cu"
THREADS = 256            # BN_THREADS in kernels/batchnorm.cu
TARGET_BLOCKS = 512      # blocks a statistics pass aims for (a few per SM of a large GPU)
MAX_SLICES = 32          # slices per channel; the finalize thread adds them in order
MAX_GRID_Y = 65535
PLANE_BLOCKS = 2048      # blocks of an element-wise pass (about two waves of a large GPU); threads loop past it
FINALIZE_THREADS = 128


def block_shape(L: int) -> tuple[int, int, int]:
    """(tx, ty, 1): tx the smallest power of two >= L (at most THREADS) walks a plane, ty = THREADS // tx planes."""
    tx = 1
    while tx < min(L, THREADS):
        tx *= 2
    return (tx, THREADS // tx, 1)


def plane_grid(planes: int, L: int) -> tuple[int, int, int]:
    """The grid of the element-wise kernels: x covers a plane's L values, y loops over the planes
    (each thread visits several planes once the grid has PLANE_BLOCKS blocks)."""
    tx, ty, _ = block_shape(L)
    across = ceil_div(L, tx)
    return (across, max(1, min(ceil_div(planes, ty), PLANE_BLOCKS // across, MAX_GRID_Y)), 1)


def stats_slices(N: int, C: int, L: int) -> int:
    """Slices of a channel's N images in the statistics passes: enough blocks, each with images to sum."""
    ty = block_shape(L)[1]
    return max(1, min(ceil_div(TARGET_BLOCKS, C), MAX_SLICES, ceil_div(N, ty)))


def _sizes(x):
    """(N, C, L) of x; N*C and L must fit the kernels' int sizes (their indexes are 64-bit)."""
    N, C = int(x.shape[0]), int(x.shape[1])
    L = int(x.size) // (N * C)
    check_int32_count("x's planes (N*C)", N * C)
    check_int32_count("each plane of x (the sizes after C)", L)
    return N, C, L


def _per_channel(rt, C, inout=(), **arrays):
    """The (C,) float32 arguments as kernel arrays (those named in ``inout`` updated in place, never copied)."""
    out = []
    for name, array in arrays.items():
        checked = (kernel_inout_array if name in inout else kernel_array)(rt, array, name, ndim=1)
        if checked.shape != (C,):
            raise ValueError(f"{name} must have shape ({C},), not {tuple(checked.shape)}.")
        out.append(checked)
    return out


def _relu_output(rt, y, x):
    """The fused ReLU's saved output as a kernel array and the kernels' relu flag (x stands in for None)."""
    if y is None:
        return x, np.int32(0)
    y = kernel_array(rt, y, "y")
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"y has shape {tuple(y.shape)} but x has {tuple(x.shape)}; they must match.")
    return y, np.int32(1)


def _channel_sums(rt, name, N, C, L, arrays, flags=()):
    """partial (C, slices, 2) from the partial-sum kernel ``name``; returns (partial, slices)."""
    slices = stats_slices(N, C, L)
    partial = rt.empty((C, slices, 2), np.float32)
    sizes = (np.int32(N), np.int32(C), np.int32(L), np.int32(slices))
    # writes partial: block (channel, slice) sums its images' values in a fixed order
    rt.function(KERNEL_FILE, name)((C, slices, 1), block_shape(L), (*arrays, partial, *sizes, *flags))
    return partial, slices


def batch_norm_forward(x, weight, bias, running_mean, running_var, momentum, eps, *, relu=False, runtime=None):
    """Training forward: x (N, C, ...) float32 -> (y, mean (C,), invstd (C,)); max(y, 0) when ``relu``.

    running_mean and running_var (C,) are updated in place on the device (so a captured step
    updates them on every replay); the running variance moves toward the unbiased batch variance.
    """
    ops_norm._check_train(x, weight, bias, running_mean, running_var, momentum, eps)
    rt = active_runtime(runtime)
    x = kernel_array(rt, x, "x")
    N, C, L = _sizes(x)
    weight, bias = _per_channel(rt, C, weight=weight, bias=bias)
    running_mean, running_var = _per_channel(rt, C, ("running_mean", "running_var"),
                                             running_mean=running_mean, running_var=running_var)
    partial, slices = _channel_sums(rt, "batch_norm_stats_partial", N, C, L, (x,))
    mean = rt.empty((C,), np.float32)
    invstd = rt.empty((C,), np.float32)
    # writes mean, invstd, running_mean, running_var: one thread per channel adds the slices in order
    rt.function(KERNEL_FILE, "batch_norm_stats_finalize")(
        (ceil_div(C, FINALIZE_THREADS), 1, 1), (FINALIZE_THREADS, 1, 1),
        (x, partial, mean, invstd, running_mean, running_var, np.int32(N), np.int32(C), np.int32(L),
         np.int32(slices), np.float32(momentum), np.float32(eps)))
    y = rt.empty(tuple(x.shape), np.float32)
    # writes y: (x - mean) * invstd * weight + bias per element, ReLU when asked
    rt.function(KERNEL_FILE, "batch_norm_forward_train")(
        plane_grid(N * C, L), block_shape(L),
        (x, mean, invstd, weight, bias, y, np.int32(N), np.int32(C), np.int32(L), np.int32(bool(relu))))
    return y, mean, invstd


def batch_norm_forward_eval(x, weight, bias, running_mean, running_var, eps, *, relu=False, runtime=None):
    """Evaluation forward: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias; max(y, 0) when ``relu``."""
    ops_norm._check_eval(x, weight, bias, running_mean, running_var, eps)
    rt = active_runtime(runtime)
    x = kernel_array(rt, x, "x")
    N, C, L = _sizes(x)
    per_channel = _per_channel(rt, C, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    weight, bias, running_mean, running_var = per_channel
    y = rt.empty(tuple(x.shape), np.float32)
    # writes y: one pass, the running statistics read once per plane
    rt.function(KERNEL_FILE, "batch_norm_forward_eval")(
        plane_grid(N * C, L), block_shape(L),
        (x, running_mean, running_var, weight, bias, y, np.int32(N), np.int32(C), np.int32(L), np.float32(eps),
         np.int32(bool(relu))))
    return y


def batch_norm_backward(grad_y, x, weight, mean, invstd, *, y=None, runtime=None):
    """Gradient of the training forward: -> (grad_x, grad_weight (C,), grad_bias (C,)).

    ``y``: the output of a ``relu=True`` forward; grad_y then counts only where y > 0.
    """
    ops_norm._check_backward(grad_y, x, weight, mean, invstd)
    rt = active_runtime(runtime)
    x = kernel_array(rt, x, "x")
    grad_y = kernel_array(rt, grad_y, "grad_y")
    N, C, L = _sizes(x)
    weight, mean, invstd = _per_channel(rt, C, weight=weight, mean=mean, invstd=invstd)
    y, relu = _relu_output(rt, y, x)
    partial, slices = _channel_sums(rt, "batch_norm_backward_partial", N, C, L, (grad_y, x, y, mean), (relu,))
    grad_weight = rt.empty((C,), np.float32)
    grad_bias = rt.empty((C,), np.float32)
    # writes grad_weight, grad_bias: one thread per channel adds the slices in order
    rt.function(KERNEL_FILE, "batch_norm_backward_finalize")(
        (ceil_div(C, FINALIZE_THREADS), 1, 1), (FINALIZE_THREADS, 1, 1),
        (partial, invstd, grad_weight, grad_bias, np.int32(C), np.int32(slices)))
    grad_x = rt.empty(tuple(x.shape), np.float32)
    # writes grad_x: one value per element from the channel's sums
    rt.function(KERNEL_FILE, "batch_norm_backward_data")(
        plane_grid(N * C, L), block_shape(L),
        (grad_y, x, y, mean, invstd, weight, grad_weight, grad_bias, grad_x, np.int32(N), np.int32(C),
         np.int32(L), relu))
    return grad_x, grad_weight, grad_bias
