"""Layers, Module and Sequential: forward against the ops, float64 gradient checks
through ``layer.backward``, gradient accumulation, validation, and the Module API."""
import types
from collections import OrderedDict

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gpucnn import backend, nn, ops
from gpucnn import optim
from gpucnn.models import LeNet5
from gpucnn.testing.gradcheck import assert_gradient_close
from gpucnn.train import Trainer
from tests.helpers import assert_same_tree, tie_free


def check_layer_grads(layer, x, seed=0):
    """Compare layer.backward (input and parameter grads) with central differences, in float64."""
    layer.double()
    x = x.astype(np.float64)
    y = layer(x)
    weights = np.random.default_rng(seed).standard_normal(y.shape)  # loss = sum(y * weights)
    layer.zero_grad()
    grad_x = layer.backward(weights)
    analytic = {name: p.grad.copy() for name, p in layer.named_parameters()}

    def loss():
        return float(np.sum(layer(x) * weights))

    assert grad_x.shape == x.shape
    assert_gradient_close(loss, x, grad_x)
    for name, p in layer.named_parameters():
        try:
            assert_gradient_close(loss, p.data, analytic[name])
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


def away_from_zero(rng, shape):
    """Values with |v| >= 0.1, so a ReLU kink is never within a finite-difference step."""
    return np.where(rng.random(shape) < 0.5, -1.0, 1.0) * (0.1 + rng.random(shape))


def naive_conv2d(x, weight, bias, stride, padding, dilation):
    """Direct loop over kernel taps: an oracle independent of the op's implementation."""
    N, C, H, W = x.shape
    OC, _, KH, KW = weight.shape
    (SH, SW), (PH, PW), (DH, DW) = stride, padding, dilation
    OH = (H + 2 * PH - DH * (KH - 1) - 1) // SH + 1
    OW = (W + 2 * PW - DW * (KW - 1) - 1) // SW + 1
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (PH, PH), (PW, PW)))
    y = np.zeros((N, OC, OH, OW))
    for ky in range(KH):
        for kx in range(KW):
            patch = xp[:, :, ky * DH: ky * DH + SH * (OH - 1) + 1: SH, kx * DW: kx * DW + SW * (OW - 1) + 1: SW]
            y += np.einsum("nchw,oc->nohw", patch, weight[:, :, ky, kx])
    if bias is not None:
        y += bias[None, :, None, None]
    return y


# ---------------------------------------------------------------- Conv2d
CONV_CASES = [
    # C, OC, H, W, kernel, stride, padding, dilation, bias
    (1, 2, 5, 5, 3, 1, 0, 1, True),
    (2, 3, 7, 6, 3, 2, 1, 1, True),
    (3, 2, 8, 7, (3, 2), (2, 1), (1, 0), 1, False),
    (2, 2, 9, 9, 3, 1, 2, 2, True),
    (2, 3, 7, 8, (2, 3), 2, (0, 1), (2, 1), True),
]


@pytest.mark.parametrize("C, OC, H, W, k, s, p, d, bias", CONV_CASES)
def test_conv2d_forward_matches_op_and_naive_loop(C, OC, H, W, k, s, p, d, bias):
    rng = np.random.default_rng(1)
    layer = nn.Conv2d(C, OC, k, stride=s, padding=p, dilation=d, bias=bias, rng=rng)
    if bias:
        layer.bias.data[:] = rng.standard_normal(OC).astype(np.float32)
    x = rng.standard_normal((2, C, H, W)).astype(np.float32)
    y = layer(x)
    b = layer.bias.data if bias else None
    assert_array_equal(y, ops.conv2d_forward(x, layer.weight.data, b, layer.stride, layer.padding, layer.dilation))
    expected = naive_conv2d(x, layer.weight.data, b, layer.stride, layer.padding, layer.dilation)
    assert y.dtype == np.float32 and y.shape == expected.shape
    assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("C, OC, H, W, k, s, p, d, bias", CONV_CASES)
