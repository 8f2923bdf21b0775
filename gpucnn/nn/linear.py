"""Linear (fully connected) and Flatten."""
from __future__ import annotations

import numpy as np

from gpucnn import ops
from gpucnn.nn.init import make_rng, uniform_weight
from gpucnn.nn.module import Module, Parameter
from gpucnn.utils import check_int


class Linear(Module):
    """y = x @ weight.T + bias: x (N, IN) -> y (N, OUT), weight (OUT, IN), bias (OUT,).

    The weight is drawn with ``init`` ("kaiming" or "lecun", fan_in = IN) from
    ``rng`` (None, an int seed, or a numpy Generator); the bias starts at zero.
    Parameters are float32; the input must have the parameters' dtype (it is
    not converted) and live on the same device.
    """

    def __init__(self, in_features, out_features, bias=True, init="kaiming", rng=None):
        super().__init__()
        self.in_features = check_int(in_features, "in_features", 1)
        self.out_features = check_int(out_features, "out_features", 1)
        self.weight = Parameter(uniform_weight((self.out_features, self.in_features), self.in_features,
                                               init, make_rng(rng)))
        self.bias = Parameter(np.zeros(self.out_features, dtype=np.float32)) if bias else None

    def forward(self, x, relu=False):
        """x (N, IN) -> y (N, OUT); relu=True: a following ReLU fused (max(0, y))."""
        self._check_input(x, ndim=2, channels=self.in_features, channels_name="features")
        bias = None if self.bias is None else self.bias.data
        y = ops.linear_forward(x, self.weight.data, bias, relu=relu)
        self._save(x=x, output_shape=tuple(y.shape))
        return y

    def backward(self, grad_output, input_grad=True, input_relu=False):
        """grad_output (N, OUT) -> grad_input (N, IN), or None when not ``input_grad`` (then not computed);
        adds into weight.grad and bias.grad (or writes them where a fused optimizer wants them).
        input_relu: the input was a ReLU's output, whose backward is fused here."""
        self._check_grad_output(grad_output)
        grad_x, grad_weight, grad_bias = ops.linear_backward(
            grad_output, self._saved("x"), self.weight.data, self.bias is not None, input_grad, input_relu=input_relu,
            grad_weight_out=self.weight.grad_target(),
            grad_bias_out=None if self.bias is None else self.bias.grad_target())
        self.weight.accumulate_grad(grad_weight)
        if self.bias is not None:
            self.bias.accumulate_grad(grad_bias)
        return grad_x

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Flatten(Module):
    """(N, d1, d2, ...) -> (N, d1*d2*...); backward restores the input shape."""

    def forward(self, x):
        """x (N, ...) -> y (N, prod(...))."""
        self._check_input(x)
        if x.ndim < 2:
            raise ValueError(f"{self!r} expected an input with a batch axis and at least one more, "
                             f"got shape {tuple(x.shape)}.")
        y = x.reshape(x.shape[0], -1)
        self._save(x_shape=tuple(x.shape), output_shape=tuple(y.shape))
        return y

    def backward(self, grad_output, input_grad=True):
        """grad_output (N, prod(...)) -> grad_input (N, ...) (None when not ``input_grad``)."""
        self._check_grad_output(grad_output)
        return grad_output.reshape(self._saved("x_shape")) if input_grad else None
