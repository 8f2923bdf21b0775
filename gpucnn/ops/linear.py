"""Fully connected layer op, forward beside backward: the public dispatchers and the NumPy reference."""
from __future__ import annotations

from gpucnn import dispatch
from gpucnn.ops import check_float_array, check_same_kind


def _check_linear(x, weight, bias, relu=False) -> None:
    check_float_array(x, "x", ndim=2)
    check_float_array(weight, "weight", ndim=2)
    check_same_kind(x, "x", weight=weight, bias=bias)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight expects {weight.shape[1]} input features (shape {tuple(weight.shape)}) "
                         f"but x has {x.shape[1]} (shape {tuple(x.shape)}).")
    if bias is not None:
        check_float_array(bias, "bias", ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight, not {tuple(bias.shape)}.")


def _check_backward(grad_y, x, weight, with_bias=True, with_grad_x=True, input_relu=False,
                    grad_weight_out=None, grad_bias_out=None) -> None:
    _check_linear(x, weight, None)
    check_float_array(grad_y, "grad_y", ndim=2)
    check_same_kind(x, "x", grad_y=grad_y)
    if tuple(grad_y.shape) != (x.shape[0], weight.shape[0]):
        raise ValueError(f"grad_y must have shape {(x.shape[0], weight.shape[0])}, not {tuple(grad_y.shape)}.")


def linear_forward(x, weight, bias, relu=False):
    """y = x @ weight.T + bias: x (N, IN), weight (OUT, IN) as in PyTorch, bias (OUT,) or None -> y (N, OUT).

    relu=True applies max(0, .) after the bias (in the product's epilogue on a kernel device).
    """
    if relu and dispatch.on_kernel_device(x, weight, bias):
        return dispatch.run("linear", "linear_forward", _check_linear, x, weight, bias, relu=True)
    y = dispatch.run("linear", "linear_forward", _check_linear, x, weight, bias)
    if relu:
        from gpucnn.ops.activation import relu_into  # noqa: PLC0415 - ops modules import each other lazily
        y = relu_into(y)
    return y


def linear_backward(grad_y, x, weight, with_bias=True, with_grad_x=True, input_relu=False,
                    grad_weight_out=None, grad_bias_out=None):
    """grad_y (N, OUT), x (N, IN), weight (OUT, IN) -> grad_x (N, IN) (None when with_grad_x is False),
    grad_weight (OUT, IN), grad_bias (OUT,) (None when with_bias is False).

    input_relu=True: x is a ReLU's output and grad_x comes back through that ReLU too (zero where
    x is not > 0). grad_weight_out / grad_bias_out: arrays to write the gradients into (returned in
    their place); on a kernel device the kernels write them there directly.
    """
    outs = dict(grad_weight_out=grad_weight_out, grad_bias_out=grad_bias_out)
    if dispatch.on_kernel_device(grad_y, x, weight):
        return dispatch.run("linear", "linear_backward", _check_backward, grad_y, x, weight, with_bias, with_grad_x,
                            input_relu=input_relu, **outs)
    grad_x, grad_weight, grad_bias = dispatch.run("linear", "linear_backward", _check_backward, grad_y, x, weight,
                                                  with_bias, with_grad_x)
    if input_relu and grad_x is not None:
        from gpucnn.ops.activation import relu_backward  # noqa: PLC0415
        grad_x = relu_backward(grad_x, x)
    return grad_x, dispatch.write_into(grad_weight_out, grad_weight), dispatch.write_into(grad_bias_out, grad_bias)


def linear_forward_reference(x, weight, bias):
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def linear_backward_reference(grad_y, x, weight, with_bias=True, with_grad_x=True):
    grad_x = grad_y @ weight if with_grad_x else None
    grad_weight = grad_y.T @ x
    grad_bias = grad_y.sum(axis=0) if with_bias else None
    return grad_x, grad_weight, grad_bias
