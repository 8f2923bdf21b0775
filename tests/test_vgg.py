"""vgg-small and the colour LeNet-5: shapes, parameters, registry, gradients, and a colour task learned."""
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from gpucnn import nn, ops, optim
from gpucnn.checkpoint import model_from_checkpoint
from gpucnn.data import channel_stats, normalize
from gpucnn.models import LeNet5, VGGSmall, build_model, default_input_shape
from gpucnn.receptive import conv_params, layer_geometry
from gpucnn.testing.gradcheck import assert_gradient_close
from gpucnn.train import Trainer
from tests.colour_data import CLASSES, colour_shape_images

VGG_SHAPES = {
    "conv1_1": (64, 32, 32), "conv1_2": (64, 32, 32), "pool1": (64, 16, 16),
    "conv2_1": (128, 16, 16), "conv2_2": (128, 16, 16), "pool2": (128, 8, 8),
    "conv3_1": (256, 8, 8), "conv3_2": (256, 8, 8), "pool3": (256, 4, 4),
    "flatten": (4096,), "fc1": (256,), "fc2": (10,),
}


def test_vgg_small_layers_shapes_and_parameters():
    model = build_model("vgg-small", seed=0)
    rows = {row.name: row for row in layer_geometry(model, (3, 32, 32))}
    for name, shape in VGG_SHAPES.items():
        assert rows[name].output_shape == shape, name
    convs = [name for name in rows if name.startswith("conv")]
    assert convs == ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2"]
    for name in convs:
        layer = getattr(model, name)
        assert layer.kernel_size == (3, 3) and layer.stride == (1, 1) and layer.padding == (1, 1)
        assert rows[name].num_params == conv_params((3, 3), layer.in_channels, layer.out_channels)
    assert model.num_parameters() == 2_196_810 == sum(row.num_params for row in rows.values())
    assert rows["pool3"].rf == (36, 36) and rows["pool3"].jump == (8, 8)
    assert not any(isinstance(layer, nn.Dropout) for layer in model.children())
    y = model(np.zeros((2, 3, 32, 32), np.float32))
    assert y.shape == (2, 10)


def test_vgg_small_he_init_keeps_the_activation_scale():
    model = VGGSmall(seed=1)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    rms = [float(np.sqrt((model.features(x, f"act{s}_2") ** 2).mean())) for s in (1, 2, 3)]
    # He init: ReLU outputs keep a mean square near the input's (1) from stage to stage, no blow-up or fade
    assert all(0.3 < r < 3 for r in rms), rms


def test_vgg_small_validates():
    with pytest.raises(ValueError, match="multiple of 8"):
        VGGSmall(input_size=28)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 3, 32, 32\)"):
        VGGSmall()(np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="num_classes"):
        VGGSmall(num_classes=1)
    assert VGGSmall(input_size=64, width=4).fc1.in_features == 16 * 8 * 8


def test_lenet5_takes_colour_and_the_1998_input_size_with_the_same_names():
    grey = LeNet5(seed=0)
    colour = LeNet5(in_channels=3, input_size=32, seed=0)
    assert list(grey.state_dict()) == list(colour.state_dict())
    assert grey.conv1.padding == (2, 2) and colour.conv1.padding == (0, 0)   # 28 padded up to 32; 32 as in 1998
    assert colour.conv1.weight.shape == (6, 3, 5, 5) and colour.fc1.in_features == 400
    assert colour(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)
    assert LeNet5(input_size=64).fc1.in_features == 16 * 13 * 13
    assert grey.input_shape == default_input_shape("lenet5") == (1, 28, 28)
    assert default_input_shape("vgg-small") == (3, 32, 32)
    assert LeNet5(input_size=20).conv1.padding == (6, 6) and LeNet5(input_size=20).fc1.in_features == 400
    with pytest.raises(ValueError, match="input_size must be at least 1"):
        LeNet5(input_size=0)


@pytest.mark.parametrize("name, kwargs", [("lenet5", dict(in_channels=3, input_size=32)),
                                          ("lenet5-classic", dict(in_channels=3, input_size=24)),
                                          ("vgg-small", dict(width=4, hidden=16, num_classes=5))])
def test_checkpoint_config_rebuilds_by_name(name, kwargs):
    model = build_model(name, seed=3, **kwargs)
    ckpt = {"model": model.state_dict(), "config": {"model": model.config}}
    rebuilt = model_from_checkpoint(ckpt)
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    for p, q in zip(model.parameters(), rebuilt.parameters()):
        assert_array_equal(p.data, q.data)