def test_conv2d_gradients(C, OC, H, W, k, s, p, d, bias):
    rng = np.random.default_rng(2)
    layer = nn.Conv2d(C, OC, k, stride=s, padding=p, dilation=d, bias=bias, rng=rng)
    check_layer_grads(layer, rng.standard_normal((2, C, H, W)))


def test_conv2d_hyperparameters_are_pairs_and_repr_reads_like_pytorch():
    layer = nn.Conv2d(1, 6, 5, padding=2)
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation) == ((5, 5), (1, 1), (2, 2), (1, 1))
    assert layer.weight.shape == (6, 1, 5, 5) and layer.bias.shape == (6,)
    assert repr(layer) == "Conv2d(1, 6, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))"
    assert repr(nn.Conv2d(2, 3, 3, dilation=2, bias=False)) == \
        "Conv2d(2, 3, kernel_size=(3, 3), stride=(1, 1), dilation=(2, 2), bias=False)"


def test_conv2d_init_is_he_uniform_reproducible_and_float32():
    a = nn.Conv2d(16, 32, 3, rng=7)
    b = nn.Conv2d(16, 32, 3, rng=7)
    assert_array_equal(a.weight.data, b.weight.data)
    assert a.weight.data.dtype == np.float32 and a.bias.data.dtype == np.float32
    bound = np.sqrt(6 / (16 * 9))
    assert np.abs(a.weight.data).max() <= bound
    # a uniform draw of 4608 values reaches close to its bound and has variance bound^2/3 = 2/fan_in
    assert np.abs(a.weight.data).max() > 0.95 * bound
    assert_allclose(a.weight.data.var(), 2 / (16 * 9), rtol=0.1)
    assert_array_equal(a.bias.data, 0)
    lecun = nn.Conv2d(16, 32, 3, init="lecun", rng=7)
    assert np.abs(lecun.weight.data).max() <= np.sqrt(3 / (16 * 9))


