"""The layers of today's CNNs on the CPU: BatchNorm1d/2d (buffers, train/eval, state_dict), AdaptiveAvgPool2d,
Residual/BasicBlock (float64 finite differences through both paths), resnet20 and vgg-small-bn, Dropout in
the built-in models, and a Trainer run with BatchNorm that resumes bit for bit."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from gpucnn import nn, optim
from gpucnn.models import ResNet20, VGGSmall, build_model
from gpucnn.testing.gradcheck import assert_gradient_close
from gpucnn.train import Trainer
from tests.loops import batch_norm_eval_loops, batch_norm_loops, global_avg_pool2d_loops

FLOAT64 = pytest.mark.backends("reference", "fast")


# ------------------------------------------------------------------ BatchNorm layers


def test_batch_norm_2d_trains_with_batch_statistics_and_evaluates_with_running_ones():
    rng = np.random.default_rng(0)
    bn = nn.BatchNorm2d(3, momentum=0.2)
    bn.weight.data[...] = [1.0, 2.0, 0.5]
    bn.bias.data[...] = [0.0, -1.0, 3.0]
    running_mean, running_var = bn.running_mean.copy(), bn.running_var.copy()
    for _ in range(2):
        x = (2 + 3 * rng.standard_normal((4, 3, 5, 6))).astype(np.float32)
        y, _, _, running_mean, running_var = batch_norm_loops(x, bn.weight.data, bn.bias.data, running_mean,
                                                              running_var, 0.2, 1e-5)
        np.testing.assert_allclose(bn(x), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, running_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, running_var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 2
    bn.eval()
    expected = batch_norm_eval_loops(x, bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var, 1e-5)
    np.testing.assert_allclose(bn(x), expected, rtol=1e-5, atol=1e-5)
    assert int(bn.num_batches_tracked) == 2
    with pytest.raises(RuntimeError, match="after an eval-mode forward"):
        bn.backward(np.ones_like(x))


def test_batch_norm_buffers_are_state_but_not_parameters():
    bn = nn.BatchNorm2d(4)
    assert [name for name, _ in bn.named_parameters()] == ["weight", "bias"]
    assert [name for name, _ in bn.named_buffers()] == ["running_mean", "running_var", "num_batches_tracked"]
    state = bn.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert state["num_batches_tracked"].dtype == np.int64 and state["num_batches_tracked"].shape == ()
    assert bn.num_parameters() == 8
    bn(np.random.default_rng(1).standard_normal((3, 4, 2, 2)).astype(np.float32))
    other = nn.BatchNorm2d(4)
    held = other.running_mean
    other.load_state_dict(bn.state_dict())
    assert other.running_mean is held  # written in place: a recorded step keeps updating this array
    assert_array_equal(other.running_mean, bn.running_mean)
    assert int(other.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="'running_var' has shape"):
        other.load_state_dict({**bn.state_dict(), "running_var": np.ones(5, np.float32)})
    with pytest.raises(ValueError, match="missing keys"):
        other.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
    other.double()
    assert other.running_var.dtype == np.float64 and other.num_batches_tracked.dtype == np.int64


def test_batch_norm_without_affine_and_1d():
    rng = np.random.default_rng(2)
    bn = nn.BatchNorm1d(5, affine=False)
    assert list(bn.state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]
    for shape in ((6, 5), (3, 5, 4)):
        x = rng.standard_normal(shape).astype(np.float32)
        y = bn(x)
        expected = batch_norm_loops(x, np.ones(5), np.zeros(5), np.zeros(5), np.ones(5), 0.1, 1e-5)[0]
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        assert bn.backward(np.ones_like(y)).shape == shape
    with pytest.raises(ValueError, match="2-D or 3-D"):
        bn(np.zeros((2, 5, 3, 3), np.float32))
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="5 features"):
        nn.BatchNorm2d(5)(np.zeros((2, 4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="momentum"):
        nn.BatchNorm2d(3, momentum=None)


@FLOAT64
def test_batch_norm_layer_gradients_match_finite_differences(backend):
    rng = np.random.default_rng(3)
    bn = nn.BatchNorm2d(3).double()
    bn.weight.data[...] = rng.standard_normal(3)
    bn.bias.data[...] = rng.standard_normal(3)
    x = rng.standard_normal((3, 3, 2, 3))
    R = rng.standard_normal(x.shape)
    bn(x)
    grad_x = bn.backward(R)
    for array, analytic in ((x, grad_x), (bn.weight.data, bn.weight.grad), (bn.bias.data, bn.bias.grad)):
        assert_gradient_close(lambda: float((bn(x) * R).sum()), array, analytic, rtol=1e-6)


# ------------------------------------------------------------------ global average pooling


def test_adaptive_avg_pool_layer():
    rng = np.random.default_rng(4)
    pool = nn.AdaptiveAvgPool2d(1)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(pool(x), global_avg_pool2d_loops(x), rtol=1e-6, atol=1e-6)
    grad = pool.backward(np.ones((2, 3, 1, 1), np.float32))
    np.testing.assert_allclose(grad, np.full(x.shape, 1 / 20), rtol=1e-6)
    assert nn.AdaptiveAvgPool2d((1, 1)).output_size == (1, 1)
    with pytest.raises(ValueError, match="only output_size 1"):
        nn.AdaptiveAvgPool2d(2)


# ------------------------------------------------------------------ residual blocks


def _gradient_check_module(module, x, rng, params):
    R = rng.standard_normal(module(x).shape)
    module.zero_grad()
    module(x)
    grad_x = module.backward(R)
    analytic = [(x, grad_x)] + [(p.data, p.grad.copy()) for p in params]
    for array, grad in analytic:
        assert_gradient_close(lambda: float((module(x) * R).sum()), array, grad, rtol=1e-6)


@FLOAT64
@pytest.mark.parametrize("stride, channels", [(1, 3), (2, 4)], ids=["identity", "projection"])
def test_basic_block_gradients_flow_through_both_paths(backend, stride, channels):
    rng = np.random.default_rng(5)
    block = nn.BasicBlock(3, channels, stride, rng=0).double()
    for bn in (m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.weight.data[...] = 1 + 0.3 * rng.standard_normal(channels)
        bn.bias.data[...] = 0.3 * rng.standard_normal(channels)
    x = rng.standard_normal((2, 3, 4, 4))
    shortcut = [block.downsample[0].weight] if stride == 2 else []
    _gradient_check_module(block, x, rng, [block.conv1.weight, block.bn2.bias, *shortcut])
    assert (hasattr(block, "downsample")) == (stride == 2)


@FLOAT64
def test_generic_residual_adds_the_identity_gradient(backend):
    rng = np.random.default_rng(6)
    body = nn.Sequential(nn.Linear(4, 4, rng=1), nn.Tanh(), nn.Linear(4, 4, rng=2)).double()
    for relu in (True, False):
        block = nn.Residual(body, relu=relu)
        x = rng.standard_normal((3, 4))
        _gradient_check_module(block, x, rng, [body[0].weight, body[2].bias])
    with pytest.raises(ValueError, match="projection shortcut"):
        nn.Residual(nn.Linear(4, 2).double())(x)
    with pytest.raises(TypeError, match="gpucnn.nn.Module"):
        nn.Residual(body, shortcut=lambda v: v)


def test_residual_block_input_grad_false_still_fills_parameter_gradients():
    block = nn.BasicBlock(2, 4, 2, rng=0)
    x = np.random.default_rng(7).standard_normal((2, 2, 6, 6)).astype(np.float32)
    y = block(x)
    assert block.backward(np.ones_like(y), input_grad=False) is None
    assert block.conv1.weight.grad is not None and block.downsample[0].weight.grad is not None


# ------------------------------------------------------------------ models


def test_resnet20_shapes_parameters_and_torchvision_names():
    colour = ResNet20(seed=0)
    assert colour.num_parameters() == 272_474
    grey = build_model("resnet20", seed=0, in_channels=1, input_size=28)
    assert grey.num_parameters() == 272_186
    names = list(grey.state_dict())
    for name in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn1.running_mean",
                 "layer2.0.downsample.0.weight", "layer3.2.bn2.num_batches_tracked", "fc.weight", "fc.bias"):
        assert name in names
    assert "layer1.0.downsample.0.weight" not in names and "layer2.1.downsample.0.weight" not in names
    assert not any(name.endswith("conv1.bias") for name in names)
    x = np.random.default_rng(8).standard_normal((2, 1, 28, 28)).astype(np.float32)
    assert grey(x).shape == (2, 10)
    assert grey.features(x, "layer2").shape == (2, 32, 14, 14)
    assert grey.features(x, "layer3").shape == (2, 64, 7, 7)
    rebuilt = build_model(**grey.config)
    for (name, a), b in zip(grey.state_dict().items(), rebuilt.state_dict().values()):
        if "running" not in name and "tracked" not in name:  # the forward above moved the statistics
            assert_array_equal(a, b)
    assert ResNet20(seed=0, input_size=9, in_channels=2)(np.zeros((2, 2, 9, 9), np.float32)).shape == (2, 10)


def test_vgg_small_bn_and_dropout_in_the_built_in_models():
    model = build_model("vgg-small-bn", seed=0, width=4, hidden=8)
    assert model.config["name"] == "vgg-small-bn"
    assert [n for n in model._modules if n.startswith("bn")] == ["bn1_1", "bn1_2", "bn2_1", "bn2_2", "bn3_1", "bn3_2",
                                                                 "bn_fc1"]
    assert isinstance(model.bn_fc1, nn.BatchNorm1d) and model.bn_fc1.num_features == 8
    assert model.conv1_1.bias is None and model.fc1.bias is None and model.fc2.bias is not None
    plain = build_model("vgg-small", seed=0, width=4, hidden=8)
    assert plain.conv1_1.bias is not None and not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    with_dropout = build_model("resnet20", seed=0, dropout=0.25)
    assert isinstance(with_dropout.dropout, nn.Dropout) and with_dropout.config["dropout"] == 0.25
    assert build_model(**with_dropout.config).dropout.p == 0.25
    assert "dropout" not in build_model("resnet20", seed=0).config
    assert isinstance(build_model("vgg-small", seed=0, width=4, hidden=8, dropout=0.5).dropout, nn.Dropout)
    with pytest.raises(ValueError, match="dropout"):
        build_model("resnet20", dropout=1.0)
    with pytest.raises(TypeError, match="vgg-small-bn"):
        build_model("vgg-small", batch_norm=True)


# ------------------------------------------------------------------ training with BatchNorm


def _tiny_run(out_dir, epochs, resume=None, augment=None):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((48, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 48)
    model = ResNet20(num_classes=3, seed=1, in_channels=1, input_size=8)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    trainer = Trainer(model, opt, optim.CosineAnnealingLR(opt, T_max=3), seed=2, out_dir=out_dir, augment=augment)
    trainer.fit((x, y), (x[:16], y[:16]), epochs=epochs, batch_size=16, progress=False, resume=resume)
    return model


def test_training_with_batch_norm_resumes_bit_for_bit(tmp_path):
    from gpucnn.data import Augment  # noqa: PLC0415

    augment = Augment(crop=True, flip=True, fill=-0.5)
    whole = _tiny_run(tmp_path / "whole", 3, augment=augment)
    _tiny_run(tmp_path / "cut", 2, augment=augment)
    resumed = _tiny_run(tmp_path / "cut", 3, resume=tmp_path / "cut" / "checkpoint.npz", augment=augment)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert a.tobytes() == b.tobytes(), name
    assert int(whole.layer1[0].bn1.num_batches_tracked) == 9
    with pytest.raises(ValueError, match="augmentation crop\\+flip but this run asks for none"):
        _tiny_run(tmp_path / "cut", 3, resume=tmp_path / "cut" / "checkpoint.npz")


def test_a_model_with_batch_norm_is_not_split_between_processes():
    from gpucnn.cpu import split  # noqa: PLC0415

    assert not split.splittable(ResNet20(seed=0))
    assert split.splittable(build_model("lenet5", seed=0))
    assert not split.splittable(nn.Sequential(OrderedDict(bn=nn.BatchNorm1d(3))))


# ------------------------------------------------------------------ the command line


def test_cli_trains_resnet20_with_augmentation_and_dropout_and_inspects_it(random_mnist, tmp_path):
    from tests.helpers import invoke  # noqa: PLC0415

    out = tmp_path / "run"
    result = invoke(["train", "--device", "cpu", "--data-dir", random_mnist, "--no-download", "--epochs", 1,
                     "--batch-size", 16, "--model", "resnet20", "--augment", "crop", "--dropout", 0.2, "--out", out,
                     "--quiet"])
    assert result.exit_code == 0, result.output
    from gpucnn.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: PLC0415

    ckpt = load_checkpoint(out / "checkpoint.npz")
    assert ckpt["config"]["augment"] == "crop" and ckpt["config"]["dropout"] == 0.2
    assert ckpt["trainer"]["augment"]["name"] == "crop"
    assert int(ckpt["model"]["layer1.0.bn1.num_batches_tracked"]) == 6  # 96 images, batch 16
    model = model_from_checkpoint(ckpt)
    assert model.config["dropout"] == 0.2 and int(model.bn1.num_batches_tracked) == 6
    common = ["--data-dir", random_mnist, "--no-download", "--device", "cpu"]
    result = invoke(["evaluate", out / "checkpoint.npz", *common])
    assert result.exit_code == 0 and "accuracy" in result.output, result.output
    result = invoke(["summary", "--model", "resnet20", "--input-shape", "1,28,28"])
    assert "layer2.0.downsample.0" in result.output and "total parameters: 272,186" in result.output
    result = invoke(["visualize", out / "checkpoint.npz", *common, "-q", "--limit", 8, "--patches", 2,
                     "--layers", "layer1.0,layer2.0.conv1", "--out", tmp_path / "viz"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "viz" / "patches_layer1.0.npz").is_file() and (tmp_path / "viz" / "filters_conv1.png").is_file()
    result = invoke(["features", out / "checkpoint.npz", *common, "-q", "--limit", 8, "--layer", "layer3.2",
                     "--out", tmp_path / "f.npy"])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "f.npy").shape == (8, 64, 7, 7)
    result = invoke(["train", "--device", "cpu", "--data-dir", random_mnist, "--no-download", "--epochs", 1,
                     "--model", "lenet5", "--dropout", 0.5, "--out", tmp_path / "x", "--quiet"])
    assert result.exit_code != 0 and "--dropout applies to the models" in result.output


def test_receptive_field_of_a_sum_is_the_larger_of_its_paths_and_features_see_inside_blocks():
    from gpucnn.features import layer_features, layer_names  # noqa: PLC0415
    from gpucnn.receptive import layer_geometry, window_strides  # noqa: PLC0415

    wide_shortcut = nn.Residual(nn.Conv2d(2, 2, 1, rng=0), nn.Conv2d(2, 2, 5, padding=2, rng=1), relu=False)
    net = nn.Sequential(OrderedDict(c=nn.Conv2d(2, 2, 3, padding=1, rng=2), r=wide_shortcut,
                                    s=nn.Residual(nn.Sequential(nn.Conv2d(2, 2, 3, 2, 1, rng=3)),
                                                  nn.Conv2d(2, 2, 1, 2, rng=4))))
    rows = {row.name: row for row in layer_geometry(net, (2, 9, 9))}
    assert [row.name for row in layer_geometry(net, (2, 9, 9))] == ["c", "r.body", "r.shortcut", "r", "s.body.0",
                                                                      "s.shortcut", "s"]
    assert rows["r.body"].rf == (3, 3) and rows["r.shortcut"].rf == (7, 7) and rows["r"].rf == (7, 7)
    assert rows["r"].first == (-3, -3) and rows["r.shortcut"].branch and not rows["r.body"].branch
    assert rows["s"].rf == (9, 9) and rows["s"].jump == (2, 2) and rows["s"].output_shape == (2, 5, 5)
    assert window_strides(list(rows.values())) == (1, 1, 2)  # the shortcuts' windows are not stacked
    assert layer_names(net) == list(rows)
    x = np.random.default_rng(10).standard_normal((3, 2, 9, 9)).astype(np.float32)
    inside = layer_features(net, x, "r.shortcut")
    np.testing.assert_array_equal(inside, wide_shortcut.shortcut(net.c(x)))
    np.testing.assert_array_equal(layer_features(net, x, "s"), net(x))
    with pytest.raises(ValueError, match="must match to be added"):
        layer_geometry(nn.Sequential(nn.Residual(nn.Conv2d(2, 3, 1))), (2, 4, 4))
