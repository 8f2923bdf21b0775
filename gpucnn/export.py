"""ONNX export: a gpucnn model as a standard ONNX graph that ONNX Runtime (and other runtimes) can run.

``to_onnx(model, "model.onnx")`` writes the model's inference graph (eval mode:
Dropout left out, BatchNorm with its running statistics) at opset ``OPSET``.
Each layer becomes the ONNX operator of the same meaning:

=====================================  =====================================================
gpucnn layer                           ONNX operator
=====================================  =====================================================
Conv2d                                 Conv (weight (OC, C, KH, KW), bias, pads, strides, dilations)
MaxPool2d / AvgPool2d                  MaxPool / AveragePool (count_include_pad=1, as gpucnn)
Linear                                 Gemm (transB=1: weight (OUT, IN), as PyTorch)
ReLU / Tanh / Sigmoid                  Relu / Tanh / Sigmoid
Flatten                                Flatten (axis 1)
Dropout                                nothing (inference is the identity)
BatchNorm2d / BatchNorm1d              BatchNormalization (running statistics)
AdaptiveAvgPool2d(1)                   GlobalAveragePool
a residual block                       its two paths, then Add (and Relu)
=====================================  =====================================================

The graph's input ``"input"`` is float32 (N, C, H, W) with a free batch size N;
its output ``"logits"`` is (N, num_classes). By default the input is what
gpucnn's model takes: pixels already normalised, ``(pixels / 255 - mean) / std``.
``normalization=(mean, std)`` (one number or one per channel, as in
``gpucnn.data.normalize``) puts that step into the graph, so the exported model
takes raw pixels, floats from 0 to 255, computed with the same float32
operations as gpucnn's. The ``onnx`` package is an optional extra:
``pip install 'gpucnn[onnx]'``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gpucnn import backend
from gpucnn.nn import Module, Sequential
from gpucnn.viz import MissingDependencyError

OPSET = 17
IR_VERSION = 8            # what opset 17 came with; readers back to ONNX Runtime 1.10 load it
INPUT_NAME, OUTPUT_NAME = "input", "logits"
INSTALL_HINT = "the onnx package is needed to export models: pip install 'gpucnn[onnx]'"
PIXEL_MAX = 255.0


def _onnx():
    """The onnx module, or MissingDependencyError with the install command."""
    try:
        import onnx  # noqa: PLC0415 - optional extra
    except ImportError:
        raise MissingDependencyError(INSTALL_HINT) from None
    return onnx


class _Graph:
    """The nodes and initializers of the graph being built, with fresh value names."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes = []
        self.initializers = []
        self._count = 0

    def constant(self, name: str, array) -> str:
        """An initializer holding ``array`` (float32 unless it is an int array); returns its name."""
        array = np.asarray(backend.to_numpy(array))
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list, name: str, **attributes) -> str:
        """Append one ``op`` node reading ``inputs``; returns the name of its output."""
        self._count += 1
        output = f"{name}_{op.lower()}_{self._count}"
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [output], name=f"{name}:{op}", **attributes))
        return output


def _pads(padding) -> list:
    """gpucnn's (PH, PW) -> ONNX's [top, left, bottom, right]."""
    return [padding[0], padding[1], padding[0], padding[1]]


def _conv(graph, layer, x, name):
    inputs = [x, graph.constant(f"{name}.weight", layer.weight.data)]
    if layer.bias is not None:
        inputs.append(graph.constant(f"{name}.bias", layer.bias.data))
    return graph.node("Conv", inputs, name, kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                      pads=_pads(layer.padding), dilations=list(layer.dilation), group=1)


def _max_pool(graph, layer, x, name):
    return graph.node("MaxPool", [x], name, kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                      pads=_pads(layer.padding))


def _avg_pool(graph, layer, x, name):
    # gpucnn's zero padding counts in the divisor, as count_include_pad=1.
    return graph.node("AveragePool", [x], name, kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                      pads=_pads(layer.padding), count_include_pad=1)


def _linear(graph, layer, x, name):
    inputs = [x, graph.constant(f"{name}.weight", layer.weight.data)]
    if layer.bias is not None:
        inputs.append(graph.constant(f"{name}.bias", layer.bias.data))
    return graph.node("Gemm", inputs, name, transB=1)


def _flatten(graph, layer, x, name):
    return graph.node("Flatten", [x], name, axis=1)


def _dropout(graph, layer, x, name):
    return x


def _batch_norm(graph, layer, x, name):
    C = layer.num_features
    weight = layer.weight.data if getattr(layer, "weight", None) is not None else np.ones(C, np.float32)
    bias = layer.bias.data if getattr(layer, "bias", None) is not None else np.zeros(C, np.float32)
    inputs = [x, graph.constant(f"{name}.weight", weight), graph.constant(f"{name}.bias", bias),
              graph.constant(f"{name}.running_mean", _array(layer.running_mean)),
              graph.constant(f"{name}.running_var", _array(layer.running_var))]
    return graph.node("BatchNormalization", inputs, name, epsilon=float(layer.eps))


def _array(value):
    """A buffer's values, whether it is kept as an array or as a Parameter-like object with .data."""
    return getattr(value, "data", value)


def _global_avg_pool(graph, layer, x, name):
    size = layer.output_size if isinstance(layer.output_size, tuple) else (layer.output_size,) * 2
    if tuple(size) != (1, 1):
        raise ValueError(f"{name}: only AdaptiveAvgPool2d(1) (global average pooling) can be exported, "
                         f"not output_size {layer.output_size}.")
    return graph.node("GlobalAveragePool", [x], name)


def _elementwise(op):
    return lambda graph, layer, x, name: graph.node(op, [x], name)