def test_conv2d_rejects_bad_inputs_with_clear_messages():
    layer = nn.Conv2d(1, 6, 5)
    with pytest.raises(ValueError, match=r"Conv2d\(1, 6, kernel_size=\(5, 5\).*expected input with 1 channels, "
                                         r"got shape \(8, 3, 28, 28\)"):
        layer(np.zeros((8, 3, 28, 28), np.float32))
    with pytest.raises(ValueError, match="4-D input"):
        layer(np.zeros((1, 28, 28), np.float32))
    with pytest.raises(TypeError, match="expected float32 input.*got float64.*astype"):
        layer(np.zeros((1, 1, 28, 28)))
    with pytest.raises(TypeError, match="got int64"):
        layer(np.zeros((1, 1, 28, 28), np.int64))
    with pytest.raises(TypeError, match="NumPy or CuPy array"):
        layer([[[[0.0]]]])
    with pytest.raises(ValueError, match="too small"):
        layer(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        nn.Conv2d(1, 6, 5).backward(np.zeros((1, 6, 1, 1), np.float32))
    layer(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"grad_output has shape \(2, 6, 3, 3\).*\(2, 6, 4, 4\)"):
        layer.backward(np.zeros((2, 6, 3, 3), np.float32))


@pytest.mark.parametrize("kwargs, error", [
    (dict(in_channels=0, out_channels=1, kernel_size=3), ValueError),
    (dict(in_channels=1, out_channels=1.5, kernel_size=3), TypeError),
    (dict(in_channels=1, out_channels=1, kernel_size=0), ValueError),
    (dict(in_channels=1, out_channels=1, kernel_size=3, stride=0), ValueError),
    (dict(in_channels=1, out_channels=1, kernel_size=3, padding=-1), ValueError),
    (dict(in_channels=1, out_channels=1, kernel_size=3, dilation=(1, 0)), ValueError),
    (dict(in_channels=1, out_channels=1, kernel_size="3"), TypeError),
    (dict(in_channels=1, out_channels=1, kernel_size=3, init="xavier"), ValueError),
    (dict(in_channels=1, out_channels=1, kernel_size=3, rng="seed"), TypeError),
])
def test_conv2d_rejects_bad_hyperparameters(kwargs, error):
    with pytest.raises(error):
        nn.Conv2d(**kwargs)


# ---------------------------------------------------------------- pooling
POOL_CASES = [
    # H, W, kernel, stride, padding
    (6, 6, 2, None, 0),
    (7, 5, 3, 2, 1),
    (5, 8, (2, 3), (1, 2), (1, 0)),
    (9, 9, 3, 3, 0),
]


@pytest.mark.parametrize("H, W, k, s, p", POOL_CASES)
def test_max_pool_forward_matches_op_and_gradients(H, W, k, s, p):
    rng = np.random.default_rng(3)
    layer = nn.MaxPool2d(k, stride=s, padding=p)
    x = tie_free((2, 3, H, W), rng, spacing=0.1)
    expected, _ = ops.max_pool2d_forward(x, layer.kernel_size, layer.stride, layer.padding)
    assert_array_equal(layer(x), expected)
    check_layer_grads(layer, x)


@pytest.mark.parametrize("H, W, k, s, p", POOL_CASES)
def test_avg_pool_forward_matches_op_and_gradients(H, W, k, s, p):
    rng = np.random.default_rng(4)
    layer = nn.AvgPool2d(k, stride=s, padding=p)
    x = rng.standard_normal((2, 3, H, W)).astype(np.float32)
    assert_array_equal(layer(x), ops.avg_pool2d_forward(x, layer.kernel_size, layer.stride, layer.padding))
    check_layer_grads(layer, x)


def test_pool_defaults_and_validation():
    pool = nn.MaxPool2d(2)
    assert (pool.kernel_size, pool.stride, pool.padding, pool.dilation) == ((2, 2), (2, 2), (0, 0), (1, 1))
    assert repr(pool) == "MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0))"
    assert nn.AvgPool2d(3, stride=1).stride == (1, 1)
    with pytest.raises(ValueError, match="at most half"):
        nn.MaxPool2d(2, padding=2)
    with pytest.raises(ValueError, match="stride"):
        nn.AvgPool2d(2, stride=0)
    with pytest.raises(ValueError, match="4-D input"):
        pool(np.zeros((3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="too small"):
        nn.MaxPool2d(3)(np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        pool(np.zeros((1, 1, 4, 4), np.int32))


# ---------------------------------------------------------------- linear, flatten
@pytest.mark.parametrize("IN, OUT, bias", [(1, 1, True), (5, 3, True), (7, 4, False)])
def test_linear_forward_matches_op_and_gradients(IN, OUT, bias):
    rng = np.random.default_rng(5)
    layer = nn.Linear(IN, OUT, bias=bias, rng=rng)
    x = rng.standard_normal((4, IN)).astype(np.float32)
    y = layer(x)
    assert_array_equal(y, ops.linear_forward(x, layer.weight.data, layer.bias.data if bias else None))
    assert_allclose(y, x.astype(np.float64) @ layer.weight.data.T, rtol=1e-5, atol=1e-6)
    check_layer_grads(layer, rng.standard_normal((4, IN)))


def test_linear_shapes_repr_and_validation():
    layer = nn.Linear(400, 120)
    assert layer.weight.shape == (120, 400) and layer.bias.shape == (120,)
    assert repr(layer) == "Linear(in_features=400, out_features=120, bias=True)"
    with pytest.raises(ValueError, match=r"expected input with 400 features, got shape \(2, 576\)"):
        layer(np.zeros((2, 576), np.float32))
    with pytest.raises(ValueError, match="2-D input"):
        layer(np.zeros((2, 16, 5, 5), np.float32))
    with pytest.raises(ValueError, match="out_features"):
        nn.Linear(3, 0)


def test_flatten_forward_backward():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    flat = nn.Flatten()
    y = flat(x)
    assert y.shape == (2, 60)
    assert_array_equal(y, x.reshape(2, -1))
    grad = np.arange(120, dtype=np.float32).reshape(2, 60)
    assert_array_equal(flat.backward(grad), grad.reshape(2, 3, 4, 5))
    with pytest.raises(ValueError, match="batch axis"):
        flat(np.zeros(5, np.float32))


# ---------------------------------------------------------------- activations, dropout
@pytest.mark.parametrize("layer_type, forward_op", [
    (nn.ReLU, ops.relu_forward), (nn.Tanh, ops.tanh_forward), (nn.Sigmoid, ops.sigmoid_forward)])
def test_activations_match_op_and_gradients(layer_type, forward_op):
    rng = np.random.default_rng(6)
    x = away_from_zero(rng, (2, 3, 4, 5)).astype(np.float32)
    layer = layer_type()
    assert_array_equal(layer(x), forward_op(x))
    assert repr(layer) == f"{layer_type.__name__}()"
    check_layer_grads(layer_type(), away_from_zero(rng, (3, 7)))


def test_activation_values():
    x = np.array([[-2.0, 0.0, 3.0]], np.float32)
    assert_allclose(nn.ReLU()(x), [[0, 0, 3]])
    assert_allclose(nn.Tanh()(x), np.tanh(x), rtol=1e-6)
    assert_allclose(nn.Sigmoid()(x), 1 / (1 + np.exp(-x.astype(np.float64))), rtol=1e-6)


def test_dropout_train_eval_and_backward():
    rng = np.random.default_rng(7)
    x = (1.0 + rng.random((64, 100))).astype(np.float32)
    layer = nn.Dropout(0.25, rng=0)
    y = layer(x)
    kept = y != 0
    assert 0.2 < 1 - kept.mean() < 0.3
    assert_allclose(y[kept], x[kept] / 0.75, rtol=1e-6)
    grad = rng.standard_normal(x.shape).astype(np.float32)
    assert_allclose(layer.backward(grad), np.where(kept, grad / 0.75, 0), rtol=1e-6)
    # the same seed drops the same elements
    assert_array_equal(nn.Dropout(0.25, rng=0)(x), y)
    assert layer.eval() is layer and not layer.training
    assert_array_equal(layer(x), x)
    assert_array_equal(layer.backward(grad), grad)
    assert layer.train().training
    assert (layer(x) == 0).any()
    assert repr(layer) == "Dropout(p=0.25)"
    for bad, error in ((1.0, ValueError), (-0.1, ValueError), ("half", TypeError)):
        with pytest.raises(error):
            nn.Dropout(bad)


# ---------------------------------------------------------------- accumulation, zero_grad
def test_grads_accumulate_over_two_backward_calls_and_zero_grad_clears_them():
    rng = np.random.default_rng(8)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 3 * 3, 4, rng=rng))
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    grad_y = rng.standard_normal((2, 4)).astype(np.float32)
    assert all(p.grad is None for p in model.parameters())
    model(x)
    model.backward(grad_y)
    first = [p.grad.copy() for p in model.parameters()]
    model(x)
    model.backward(grad_y)
    for g1, p in zip(first, model.parameters()):
        assert_allclose(p.grad, 2 * g1, rtol=1e-6, atol=1e-7)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_sequential_network_gradients():
    rng = np.random.default_rng(9)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, rng=rng), nn.Tanh(), nn.AvgPool2d(2),
                          nn.Conv2d(2, 3, 2, stride=2, rng=rng), nn.Sigmoid(), nn.Flatten(),
                          nn.Linear(3 * 2 * 2, 3, rng=rng))
    check_layer_grads(model, rng.standard_normal((2, 1, 8, 8)))


