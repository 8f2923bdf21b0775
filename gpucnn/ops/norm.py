"""Batch normalisation: the public dispatchers and the NumPy reference.

x is (N, C), (N, C, L) or (N, C, H, W); the statistics are per channel (axis 1) over the
other M = N * L values (L the product of the sizes after C). Training normalises with the
batch's biased variance and moves the running statistics toward the batch's, the running
variance toward the unbiased one (as PyTorch does); evaluation normalises with the running
statistics. Per-channel arrays are (C,) and share x's dtype and device.

The reference views x as (N, C, L), sums over axes (0, 2) in float64 (two passes: the mean,
then the squared deviations) and casts the results to x's dtype.
"""
from __future__ import annotations

import numpy as np

from gpucnn import dispatch
from gpucnn.ops import check_float_array, check_same_kind
from gpucnn.ops.activation import relu_backward_reference, relu_forward_reference


def _check_x(x) -> None:
    check_float_array(x, "x")
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"x must have shape (N, C), (N, C, L) or (N, C, H, W), not {tuple(x.shape)}.")


def _check_channels(x, **per_channel) -> None:
    C = x.shape[1]
    for name, array in per_channel.items():
        check_float_array(array, name, ndim=1)
        check_same_kind(x, "x", **{name: array})
        if array.shape[0] != C:
            raise ValueError(f"{name} must have shape ({C},) for x of shape {tuple(x.shape)}, "
                             f"not {tuple(array.shape)}.")


def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, not {eps!r}.")


def _check_train(x, weight, bias, running_mean, running_var, momentum, eps) -> None:
    _check_x(x)
    _check_channels(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)) \
            or not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1], not {momentum!r}.")
    _check_eps(eps)
    if x.size // x.shape[1] < 2:
        raise ValueError(f"batch normalisation in training needs more than one value per channel, but x has "
                         f"shape {tuple(x.shape)}; use a larger batch or eval().")


