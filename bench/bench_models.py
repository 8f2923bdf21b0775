"""The models the CPU benchmarks time, built once per library from one description.

gpucnn's model comes from its registry (seed 0); PyTorch's is the same network (layer for layer,
He-uniform weights, zero biases); ONNX Runtime runs gpucnn's own model, with gpucnn's weights,
exported by gpucnn.export.build_onnx (inference only). PyTorch and ONNX Runtime are imported
only by the process that times them.
"""
from __future__ import annotations

import os

# name -> (gpucnn registry name, PyTorch builder name)
MODELS = {"lenet5": "lenet5", "vgg-small": "vgg-small"}


def gpucnn_model(name: str, seed: int = 0):
    from gpucnn import models  # noqa: PLC0415
    return models.build_model(MODELS[name], seed=seed)


def torch_model(torch, name: str):
    """The PyTorch network of the same shape as gpucnn's `name` (He-uniform weights, zero biases)."""
    nn = torch.nn
    if name == "lenet5":
        model = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    elif name == "vgg-small":
        layers, channels = [], 3
        for width in (64, 128, 256):
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2))
        model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(256 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10))
    else:
        raise ValueError(f"no PyTorch form of {name!r}")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return model


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