# Layer class name -> converter(graph, layer, input name, layer name) -> output name.
CONVERTERS = {
    "Conv2d": _conv, "MaxPool2d": _max_pool, "AvgPool2d": _avg_pool, "Linear": _linear, "Flatten": _flatten,
    "ReLU": _elementwise("Relu"), "Tanh": _elementwise("Tanh"), "Sigmoid": _elementwise("Sigmoid"),
    "Dropout": _dropout, "BatchNorm2d": _batch_norm, "BatchNorm1d": _batch_norm,
    "AdaptiveAvgPool2d": _global_avg_pool,
}


def _residual(graph, block, x: str, name: str) -> str:
    """A residual block (gpucnn.nn.Residual, BasicBlock): both paths from ``x``, Add, then Relu when it has one."""
    (body_name, body), (shortcut_name, shortcut) = block.named_paths()
    through = _convert(graph, body, x, ".".join(filter(None, [name, body_name])))
    across = x if shortcut is None else _convert(graph, shortcut, x, ".".join(filter(None, [name, shortcut_name])))
    y = graph.node("Add", [through, across], name or "residual")
    return graph.node("Relu", [y], name or "residual") if block.relu else y


def _convert(graph, module, x: str, name: str) -> str:
    """The graph of ``module`` applied to the value ``x``; returns the name of its output."""
    converter = CONVERTERS.get(type(module).__name__)
    if converter is not None:
        return converter(graph, module, x, name)
    if callable(getattr(module, "named_paths", None)):   # a residual block: y = body(x) + shortcut(x)
        return _residual(graph, module, x, name)
    if isinstance(module, Sequential):
        # Layers in their declared order: the models' ReLU/max-pool swap (see models.py) computes the same.
        for child_name, child in module.named_children():
            x = _convert(graph, child, x, f"{name}.{child_name}" if name else child_name)
        return x
    raise ValueError(f"cannot export {name or 'the model'} ({type(module).__name__}) to ONNX: gpucnn exports "
                     f"{', '.join(sorted(CONVERTERS))}, Sequential and residual blocks.")


def _normalize_input(graph, x: str, normalization, C: int) -> str:
    """(x * (1/255) - mean) / std, the float32 steps of gpucnn.data.normalize, per channel."""
    mean, std = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in normalization)
    for what, values in (("mean", mean), ("std", std)):
        if values.ndim != 1 or len(values) not in (1, C) or not np.isfinite(values).all():
            raise ValueError(f"normalization {what} must be one finite number or {C} (one per channel), "
                             f"not {values.tolist()}.")
    if (std <= 0).any():
        raise ValueError(f"normalization std must be positive, not {std.tolist()}.")
    scale = graph.constant("pixel_scale", np.float32(1.0 / PIXEL_MAX))
    mean = graph.constant("pixel_mean", mean.astype(np.float32).reshape(1, -1, 1, 1))
    std = graph.constant("pixel_std", std.astype(np.float32).reshape(1, -1, 1, 1))
    x = graph.node("Mul", [x, scale], "normalize")
    x = graph.node("Sub", [x, mean], "normalize")
    return graph.node("Div", [x, std], "normalize")


def _check_model(model, input_shape):
    if not isinstance(model, Module):
        raise TypeError(f"to_onnx needs a gpucnn.nn.Module, not {type(model).__name__}.")
    dtypes = {np.dtype(p.dtype) for p in model.parameters()}
    if dtypes - {np.dtype(np.float32)}:
        raise TypeError(f"to_onnx exports float32 models; this one holds {sorted(map(str, dtypes))} "
                        "(call model.float() first).")
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError("the model has no input_shape; pass input_shape=(C, H, W).")
    shape = tuple(int(d) for d in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) of positive ints, not {shape}.")
    return shape


def build_onnx(model, normalization=None, input_shape=None, metadata=None):
    """The ``onnx.ModelProto`` of ``model`` (see the module docstring); checked by ``onnx.checker``.

    ``metadata`` (str -> str) goes into the model's metadata_props (the CLI stores the class names there).
    """
    onnx = _onnx()
    C, H, W = _check_model(model, input_shape)
    graph = _Graph(onnx)
    x = INPUT_NAME
    if normalization is not None:
        x = _normalize_input(graph, x, normalization, C)
    y = _convert(graph, model, x, "")
    graph.nodes.append(onnx.helper.make_node("Identity", [y], [OUTPUT_NAME], name="logits"))
    num_classes = getattr(model, "num_classes", None)
    float32 = onnx.TensorProto.FLOAT
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            graph.nodes, getattr(model, "config", {}).get("name", type(model).__name__),
            [onnx.helper.make_tensor_value_info(INPUT_NAME, float32, ["N", C, H, W])],
            [onnx.helper.make_tensor_value_info(OUTPUT_NAME, float32, ["N", num_classes])],
            graph.initializers),
        opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="gpucnn", ir_version=IR_VERSION,
        doc_string="input: " + ("raw pixels 0-255, normalised in the graph" if normalization is not None
                                else "normalised pixels, (pixels / 255 - mean) / std"))
    if metadata:
        onnx.helper.set_model_props(proto, {str(key): str(value) for key, value in metadata.items()})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def to_onnx(model, path, normalization=None, input_shape=None, metadata=None) -> Path:
    """Write ``model`` as an ONNX file at ``path`` (see the module docstring); returns the path.

    ``normalization``: None (the file takes normalised input, as ``model`` does) or
    ``(mean, std)`` (it takes raw pixels 0-255 and normalises them itself).
    ``input_shape`` (C, H, W): default ``model.input_shape``; ``metadata``: see
    ``build_onnx``. The file is written
    under a temporary name and renamed, so a failed export leaves no partial file.
    """
    proto = build_onnx(model, normalization, input_shape, metadata)
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist.")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(proto.SerializeToString())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