def test_a_vgg_stage_conv_gradients_at_its_shape():
    """3x3, stride 1, pad 1 with ReLU, as in every stage, in float64 against finite differences."""
    rng = np.random.default_rng(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, rng=0).double()
    relu = nn.ReLU()
    x = rng.standard_normal((2, 3, 6, 6))
    R = rng.standard_normal((2, 4, 6, 6))

    def f():
        return float((relu(conv(x)) * R).sum())
    conv.zero_grad()
    f()
    grad_x = conv.backward(relu.backward(R))
    assert_gradient_close(f, x, grad_x, rtol=1e-6)
    assert_gradient_close(f, conv.weight.data, conv.weight.grad, rtol=1e-6)
    assert_gradient_close(f, conv.bias.data, conv.bias.grad, rtol=1e-6)


@pytest.mark.parametrize("c, oc", [(64, 128), (128, 256)])
def test_conv_gradients_at_vgg_channel_counts(c, oc):
    """The input and bias gradients of conv2_1's and conv3_1's channel counts (3x3 pad 1) on a 2x2 image."""
    rng = np.random.default_rng(2)
    conv = nn.Conv2d(c, oc, 3, padding=1, rng=1).double()
    x = rng.standard_normal((1, c, 2, 2))
    R = rng.standard_normal((1, oc, 2, 2))

    def f():
        return float((conv(x) * R).sum())
    conv.zero_grad()
    f()
    grad_x = conv.backward(R)
    assert_gradient_close(f, x, grad_x, rtol=1e-6)
    assert_gradient_close(f, conv.bias.data, conv.bias.grad, rtol=1e-6)


def test_whole_vgg_small_gradients_in_float64():
    model = VGGSmall(num_classes=3, seed=0, input_size=8, width=2, hidden=6).double()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8, 8))
    labels = np.array([0, 2])

    def loss():
        return float(ops.softmax_cross_entropy(model(x), labels)[0])
    model.zero_grad()
    _, probs = ops.softmax_cross_entropy(model(x), labels)
    grad_x = model.backward(ops.softmax_cross_entropy_backward(probs, labels))
    assert_gradient_close(loss, x, grad_x, rtol=1e-5)
    for name in ("conv1_1", "conv2_2", "conv3_2", "fc1"):
        layer = getattr(model, name)
        assert_gradient_close(loss, layer.weight.data, layer.weight.grad, rtol=1e-5)


def train_colour_task(model, epochs, size=32):
    train_images, train_labels = colour_shape_images(600, seed=0, size=size)
    test_images, test_labels = colour_shape_images(200, seed=1, size=size)
    mean, std = channel_stats(train_images)
    trainer = Trainer(model, optim.Adam(list(model.parameters()), lr=2e-3), device="cpu", seed=0)
    return trainer.fit((normalize(train_images, mean, std), train_labels),
                       (normalize(test_images, mean, std), test_labels), epochs=epochs, batch_size=32,
                       progress=False)


def test_a_colour_and_shape_task_is_learned_by_the_colour_lenet5():
    history = train_colour_task(LeNet5(num_classes=len(CLASSES), in_channels=3, input_size=32, seed=0), epochs=3)
    assert history[-1]["test_acc"] >= 0.95, history   # 1.0 from epoch 2 when written (1-7 s, by load)


def test_a_colour_and_shape_task_is_learned_by_a_narrow_vgg_small():
    # the same three stages at 16x16 and 8-16-32 channels, so that CI stays fast
    model = VGGSmall(num_classes=len(CLASSES), seed=0, width=8, hidden=32, input_size=16)
    history = train_colour_task(model, epochs=5, size=16)
    assert history[-1]["test_acc"] >= 0.95, history   # 1.0 from epoch 3 when written (2-6 s, by load)


def test_cpu_benchmark_times_vgg_small_in_every_mode():
    """bench/cpu_throughput.py --model vgg-small: a worker per library answers rounds of each mode (gpucnn
    alone here; PyTorch's and ONNX Runtime's workers are the same code with another step)."""
    import json
    import subprocess
    import sys

    from tests.test_bench_scripts import ROOT
    result = subprocess.run([sys.executable, "bench/cpu_throughput.py", "--model", "vgg-small", "--libraries", "gpucnn",
                             "--batch-sizes", "2", "--rounds", "1", "--steps", "1", "--warmup", "0",
                             "--round-warmup", "0", "--pool", "4", "--threads", "1", "--modes", "train,loop,infer"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["train"], ["loop"], ["infer"])]
    assert [row[:2] for row in rows] == [["train", "2"], ["loop", "2"], ["infer", "2"]]
    assert all(float(row[2]) > 0 for row in rows)
    assert "model=vgg-small" in result.stdout.splitlines()[0]
