"""Element-wise layers: ReLU, Tanh, Sigmoid, and Dropout. Shapes are unchanged.

These layers have no parameters; they take float32 or float64 input.
"""
from __future__ import annotations

from gpucnn import ops
from gpucnn.nn.init import make_rng
from gpucnn.nn.module import Module


class _Elementwise(Module):
    """y = f(x) with a backward that needs only y (true of relu, tanh and sigmoid)."""

    _forward_op = None   # staticmethod(ops.<name>_forward) in subclasses
    _backward_op = None  # staticmethod(ops.<name>_backward): (grad_y, y) -> grad_x

    def forward(self, x):
        """x (any shape) -> y (same shape)."""
        self._check_input(x)
        y = self._forward_op(x)
        self._save(y=y, output_shape=tuple(y.shape))
        return y

    def backward(self, grad_output, input_grad=True):
        """grad_output (shape of y) -> grad_input (same shape; None when not ``input_grad``)."""
        self._check_grad_output(grad_output)
        return self._backward_op(grad_output, self._saved("y")) if input_grad else None


class ReLU(_Elementwise):
    """y = max(x, 0)."""
    _forward_op = staticmethod(ops.relu_forward)
    _backward_op = staticmethod(ops.relu_backward)


class Tanh(_Elementwise):
    """y = tanh(x)."""
    _forward_op = staticmethod(ops.tanh_forward)
    _backward_op = staticmethod(ops.tanh_backward)


class Sigmoid(_Elementwise):
    """y = 1 / (1 + exp(-x))."""
    _forward_op = staticmethod(ops.sigmoid_forward)
    _backward_op = staticmethod(ops.sigmoid_backward)


class Dropout(Module):
    """Inverted dropout: in training mode each element is zeroed with probability
    ``p`` and the survivors scaled by 1/(1-p); in eval mode the identity.

    The layer owns its numpy Generator, made from ``rng`` (None, an int seed, or
    a Generator), so a seeded layer drops the same elements run after run.
    """

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"Dropout probability p must be a number, not {p!r}.")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability p must be in [0, 1), got {p}.")
        self.p = float(p)
        self.rng = make_rng(rng)

    def forward(self, x):
        """x (any shape) -> y (same shape)."""
        self._check_input(x)
        y, mask = ops.dropout_forward(x, self.p, self.rng, self.training)
        self._save(mask=mask, output_shape=tuple(y.shape))
        return y

    def backward(self, grad_output, input_grad=True):
        """grad_output (shape of y) -> grad_input (same shape; None when not ``input_grad``)."""
        self._check_grad_output(grad_output)
        return ops.dropout_backward(grad_output, self._saved("mask")) if input_grad else None

    def extra_repr(self) -> str:
        return f"p={self.p}"