# ---------------------------------------------------------------- Module / Sequential API
def small_model(seed=0):
    return nn.Sequential(nn.Conv2d(1, 2, 3, rng=seed), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3, rng=seed))


def test_named_parameters_order_names_and_counts():
    model = small_model()
    assert [name for name, _ in model.named_parameters()] == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert [p.shape for p in model.parameters()] == [(2, 1, 3, 3), (2,), (3, 32), (3,)]
    assert model.num_parameters() == 2 * 9 + 2 + 3 * 32 + 3
    named = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 3), act=nn.ReLU()))
    assert [name for name, _ in named.named_parameters()] == ["conv.weight", "conv.bias"]
    assert named.conv is named[0] and named["act"] is named[-1]
    assert [name for name, _ in named.named_children()] == ["conv", "act"]


def test_sequential_indexing_slicing_iteration():
    model = small_model()
    layers = list(model)
    assert len(model) == 4 and layers[1] is model[1] and model[-1] is layers[3]
    head = model[:2]
    assert isinstance(head, nn.Sequential) and list(head) == layers[:2]
    assert head(np.ones((1, 1, 6, 6), np.float32)).shape == (1, 2, 4, 4)
    with pytest.raises(IndexError):
        model[4]
    with pytest.raises(TypeError, match="must be Modules"):
        nn.Sequential(nn.ReLU(), "relu")
    assert model.append(nn.ReLU()) is model and len(model) == 5


