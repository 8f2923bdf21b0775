"""LeNet-5, a small VGG (with or without BatchNorm), ResNet-20, and the model registry used by
checkpoints and the CLI.

Every model keeps ``config``, a dict holding its registry name and the keyword
arguments it was built with, so ``build_model(**model.config)`` rebuilds it.
Every model also has ``input_shape`` (C, H, W) and ``features(x, layer)``.
"""
from __future__ import annotations

from collections import OrderedDict

from gpucnn import nn
from gpucnn.nn.init import make_rng
from gpucnn.nn.module import fused_relus
from gpucnn.utils import check_int

LENET5_VARIANTS = ("modern", "classic")
LENET5_DEFAULT_INPUT = (1, 28, 28)
LENET5_FULL_SIZE = 32        # the 1998 network's input; smaller inputs are zero-padded up to it by conv1
VGG_STAGES = (1, 2, 4)       # channel multipliers of the three stages (64, 128, 256 at width 64)
VGG_DOWNSAMPLE = 2 ** len(VGG_STAGES)
RESNET20_WIDTHS = (16, 32, 64)  # channels of the three stages of He et al.'s CIFAR ResNets
RESNET20_BLOCKS = 3             # basic blocks per stage: 6 * 3 + 2 = 20 weighted layers


def _check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}.")
    return float(dropout)


