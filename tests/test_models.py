"""LeNet-5: parameter counts, shapes, checkpoints, the registry, and fitting a small batch."""
from collections import OrderedDict

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from gpucnn import dispatch, nn, ops, optim
from gpucnn.models import LeNet5, VGGSmall, available_models, build_model

LAYER_SHAPES = OrderedDict([
    ("conv1", (4, 6, 28, 28)), ("act1", (4, 6, 28, 28)), ("pool1", (4, 6, 14, 14)),
    ("conv2", (4, 16, 10, 10)), ("act2", (4, 16, 10, 10)), ("pool2", (4, 16, 5, 5)),
    ("flatten", (4, 400)), ("fc1", (4, 120)), ("act3", (4, 120)), ("fc2", (4, 84)), ("act4", (4, 84)),
    ("fc3", (4, 10)),
])


@pytest.mark.parametrize("variant", ["modern", "classic"])
def test_lenet5_has_61706_parameters(variant):
    assert LeNet5(variant=variant).num_parameters() == 61706


@pytest.mark.parametrize("variant, act, pool", [("modern", nn.ReLU, nn.MaxPool2d), ("classic", nn.Tanh, nn.AvgPool2d)])
def test_lenet5_layers_read_top_to_bottom(variant, act, pool):
    model = LeNet5(variant=variant)
    assert [name for name, _ in model.named_children()] == list(LAYER_SHAPES)
    assert all(isinstance(model[f"act{i}"], act) for i in range(1, 5))
    assert isinstance(model.pool1, pool) and isinstance(model.pool2, pool)
    assert repr(model).splitlines()[1] == "  (conv1): Conv2d(1, 6, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))"


def test_conv_parameters_follow_the_formula():
    model = LeNet5()
    for name, cin, cout in (("conv1", 1, 6), ("conv2", 6, 16)):
        KH, KW = model[name].kernel_size
        assert model[name].num_parameters() == (KW * KH * cin + 1) * cout
    assert model.conv1.num_parameters() == 156 and model.conv2.num_parameters() == 2416