def test_state_dict_is_an_ordered_numpy_copy():
    model = small_model()
    state = model.state_dict()
    assert list(state) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert all(isinstance(v, np.ndarray) for v in state.values())
    state["0.weight"][:] = 99.0
    assert not np.any(model[0].weight.data == 99.0)


def test_load_state_dict_round_trip_and_errors():
    source, target = small_model(seed=1), small_model(seed=2)
    x = np.random.default_rng(0).standard_normal((2, 1, 6, 6)).astype(np.float32)
    assert not np.allclose(source(x), target(x))
    target.load_state_dict(source.state_dict())
    assert_array_equal(source(x), target(x))
    state = source.state_dict()
    before = target.state_dict()
    missing = OrderedDict((k, v) for k, v in state.items() if k != "3.bias")
    with pytest.raises(ValueError, match=r"missing keys \['3.bias'\]"):
        target.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        target.load_state_dict({**state, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match=r"'3.weight' has shape \(3, 31\).*\(3, 32\)"):
        target.load_state_dict({**state, "3.weight": np.zeros((3, 31), np.float32)})
    # nothing was copied by the failed loads
    for k, v in before.items():
        assert_array_equal(target.state_dict()[k], v)
    result = target.load_state_dict(missing, strict=False)
    assert result.missing_keys == ["3.bias"] and result.unexpected_keys == []
    with pytest.raises(TypeError, match="mapping"):
        target.load_state_dict([1, 2])


def test_train_eval_toggle_recursively_and_return_self():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Dropout(0.5), nn.ReLU()))
    assert model.training and model[1][0].training
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    assert model.train() is model
    assert all(m.training for m in model.modules())


def test_repr_nests_like_pytorch():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.ReLU()))
    assert repr(model) == ("Sequential(\n"
                           "  (0): Conv2d(1, 2, kernel_size=(3, 3), stride=(1, 1))\n"
                           "  (1): Sequential(\n"
                           "    (0): ReLU()\n"
                           "  )\n"
                           ")")


def test_double_casts_parameters_and_inputs_must_follow():
    layer = nn.Linear(3, 2).double()
    assert layer.weight.dtype == np.float64
    assert layer(np.zeros((1, 3))).dtype == np.float64
    with pytest.raises(TypeError, match="expected float64"):
        layer(np.zeros((1, 3), np.float32))
    assert layer.float().weight.dtype == np.float32


def test_to_cpu_keeps_values_and_reports_device():
    model = small_model()
    state = model.state_dict()
    assert model.to("cpu") is model and model.device == "cpu"
    for k, v in model.state_dict().items():
        assert_array_equal(v, state[k])
    assert nn.ReLU().device == "cpu"


