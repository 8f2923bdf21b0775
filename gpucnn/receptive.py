"""Receptive-field arithmetic for Sequential models (shared by summary and visualize).

Walking the layers from the input, each axis carries three numbers:

    rf     receptive field: how many input pixels one output sees
    jump   distance in input pixels between adjacent outputs (product of strides)
    start  input coordinate of the centre of the first output's receptive field

and a convolution or pooling layer (kernel k, stride s, padding p, dilation d) updates them:

    k_eff     = d*(k - 1) + 1
    rf_out    = rf_in + (k_eff - 1)*jump_in
    jump_out  = jump_in*s
    start_out = start_in + ((k_eff - 1)/2 - p)*jump_in

starting from rf = 1, jump = 1, start = 0 at the input. Element-wise layers (and
BatchNorm) keep all three; global average pooling sees its whole input. From Flatten on
the spatial layout is gone and every output depends on the whole input, so those rows
carry None.

A residual block (gpucnn.nn.Residual, such as resnet20's BasicBlock) walks its body and its
shortcut from the block's input; its own row is the sum, whose field is the union of the
two paths' fields (the larger one: for a ResNet block, the body's). The shortcut's rows are
marked ``branch``: off the main path.
"""
from __future__ import annotations

from dataclasses import dataclass

from gpucnn import nn
from gpucnn.utils import conv_output_size, pair

ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Dropout)
PER_CHANNEL = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class LayerGeometry:
    """One layer's row: shapes, parameter count and receptive field of its outputs.

    ``output_shape`` is (C, H, W) or (F,) — with a leading N when the input shape
    had one. ``kernel_size``/``stride``/``padding``/``dilation`` are the layer's
    own (H, W) pairs, None for layers without a window. ``rf``, ``jump`` and
    ``start`` are (H, W) pairs in input pixels; ``first`` is the (row, col) of the
    top-left input pixel of output (0, 0)'s receptive field, possibly negative
    (in the padding). All four are None for non-spatial rows (Flatten, Linear, ...).
    ``branch`` is True for the layers of a residual block's shortcut (off the main path).
    """
    name: str
    type: str
    output_shape: tuple
    num_params: int
    kernel_size: tuple | None
    stride: tuple | None
    padding: tuple | None
    dilation: tuple | None
    rf: tuple | None
    jump: tuple | None
    start: tuple | None
    first: tuple | None
    branch: bool = False

    @property
    def spatial(self) -> bool:
        """True while outputs still have a position in the input image."""
        return self.rf is not None


def flatten_layers(model, prefix=""):
    """(name, layer) for each leaf layer of a (possibly nested) Sequential, in forward order.

    A residual block's leaves come body first, then shortcut (``layer1.0.conv1``, ...,
    ``layer2.0.downsample.0``); the block itself is no leaf.
    """
    for name, layer in model.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(layer, nn.Sequential):
            yield from flatten_layers(layer, full)
        elif isinstance(layer, nn.Residual):
            for path_name, path in layer.named_paths():
                if path is None:
                    continue
                path_full = f"{full}.{path_name}" if path_name else full
                if isinstance(path, nn.Sequential):
                    yield from flatten_layers(path, path_full)
                else:
                    yield path_full, path
        else:
            yield full, layer


def row_names(module, name=""):
    """The names of the rows layer_geometry gives for ``module``, in order, without any shapes: every leaf
    layer and every residual block (after its body's and its shortcut's layers)."""
    if isinstance(module, nn.Sequential):
        for child_name, child in module.named_children():
            yield from row_names(child, f"{name}.{child_name}" if name else child_name)
    elif isinstance(module, nn.Residual):
        for path_name, path in module.named_paths():
            if path is not None:
                yield from row_names(path, f"{name}.{path_name}" if path_name else name)
        yield name
    else:
        yield name


def conv_params(kernel_size, in_channels: int, out_channels: int, bias: bool = True) -> int:
    """(KW*KH*C + 1)*OC parameters for a convolution with bias, KW*KH*C*OC without."""
    KH, KW = kernel_size
    return (KW * KH * in_channels + int(bias)) * out_channels


def linear_params(in_features: int, out_features: int, bias: bool = True) -> int:
    """(IN + 1)*OUT parameters for a linear layer with bias, IN*OUT without."""
    return (in_features + int(bias)) * out_features