@pytest.mark.parametrize("variant", ["modern", "classic"])
def test_output_and_intermediate_shapes(variant):
    model = LeNet5(variant=variant, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    logits = model(x)
    assert logits.shape == (4, 10) and logits.dtype == np.float32
    for name, shape in LAYER_SHAPES.items():
        assert model.features(x, name).shape == shape, name
    assert_array_equal(model.features(x, "fc3"), logits)
    grad_x = model.backward(np.ones((4, 10), np.float32))
    assert grad_x.shape == x.shape


def test_num_classes_and_input_validation():
    assert LeNet5(num_classes=3)(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 1, 28, 28\), got \(2, 1, 32, 32\)"):
        LeNet5()(np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="no layer named 'conv3'"):
        LeNet5().features(np.zeros((1, 1, 28, 28), np.float32), "conv3")
    with pytest.raises(ValueError, match="variant"):
        LeNet5(variant="1989")
    with pytest.raises(ValueError, match="num_classes"):
        LeNet5(num_classes=1)
    with pytest.raises(TypeError, match="seed"):
        LeNet5(seed=1.5)


def test_seed_makes_init_reproducible():
    a, b, c = LeNet5(seed=1), LeNet5(seed=1), LeNet5(seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert_array_equal(pa.data, pb.data)
        if name.endswith("weight"):
            assert not np.array_equal(pa.data, pc.data)


def test_state_dict_round_trip_and_strict_errors():
    source, target = LeNet5(seed=1), LeNet5(seed=2)
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    state = source.state_dict()
    assert list(state)[:4] == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    assert len(state) == 10
    target.load_state_dict(state)
    assert_array_equal(target(x), source(x))
    renamed = OrderedDict((k.replace("fc3", "head"), v) for k, v in state.items())
    with pytest.raises(ValueError, match=r"missing keys \['fc3.weight', 'fc3.bias'\] and unexpected keys "
                                         r"\['head.weight', 'head.bias'\]"):
        target.load_state_dict(renamed)
    with pytest.raises(ValueError, match="'fc3.weight' has shape"):
        target.load_state_dict(LeNet5(num_classes=5).state_dict())


def test_registry_and_config_rebuild():
    assert available_models() == ["lenet5", "lenet5-classic", "resnet20", "vgg-small", "vgg-small-bn"]
    model = build_model("lenet5-classic", seed=4)
    assert isinstance(model, LeNet5) and model.variant == "classic"
    assert model.config == {"name": "lenet5-classic", "num_classes": 10, "seed": 4}
    colour = build_model("lenet5", in_channels=3, input_size=32)
    assert colour.config == {"name": "lenet5", "num_classes": 10, "seed": None, "in_channels": 3, "input_size": 32}
    rebuilt = build_model(**model.config)
    for p, q in zip(model.parameters(), rebuilt.parameters()):
        assert_array_equal(p.data, q.data)
    assert LeNet5().config["name"] == "lenet5"
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")
    with pytest.raises(TypeError, match="variant"):
        build_model("lenet5", variant="classic")


def test_eval_and_train_toggle_dropout_inside_a_model():
    model = nn.Sequential(OrderedDict(net=LeNet5(seed=0)[:7], drop=nn.Dropout(0.5, rng=0)))
    x = np.random.default_rng(2).standard_normal((2, 1, 28, 28)).astype(np.float32)
    model.eval()
    assert not model.drop.training and not model.net.conv1.training
    assert_array_equal(model(x), model.net(x))
    model.train()
    y = model(x)
    assert (y == 0).sum() > (model.net(x) == 0).sum()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["modern", "classic"])
def test_lenet5_fits_a_small_fixed_batch(variant):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 1, 28, 28)).astype(np.float32)
    labels = np.arange(32) % 10
    model = LeNet5(variant=variant, seed=0)
    adam = optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):  # both variants got below 0.05 in about 25 steps when this test was written
        loss, probs = ops.softmax_cross_entropy(model(x), labels)
        losses.append(float(loss))
        if losses[-1] < 0.05:
            break
        adam.zero_grad()
        model.backward(ops.softmax_cross_entropy_backward(probs, labels))
        adam.step()
    assert losses[0] > 1.5
    assert losses[-1] < 0.05, losses[::10]
    assert_array_equal(np.argmax(model(x), axis=1), labels)


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_lenet_runs_max_pool_before_relu_with_the_same_results_as_the_declared_order(path):
    """LeNet5 (modern) runs pool1/pool2 before act1/act2; Sequential's declared order must give the
    very same logits and gradients (ties from a constant image, NaN-free), and features() still
    reports the declared layers."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 1, 28, 28)).astype(np.float32)
    x[0] = 0.5  # flat image: ties in every pooling window
    labels = rng.integers(0, 10, 6)
    grads = []
    with dispatch.cpu_path(path):
        for run in (LeNet5.forward, nn.Sequential.forward):
            model = LeNet5(seed=3)
            logits = run(model, x)
            _, probs = ops.softmax_cross_entropy(logits, labels)
            backward = LeNet5.backward if run is LeNet5.forward else nn.Sequential.backward
            backward(model, ops.softmax_cross_entropy_backward(probs, labels), input_grad=False)
            grads.append((logits, [p.grad for p in model.parameters()]))
        assert LeNet5(seed=3)._run_order()[:6] == ["conv1", "pool1", "act1", "conv2", "pool2", "act2"]
        assert LeNet5(seed=3).features(x, "act1").shape == (6, 6, 28, 28)
    np.testing.assert_array_equal(grads[0][0], grads[1][0])
    for got, want in zip(grads[0][1], grads[1][1]):
        np.testing.assert_array_equal(got, want)
    classic = LeNet5(variant="classic")
    assert classic._run_order() == list(classic._modules)  # tanh and average pooling do not commute
    vgg = VGGSmall(width=2, hidden=4)
    assert vgg._run_order()[:6] == ["conv1_1", "act1_1", "conv1_2", "pool1", "act1_2", "conv2_1"]
