"""ONNX export: every registered model, run by ONNX Runtime, gives gpucnn's logits; onnx.checker passes."""
import json
import sys
from collections import OrderedDict

import numpy as np
import pytest

import gpucnn
from gpucnn.checkpoint import load_checkpoint, model_from_checkpoint
from gpucnn.data import load_dataset, normalize
from gpucnn.export import OPSET, build_onnx, to_onnx
from gpucnn.models import available_models, build_model
from gpucnn.nn import Linear, Module, Sequential
from gpucnn.viz import MissingDependencyError
from tests.helpers import run_cli

onnx = pytest.importorskip("onnx")          # both are in the test extra; a bare install skips these tests
ort = pytest.importorskip("onnxruntime")

RTOL = 1e-5   # relative to the largest logit: ONNX Runtime sums convolutions in its own order


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: x})[0]


def gpucnn_logits(model, x):
    model.eval()
    with gpucnn.no_grad():
        return np.asarray(model(x))


def assert_close_logits(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL * np.abs(expected).max())


def settled(model, x):
    """The model after one training-mode forward on ``x``: running statistics (where a layer has them) moved."""
    model.train()
    model(x)
    return model.eval()


@pytest.mark.parametrize("name", available_models())
def test_every_registered_model_runs_in_onnx_runtime_with_gpucnn_logits(name, tmp_path):
    model = build_model(name, seed=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, *model.input_shape)).astype(np.float32)
    model = settled(model, x)
    path = to_onnx(model, tmp_path / f"{name}.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == OPSET >= 17
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == \
        ["N", *model.input_shape]
    assert "Dropout" not in {node.op_type for node in proto.graph.node}
    for batch in (x, x[:1]):   # any batch size
        assert_close_logits(run_onnx(path, batch), gpucnn_logits(model, batch))


def test_other_input_shapes_and_every_layer_kind_in_the_graph(tmp_path):
    model = build_model("lenet5-classic", seed=2, in_channels=3, input_size=32)   # tanh, average pooling
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    path = to_onnx(model, tmp_path / "classic.onnx")
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops == ["Conv", "Tanh", "AveragePool", "Conv", "Tanh", "AveragePool", "Flatten", "Gemm", "Tanh", "Gemm",
                   "Tanh", "Gemm", "Identity"]
    assert_close_logits(run_onnx(path, x), gpucnn_logits(model, x))


def test_raw_pixel_input_normalises_inside_the_graph_like_gpucnn(tmp_path):
    model = build_model("lenet5", seed=3, in_channels=3, input_size=32)
    pixels = np.random.default_rng(2).integers(0, 256, size=(5, 3, 32, 32), dtype=np.uint8)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    path = to_onnx(model, tmp_path / "raw.onnx", normalization=(mean, std))
    onnx.checker.check_model(str(path))
    expected = gpucnn_logits(model, normalize(pixels, mean, std))
    assert_close_logits(run_onnx(path, pixels.astype(np.float32)), expected)
    one = to_onnx(build_model("lenet5", seed=3), tmp_path / "grey.onnx", normalization=(0.2860, 0.3530))
    grey = pixels[:, :1, 2:30, 2:30].copy()
    expected = gpucnn_logits(build_model("lenet5", seed=3), normalize(grey, 0.2860, 0.3530))
    assert_close_logits(run_onnx(one, grey.astype(np.float32)), expected)


class Doubler(Module):
    def forward(self, x):
        return 2 * x


def test_what_cannot_be_exported_is_one_clear_error(tmp_path, monkeypatch):
    model = build_model("lenet5", seed=0)
    with pytest.raises(ValueError, match=r"cannot export extra \(Doubler\) to ONNX"):
        build_onnx(Sequential(OrderedDict([("net", model), ("extra", Doubler())])), input_shape=(1, 28, 28))
    with pytest.raises(TypeError, match="exports float32 models"):
        build_onnx(build_model("lenet5", seed=0).double())
    with pytest.raises(ValueError, match="no input_shape"):
        build_onnx(Sequential(Linear(4, 3)))
    with pytest.raises(ValueError, match="normalization mean must be one finite number or 1"):
        build_onnx(model, normalization=((0.1, 0.2), 0.3))
    with pytest.raises(ValueError, match="std must be positive"):
        build_onnx(model, normalization=(0.1, 0.0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_onnx(model, tmp_path / "missing" / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)   # as if the extra were not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'gpucnn\[onnx\]'"):
        to_onnx(model, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_export_command_writes_a_file_that_classifies_like_evaluate(reference_run, random_mnist, tmp_path):
    checkpoint = reference_run / "checkpoint.npz"
    run_cli("export", checkpoint, tmp_path / "model.onnx")
    result = run_cli("export", checkpoint, tmp_path / "raw.onnx", "--raw-pixels")
    assert result.stdout.startswith(f"wrote {tmp_path / 'raw.onnx'}: lenet5, input (N, 1, 28, 28) float32 raw")
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    images, _ = load_dataset("mnist", "test", data_dir=random_mnist, download=False)
    stats = ckpt["config"]["normalization"]   # the training split's, stored by train
    x = normalize(images, stats["mean"], stats["std"])
    expected = gpucnn_logits(model, x)
    assert_close_logits(run_onnx(tmp_path / "model.onnx", x), expected)
    assert_close_logits(run_onnx(tmp_path / "raw.onnx", images[:, None].astype(np.float32)), expected)
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "raw.onnx")).metadata_props}
    assert json.loads(metadata["classes"]) == [str(k) for k in range(10)] and metadata["dataset"] == "mnist"
    bad = run_cli("export", checkpoint, tmp_path / "model.txt", check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip() == f"Error: OUT must name a .onnx file, not {tmp_path / 'model.txt'}."


def test_batch_norm_residual_blocks_and_global_pooling_become_their_onnx_operators(tmp_path):
    from gpucnn import nn
    model = build_model("resnet20", seed=4, in_channels=1, input_size=28, dropout=0.3)   # grey, with Dropout
    x = np.random.default_rng(5).standard_normal((3, 1, 28, 28)).astype(np.float32)
    model = settled(model, x)
    path = to_onnx(model, tmp_path / "resnet20.onnx")
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("Add") == 9 and ops.count("GlobalAveragePool") == 1 and "Dropout" not in ops
    assert ops.count("BatchNormalization") == 1 + 9 * 2 + 2          # stem, two per block, two projections
    assert_close_logits(run_onnx(path, x), gpucnn_logits(model, x))
    # BatchNorm1d on features (N, F), without affine parameters
    head = Sequential(OrderedDict([("flatten", nn.Flatten()), ("fc", nn.Linear(784, 16, rng=0)),
                                   ("bn", nn.BatchNorm1d(16, affine=False)), ("out", nn.Linear(16, 10, rng=1))]))
    head = settled(head, x)
    path = to_onnx(head, tmp_path / "head.onnx", input_shape=(1, 28, 28))
    assert "BatchNormalization" in [node.op_type for node in onnx.load(str(path)).graph.node]
    assert_close_logits(run_onnx(path, x), gpucnn_logits(head, x))