def _check_common(num_classes, seed):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int of at least 2, got {num_classes!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be None or an int, not {seed!r}.")


class _ImageClassifier(nn.Sequential):
    """A Sequential taking images (N, C, H, W) of one fixed ``input_shape``; checks its input.

    forward runs every max-pool right after a ReLU BEFORE that ReLU: max-pooling commutes with
    ReLU (both monotone; ties and NaN go the same way), so outputs and gradients are the same
    and the ReLU works on a four times smaller array (measured on LeNet-5 on the CPU: 9-11% off
    a training step, 20% off inference, at batch 64 and 256). The layers keep their declared
    order and names: features(), state_dict() and printing are unchanged.
    """

    input_shape: tuple

    def forward(self, x):
        """x (N, C, H, W) with (C, H, W) == input_shape -> logits (N, num_classes).

        Each ReLU between a conv/linear/max-pool layer and a following conv or linear layer (a Flatten
        between them allowed) runs inside them: its forward in the first one's kernel, its backward in
        the second one's data gradient (two launches fewer per ReLU on a kernel device; on the CPU the
        convolution applies it to each chunk of output while the chunk is in cache: vgg-small inference
        at batch 64, two threads, 128 -> 126 ms, LeNet-5 2.49 -> 2.29 ms). A ReLU right after a
        BatchNorm runs inside the BatchNorm, on every device.
        """
        self._check_image_batch(x)
        self._last_order = self._run_order()
        fused = self._fused_relus(self._last_order)
        fused.update(self._norm_relus(self._last_order))
        self._last_fused = fused
        producers = {producer for producer, _ in fused.values()}
        for name in self._last_order:
            if name in fused:
                continue
            module = self._modules[name]
            x = module.forward(x, relu=True) if name in producers else module(x)
        return x

    def backward(self, grad_output, input_grad=True):
        """Back-propagate in the reverse of the order the last forward (or features) ran; see Sequential."""
        order = getattr(self, "_last_order", None) or self._run_order()
        fused = getattr(self, "_last_fused", None) or {}
        consumers = {consumer for _, consumer in fused.values()}
        for i in range(len(order) - 1, -1, -1):
            if order[i] in fused:
                continue
            module, need = self._modules[order[i]], input_grad or i > 0
            if order[i] in consumers:
                grad_output = module.backward(grad_output, input_grad=need, input_relu=True)
            else:
                grad_output = module.backward(grad_output, input_grad=need)
        return grad_output

    def _norm_relus(self, order) -> dict:
        """{relu name: (batch norm, None)} for each ReLU right after a BatchNorm, which runs it on every device
        (see nn.Sequential.forward)."""
        layers = [self._modules[name] for name in order]
        return {order[i]: (order[i - 1], None) for i in fused_relus(layers)}

    def _fused_relus(self, order) -> dict:
        """{relu name: (producer, consumer)} for the ReLUs the kernels can take over (see forward)."""
        fused = {}
        for i in range(1, len(order) - 1):
            if type(self._modules[order[i]]) is not nn.ReLU:
                continue
            producer = order[i - 1]
            if type(self._modules[producer]) not in (nn.Conv2d, nn.Linear, nn.MaxPool2d):
                continue
            j = i + 1
            while j < len(order) and type(self._modules[order[j]]) is nn.Flatten:
                j += 1
            if j < len(order) and type(self._modules[order[j]]) in (nn.Conv2d, nn.Linear):
                fused[order[i]] = (producer, order[j])
        return fused

    def features(self, x, layer: str):
        """The activation of the named layer (e.g. "conv1", "pool2", "fc1") for input x (N, C, H, W)."""
        if layer not in self._modules:
            raise ValueError(f"{type(self).__name__} has no layer named {layer!r}; "
                             f"its layers are {list(self._modules)}.")
        self._check_image_batch(x)
        last = list(self._modules).index(layer)
        self._last_order = list(self._modules)[: last + 1]  # the declared order, which the names describe
        self._last_fused = {}
        return self[: last + 1](x)

    def _run_order(self) -> list:
        """The layer names in the order forward runs them: each ReLU, MaxPool2d pair swapped."""
        names = list(self._modules)
        for i in range(len(names) - 1):
            if type(self._modules[names[i]]) is nn.ReLU and type(self._modules[names[i + 1]]) is nn.MaxPool2d:
                names[i], names[i + 1] = names[i + 1], names[i]
        return names

    def _check_image_batch(self, x) -> None:
        name = type(self).__name__
        if not hasattr(x, "shape"):
            raise TypeError(f"{name} expects a NumPy or CuPy array, got {type(x).__name__}.")
        shape = tuple(x.shape)
        if len(shape) != 4 or shape[1:] != tuple(self.input_shape):
            raise ValueError(f"{name} expects input of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {shape}.")


class LeNet5(_ImageClassifier):
    """LeNet-5: x (N, in_channels, input_size, input_size) -> logits (N, num_classes).

    modern:  conv1 C->6 5x5, ReLU, max-pool 2, conv2 6->16 5x5, ReLU, max-pool 2,
             flatten, fc1 ->120, ReLU, fc2 120->84, ReLU, fc3 84->num_classes; He-uniform init.
    classic: the 1998 form: the same shapes with tanh and average pooling; LeCun init.

    The 1998 network took 32x32 input. conv1 zero-pads a smaller input up to 32x32
    (padding (32 - input_size) // 2: 2 for the default 28x28 MNIST images) and
    does not pad larger ones. Default (grey 28x28, 61,706 parameters for 10 classes):
    (N,1,28,28) conv1 (N,6,28,28) pool1 (N,6,14,14) conv2 (N,16,10,10)
    pool2 (N,16,5,5) flatten (N,400) fc1 (N,120) fc2 (N,84) fc3 (N,num_classes).
    ``seed`` (None or an int) makes the initial weights reproducible.
    """

    def __init__(self, num_classes=10, variant="modern", seed=None, in_channels=1, input_size=28):
        _check_common(num_classes, seed)
        if variant not in LENET5_VARIANTS:
            raise ValueError(f"LeNet5 variant must be one of {LENET5_VARIANTS}, not {variant!r}.")
        in_channels = check_int(in_channels, "in_channels", 1)
        input_size = check_int(input_size, "input_size", 1)
        padding = max(0, (LENET5_FULL_SIZE - input_size) // 2)
        side = ((input_size + 2 * padding - 4) // 2 - 4) // 2   # after conv1, pool1, conv2, pool2 (>= 4)
        rng = make_rng(seed)
        if variant == "modern":
            act, pool, init = nn.ReLU, nn.MaxPool2d, "kaiming"
        else:
            act, pool, init = nn.Tanh, nn.AvgPool2d, "lecun"
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 6, 5, padding=padding, init=init, rng=rng)),
            ("act1", act()),
            ("pool1", pool(2)),
            ("conv2", nn.Conv2d(6, 16, 5, init=init, rng=rng)),
            ("act2", act()),
            ("pool2", pool(2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(16 * side * side, 120, init=init, rng=rng)),
            ("act3", act()),
            ("fc2", nn.Linear(120, 84, init=init, rng=rng)),
            ("act4", act()),
            ("fc3", nn.Linear(84, num_classes, init=init, rng=rng)),
        ]))
        self.num_classes = num_classes
        self.variant = variant
        self.input_shape = (in_channels, input_size, input_size)
        self.config = {"name": "lenet5" if variant == "modern" else "lenet5-classic",
                       "num_classes": num_classes, "seed": seed}
        # Only a non-default input is recorded, so a grey 28x28 model's config reads as it always did.
        if self.input_shape != LENET5_DEFAULT_INPUT:
            self.config.update(in_channels=in_channels, input_size=input_size)


