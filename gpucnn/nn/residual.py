"""Residual connections with explicit backward: y = body(x) + shortcut(x), optionally through ReLU.

The backward sends the output's gradient (through the ReLU, when there is one) down both paths,
the body and the shortcut (the identity when there is none), and adds the two input gradients.
``BasicBlock`` is He et al.'s (2016) two-convolution block with torchvision's names, the unit of
``gpucnn.models.resnet20``.
"""
from __future__ import annotations

from collections import OrderedDict

from gpucnn import ops
from gpucnn.nn.activation import ReLU
from gpucnn.nn.conv import Conv2d
from gpucnn.nn.init import make_rng
from gpucnn.nn.module import Module, Sequential
from gpucnn.nn.norm import BatchNorm2d


class Residual(Module):
    """y = body(x) + shortcut(x), then ReLU when ``relu`` (the default); shortcut None is the identity.

    body and shortcut are Modules taking x and returning arrays of one shape. Printing and
    state_dict name them ``body`` and ``shortcut``.
    """

    def __init__(self, body: Module, shortcut: Module | None = None, relu: bool = True):
        super().__init__()
        for name, module in (("body", body), ("shortcut", shortcut)):
            if module is not None and not isinstance(module, Module):
                raise TypeError(f"the residual {name} must be a gpucnn.nn.Module, not {type(module).__name__}.")
        self.body = body
        self.shortcut = shortcut
        self.relu = bool(relu)

    def paths(self) -> tuple[Module, Module | None]:
        """(body, shortcut): the two modules whose outputs are added (shortcut None: the identity)."""
        return self.body, self.shortcut

    def named_paths(self) -> tuple[tuple[str, Module], tuple[str, Module | None]]:
        """((name, body), (name, shortcut)): the paths with the names their layers have under this block
        (an empty name: the body's layers are the block's own, as in BasicBlock)."""
        body, shortcut = self.paths()
        return ("body", body), ("shortcut", shortcut)

    def forward(self, x):
        """x -> relu(body(x) + shortcut(x)) (or without the ReLU)."""
        body, shortcut = self.paths()
        across = x if shortcut is None else shortcut(x)
        through = body(x)
        if tuple(through.shape) != tuple(across.shape):
            raise ValueError(f"{type(self).__name__}: the body's output has shape {tuple(through.shape)} but the "
                             f"shortcut's has {tuple(across.shape)}; give the block a projection shortcut.")
        y = ops.add_relu_forward(through, across) if self.relu else ops.add_forward(through, across)
        self._save(y=y, output_shape=tuple(y.shape))
        return y

    def backward(self, grad_output, input_grad=True):
        """grad_output (shape of y) -> grad_input: the body's and the shortcut's input gradients added."""
        self._check_grad_output(grad_output)
        grad = ops.relu_backward(grad_output, self._saved("y")) if self.relu else grad_output
        body, shortcut = self.paths()
        grad_through = body.backward(grad, input_grad=input_grad)
        grad_across = grad if shortcut is None else shortcut.backward(grad, input_grad=input_grad)
        if not input_grad:
            return None
        return ops.add_forward(grad_through, grad_across)

    def extra_repr(self) -> str:
        return "" if self.relu else "relu=False"


class BasicBlock(Residual):
    """He et al.'s basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    x (N, in_channels, H, W) -> (N, out_channels, H', W') with H' = ceil(H / stride). conv1 is
    3x3 with ``stride``, conv2 3x3; both without bias (BatchNorm follows). When the stride is not 1
    or the channels change, the shortcut is ``downsample``, a 1x1 convolution with ``stride`` and a
    BatchNorm (torchvision's "option B"); otherwise the identity. Names as torchvision's:
    conv1, bn1, conv2, bn2, downsample.0, downsample.1.
    """

    def __init__(self, in_channels, out_channels, stride=1, rng=None):
        Module.__init__(self)
        rng = make_rng(rng)
        self.relu = True
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, rng=rng)
        self.bn1 = BatchNorm2d(out_channels)
        self.act1 = ReLU()
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, bias=False, rng=rng)
        self.bn2 = BatchNorm2d(out_channels)
        projection = None
        if stride != 1 or in_channels != out_channels:
            projection = self.downsample = Sequential(
                Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, rng=rng), BatchNorm2d(out_channels))
        # The body runs the named layers in order; held outside the registry so no name appears twice.
        body = Sequential(OrderedDict((n, self._modules[n]) for n in ("conv1", "bn1", "act1", "conv2", "bn2")))
        object.__setattr__(self, "_paths", (body, projection))

    def paths(self) -> tuple[Module, Module | None]:
        return self._paths

    def named_paths(self):
        body, shortcut = self._paths
        return ("", body), ("downsample", shortcut)

    def extra_repr(self) -> str:
        return ""
