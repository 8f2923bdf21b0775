"""Element-wise activations and dropout, forward beside backward.

The public functions dispatch by device (gpucnn.dispatch); below them the NumPy
reference. The backward functions take the saved forward output ``y`` where it
determines the derivative.
"""
from __future__ import annotations

import numpy as np

from gpucnn import dispatch
from gpucnn.ops import check_float_array, check_same_kind


def _check_pair(grad_y, grad_name: str, saved, saved_name: str) -> None:
    check_float_array(grad_y, grad_name, nonempty=False)
    check_float_array(saved, saved_name, nonempty=False)
    check_same_kind(saved, saved_name, **{grad_name: grad_y})
    if tuple(grad_y.shape) != tuple(saved.shape):
        raise ValueError(f"{grad_name} has shape {tuple(grad_y.shape)} but {saved_name} has "
                         f"{tuple(saved.shape)}; they must match.")


def _check_x(x) -> None:
    check_float_array(x, "x", nonempty=False)


def _check_dropout(x, p, rng, training) -> None:
    check_float_array(x, "x", nonempty=False)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, not {type(rng).__name__}.")
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) or not 0 <= p <= 1:
        raise ValueError(f"the dropout probability p must be a number in [0, 1], not {p!r}.")


def _check_dropout_backward(grad_y, mask) -> None:
    check_float_array(grad_y, "grad_y", nonempty=False)
    if mask is None:
        return
    check_float_array(mask, "mask", nonempty=False)
    check_same_kind(grad_y, "grad_y", mask=mask)
    if tuple(mask.shape) != tuple(grad_y.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but grad_y has {tuple(grad_y.shape)}; they must match.")


def _check_add(a, b) -> None:
    _check_pair(a, "a", b, "b")


def _check_backward(grad_y, y) -> None:
    _check_pair(grad_y, "grad_y", y, "y")


def relu_forward(x):
    """y = max(x, 0), any shape; NaN stays NaN."""
    return dispatch.run("activation", "relu_forward", _check_x, x)


def relu_into(y):
    """max(y, 0) written into y itself and returned: for a NumPy array an op has just made (a fused ReLU on
    the CPU), so that no second array of its size is alive at once. NaN stays NaN."""
    return np.maximum(y, 0, out=y)


def relu_backward(grad_y, y):
    """grad_x = grad_y * (y > 0) from the saved output y (the kink at 0 gets 0, like PyTorch).

    Unlike PyTorch, a NaN in grad_y stays NaN where y <= 0 on the CPU.
    """
    return dispatch.run("activation", "relu_backward", _check_backward, grad_y, y)


def tanh_forward(x):
    """y = tanh(x), any shape."""
    return dispatch.run("activation", "tanh_forward", _check_x, x)


def tanh_backward(grad_y, y):
    """grad_x = grad_y * (1 - y**2) from the saved output y."""
    return dispatch.run("activation", "tanh_backward", _check_backward, grad_y, y)


def sigmoid_forward(x):
    """y = 1 / (1 + exp(-x)), any shape, computed without overflow for large |x|."""
    return dispatch.run("activation", "sigmoid_forward", _check_x, x)


def sigmoid_backward(grad_y, y):
    """grad_x = grad_y * y * (1 - y) from the saved output y."""
    return dispatch.run("activation", "sigmoid_backward", _check_backward, grad_y, y)


def add_forward(a, b):
    """y = a + b (a residual connection's sum), a and b of one shape, dtype and device."""
    return dispatch.run("activation", "add_forward", _check_add, a, b)


def add_relu_forward(a, b):
    """y = max(a + b, 0): a residual sum followed by ReLU; NaN stays NaN.

    Its gradient for both a and b is relu_backward(grad_y, y).
    """
    return dispatch.run("activation", "add_relu_forward", _check_add, a, b)


def dropout_forward(x, p, rng, training):
    """Inverted dropout: y = x * mask, mask 0 with probability p else 1/(1-p); returns (y, mask).

    x any shape; p in [0, 1]; rng a numpy.random.Generator (the mask is drawn on the CPU,
    so results do not depend on the device, then moved to x's device). When not training
    or p == 0, y is x itself and mask is None.
    """
    return dispatch.run("activation", "dropout_forward", _check_dropout, x, p, rng, training)


def dropout_backward(grad_y, mask):
    """grad_x = grad_y * mask (the mask dropout_forward returned; None means dropout was off)."""
    return dispatch.run("activation", "dropout_backward", _check_dropout_backward, grad_y, mask)


# ---------------------------------------------------------------------------------------
# NumPy reference (arguments already validated)


def relu_forward_reference(x):
    return np.maximum(x, 0)


def relu_backward_reference(grad_y, y):
    # A multiply, not np.where: NumPy's where branches per element and is ~6x slower on random masks.
    return grad_y * (y > 0)


def tanh_forward_reference(x):
    return np.tanh(x)


def tanh_backward_reference(grad_y, y):
    return grad_y * (1 - y * y)


def sigmoid_forward_reference(x):
    small = np.exp(-np.abs(x))  # in (0, 1], never overflows
    return np.where(x >= 0, 1 / (1 + small), small / (1 + small)).astype(x.dtype, copy=False)


def sigmoid_backward_reference(grad_y, y):
    return grad_y * y * (1 - y)


def add_forward_reference(a, b):
    return a + b


def add_relu_forward_reference(a, b):
    y = a + b
    return np.maximum(y, 0, out=y)


def dropout_forward_reference(x, p, rng, training):
    if not training or p == 0:
        return x, None
    keep = rng.random(tuple(x.shape)) >= p
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    mask = (keep * scale).astype(x.dtype)
    return x * mask, mask


def dropout_backward_reference(grad_y, mask):
    return grad_y if mask is None else grad_y * mask
