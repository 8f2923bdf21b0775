"""Fast batch normalisation on NumPy arrays: the signatures and results of gpucnn.ops.norm.

The reference sums in float64 on an (N, C, L) view, which copies a CHWN-ordered activation
(what the fast convolution returns) and converts every value. Here the sums stay in x's
dtype on x's own memory: for channel-major memory (CHWN) each channel is one contiguous row
of M values, reduced by NumPy's pairwise sum; for NCHW the reductions run over axes (0, 2)
of an (N, C, L) view. Outputs keep x's memory order. Other layouts take the reference.
"""
from __future__ import annotations

import numpy as np

from gpucnn.cpu.threads import empty_in_order, memory_order
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


def batch_norm_forward(x, weight, bias, running_mean, running_var, momentum, eps):
    layout = _layout(x)
    if layout is None:
        return reference.batch_norm_forward_reference(x, weight, bias, running_mean, running_var, momentum, eps)
    order, view = layout
    dtype = x.dtype.type
    xv = view(x)
    M = x.size // x.shape[1]
    mean = xv.sum(axis=_reduce_axes(xv)) * dtype(1.0 / M)
    y = empty_in_order(x.shape, x.dtype, order)
    yv = view(y)
    np.subtract(xv, mean[:, None], out=yv)  # the deviations, in y's memory until scaled
    var = _dot_per_channel(yv, yv) * dtype(1.0 / M)
    invstd = (1 / np.sqrt(var + dtype(eps))).astype(x.dtype)
    yv *= (invstd * weight)[:, None]
    yv += bias[:, None]
    momentum = dtype(momentum)
    running_mean *= 1 - momentum
    running_mean += momentum * mean
    running_var *= 1 - momentum
    running_var += momentum * var * dtype(M / (M - 1))
    return y, mean, invstd


def batch_norm_forward_eval(x, weight, bias, running_mean, running_var, eps):
    layout = _layout(x)
    if layout is None:
        return reference.batch_norm_forward_eval_reference(x, weight, bias, running_mean, running_var, eps)
    order, view = layout
    invstd = (1.0 / np.sqrt(running_var.astype(np.float64) + eps)).astype(x.dtype)
    scale = invstd * weight
    y = empty_in_order(x.shape, x.dtype, order)
    yv = view(y)
    np.multiply(view(x), scale[:, None], out=yv)
    yv += (bias - running_mean * scale)[:, None]
    return y


def batch_norm_backward(grad_y, x, weight, mean, invstd):
    layout = _layout(x)
    if layout is None:
        return reference.batch_norm_backward_reference(grad_y, x, weight, mean, invstd)
    order, view = layout
    dtype = x.dtype.type
    M = x.size // x.shape[1]
    gv = view(_in_layout(grad_y, order))
    grad_x = empty_in_order(x.shape, x.dtype, order)
    xhat = view(grad_x)  # xhat first, turned into grad_x in place
    np.subtract(view(x), mean[:, None], out=xhat)
    xhat *= invstd[:, None]
    grad_bias = gv.sum(axis=_reduce_axes(gv))
    grad_weight = _dot_per_channel(gv, xhat)
    # grad_x = k * (M * grad_y - grad_bias - xhat * grad_weight), k = weight * invstd / M
    k = weight * invstd * dtype(1.0 / M)
    xhat *= (-k * grad_weight)[:, None]
    xhat += gv * (k * dtype(M))[:, None]
    xhat -= (k * grad_bias)[:, None]
    return grad_x, grad_weight, grad_bias