def _window_output(name, layer, shape, batch) -> tuple[tuple, int]:
    """(output shape (OC, OH, OW), parameter count) of a conv or pool layer receiving (C, H, W) ``shape``."""
    if len(shape) != 3:
        raise ValueError(f"layer {name} ({type(layer).__name__}) needs a (C, H, W) input, "
                         f"but receives shape {batch + shape}.")
    C, H, W = shape
    if isinstance(layer, nn.Conv2d):
        if C != layer.in_channels:
            raise ValueError(f"layer {name} ({layer!r}) expects {layer.in_channels} channels, "
                             f"but receives shape {batch + shape}.")
        OC = layer.out_channels
        params = conv_params(layer.kernel_size, C, OC, layer.bias is not None)
    else:
        OC, params = C, 0
    window = (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    OH, OW = (conv_output_size(size, k, s, p, d) for size, k, s, p, d in zip((H, W), *window))
    if OH < 1 or OW < 1:
        raise ValueError(f"layer {name} ({layer!r}) receives shape {batch + shape}, "
                         f"too small for its window (output would be {OH}x{OW}).")
    return (OC, OH, OW), params


def _grow_field(layer, rf, jump, start, first):
    """(rf, jump, start, first) after a window layer, per axis (rf and jump in input pixels)."""
    k_eff = tuple(d * (k - 1) + 1 for k, d in zip(layer.kernel_size, layer.dilation))
    start = tuple(st + ((ke - 1) / 2 - p) * j for st, ke, p, j in zip(start, k_eff, layer.padding, jump))
    first = tuple(f - p * j for f, p, j in zip(first, layer.padding, jump))
    rf = tuple(r + (ke - 1) * j for r, ke, j in zip(rf, k_eff, jump))
    jump = tuple(j * s for j, s in zip(jump, layer.stride))
    return rf, jump, start, first


@dataclass(frozen=True)
class _Field:
    """What flows from layer to layer: the (C, H, W) or (F,) shape and the receptive field (None: not spatial)."""
    shape: tuple
    rf: tuple | None
    jump: tuple | None
    start: tuple | None
    first: tuple | None


def layer_geometry(model, input_shape) -> list[LayerGeometry]:
    """One LayerGeometry per layer of the Sequential ``model`` for inputs of ``input_shape``.

    ``input_shape`` is (C, H, W) or (N, C, H, W). Shapes are computed by
    arithmetic, nothing is run. Raises ValueError when a layer does not fit the
    shape arriving at it and TypeError for a layer whose geometry is unknown.
    A residual block adds the rows of its body, of its shortcut (``branch``) and
    its own (the sum), in that order.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"layer_geometry needs a Sequential model, not {type(model).__name__}.")
    shape = tuple(input_shape)
    if len(shape) not in (3, 4) or not all(hasattr(s, "__index__") and not isinstance(s, bool) and s >= 1
                                           for s in shape):
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W) of positive ints, got {input_shape!r}.")
    shape = tuple(int(s) for s in shape)
    batch = shape[:-3]
    rows = []
    _walk(model, "", _Field(shape[-3:], (1, 1), (1, 1), (0.0, 0.0), (0, 0)), batch, rows, False)
    return rows


def _walk(module, name, field, batch, rows, branch) -> _Field:
    """Append the rows of ``module`` (named ``name``) for ``field`` arriving at it; returns the field leaving it."""
    if isinstance(module, nn.Sequential):
        for child_name, child in module.named_children():
            field = _walk(child, f"{name}.{child_name}" if name else child_name, field, batch, rows, branch)
        return field
    if isinstance(module, nn.Residual):
        return _residual(module, name, field, batch, rows, branch)
    field, params, window = _leaf(name, module, field, batch)
    kernel_size, stride, padding, dilation = window if window else (None, None, None, None)
    rows.append(LayerGeometry(name, type(module).__name__, batch + field.shape, params, kernel_size, stride,
                              padding, dilation, field.rf, field.jump, field.start, field.first, branch))
    return field


def _residual(block, name, field, batch, rows, branch) -> _Field:
    """The rows of a residual block: its body, its shortcut (a branch), then the sum's row."""
    (body_name, body), (shortcut_name, shortcut) = block.named_paths()
    through = _walk(body, f"{name}.{body_name}" if body_name else name, field, batch, rows, branch)
    across = field if shortcut is None else _walk(shortcut, f"{name}.{shortcut_name}", field, batch, rows, True)
    if through.shape != across.shape:
        raise ValueError(f"residual block {name}: the body gives shape {batch + through.shape} but the shortcut "
                         f"{batch + across.shape}; they must match to be added.")
    out = through
    if through.rf is not None and across.rf is not None:
        # The field of a sum is the union of its paths' fields (the larger one when one holds the other).
        first = tuple(min(a, b) for a, b in zip(through.first, across.first))
        end = tuple(max(fa + ra, fb + rb) for fa, ra, fb, rb in zip(through.first, through.rf, across.first,
                                                                     across.rf))
        out = _Field(through.shape, tuple(e - f for e, f in zip(end, first)), through.jump, through.start, first)
    rows.append(LayerGeometry(name, type(block).__name__, batch + out.shape, 0, None, None, None, None, out.rf,
                              out.jump, out.start, out.first, branch))
    return out


def _leaf(name, layer, field, batch) -> tuple[_Field, int, tuple | None]:
    """(field leaving, parameter count, (kernel, stride, padding, dilation) or None) of one layer."""
    shape, rf, jump, start, first = field.shape, field.rf, field.jump, field.start, field.first
    window = None
    if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        shape, params = _window_output(name, layer, shape, batch)
        window = (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        if rf is not None:
            rf, jump, start, first = _grow_field(layer, rf, jump, start, first)
    elif isinstance(layer, nn.AdaptiveAvgPool2d):
        if len(shape) != 3:
            raise ValueError(f"layer {name} ({type(layer).__name__}) needs a (C, H, W) input, "
                             f"but receives shape {batch + shape}.")
        whole = _WholeInput(tuple(shape[1:]))
        shape, params = (shape[0], 1, 1), 0
        if rf is not None:
            rf, jump, start, first = _grow_field(whole, rf, jump, start, first)
    elif isinstance(layer, ELEMENTWISE):
        params = 0
    elif isinstance(layer, PER_CHANNEL):
        if shape[0] != layer.num_features:
            raise ValueError(f"layer {name} ({layer!r}) expects {layer.num_features} channels, "
                             f"but receives shape {batch + shape}.")
        params = 2 * layer.num_features if layer.affine else 0
    elif isinstance(layer, nn.Flatten):
        size = 1
        for s in shape:
            size *= s
        shape, params = (size,), 0
        rf = jump = start = first = None
    elif isinstance(layer, nn.Linear):
        if len(shape) != 1 or shape[0] != layer.in_features:
            raise ValueError(f"layer {name} ({layer!r}) expects {layer.in_features} features, "
                             f"but receives shape {batch + shape}.")
        shape = (layer.out_features,)
        params = linear_params(layer.in_features, layer.out_features, layer.bias is not None)
        rf = jump = start = first = None
    else:
        raise TypeError(f"layer_geometry does not know how layer {name} ({type(layer).__name__}) "
                        "changes shapes.")
    return _Field(shape, rf, jump, start, first), params, window


@dataclass(frozen=True)
class _WholeInput:
    """The window of global average pooling: all of its (H, W) input at once."""
    kernel_size: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)


def input_region(row: LayerGeometry, oy: int, ox: int, input_hw, clip: bool = True) -> tuple[int, int, int, int]:
    """Input rows [y0, y1) and columns [x0, x1) that feed output position (oy, ox) of ``row``.

    ``x[..., y0:y1, x0:x1]`` is the receptive field of that output. With
    ``clip`` (the default) the box is clipped to the image of size
    ``input_hw`` = (H, W); with ``clip=False`` it may reach into the padding
    (negative or past the border). With dilation the box is the bounding box:
    pixels in the holes between dilated taps lie inside it without feeding the output.
    """
    if not isinstance(row, LayerGeometry):
        raise TypeError(f"row must be a LayerGeometry from layer_geometry, not {type(row).__name__}.")
    if not row.spatial:
        raise ValueError(f"layer {row.name} ({row.type}) has no spatial layout: its outputs see the whole input.")
    OH, OW = row.output_shape[-2:]
    for value, size, axis in ((oy, OH, "oy"), (ox, OW, "ox")):
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{axis} must be an int, not {value!r}.")
        if not 0 <= int(value) < size:
            raise ValueError(f"{axis}={int(value)} is outside layer {row.name}'s output of size {OH}x{OW}.")
    H, W = pair(input_hw, "input_hw")
    if H < 1 or W < 1:
        raise ValueError(f"input_hw must be positive, got {(H, W)}.")
    y0 = row.first[0] + int(oy) * row.jump[0]
    x0 = row.first[1] + int(ox) * row.jump[1]
    y1, x1 = y0 + row.rf[0], x0 + row.rf[1]
    if not clip:
        return (y0, y1, x0, x1)
    return (max(y0, 0), min(y1, H), max(x0, 0), min(x1, W))


def stacked_3x3_layers(size: int, strides=()) -> int:
    """How many stacked 3x3 layers it takes for one output to see ``size`` input pixels along an axis.

    Layer i has stride ``strides[i]`` (1 past the end of ``strides``); each 3x3
    layer widens the receptive field by 2*jump, and its stride multiplies the jump.
    With stride 1 throughout, N layers see 2N + 1 pixels, so 300 pixels need 150.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, not {size!r}.")
    rf, jump, layers = 1, 1, 0
    while rf < size:
        stride = strides[layers] if layers < len(strides) else 1
        rf += 2 * jump
        jump *= stride
        layers += 1
    return layers


def window_strides(rows) -> tuple[int, ...]:
    """The stride along H of every windowed layer (convolution or pooling) on the main path of layer_geometry
    rows, in order (a residual shortcut's layers are not stacked on the others)."""
    return tuple(row.stride[0] for row in rows if row.stride is not None and not row.branch)
