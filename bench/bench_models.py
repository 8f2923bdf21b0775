"""The models the CPU benchmarks time, built once per library from one description.

gpucnn's model comes from its registry (seed 0); PyTorch's is the same network (layer for layer,
He-uniform weights, zero biases); ONNX Runtime runs gpucnn's own model, with gpucnn's weights,
exported by gpucnn.export.build_onnx (inference only). PyTorch and ONNX Runtime are imported
only by the process that times them.
"""
from __future__ import annotations

import os

# the networks both libraries build (gpucnn's registry names); resnet20 and vgg-small-bn need a gpucnn
# that registers them (issue 20)
MODELS = ("lenet5", "vgg-small", "vgg-small-bn", "resnet20")


def gpucnn_model(name: str, seed: int = 0):
    from gpucnn import models  # noqa: PLC0415
    if name not in models.available_models():
        raise SystemExit(f"this gpucnn has no model {name!r} (it has {', '.join(models.available_models())})")
    return models.build_model(name, seed=seed)


def torch_model(torch, name: str):
    """The PyTorch network of the same shape as gpucnn's `name` (He-uniform weights, zero biases)."""
    nn = torch.nn
    if name == "lenet5":
        model = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    elif name in ("vgg-small", "vgg-small-bn"):
        layers, channels = [], 3
        for width in (64, 128, 256):
            for _ in range(2):
                if name == "vgg-small":
                    layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                else:
                    layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2))
        hidden = [nn.Linear(256 * 4 * 4, 256)] if name == "vgg-small" else \
            [nn.Linear(256 * 4 * 4, 256, bias=False), nn.BatchNorm1d(256)]
        model = nn.Sequential(*layers, nn.Flatten(), *hidden, nn.ReLU(), nn.Linear(256, 10))
    elif name == "resnet20":
        model = _torch_resnet20(nn)
    else:
        raise ValueError(f"no PyTorch form of {name!r}")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def _torch_resnet20(nn):
    """He et al.'s CIFAR ResNet-20 as gpucnn's resnet20: 3x3 convolutions without bias, BatchNorm, three
    stages of three basic blocks (16, 32, 64 channels), 1x1 convolution + BatchNorm shortcuts where the
    shape changes, global average pooling, fc 64 -> 10."""

    class Block(nn.Module):
        def __init__(self, inputs, outputs, stride):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs),
                                      nn.ReLU(), nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(outputs))
            self.shortcut = nn.Identity() if stride == 1 and inputs == outputs else nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

        def forward(self, x):
            return nn.functional.relu(self.body(x) + self.shortcut(x))

    layers, channels = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, width in enumerate((16, 32, 64)):
        for index in range(3):
            layers.append(Block(channels, width, 2 if stage and not index else 1))
            channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def onnx_session(model, threads: int):
    """An ONNX Runtime CPU session of gpucnn's `model` (all graph optimisations, `threads` intra-op threads,
    sequential execution) and the name of its input."""
    import onnxruntime as ort  # noqa: PLC0415

    from gpucnn.export import INPUT_NAME, build_onnx  # noqa: PLC0415
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(build_onnx(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session, INPUT_NAME


def thread_count() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", "1"))
