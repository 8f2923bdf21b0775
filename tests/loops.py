"""Naive nested-loop references for convolution and pooling, used only by the tests.

Written for clarity, not speed: one output element at a time, straight from the
definitions, in float64. They share no code with gpucnn.ops, so they are an
independent oracle for both the NumPy ops and the CUDA kernels.
"""
import math

import numpy as np


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv2d_loops(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """y[n, oc, oh, ow] = bias[oc] + sum over c, ky, kx of weight[oc, c, ky, kx] * x at the tap (zero outside)."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n_batch, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n_batch, out_channels, out_h, out_w))
    for n in range(n_batch):
        for oc in range(out_channels):
            for oh in range(out_h):
                for ow in range(out_w):
                    total = 0.0 if bias is None else float(bias[oc])
                    for c in range(channels):
                        for ky in range(kh):
                            for kx in range(kw):
                                row = oh * sh - ph + ky * dh
                                col = ow * sw - pw + kx * dw
                                if 0 <= row < height and 0 <= col < width:
                                    total += float(weight[oc, c, ky, kx]) * float(x[n, c, row, col])
                    y[n, oc, oh, ow] = total
    return y


def _pool_windows(x_shape, kernel_size, stride, padding):
    """Yield (n, c, oh, ow, [(k, row, col) for the window's pixels inside the input, in ky, kx order])."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    n_batch, channels, height, width = x_shape
    out_h = (height + 2 * ph - kh) // sh + 1
    out_w = (width + 2 * pw - kw) // sw + 1
    for n in range(n_batch):
        for c in range(channels):
            for oh in range(out_h):
                for ow in range(out_w):
                    inside = []
                    for ky in range(kh):
                        for kx in range(kw):
                            row, col = oh * sh - ph + ky, ow * sw - pw + kx
                            if 0 <= row < height and 0 <= col < width:
                                inside.append((ky * kw + kx, row, col))
                    yield n, c, oh, ow, inside


def pooled_shape(x_shape, kernel_size, stride=None, padding=0):
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    return (x_shape[0], x_shape[1], (x_shape[2] + 2 * ph - kh) // sh + 1, (x_shape[3] + 2 * pw - kw) // sw + 1)


def max_pool2d_loops(x, kernel_size, stride=None, padding=0):
    """(y, argmax): the first maximum of each window's inside pixels; the first NaN beats any number."""
    y = np.zeros(pooled_shape(x.shape, kernel_size, stride, padding))
    argmax = np.zeros(y.shape, dtype=np.int64)
    for n, c, oh, ow, inside in _pool_windows(x.shape, kernel_size, stride, padding):
        best_k, best = inside[0][0], -math.inf
        for k, row, col in inside:
            value = float(x[n, c, row, col])
            if math.isnan(best):
                break
            if value > best or math.isnan(value):
                best_k, best = k, value
        y[n, c, oh, ow] = best
        argmax[n, c, oh, ow] = best_k
    return y, argmax


def max_pool2d_backward_loops(grad_y, argmax, x_shape, kernel_size, stride=None, padding=0):
    """Each grad_y element is added to the input pixel its argmax names."""
    grad_x = np.zeros(x_shape)
    for n, c, oh, ow, inside in _pool_windows(x_shape, kernel_size, stride, padding):
        for k, row, col in inside:
            if k == argmax[n, c, oh, ow]:
                grad_x[n, c, row, col] += float(grad_y[n, c, oh, ow])
    return grad_x


def avg_pool2d_loops(x, kernel_size, stride=None, padding=0):
    """Window sums of the inside pixels divided by KH*KW (padding counts as zeros in the divisor)."""
    kh, kw = _pair(kernel_size)
    y = np.zeros(pooled_shape(x.shape, kernel_size, stride, padding))
    for n, c, oh, ow, inside in _pool_windows(x.shape, kernel_size, stride, padding):
        y[n, c, oh, ow] = sum(float(x[n, c, row, col]) for _, row, col in inside) / (kh * kw)
    return y


def avg_pool2d_backward_loops(grad_y, x_shape, kernel_size, stride=None, padding=0):
    """Each grad_y element is spread as grad / (KH*KW) over its window's inside pixels."""
    kh, kw = _pair(kernel_size)
    grad_x = np.zeros(x_shape)
    for n, c, oh, ow, inside in _pool_windows(x_shape, kernel_size, stride, padding):
        for _, row, col in inside:
            grad_x[n, c, row, col] += float(grad_y[n, c, oh, ow]) / (kh * kw)
    return grad_x