def test_parameter_validation_and_accumulation():
    with pytest.raises(TypeError, match="NumPy or CuPy array"):
        nn.Parameter([1.0, 2.0])
    with pytest.raises(TypeError, match="float32 or float64"):
        nn.Parameter(np.zeros(3, np.int64))
    p = nn.Parameter(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="does not match"):
        p.accumulate_grad(np.ones(4, np.float32))
    p.accumulate_grad(np.ones(3, np.float32))
    p.accumulate_grad(np.ones(3, np.float32))
    assert_array_equal(p.grad, [2, 2, 2])


@pytest.mark.skipif(backend.gpu_available(), reason="checks the error raised on a machine without a GPU")
def test_to_gpu_without_gpu_raises_device_error():
    with pytest.raises(backend.DeviceError):
        small_model().to("gpu")


@pytest.mark.gpu
def test_gpu_forward_backward_match_cpu_and_device_mismatch_is_reported():
    cpu_model = small_model(seed=3)
    gpu_model = small_model(seed=3).to("gpu")
    assert gpu_model.device == "gpu"
    x = np.random.default_rng(1).standard_normal((2, 1, 6, 6)).astype(np.float32)
    grad_y = np.ones((2, 3), np.float32)
    y_cpu = cpu_model(x)
    cpu_model.backward(grad_y)
    xp = backend.cupy_module()
    y_gpu = gpu_model(xp.asarray(x))
    gpu_model.backward(xp.asarray(grad_y))
    assert_allclose(backend.to_numpy(y_gpu), y_cpu, rtol=1e-4, atol=1e-5)
    for p_cpu, p_gpu in zip(cpu_model.parameters(), gpu_model.parameters()):
        assert_allclose(backend.to_numpy(p_gpu.grad), p_cpu.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="input is on cpu but Conv2d's parameters are on gpu"):
        gpu_model(x)
    state = gpu_model.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    gpu_model.load_state_dict(cpu_model.state_dict())
    assert gpu_model.device == "gpu"


# ------------------------------------------------------------------------------------------------
# Bad input to layers and ops: one sentence naming the layer and the shape


