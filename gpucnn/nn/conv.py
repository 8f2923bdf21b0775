"""Conv2d: owns weight and bias, delegates to ``ops.conv2d_forward`` / ``ops.conv2d_backward``."""
from __future__ import annotations

import numpy as np

from gpucnn import ops
from gpucnn.nn.init import make_rng, uniform_weight
from gpucnn.nn.module import Module, Parameter, check_pair
from gpucnn.utils import check_int
from gpucnn.utils import conv_output_size


class Conv2d(Module):
    """2-D convolution (cross-correlation, as in PyTorch) over NCHW input.

    x (N, C, H, W) -> y (N, OC, OH, OW) with weight (OC, C, KH, KW) and bias (OC,),
    OH = (H + 2*PH - DH*(KH-1) - 1)//SH + 1 and likewise OW.

    ``kernel_size``, ``stride``, ``padding`` and ``dilation`` take an int or a
    pair and are stored as pairs. The weight is drawn with ``init``
    ("kaiming": He uniform for ReLU nets, "lecun": for tanh nets) from ``rng``
    (None, an int seed, or a numpy Generator); the bias starts at zero.
    Parameters are float32; the input must have the parameters' dtype
    (it is not converted) and live on the same device.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 bias=True, init="kaiming", rng=None):
        super().__init__()
        self.in_channels = check_int(in_channels, "in_channels", 1)
        self.out_channels = check_int(out_channels, "out_channels", 1)
        self.kernel_size = check_pair(kernel_size, "kernel_size", 1)
        self.stride = check_pair(stride, "stride", 1)
        self.padding = check_pair(padding, "padding", 0)
        self.dilation = check_pair(dilation, "dilation", 1)
        KH, KW = self.kernel_size
        fan_in = self.in_channels * KH * KW
        generator = make_rng(rng)
        self.weight = Parameter(uniform_weight((self.out_channels, self.in_channels, KH, KW), fan_in,
                                               init, generator))
        self.bias = Parameter(np.zeros(self.out_channels, dtype=np.float32)) if bias else None

    def output_hw(self, H: int, W: int) -> tuple[int, int]:
        """(OH, OW) for an (H, W) input."""
        return tuple(conv_output_size(size, k, s, p, d) for size, k, s, p, d in
                     zip((H, W), self.kernel_size, self.stride, self.padding, self.dilation))

    def forward(self, x, relu=False):
        """x (N, C, H, W) -> y (N, OC, OH, OW); relu=True: a following ReLU fused (max(0, y))."""
        self._check_input(x, ndim=4, channels=self.in_channels)
        OH, OW = self.output_hw(x.shape[2], x.shape[3])
        if OH < 1 or OW < 1:
            raise ValueError(f"{self!r} got input of shape {tuple(x.shape)}, too small for its kernel "
                             f"(output would be {OH}x{OW}).")
        bias = None if self.bias is None else self.bias.data
        y = ops.conv2d_forward(x, self.weight.data, bias, self.stride, self.padding, self.dilation, relu)
        self._save(x=x, output_shape=tuple(y.shape))
        return y

    def backward(self, grad_output, input_grad=True, input_relu=False):
        """grad_output (N, OC, OH, OW) -> grad_input (N, C, H, W), or None when not ``input_grad`` (then
        not computed: the first layer of a model); adds into weight.grad and bias.grad (writes them
        into the buffers a fused optimizer's zero_grad(set_to_none=True) left). input_relu: the input
        was a ReLU's output, whose backward is fused here (grad_input is zero where the input is not > 0)."""
        self._check_grad_output(grad_output)
        grad_x, grad_weight, grad_bias = ops.conv2d_backward(
            grad_output, self._saved("x"), self.weight.data, self.stride, self.padding, self.dilation,
            with_bias=self.bias is not None, with_grad_x=input_grad, input_relu=input_relu,
            grad_weight_out=self.weight.grad_target(),
            grad_bias_out=None if self.bias is None else self.bias.grad_target())
        self.weight.accumulate_grad(grad_weight)
        if self.bias is not None:
            self.bias.accumulate_grad(grad_bias)
        return grad_x

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        return text
