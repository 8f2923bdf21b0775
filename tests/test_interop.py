"""PyTorch interop: a torch LeNet-5's weights give gpucnn the same logits, and gpucnn's give torch the same.

The torch tests skip themselves without torch (it is not a test dependency); the
NumPy round trip and the no-torch-import promise run everywhere.
"""
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest

import gpucnn
from gpucnn import interop
from gpucnn.models import available_models, build_model
from tests.helpers import ROOT

RTOL = 1e-5   # relative to the largest logit (the two libraries sum in different orders)


def assert_close_logits(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL * np.abs(expected).max())


def gpucnn_logits(model, x):
    model.eval()
    with gpucnn.no_grad():
        return np.asarray(model(x))


def torch_twin(torch, model):
    """A torch nn.Sequential with the gpucnn model's layers, names and hyperparameters (fresh torch weights)."""
    tnn = torch.nn
    layers = OrderedDict()
    for name, layer in model.named_children():
        kind = type(layer).__name__
        if kind == "Conv2d":
            layers[name] = tnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                      layer.padding, layer.dilation, bias=layer.bias is not None)
        elif kind == "Linear":
            layers[name] = tnn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        elif kind in ("MaxPool2d", "AvgPool2d"):
            layers[name] = getattr(tnn, kind)(layer.kernel_size, layer.stride, layer.padding)
        elif kind in ("BatchNorm1d", "BatchNorm2d"):
            layers[name] = getattr(tnn, kind)(layer.num_features, eps=layer.eps, momentum=layer.momentum)
        else:   # ReLU, Tanh, Flatten: no hyperparameters
            layers[name] = getattr(tnn, kind)()
    return tnn.Sequential(layers).eval()


# Sequential models a torch twin mirrors layer for layer (vgg-small-bn: once issue 20's BatchNorm models exist).
TWINNED = [name for name in ("lenet5", "lenet5-classic", "vgg-small", "vgg-small-bn") if name in available_models()]


@pytest.mark.parametrize("name", TWINNED)
def test_torch_weights_load_into_gpucnn_and_back_with_the_same_logits(name):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = build_model(name, seed=5)
    twin = torch_twin(torch, model)
    x = np.random.default_rng(0).standard_normal((4, *model.input_shape)).astype(np.float32)
    with torch.no_grad():   # running statistics (BatchNorm) away from their initial values
        twin.train()(torch.from_numpy(x))
        twin.eval()
    assert list(twin.state_dict()) == list(model.state_dict())          # the same names, in the same order
    assert [tuple(t.shape) for t in twin.state_dict().values()] == [a.shape for a in model.state_dict().values()]

    # PyTorch -> gpucnn: torch's own initial weights (requires_grad tensors) become gpucnn's
    result = interop.load_state_dict(model, twin.state_dict(keep_vars=True))
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    assert_close_logits(gpucnn_logits(model, x), expected)

    # gpucnn -> PyTorch: other weights, loaded strictly into a fresh twin
    other = build_model(name, seed=6)
    other.train()(x)        # moves its running statistics, where it has them
    fresh = torch_twin(torch, other)
    fresh.load_state_dict(interop.state_dict(other, as_torch=True), strict=True)
    with torch.no_grad():
        assert_close_logits(fresh(torch.from_numpy(x)).numpy(), gpucnn_logits(other, x))


def test_numpy_mappings_round_trip_and_mistakes_are_named():
    source, target = build_model("lenet5", seed=1), build_model("lenet5", seed=2)
    interop.load_state_dict(target, interop.state_dict(source))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    state = interop.state_dict(source)
    state["fc3.weight"] = state["fc3.weight"][:5]
    with pytest.raises(ValueError, match=r"'fc3.weight' has shape \(5, 84\)"):
        interop.load_state_dict(target, state)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        interop.load_state_dict(target, {**interop.state_dict(source), "extra": np.zeros(1)})
    skipped = interop.load_state_dict(target, {"conv1.bias": [0.5] * 6}, strict=False)   # lists of numbers too
    assert "fc3.bias" in skipped.missing_keys and target.state_dict()["conv1.bias"].tolist() == [0.5] * 6
    with pytest.raises(TypeError, match="mapping of name -> tensor"):
        interop.load_state_dict(target, [1, 2])
    with pytest.raises(TypeError, match="must be a tensor or an array of numbers"):
        interop.load_state_dict(target, {"conv1.bias": "zeros"}, strict=False)


def test_interop_never_imports_torch_unless_asked():
    code = ("import sys, numpy as np\n"
            "from gpucnn import interop\nfrom gpucnn.models import LeNet5\n"
            "m = LeNet5(seed=0)\ninterop.load_state_dict(m, interop.state_dict(m))\n"
            "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
