"""Fast batch normalisation on NumPy arrays: the signatures and results of gpucnn.ops.norm.

The reference sums in float64 on an (N, C, L) view, which copies a CHWN-ordered activation
(what the fast convolution returns) and converts every value. Here the sums stay in x's
dtype on x's own memory: for channel-major memory (CHWN) each channel is one contiguous row
of M values, reduced by NumPy's pairwise sum; for NCHW the reductions run over axes (0, 2)
of an (N, C, L) view. Outputs keep x's memory order. Other layouts take the reference.
The channels are cut into chunks, fixed by the shape (so results do not depend on the thread
count), which the threads share: each channel's sums stay within one chunk. A fused ReLU
(``relu=True`` forward, ``y=`` backward) costs no array of its own.
"""
from __future__ import annotations

import numpy as np

from gpucnn.cpu.activation import relu_inplace
from gpucnn.cpu.threads import empty_in_order, even_ranges, memory_order, run_chunks, scratch
from gpucnn.ops import norm as reference


def _layout(x):
    """(order, view function) for x's memory, or None when no fast layout fits.

    The view function maps an array of x's shape and memory order to a view whose per-channel
    values broadcast against (C, 1): (C, M) for channel-major memory, (N, C, L) for NCHW.
    """
    if x.flags.c_contiguous:
        return list(range(x.ndim)), lambda a: a.reshape(a.shape[0], a.shape[1], -1)
    order = memory_order(x)
    if order[0] == 1 and x.transpose(order).flags.c_contiguous:
        return order, lambda a: a.transpose(order).reshape(a.shape[1], -1)
    return None


# Chunks of channels an op is cut into (fewer when there are fewer channels). Two threads, CHWN input at
# batch 128 (ResNet-20's 16x28x28, 32x14x14, 64x7x7), training forward + backward with the ReLU fused:
# 1 chunk 5.9 / 3.1 / 1.5 ms, 2 chunks 3.5 / 1.9 / 1.4, 4 chunks 3.6 / 2.2 / 1.8 (each hand-over costs).
CHANNEL_CHUNKS = 2
# Passes over x each op makes (how much work a chunk is, for run_chunks).
PASSES = 6


def _rows(view, c0: int, c1: int):
    """The channels [c0, c1) of a view made by a layout's view function."""
    return view[c0:c1] if view.ndim == 2 else view[:, c0:c1]


def _reduce_axes(view) -> tuple:
    return (1,) if view.ndim == 2 else (0, 2)


def _dot_per_channel(a, b):
    """sum over each channel of a * b, for two views made by the same view function."""
    return np.einsum("cm,cm->c" if a.ndim == 2 else "ncl,ncl->c", a, b)


def _in_layout(array, order):
    """array itself when its memory follows ``order`` contiguously, else a copy that does."""
    if array.transpose(order).flags.c_contiguous:
        return array
    copy = empty_in_order(array.shape, array.dtype, order)
    copy[...] = array
    return copy


def batch_norm_forward(x, weight, bias, running_mean, running_var, momentum, eps, relu=False):
    layout = _layout(x)
    if layout is None:
        return reference.batch_norm_forward_reference(x, weight, bias, running_mean, running_var, momentum, eps,
                                                      relu)
    order, view = layout
    dtype = x.dtype.type
    C = x.shape[1]
    M = x.size // C
    xv = view(x)
    y = empty_in_order(x.shape, x.dtype, order)
    yv = view(y)
    mean, var, invstd = (np.empty(C, x.dtype) for _ in range(3))
    ranges = even_ranges(C, CHANNEL_CHUNKS)

    def work(i):
        c0, c1 = ranges[i]
        xs, ys = _rows(xv, c0, c1), _rows(yv, c0, c1)
        mean[c0:c1] = xs.sum(axis=_reduce_axes(xs)) * dtype(1.0 / M)
        np.subtract(xs, mean[c0:c1, None], out=ys)  # the deviations, in y's memory until scaled
        var[c0:c1] = _dot_per_channel(ys, ys) * dtype(1.0 / M)
        invstd[c0:c1] = 1 / np.sqrt(var[c0:c1] + dtype(eps))
        ys *= (invstd[c0:c1] * weight[c0:c1])[:, None]
        ys += bias[c0:c1, None]
        if relu:
            relu_inplace(ys)

    run_chunks(work, len(ranges), PASSES * x.size / len(ranges))
    momentum = dtype(momentum)
    running_mean *= 1 - momentum
    running_mean += momentum * mean
    running_var *= 1 - momentum
    running_var += momentum * var * dtype(M / (M - 1))
    return y, mean, invstd


def batch_norm_forward_eval(x, weight, bias, running_mean, running_var, eps, relu=False):
    layout = _layout(x)
    if layout is None:
        return reference.batch_norm_forward_eval_reference(x, weight, bias, running_mean, running_var, eps, relu)
    order, view = layout
    invstd = (1.0 / np.sqrt(running_var.astype(np.float64) + eps)).astype(x.dtype)
    scale = invstd * weight
    shift = bias - running_mean * scale
    xv = view(x)
    y = empty_in_order(x.shape, x.dtype, order)
    yv = view(y)
    ranges = even_ranges(x.shape[1], CHANNEL_CHUNKS)

    def work(i):
        c0, c1 = ranges[i]
        ys = _rows(yv, c0, c1)
        np.multiply(_rows(xv, c0, c1), scale[c0:c1, None], out=ys)
        ys += shift[c0:c1, None]
        if relu:
            relu_inplace(ys)

    run_chunks(work, len(ranges), 3 * x.size / len(ranges))
    return y


def batch_norm_backward(grad_y, x, weight, mean, invstd, y=None):
    layout = _layout(x)
    if layout is None:
        return reference.batch_norm_backward_reference(grad_y, x, weight, mean, invstd, y)
    order, view = layout
    dtype = x.dtype.type
    C = x.shape[1]
    M = x.size // C
    xv, gv = view(x), view(_in_layout(grad_y, order))
    yv = None if y is None else view(_in_layout(y, order))
    grad_x = empty_in_order(x.shape, x.dtype, order)
    gxv = view(grad_x)
    grad_weight, grad_bias = np.empty(C, x.dtype), np.empty(C, x.dtype)
    # grad_x = k * (M * g - grad_bias - xhat * grad_weight), k = weight * invstd / M
    k = weight * invstd * dtype(1.0 / M)
    ranges = even_ranges(C, CHANNEL_CHUNKS)

    def work(i):
        c0, c1 = ranges[i]
        g, out = _rows(gv, c0, c1), _rows(gxv, c0, c1)
        if yv is not None:  # the fused ReLU's backward: g where y > 0, else 0, in grad_x's memory
            np.multiply(g, _rows(yv, c0, c1) > 0, out=out)
            g = out
        xhat = scratch("batch_norm_xhat", out.shape, x.dtype)
        np.subtract(_rows(xv, c0, c1), mean[c0:c1, None], out=xhat)
        xhat *= invstd[c0:c1, None]
        grad_bias[c0:c1] = g.sum(axis=_reduce_axes(g))
        grad_weight[c0:c1] = _dot_per_channel(g, xhat)
        xhat *= (-k[c0:c1] * grad_weight[c0:c1])[:, None]
        np.multiply(g, (k[c0:c1] * dtype(M))[:, None], out=out)
        out += xhat
        out -= (k[c0:c1] * grad_bias[c0:c1])[:, None]

    run_chunks(work, len(ranges), PASSES * x.size / len(ranges))
    return grad_x, grad_weight, grad_bias