def test_wrong_ndim_names_the_layer_and_the_shape():
    with pytest.raises(ValueError, match=r"Conv2d\(1, 6, kernel_size=\(5, 5\).*expected a 4-D input, got shape "
                                         r"\(1, 28, 28\)"):
        nn.Conv2d(1, 6, 5)(np.zeros((1, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"Linear\(in_features=4.*expected a 2-D input, got shape \(2, 1, 2, 2\)"):
        nn.Linear(4, 3)(np.zeros((2, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"MaxPool2d\(kernel_size=\(2, 2\).*expected a 4-D input, got shape \(8, 8\)"):
        nn.MaxPool2d(2)(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match=r"LeNet5 expects input of shape \(N, 1, 28, 28\), got \(2, 1, 32, 32\)"):
        LeNet5()(np.zeros((2, 1, 32, 32), np.float32))


def test_float64_and_integer_inputs_are_refused_not_converted():
    conv = nn.Conv2d(1, 2, 3)
    with pytest.raises(TypeError, match=r"Conv2d\(1, 2.*expected float32 input \(like its parameters\), got "
                                        r"float64; convert the input with x.astype\(float32\)"):
        conv(np.zeros((1, 1, 5, 5), np.float64))
    with pytest.raises(TypeError, match=r"Conv2d\(1, 2.*expected float32 input.*got int64"):
        conv(np.zeros((1, 1, 5, 5), np.int64))
    with pytest.raises(TypeError, match=r"ReLU\(\) expected float32 or float64 input, got uint8"):
        nn.ReLU()(np.zeros((2, 3), np.uint8))
    with pytest.raises(TypeError, match="x must be a float32 or float64 array, not int32"):
        ops.conv2d_forward(np.zeros((1, 1, 5, 5), np.int32), np.zeros((1, 1, 3, 3), np.float32), None)
    with pytest.raises(TypeError, match="weight has dtype float64 but x has float32; they must match"):
        ops.conv2d_forward(np.zeros((1, 1, 5, 5), np.float32), np.zeros((1, 1, 3, 3), np.float64), None)
    # double() is the documented way to run float64 (gradient checks): then float64 input is right.
    assert nn.Conv2d(1, 2, 3).double()(np.zeros((1, 1, 5, 5), np.float64)).dtype == np.float64


def test_wrong_channel_count_names_the_layer_and_both_shapes():
    with pytest.raises(ValueError, match=r"Conv2d\(3, 8.*expected input with 3 channels, got shape \(2, 1, 8, 8\)"):
        nn.Conv2d(3, 8, 3)(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"Linear\(in_features=400.*expected input with 400 features, got shape "
                                         r"\(2, 256\)"):
        nn.Linear(400, 120)(np.zeros((2, 256), np.float32))
    with pytest.raises(ValueError, match=r"weight expects 3 input channels \(shape \(8, 3, 3, 3\)\) but x has 1 "
                                         r"\(shape \(2, 1, 8, 8\)\)"):
        ops.conv2d_forward(np.zeros((2, 1, 8, 8), np.float32), np.zeros((8, 3, 3, 3), np.float32), None)


def test_kernel_larger_than_the_padded_input():
    with pytest.raises(ValueError, match=r"Conv2d\(1, 1, kernel_size=\(5, 5\).*got input of shape \(1, 1, 3, 3\), "
                                         r"too small for its kernel \(output would be -1x-1\)"):
        nn.Conv2d(1, 1, 5)(np.zeros((1, 1, 3, 3), np.float32))
    assert nn.Conv2d(1, 1, 5, padding=1)(np.zeros((1, 1, 3, 3), np.float32)).shape == (1, 1, 1, 1)  # fits exactly
    with pytest.raises(ValueError, match=r"MaxPool2d.*got input of shape \(1, 1, 3, 3\), too small for its window"):
        nn.MaxPool2d(4)(np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"the \(dilated\) kernel 5x5 is larger than the padded input 3x3"):
        ops.conv2d_forward(np.zeros((1, 1, 3, 3), np.float32), np.zeros((1, 1, 3, 3), np.float32), None,
                           dilation=2)
    with pytest.raises(ValueError, match=r"the pooling kernel 4x4 is larger than the padded input 3x3"):
        ops.avg_pool2d_forward(np.zeros((1, 1, 3, 3), np.float32), 4)


@pytest.mark.parametrize("make, message", [
    (lambda: nn.Conv2d(0, 6, 5), "in_channels must be at least 1, (got|not) 0"),
    (lambda: nn.Conv2d(1, -6, 5), "out_channels must be at least 1, (got|not) -6"),
    (lambda: nn.Conv2d(1, 6, (5, 0)), r"kernel_size must be at least 1 in both dimensions, got \(5, 0\)"),
    (lambda: nn.Conv2d(1, 6, 5, stride=0), r"stride must be at least 1 in both dimensions, got \(0, 0\)"),
    (lambda: nn.Conv2d(1, 6, 5, padding=-1), r"padding must be at least 0 in both dimensions, got \(-1, -1\)"),
    (lambda: nn.Linear(5, 0), "out_features must be at least 1, (got|not) 0"),
    (lambda: nn.MaxPool2d(0), r"kernel_size must be at least 1 in both dimensions, got \(0, 0\)"),
    (lambda: nn.AvgPool2d(2, padding=2), r"AvgPool2d padding \(2, 2\) must be at most half of kernel_size"),
    (lambda: LeNet5(num_classes=1), "num_classes must be an int of at least 2, got 1"),
], ids=["in-0", "out-neg", "kernel-0", "stride-0", "padding-neg", "linear-0", "pool-0", "pool-padding", "classes-1"])
def test_zero_and_negative_sizes_are_refused_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_empty_batch_names_the_layer():
    with pytest.raises(ValueError, match=r"Conv2d\(1, 6.*got an empty input of shape \(0, 1, 28, 28\)"):
        LeNet5()(np.zeros((0, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"Flatten\(\) got an empty input of shape \(4, 0, 2\)"):
        nn.Flatten()(np.zeros((4, 0, 2), np.float32))
    with pytest.raises(ValueError, match=r"x has a zero-length dimension \(shape \(2, 1, 0, 5\)\)"):
        ops.max_pool2d_forward(np.zeros((2, 1, 0, 5), np.float32), 2)


def test_nan_and_inf_policy_layers_propagate_the_trainer_refuses_bad_data():
    # Layers do not scan their input (a full pass, and a GPU sync, per layer): NaN propagates ...
    x = np.zeros((1, 1, 28, 28), np.float32)
    x[0, 0, 14, 14] = np.nan
    assert np.isnan(LeNet5(seed=0)(x)).all()
    # ... and the trainer checks its data once, before the first step, naming where the bad image is.
    rng = np.random.default_rng(0)
    images = rng.standard_normal((20, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 20)
    bad = images.copy()
    bad[7, 0, 3, 3] = np.inf
    bad[12, 0, 0, 0] = np.nan
    model = LeNet5(seed=0)
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.01), device="cpu")
    before = model.state_dict()
    with pytest.raises(ValueError, match=r"train_data images hold NaN or infinite values \(2 of 20 images, "
                                         r"the first at index 7\)"):
        trainer.fit((bad, labels), (images, labels), epochs=1, batch_size=5, progress=False)
    with pytest.raises(ValueError, match=r"test_data images hold NaN or infinite values \(2 of 20 images"):
        trainer.fit((images, labels), (bad, labels), epochs=1, batch_size=5, progress=False)
    with pytest.raises(ValueError, match="data images hold NaN or infinite values"):
        trainer.evaluate((bad, labels))
    assert_same_tree(model.state_dict(), before, "untouched weights")


@pytest.fixture
def fake_gpu(monkeypatch):
    """Arrays that gpucnn.backend takes for CuPy arrays (a NumPy subclass), so device checks run without a GPU."""
    class FakeGpuArray(np.ndarray):
        pass

    monkeypatch.setattr(backend, "_cupy", types.SimpleNamespace(ndarray=FakeGpuArray))
    return lambda array: np.ascontiguousarray(array).view(FakeGpuArray)


def test_input_on_the_wrong_device_names_the_layer_and_shape(fake_gpu):
    x = fake_gpu(np.zeros((2, 1, 28, 28), np.float32))
    assert backend.device_of(x) == "gpu"
    with pytest.raises(ValueError, match=r"input is on gpu but Conv2d's parameters are on cpu \(Conv2d\(1, 6.*input "
                                         r"shape \(2, 1, 28, 28\)\); call model.to\('gpu'\)"):
        LeNet5()(x)
    with pytest.raises(ValueError, match=r"input is on gpu but Linear's parameters are on cpu"):
        nn.Linear(3, 2)(fake_gpu(np.zeros((4, 3), np.float32)))
    with pytest.raises(ValueError, match=r"weight and x must be on the same device \(cpu vs gpu\)"):
        ops.conv2d_forward(x, np.zeros((6, 1, 5, 5), np.float32), None)


@pytest.mark.gpu
def test_input_on_the_wrong_device_with_a_real_gpu():
    cp = backend.cupy_module()
    with pytest.raises(ValueError, match=r"input is on gpu but Conv2d's parameters are on cpu"):
        LeNet5()(cp.zeros((2, 1, 28, 28), dtype=cp.float32))
    model = LeNet5().to("gpu")
    with pytest.raises(ValueError, match=r"input is on cpu but Conv2d's parameters are on gpu"):
        model(np.zeros((2, 1, 28, 28), np.float32))
