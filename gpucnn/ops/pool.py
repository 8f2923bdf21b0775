"""2-D max and average pooling: the public dispatchers and the NumPy reference.

Max pooling keeps, for every output, the window-local index ``ky*KW + kx`` of its
maximum (int32 ``argmax``): the FIRST maximum wins ties, a NaN wins over numbers (the
first NaN), padding counts as -inf and is never chosen. Backward routes each output's
gradient to that one input pixel, adding where windows overlap. Average pooling
counts zero padding in the divisor, like PyTorch's default.

The NumPy reference loops over the KH*KW kernel offsets, each step on whole
(N, C, OH, OW) strided views; 2x2 stride-2 max pooling (LeNet's) has a faster path with
identical results. Max-pool backward scatters through flat indices instead.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gpucnn import dispatch
from gpucnn.ops import check_float_array
from gpucnn.utils import cached_when_hashable, conv_output_size, pair


PoolGeometry = NamedTuple("PoolGeometry", [(size, int) for size in "N C H W KH KW SH SW PH PW OH OW".split()])
PoolGeometry.__doc__ = "Every size of one pooling, in the shared shape vocabulary."



@cached_when_hashable
def pool2d_geometry(x_shape, kernel_size, stride=None, padding=0) -> PoolGeometry:
    """Validate pooling sizes for an input of shape x_shape (N, C, H, W) and return them all.

    stride None means kernel_size; padding must be at most half the kernel per axis.
    """
    shape = tuple(x_shape)
    if len(shape) != 4 or not all(isinstance(s, (int, np.integer)) for s in shape):
        raise ValueError(f"the input shape must be four ints (N, C, H, W), not {x_shape!r}.")
    if min(shape) < 1:
        raise ValueError(f"every input size must be positive, but the input shape is {shape}.")
    N, C, H, W = (int(s) for s in shape)
    KH, KW = pair(kernel_size, "kernel_size")
    SH, SW = (KH, KW) if stride is None else pair(stride, "stride")
    PH, PW = pair(padding, "padding")
    if min(KH, KW) < 1:
        raise ValueError(f"kernel_size must be positive, not {kernel_size!r}.")
    if min(SH, SW) < 1:
        raise ValueError(f"stride must be positive, not {stride!r}.")
    if min(PH, PW) < 0 or PH > KH // 2 or PW > KW // 2:
        raise ValueError(f"padding {padding!r} must be between 0 and half the kernel size {KH}x{KW}.")
    if KH > H + 2 * PH or KW > W + 2 * PW:
        raise ValueError(f"the pooling kernel {KH}x{KW} is larger than the padded input {H + 2 * PH}x{W + 2 * PW}.")
    OH = conv_output_size(H, KH, SH, PH)
    OW = conv_output_size(W, KW, SW, PW)
    return PoolGeometry(N, C, H, W, KH, KW, SH, SW, PH, PW, OH, OW)


def _check_grad_y(grad_y, g: PoolGeometry) -> None:
    check_float_array(grad_y, "grad_y", ndim=4)
    if tuple(grad_y.shape) != (g.N, g.C, g.OH, g.OW):
        raise ValueError(f"grad_y must have the pooled shape {(g.N, g.C, g.OH, g.OW)}, not {tuple(grad_y.shape)}.")


def max_pool2d_forward(x, kernel_size, stride=None, padding=0, relu=False):
    """Max pooling: x (N, C, H, W) -> y (N, C, OH, OW), argmax (N, C, OH, OW) int32.

    OH = (H + 2*PH - KH) // SH + 1 (OW likewise); stride None means kernel_size;
    padding (at most kernel//2) counts as -inf. argmax holds ky*KW + kx of the first
    maximum in each window; a NaN counts as the maximum (the first NaN). relu=True applies
    max(0, .) to y (in the pooling kernel on a kernel device; argmax unchanged).
    """
    if relu and dispatch.on_kernel_device(x):
        return dispatch.run("pool", "max_pool2d_forward", _check_forward, x, kernel_size, stride, padding, relu=True)
    y, argmax = dispatch.run("pool", "max_pool2d_forward", _check_forward, x, kernel_size, stride, padding)
    return (_relu(y) if relu else y), argmax


def max_pool2d(x, kernel_size, stride=None, padding=0, relu=False):
    """Max pooling without argmax: x (N, C, H, W) -> y (N, C, OH, OW), max_pool2d_forward's y.

    For forward passes that keep nothing for backward (``gpucnn.no_grad()``): finding each
    window's maximum is all the work there is. relu as in max_pool2d_forward.
    """
    if relu and dispatch.on_kernel_device(x):
        return dispatch.run("pool", "max_pool2d", _check_forward, x, kernel_size, stride, padding, relu=True)
    y = dispatch.run("pool", "max_pool2d", _check_forward, x, kernel_size, stride, padding)
    return _relu(y) if relu else y


def _relu(y):
    from gpucnn.ops.activation import relu_into  # noqa: PLC0415 - ops modules import each other lazily
    return relu_into(y)


def max_pool2d_backward(grad_y, argmax, x_shape, kernel_size, stride=None, padding=0):
    """Gradient of max pooling: grad_y, argmax (N, C, OH, OW) -> grad_x of shape x_shape (N, C, H, W).

    Each grad_y value goes to the input pixel its argmax names; overlapping windows add up.
    """
    return dispatch.run("pool", "max_pool2d_backward", _check_max_backward, grad_y, argmax, x_shape, kernel_size,
                        stride, padding)


def avg_pool2d_forward(x, kernel_size, stride=None, padding=0):
    """Average pooling: x (N, C, H, W) -> y (N, C, OH, OW), each the window sum / (KH*KW).

    Zero padding (at most kernel//2) is counted in the divisor, like PyTorch's default.
    """
    return dispatch.run("pool", "avg_pool2d_forward", _check_forward, x, kernel_size, stride, padding)


def avg_pool2d_backward(grad_y, x_shape, kernel_size, stride=None, padding=0):
    """Gradient of average pooling: grad_y (N, C, OH, OW) -> grad_x of shape x_shape (N, C, H, W)."""
    return dispatch.run("pool", "avg_pool2d_backward", _check_avg_backward, grad_y, x_shape, kernel_size, stride,
                        padding)


def global_avg_pool2d_forward(x):
    """Global average pooling: x (N, C, H, W) -> y (N, C, 1, 1), the mean of each channel's H*W values."""
    return dispatch.run("pool", "global_avg_pool2d_forward", _check_global_forward, x)


def global_avg_pool2d_backward(grad_y, x_shape):
    """Gradient of global average pooling: grad_y (N, C, 1, 1) -> grad_x of shape x_shape, grad_y / (H*W)."""
    return dispatch.run("pool", "global_avg_pool2d_backward", _check_global_backward, grad_y, x_shape)


def _check_global_forward(x) -> None:
    check_float_array(x, "x", ndim=4)


def _check_global_backward(grad_y, x_shape) -> None:
    shape = tuple(x_shape) if isinstance(x_shape, (tuple, list)) else None
    if shape is None or len(shape) != 4 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape):
        raise ValueError(f"x_shape must be four positive ints (N, C, H, W), not {x_shape!r}.")
    check_float_array(grad_y, "grad_y", ndim=4)
    if tuple(grad_y.shape) != (shape[0], shape[1], 1, 1):
        raise ValueError(f"grad_y must have shape {(shape[0], shape[1], 1, 1)} for x_shape {shape}, "
                         f"not {tuple(grad_y.shape)}.")


def _check_forward(x, kernel_size, stride=None, padding=0, relu=False) -> None:
    check_float_array(x, "x", ndim=4)
    pool2d_geometry(x.shape, kernel_size, stride, padding)


def _check_max_backward(grad_y, argmax, x_shape, kernel_size, stride=None, padding=0) -> None:
    _check_grad_y(grad_y, pool2d_geometry(x_shape, kernel_size, stride, padding))
    if getattr(argmax, "dtype", None) is None or argmax.dtype.kind not in "iu":
        raise TypeError(f"argmax must be an integer array, not {getattr(argmax, 'dtype', type(argmax).__name__)}.")
    if tuple(argmax.shape) != tuple(grad_y.shape):
        raise ValueError(f"argmax has shape {tuple(argmax.shape)} but grad_y has {tuple(grad_y.shape)}; they must match.")


def _check_avg_backward(grad_y, x_shape, kernel_size, stride=None, padding=0) -> None:
    _check_grad_y(grad_y, pool2d_geometry(x_shape, kernel_size, stride, padding))


def max_pool2d_forward_reference(x, kernel_size, stride=None, padding=0):
    """The NumPy reference of max_pool2d_forward (arguments already validated)."""
    g = pool2d_geometry(x.shape, kernel_size, stride, padding)
    if (g.KH, g.KW, g.SH, g.SW, g.PH, g.PW) == (2, 2, 2, 2, 0, 0):
        return _max_forward_2x2(x, g)
    return _max_forward_numpy(x, g)


def max_pool2d_reference(x, kernel_size, stride=None, padding=0):
    """The NumPy reference of max_pool2d: max_pool2d_forward_reference's y."""
    return max_pool2d_forward_reference(x, kernel_size, stride, padding)[0]


def max_pool2d_backward_reference(grad_y, argmax, x_shape, kernel_size, stride=None, padding=0):
    """The NumPy reference of max_pool2d_backward (arguments already validated)."""
    return _max_backward_numpy(grad_y, argmax, pool2d_geometry(x_shape, kernel_size, stride, padding))


def avg_pool2d_forward_reference(x, kernel_size, stride=None, padding=0):
    """The NumPy reference of avg_pool2d_forward (arguments already validated)."""
    return _avg_forward_numpy(x, pool2d_geometry(x.shape, kernel_size, stride, padding))


def avg_pool2d_backward_reference(grad_y, x_shape, kernel_size, stride=None, padding=0):
    """The NumPy reference of avg_pool2d_backward (arguments already validated)."""
    return _avg_backward_numpy(grad_y, pool2d_geometry(x_shape, kernel_size, stride, padding))


def global_avg_pool2d_forward_reference(x):
    """The NumPy reference of global_avg_pool2d_forward: float64 sums over H*W, cast to x's dtype."""
    N, C, H, W = x.shape
    sums = x.reshape(N, C, H * W).sum(axis=2, dtype=np.float64)
    return (sums * (1.0 / (H * W))).astype(x.dtype).reshape(N, C, 1, 1)


def global_avg_pool2d_backward_reference(grad_y, x_shape):
    """The NumPy reference of global_avg_pool2d_backward."""
    N, C, H, W = (int(s) for s in x_shape)
    share = grad_y * grad_y.dtype.type(1.0 / (H * W))
    return np.ascontiguousarray(np.broadcast_to(share, (N, C, H, W)))


# ---------------------------------------------------------------------------------------
# NumPy reference


def _window(padded, g: PoolGeometry, ky: int, kx: int):
    """The (N, C, OH, OW) view of a padded (N, C, HP, WP) array at kernel offset (ky, kx)."""
    return padded[:, :, ky: ky + g.SH * (g.OH - 1) + 1: g.SH, kx: kx + g.SW * (g.OW - 1) + 1: g.SW]


def _pad(x, g: PoolGeometry, fill):
    if g.PH == 0 and g.PW == 0:
        return x
    padded = np.full((g.N, g.C, g.H + 2 * g.PH, g.W + 2 * g.PW), fill, x.dtype)
    padded[:, :, g.PH: g.PH + g.H, g.PW: g.PW + g.W] = x
    return padded


def _crop(padded, g: PoolGeometry):
    if g.PH == 0 and g.PW == 0:
        return padded
    return np.ascontiguousarray(padded[:, :, g.PH: g.PH + g.H, g.PW: g.PW + g.W])


def _first_inside_offset(g: PoolGeometry):
    """(OH, OW) int32: ky*KW + kx of each window's first pixel inside the unpadded input."""
    first_ky = np.maximum(g.PH - g.SH * np.arange(g.OH), 0)
    first_kx = np.maximum(g.PW - g.SW * np.arange(g.OW), 0)
    return (first_ky[:, None] * g.KW + first_kx[None, :]).astype(np.int32)


def _max_forward_numpy(x, g: PoolGeometry):
    padded = _pad(x, g, -np.inf)
    # Start below every number at the first pixel inside the input, then take strictly
    # greater values (first maximum wins) and a NaN only over a non-NaN (first NaN wins).
    y = np.full((g.N, g.C, g.OH, g.OW), -np.inf, x.dtype)
    argmax = np.empty((g.N, g.C, g.OH, g.OW), np.int32)
    argmax[...] = _first_inside_offset(g)
    has_nan = bool(np.isnan(x).any())
    for ky in range(g.KH):
        for kx in range(g.KW):
            values = _window(padded, g, ky, kx)
            take = values > y
            if has_nan:
                take |= np.isnan(values) & ~np.isnan(y)
            # Branch-free updates (masked copies are slow on random masks): np.maximum equals
            # "values where take, else y", NaN included; argmax moves to k where take.
            np.maximum(y, values, out=y)
            argmax -= take * (argmax - np.int32(ky * g.KW + kx))
    return y, argmax


def _max_forward_2x2(x, g: PoolGeometry):
    """LeNet's 2x2 stride-2 unpadded pooling: a pairwise tournament, same results as the general loop."""
    top_left, top_right = _window(x, g, 0, 0), _window(x, g, 0, 1)
    bottom_left, bottom_right = _window(x, g, 1, 0), _window(x, g, 1, 1)
    top = np.maximum(top_left, top_right)  # np.maximum propagates NaN
    bottom = np.maximum(bottom_left, bottom_right)
    y = np.maximum(top, bottom)
    if np.isnan(y).any():  # comparisons below ignore NaN; the general loop handles it
        return _max_forward_numpy(x, g)
    # Strict comparisons keep the earlier candidate on ties: left before right, top before bottom.
    use_bottom = bottom > top
    right_wins = (use_bottom & (bottom_right > bottom_left)) | (~use_bottom & (top_right > top_left))
    argmax = np.add(right_wins, use_bottom * np.int32(2), dtype=np.int32)
    return y, argmax


def _max_backward_numpy(grad_y, argmax, g: PoolGeometry):
    HP, WP = g.H + 2 * g.PH, g.W + 2 * g.PW
    # Flat index, in the padded (N, C, HP, WP) gradient, of the pixel each output's maximum came from.
    ky, kx = np.divmod(argmax, g.KW)
    window_corner = (np.arange(g.OH) * g.SH)[:, None] * WP + (np.arange(g.OW) * g.SW)[None, :]  # (OH, OW)
    plane_start = (np.arange(g.N * g.C, dtype=np.int64) * (HP * WP)).reshape(g.N, g.C, 1, 1)
    source = (plane_start + window_corner + ky * WP + kx).reshape(-1)
    grad_padded = np.zeros(g.N * g.C * HP * WP, grad_y.dtype)
    if g.SH >= g.KH and g.SW >= g.KW:  # disjoint windows: every pixel is named at most once
        grad_padded[source] = grad_y.reshape(-1)
    else:  # overlapping windows: a pixel may be the maximum of several and must sum them
        np.add.at(grad_padded, source, grad_y.reshape(-1))
    return _crop(grad_padded.reshape(g.N, g.C, HP, WP), g)


def _avg_forward_numpy(x, g: PoolGeometry):
    padded = _pad(x, g, 0)
    y = np.zeros((g.N, g.C, g.OH, g.OW), x.dtype)
    for ky in range(g.KH):
        for kx in range(g.KW):
            np.add(y, _window(padded, g, ky, kx), out=y)
    y *= x.dtype.type(1.0 / (g.KH * g.KW))
    return y


def _avg_backward_numpy(grad_y, g: PoolGeometry):
    share = grad_y * grad_y.dtype.type(1.0 / (g.KH * g.KW))
    grad_padded = np.zeros((g.N, g.C, g.H + 2 * g.PH, g.W + 2 * g.PW), grad_y.dtype)
    for ky in range(g.KH):
        for kx in range(g.KW):
            target = _window(grad_padded, g, ky, kx)
            np.add(target, share, out=target)
    return _crop(grad_padded, g)