def _check_eval(x, weight, bias, running_mean, running_var, eps) -> None:
    _check_x(x)
    _check_channels(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    _check_eps(eps)


def _check_relu(relu) -> None:
    if not isinstance(relu, (bool, np.bool_)):
        raise TypeError(f"relu must be True or False, not {relu!r}.")


def _check_train_relu(x, weight, bias, running_mean, running_var, momentum, eps, relu=False) -> None:
    _check_train(x, weight, bias, running_mean, running_var, momentum, eps)
    _check_relu(relu)


def _check_eval_relu(x, weight, bias, running_mean, running_var, eps, relu=False) -> None:
    _check_eval(x, weight, bias, running_mean, running_var, eps)
    _check_relu(relu)


def _check_backward(grad_y, x, weight, mean, invstd, y=None) -> None:
    _check_x(x)
    for name, array in (("grad_y", grad_y), ("y", y)):
        if array is None and name == "y":
            continue
        check_float_array(array, name)
        check_same_kind(x, "x", **{name: array})
        if tuple(array.shape) != tuple(x.shape):
            raise ValueError(f"{name} has shape {tuple(array.shape)} but x has {tuple(x.shape)}; they must match.")
    _check_channels(x, weight=weight, mean=mean, invstd=invstd)


def batch_norm_forward(x, weight, bias, running_mean, running_var, momentum, eps, relu=False):
    """Training forward: x -> (y, mean, invstd); updates running_mean and running_var IN PLACE.

    x (N, C, ...); weight, bias, running_mean, running_var (C,); momentum in [0, 1]; eps > 0.
    mean and the biased var are over the M = x.size / C values of each channel, invstd =
    1 / sqrt(var + eps), y = (x - mean) * invstd * weight + bias, then max(y, 0) when ``relu``
    (a following ReLU fused). Then running_mean moves by momentum toward mean, running_var
    toward var * M / (M - 1). M must be at least 2.
    """
    return dispatch.run("norm", "batch_norm_forward", _check_train_relu, x, weight, bias, running_mean, running_var,
                        momentum, eps, relu=relu)


def batch_norm_forward_eval(x, weight, bias, running_mean, running_var, eps, relu=False):
    """Evaluation forward: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, then max(y, 0) when
    ``relu``; nothing updated."""
    return dispatch.run("norm", "batch_norm_forward_eval", _check_eval_relu, x, weight, bias, running_mean,
                        running_var, eps, relu=relu)


def batch_norm_backward(grad_y, x, weight, mean, invstd, y=None):
    """Gradient of the training forward: -> (grad_x, grad_weight, grad_bias).

    grad_y and x (N, C, ...); weight, and mean and invstd as batch_norm_forward returned, (C,).
    ``y``: the output of a ``relu=True`` forward, whose ReLU's backward is fused here (grad_y
    counts only where y > 0, as relu_backward). With g that grad_y and xhat = (x - mean) * invstd:
    grad_bias = sum(g), grad_weight = sum(g * xhat) per channel, grad_x = weight * invstd / M *
    (M * g - grad_bias - xhat * grad_weight).
    """
    return dispatch.run("norm", "batch_norm_backward", _check_backward, grad_y, x, weight, mean, invstd, y=y)


# ---------------------------------------------------------------------------------------
# NumPy reference (arguments already validated)


def _as_ncl(x):
    """x as an (N, C, L) view or copy."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def _per_channel(values):
    """(C, 1) broadcastable against (N, C, L)."""
    return values.reshape(-1, 1)


def _statistics(x3):
    """(mean, biased var) per channel of an (N, C, L) array, both float64 (C,)."""
    M = x3.shape[0] * x3.shape[2]
    mean = x3.sum(axis=(0, 2), dtype=np.float64) / M
    deviation = x3 - _per_channel(mean)
    var = np.einsum("ncl,ncl->c", deviation, deviation) / M
    return mean, var


def batch_norm_forward_reference(x, weight, bias, running_mean, running_var, momentum, eps, relu=False):
    x3 = _as_ncl(x)
    M = x3.shape[0] * x3.shape[2]
    mean64, var64 = _statistics(x3)
    dtype = x.dtype
    mean = mean64.astype(dtype)
    invstd = (1.0 / np.sqrt(var64 + eps)).astype(dtype)
    scale = _per_channel(invstd * weight)
    y = (x3 - _per_channel(mean)) * scale + _per_channel(bias)
    momentum = dtype.type(momentum)
    running_mean *= 1 - momentum
    running_mean += momentum * mean
    running_var *= 1 - momentum
    running_var += momentum * (var64 * (M / (M - 1))).astype(dtype)
    if relu:
        y = relu_forward_reference(y)
    return y.reshape(x.shape), mean, invstd


def batch_norm_forward_eval_reference(x, weight, bias, running_mean, running_var, eps, relu=False):
    x3 = _as_ncl(x)
    invstd = (1.0 / np.sqrt(running_var.astype(np.float64) + eps)).astype(x.dtype)
    y = (x3 - _per_channel(running_mean)) * _per_channel(invstd * weight) + _per_channel(bias)
    if relu:
        y = relu_forward_reference(y)
    return y.reshape(x.shape)


def batch_norm_backward_reference(grad_y, x, weight, mean, invstd, y=None):
    if y is not None:
        grad_y = relu_backward_reference(grad_y, y)
    x3, g3 = _as_ncl(x), _as_ncl(grad_y)
    M = x3.shape[0] * x3.shape[2]
    xhat = (x3 - _per_channel(mean)) * _per_channel(invstd)
    grad_bias = g3.sum(axis=(0, 2), dtype=np.float64).astype(x.dtype)
    grad_weight = np.einsum("ncl,ncl->c", g3, xhat, dtype=np.float64).astype(x.dtype)
    grad_x = (g3 * x.dtype.type(M) - _per_channel(grad_bias) - xhat * _per_channel(grad_weight)) \
        * _per_channel(weight * invstd * x.dtype.type(1.0 / M))
    return grad_x.reshape(x.shape), grad_weight, grad_bias

