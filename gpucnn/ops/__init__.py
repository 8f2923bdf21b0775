"""The ops: forward and backward functions on arrays of any device (NCHW, float32; float64 for checks on the CPU).

Each op family lives in its own module (conv, pool, activation, linear, loss, tensor, norm):
the public functions, which gpucnn.dispatch sends to the implementation for the device
of their arrays, and the NumPy reference (``<name>_reference``). The checks below are
shared by all of them; they are defined before the submodules are imported because
every submodule imports them from here.
"""
from __future__ import annotations

import numpy as np

from gpucnn import backend

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_float_array(array, name: str, ndim: int | None = None, nonempty: bool = True) -> None:
    """Refuse anything but a float32/float64 NumPy or CuPy array of the given ndim.

    TypeError for a non-array or another dtype (ints, float16); ValueError for a wrong
    ndim or, when ``nonempty``, a zero-length dimension.
    """
    dtype = getattr(array, "dtype", None)
    if dtype is None or not hasattr(array, "shape"):
        raise TypeError(f"{name} must be a NumPy or CuPy array, not {type(array).__name__}.")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array, not {dtype}.")
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, but has shape {tuple(array.shape)}.")
    if nonempty and 0 in array.shape:
        raise ValueError(f"{name} has a zero-length dimension (shape {tuple(array.shape)}); sizes must be positive.")


def check_same_kind(reference, reference_name: str, **others) -> None:
    """Every array in ``others`` (None skipped) must share the reference's dtype and device."""
    device = backend.device_of(reference)
    for name, array in others.items():
        if array is None:
            continue
        if backend.device_of(array) != device:
            raise ValueError(f"{name} and {reference_name} must be on the same device "
                             f"({backend.device_of(array)} vs {backend.device_of(reference)}).")
        if array.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {array.dtype} but {reference_name} has {reference.dtype}; "
                            "they must match.")


from gpucnn.ops.activation import (  # noqa: E402 - the submodules use the checks above
    add_forward,
    add_relu_forward,
    dropout_backward,
    dropout_forward,
    relu_backward,
    relu_forward,
    sigmoid_backward,
    sigmoid_forward,
    tanh_backward,
    tanh_forward,
)
from gpucnn.ops.conv import conv2d_backward, conv2d_forward  # noqa: E402
from gpucnn.ops.norm import batch_norm_backward, batch_norm_forward, batch_norm_forward_eval  # noqa: E402
from gpucnn.ops.linear import linear_backward, linear_forward  # noqa: E402
from gpucnn.ops.loss import softmax_cross_entropy, softmax_cross_entropy_backward  # noqa: E402
from gpucnn.ops.tensor import add_into, fill  # noqa: E402
from gpucnn.ops.pool import (  # noqa: E402
    avg_pool2d_backward,
    avg_pool2d_forward,
    global_avg_pool2d_backward,
    global_avg_pool2d_forward,
    max_pool2d,
    max_pool2d_backward,
    max_pool2d_forward,
)

__all__ = [
    "add_forward", "add_into", "add_relu_forward", "batch_norm_backward", "batch_norm_forward",
    "batch_norm_forward_eval", "global_avg_pool2d_backward", "global_avg_pool2d_forward", "avg_pool2d_backward", "avg_pool2d_forward", "check_float_array", "check_same_kind",
    "conv2d_backward", "conv2d_forward", "dropout_backward", "dropout_forward", "fill",
    "linear_backward", "linear_forward", "max_pool2d", "max_pool2d_backward", "max_pool2d_forward",
    "relu_backward", "relu_forward", "sigmoid_backward", "sigmoid_forward",
    "softmax_cross_entropy", "softmax_cross_entropy_backward", "tanh_backward", "tanh_forward",
]
