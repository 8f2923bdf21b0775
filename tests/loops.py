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


def conv2d_taps(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """conv2d_loops, one kernel tap (c, ky, kx) at a time over the whole batch: the same sums, fast enough
    for the float32 cases every backend runs. float64."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n_batch, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = np.zeros((n_batch, channels, height + 2 * ph, width + 2 * pw))
    padded[:, :, ph:ph + height, pw:pw + width] = x
    y = np.zeros((n_batch, out_channels, out_h, out_w))
    for c in range(channels):
        for ky in range(kh):
            for kx in range(kw):
                tap = padded[:, c, ky * dh:ky * dh + sh * (out_h - 1) + 1:sh, kx * dw:kx * dw + sw * (out_w - 1) + 1:sw]
                y += weight[None, :, c, ky, kx, None, None].astype(np.float64) * tap[:, None]
    if bias is not None:
        y += np.asarray(bias, np.float64)[None, :, None, None]
    return y


def conv2d_backward_taps(grad_y, x, weight, stride=1, padding=0, dilation=1):
    """(grad_x, grad_weight, grad_bias) of conv2d_taps: each tap's share, added tap by tap. float64."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n_batch, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    _, _, out_h, out_w = grad_y.shape
    grad_y = np.asarray(grad_y, np.float64)
    padded = np.zeros((n_batch, channels, height + 2 * ph, width + 2 * pw))
    padded[:, :, ph:ph + height, pw:pw + width] = x
    grad_padded = np.zeros_like(padded)
    grad_weight = np.zeros(weight.shape)
    for c in range(channels):
        for ky in range(kh):
            for kx in range(kw):
                rows = slice(ky * dh, ky * dh + sh * (out_h - 1) + 1, sh)
                cols = slice(kx * dw, kx * dw + sw * (out_w - 1) + 1, sw)
                grad_weight[:, c, ky, kx] = (grad_y * padded[:, c, rows, cols][:, None]).sum(axis=(0, 2, 3))
                grad_padded[:, c, rows, cols] += (grad_y * weight[None, :, c, ky, kx, None, None]).sum(axis=1)
    return grad_padded[:, :, ph:ph + height, pw:pw + width], grad_weight, grad_y.sum(axis=(0, 2, 3))


def linear_loops(x, weight, bias=None):
    """y[n, o] = bias[o] + sum over i of x[n, i] * weight[o, i], in float64 (matrix products of float64)."""
    y = np.asarray(x, np.float64) @ np.asarray(weight, np.float64).T
    return y if bias is None else y + bias


def linear_backward_loops(grad_y, x, weight):
    grad_y = np.asarray(grad_y, np.float64)
    return grad_y @ weight, grad_y.T @ np.asarray(x, np.float64), grad_y.sum(axis=0)


def softmax_cross_entropy_loops(logits, labels):
    """(mean loss, probs) row by row, stable: log-sum-exp after subtracting the row maximum. float64."""
    probs = np.zeros(logits.shape)
    total = 0.0
    for n, row in enumerate(np.asarray(logits, np.float64)):
        top = row.max()
        exps = [math.exp(v - top) for v in row]
        denominator = sum(exps)
        probs[n] = [e / denominator for e in exps]
        total += math.log(denominator) + top - row[labels[n]]
    return total / len(labels), probs


def softmax_cross_entropy_backward_loops(probs, labels):
    """(probs - one_hot(labels)) / N. float64."""
    grad = np.array(probs, np.float64)
    for n, label in enumerate(labels):
        grad[n, label] -= 1.0
    return grad / len(labels)


def relu_loops(x):
    """max(x, 0) element by element; NaN stays NaN."""
    return np.array([v if (v > 0 or math.isnan(v)) else 0.0 for v in np.asarray(x).reshape(-1)],
                    np.asarray(x).dtype).reshape(np.shape(x))


def relu_backward_loops(grad_y, y):
    """grad_y where y > 0, else 0 (the kink at 0 and NaN outputs pass no gradient)."""
    return np.array([g if v > 0 else 0.0 for g, v in zip(np.asarray(grad_y).reshape(-1), np.asarray(y).reshape(-1))],
                    np.asarray(grad_y).dtype).reshape(np.shape(grad_y))


def batch_norm_loops(x, weight, bias, running_mean, running_var, momentum, eps):
    """Training batch norm one channel at a time from the definition, float64:
    (y, mean, invstd, new running_mean, new running_var); the running variance moves toward the
    unbiased variance (divisor M - 1), the normalisation uses the biased one (divisor M)."""
    x = np.asarray(x, np.float64)
    channels = x.shape[1]
    y = np.empty_like(x)
    mean, invstd = np.empty(channels), np.empty(channels)
    new_mean, new_var = np.empty(channels), np.empty(channels)
    for c in range(channels):
        values = [float(v) for v in x[:, c].reshape(-1)]
        m = len(values)
        mu = sum(values) / m
        squares = sum((v - mu) ** 2 for v in values)
        mean[c], invstd[c] = mu, 1.0 / math.sqrt(squares / m + eps)
        y[:, c] = (x[:, c] - mu) * invstd[c] * float(weight[c]) + float(bias[c])
        new_mean[c] = (1 - momentum) * float(running_mean[c]) + momentum * mu
        new_var[c] = (1 - momentum) * float(running_var[c]) + momentum * squares / (m - 1)
    return y, mean, invstd, new_mean, new_var


def batch_norm_eval_loops(x, weight, bias, running_mean, running_var, eps):
    """Evaluation batch norm element by element, float64."""
    x = np.asarray(x, np.float64)
    y = np.empty_like(x)
    for index in np.ndindex(*x.shape):
        c = index[1]
        y[index] = ((x[index] - float(running_mean[c])) / math.sqrt(float(running_var[c]) + eps)
                    * float(weight[c]) + float(bias[c]))
    return y


def global_avg_pool2d_loops(x):
    """(N, C, 1, 1): the mean of each (n, c) plane, float64."""
    n_batch, channels = x.shape[:2]
    y = np.zeros((n_batch, channels, 1, 1))
    for n in range(n_batch):
        for c in range(channels):
            y[n, c, 0, 0] = sum(float(v) for v in x[n, c].reshape(-1)) / x[n, c].size
    return y