class VGGSmall(_ImageClassifier):
    """A VGG-style network for 32x32 colour images: three stages of two 3x3 convolutions.

    x (N, in_channels, S, S) -> logits (N, num_classes), S = input_size (a multiple of 8).
    Stage s (s = 1, 2, 3) is conv{s}_1, ReLU, conv{s}_2, ReLU, 2x2 max-pool, with
    width, 2*width, 4*width output channels (64, 128, 256 by default); every
    convolution is 3x3, stride 1, padding 1, so only the pools shrink the image.
    Then flatten (4*width * (S/8)^2 features), fc1 -> hidden, ReLU, fc2 -> num_classes.
    He-uniform init. batch_norm=True (registered as vgg-small-bn): a BatchNorm2d after every
    convolution and a BatchNorm1d after fc1 (bn{s}_{i}, bn_fc1), which then have no bias; without
    bn_fc1 the loss jumped at Adam's second step (4.28 -> 8.21) through the 4096 -> 256 fc1, with it it falls
    from the first step (bench/vgg_first_steps.py). Default shapes (3x32x32 input):
    conv1_* (N,64,32,32) pool1 (N,64,16,16) conv2_* (N,128,16,16) pool2 (N,128,8,8)
    conv3_* (N,256,8,8) pool3 (N,256,4,4) flatten (N,4096) fc1 (N,256) fc2 (N,num_classes);
    2,196,810 parameters for 10 classes.
    """

    def __init__(self, num_classes=10, seed=None, in_channels=3, input_size=32, width=64, hidden=256,
                 batch_norm=False, dropout=0.0):
        _check_common(num_classes, seed)
        dropout = _check_dropout(dropout)
        in_channels = check_int(in_channels, "in_channels", 1)
        input_size = check_int(input_size, "input_size", 1)
        width = check_int(width, "width", 1)
        hidden = check_int(hidden, "hidden", 1)
        if input_size % VGG_DOWNSAMPLE:
            raise ValueError(f"vgg-small needs input_size a multiple of {VGG_DOWNSAMPLE} (three 2x2 pools), "
                             f"got {input_size}.")
        rng = make_rng(seed)
        layers = OrderedDict()
        channels = in_channels
        for stage, multiplier in enumerate(VGG_STAGES, 1):
            for index in (1, 2):
                layers[f"conv{stage}_{index}"] = nn.Conv2d(channels, width * multiplier, 3, padding=1,
                                                           bias=not batch_norm, init="kaiming", rng=rng)
                if batch_norm:
                    layers[f"bn{stage}_{index}"] = nn.BatchNorm2d(width * multiplier)
                layers[f"act{stage}_{index}"] = nn.ReLU()
                channels = width * multiplier
            layers[f"pool{stage}"] = nn.MaxPool2d(2)
        side = input_size // VGG_DOWNSAMPLE
        layers["flatten"] = nn.Flatten()
        layers["fc1"] = nn.Linear(channels * side * side, hidden, bias=not batch_norm, init="kaiming", rng=rng)
        if batch_norm:
            layers["bn_fc1"] = nn.BatchNorm1d(hidden)
        layers["act_fc1"] = nn.ReLU()
        if dropout:
            layers["dropout"] = nn.Dropout(dropout, rng=rng)
        layers["fc2"] = nn.Linear(hidden, num_classes, init="kaiming", rng=rng)
        super().__init__(layers)
        self.num_classes = num_classes
        self.input_shape = (in_channels, input_size, input_size)
        self.config = {"name": "vgg-small-bn" if batch_norm else "vgg-small", "num_classes": num_classes,
                       "seed": seed, "in_channels": in_channels, "input_size": input_size, "width": width,
                       "hidden": hidden}
        if dropout:
            self.config["dropout"] = dropout


