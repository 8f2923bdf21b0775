"""MaxPool2d and AvgPool2d: no parameters, delegate to the pooling ops."""
from __future__ import annotations

from gpucnn import ops
from gpucnn.grad_mode import is_grad_enabled
from gpucnn.nn.module import Module, check_pair
from gpucnn.utils import conv_output_size


class _Pool2d(Module):
    """Shared hyperparameters and checks of the 2-D pooling layers.

    ``kernel_size``, ``stride`` (None: the kernel size) and ``padding`` take an
    int or a pair and are stored as pairs; ``dilation`` is always (1, 1) and is
    exposed so receptive-field code can treat pools and convolutions alike.
    Padding may be at most half the kernel size (as in PyTorch).
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = check_pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else check_pair(stride, "stride", 1)
        self.padding = check_pair(padding, "padding", 0)
        self.dilation = (1, 1)
        for p, k in zip(self.padding, self.kernel_size):
            if p > k // 2:
                raise ValueError(f"{type(self).__name__} padding {self.padding} must be at most half of "
                                 f"kernel_size {self.kernel_size}.")

    def output_hw(self, H: int, W: int) -> tuple[int, int]:
        """(OH, OW) for an (H, W) input: (H + 2*PH - KH)//SH + 1, likewise OW."""
        return tuple(conv_output_size(size, k, s, p) for size, k, s, p in
                     zip((H, W), self.kernel_size, self.stride, self.padding))

    def _check_pool_input(self, x) -> None:
        self._check_input(x, ndim=4)
        OH, OW = self.output_hw(x.shape[2], x.shape[3])
        if OH < 1 or OW < 1:
            raise ValueError(f"{self!r} got input of shape {tuple(x.shape)}, too small for its window "
                             f"(output would be {OH}x{OW}).")

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """Max pooling: x (N, C, H, W) -> y (N, C, OH, OW); padding counts as -inf.

    Backward sends each output gradient to the first maximum of its window.
    """

    def forward(self, x, relu=False):
        """x (N, C, H, W) -> y (N, C, OH, OW); under gpucnn.no_grad() without the argmax backward needs.
        relu=True: a following ReLU fused (max(0, y); the argmax is unchanged)."""
        self._check_pool_input(x)
        if not is_grad_enabled():
            y = ops.max_pool2d(x, self.kernel_size, self.stride, self.padding, relu=relu)
            self._save(output_shape=tuple(y.shape))
            return y
        y, argmax = ops.max_pool2d_forward(x, self.kernel_size, self.stride, self.padding, relu=relu)
        self._save(argmax=argmax, x_shape=tuple(x.shape), output_shape=tuple(y.shape))
        return y

    def backward(self, grad_output, input_grad=True):
        """grad_output (N, C, OH, OW) -> grad_input (N, C, H, W) (None when not ``input_grad``)."""
        self._check_grad_output(grad_output)
        if not input_grad:
            return None
        return ops.max_pool2d_backward(grad_output, self._saved("argmax"), self._saved("x_shape"),
                                       self.kernel_size, self.stride, self.padding)


class AvgPool2d(_Pool2d):
    """Average pooling: x (N, C, H, W) -> y (N, C, OH, OW); zero padding counts in the divisor."""

    def forward(self, x):
        """x (N, C, H, W) -> y (N, C, OH, OW)."""
        self._check_pool_input(x)
        y = ops.avg_pool2d_forward(x, self.kernel_size, self.stride, self.padding)
        self._save(x_shape=tuple(x.shape), output_shape=tuple(y.shape))
        return y

    def backward(self, grad_output, input_grad=True):
        """grad_output (N, C, OH, OW) -> grad_input (N, C, H, W) (None when not ``input_grad``)."""
        self._check_grad_output(grad_output)
        if not input_grad:
            return None
        return ops.avg_pool2d_backward(grad_output, self._saved("x_shape"), self.kernel_size,
                                       self.stride, self.padding)


class AdaptiveAvgPool2d(Module):
    """Global average pooling, PyTorch's ``AdaptiveAvgPool2d(1)``: x (N, C, H, W) -> y (N, C, 1, 1).

    Only output_size 1 (or (1, 1)) is supported: the global average a ResNet ends with.
    """

    def __init__(self, output_size=1):
        super().__init__()
        if check_pair(output_size, "output_size", 1) != (1, 1):
            raise ValueError(f"AdaptiveAvgPool2d supports only output_size 1 (global average pooling), "
                             f"not {output_size!r}.")
        self.output_size = (1, 1)

    def forward(self, x):
        """x (N, C, H, W) -> y (N, C, 1, 1), each channel's mean."""
        self._check_input(x, ndim=4)
        y = ops.global_avg_pool2d_forward(x)
        self._save(x_shape=tuple(x.shape), output_shape=tuple(y.shape))
        return y

    def backward(self, grad_output, input_grad=True):
        """grad_output (N, C, 1, 1) -> grad_input (N, C, H, W), each value's share (None when not ``input_grad``)."""
        self._check_grad_output(grad_output)
        if not input_grad:
            return None
        return ops.global_avg_pool2d_backward(grad_output, self._saved("x_shape"))

    def extra_repr(self) -> str:
        return "output_size=1"