class ResNet20(_ImageClassifier):
    """He et al. (2016)'s CIFAR ResNet-20: x (N, in_channels, S, S) -> logits (N, num_classes).

    conv1 3x3 -> 16 channels, bn1, ReLU; layer1, layer2, layer3: three BasicBlocks each
    (gpucnn.nn.BasicBlock) with 16, 32, 64 channels, the first block of layer2 and layer3
    halving the image with stride 2 and a 1x1 convolution + BatchNorm shortcut; global average
    pooling (avgpool), flatten, optional dropout, fc 64 -> num_classes. Any input size S >= 1
    (grey 28x28: 28 -> 14 -> 7; colour 32x32: 32 -> 16 -> 8) and channel count; 272,474
    parameters for 3x32x32 and 10 classes (272,186 for grey input). Convolutions are bias-free
    (BatchNorm follows), He-uniform initialised; state_dict names as torchvision's ResNet
    (``layer1.0.conv1.weight``, ``layer2.0.downsample.1.running_mean``, ``fc.bias``).
    """

    def __init__(self, num_classes=10, seed=None, in_channels=3, input_size=32, dropout=0.0):
        _check_common(num_classes, seed)
        in_channels = check_int(in_channels, "in_channels", 1)
        input_size = check_int(input_size, "input_size", 1)
        dropout = _check_dropout(dropout)
        rng = make_rng(seed)
        layers = OrderedDict()
        layers["conv1"] = nn.Conv2d(in_channels, RESNET20_WIDTHS[0], 3, padding=1, bias=False, rng=rng)
        layers["bn1"] = nn.BatchNorm2d(RESNET20_WIDTHS[0])
        layers["relu"] = nn.ReLU()
        channels = RESNET20_WIDTHS[0]
        for stage, width in enumerate(RESNET20_WIDTHS, 1):
            blocks = []
            for index in range(RESNET20_BLOCKS):
                stride = 2 if stage > 1 and index == 0 else 1
                blocks.append(nn.BasicBlock(channels, width, stride, rng=rng))
                channels = width
            layers[f"layer{stage}"] = nn.Sequential(*blocks)
        layers["avgpool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        if dropout:
            layers["dropout"] = nn.Dropout(dropout, rng=rng)
        layers["fc"] = nn.Linear(channels, num_classes, init="kaiming", rng=rng)
        super().__init__(layers)
        self.num_classes = num_classes
        self.input_shape = (in_channels, input_size, input_size)
        self.config = {"name": "resnet20", "num_classes": num_classes, "seed": seed, "in_channels": in_channels,
                       "input_size": input_size}
        if dropout:
            self.config["dropout"] = dropout


MODELS = {
    "lenet5": lambda **kwargs: LeNet5(variant="modern", **kwargs),
    "lenet5-classic": lambda **kwargs: LeNet5(variant="classic", **kwargs),
    "vgg-small": lambda **kwargs: VGGSmall(**kwargs),
    "vgg-small-bn": lambda **kwargs: VGGSmall(batch_norm=True, **kwargs),
    "resnet20": lambda **kwargs: ResNet20(**kwargs),
}
# What each model is for, shown by the CLI's help.
MODEL_HELP = {
    "lenet5": "LeNet-5 with ReLU + max-pool (grey 28x28 by default)",
    "lenet5-classic": "LeNet-5 with tanh + average-pool (1998)",
    "vgg-small": "three VGG stages of 3x3 convolutions, 64-128-256 channels (colour 32x32)",
    "vgg-small-bn": "vgg-small with BatchNorm after every convolution and the hidden linear layer (colour 32x32)",
    "resnet20": "He et al.'s CIFAR ResNet-20: BatchNorm, residual blocks, global average pooling (colour 32x32)",
}
# The models with a place for Dropout (before the last linear layer; their ``dropout`` argument).
DROPOUT_MODELS = ("resnet20", "vgg-small", "vgg-small-bn")
# The input (C, H, W) each model is built for when nothing else is said.
DEFAULT_INPUT_SHAPES = {"lenet5": LENET5_DEFAULT_INPUT, "lenet5-classic": LENET5_DEFAULT_INPUT,
                        "vgg-small": (3, 32, 32), "vgg-small-bn": (3, 32, 32), "resnet20": (3, 32, 32)}


def available_models() -> list[str]:
    """Names accepted by ``build_model``."""
    return sorted(MODELS)


def default_input_shape(name: str) -> tuple[int, int, int]:
    """The (C, H, W) a registered model takes when built without in_channels / input_size."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available models are {available_models()}.")
    return DEFAULT_INPUT_SHAPES[name]


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name (see ``available_models()``) with its keyword arguments.

    ``build_model(**model.config)`` rebuilds a model of the same architecture.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available models are {available_models()}.")
    if "batch_norm" in kwargs:
        raise TypeError(f"BatchNorm is part of the model name; use 'vgg-small' or 'vgg-small-bn', "
                        f"not batch_norm={kwargs['batch_norm']!r}.")
    if "variant" in kwargs:
        raise TypeError(f"the variant is part of the model name; use 'lenet5' or 'lenet5-classic', "
                        f"not variant={kwargs['variant']!r}.")
    return MODELS[name](**kwargs)
