"""Batched activations and the top-patch search: against brute force, and each crop alone reproduces its activation."""
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

from gpucnn import backend, nn, optim
from gpucnn.features import TopPatches, conv_layer_names, layer_features, named_layers, top_patches
from gpucnn.models import LeNet5
from gpucnn.receptive import input_region, layer_geometry

MNIST_DIR = Path("/work/shared/datasets/mnist")


def images(n, c=1, h=28, w=28, seed=0):
    return np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)


def strided_stack():
    """Stride, padding, dilation and pooling before the last conv, so every offset of input_region matters."""
    rng = np.random.default_rng(5)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(2, 3, 3, stride=2, padding=1, rng=rng)),
        ("act1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
        ("conv2", nn.Conv2d(3, 4, (3, 2), padding=(2, 1), dilation=(2, 1), rng=rng)),
    ]))


def forward_to(model, x, layer):
    for name, module in named_layers(model):
        x = module(x)
        if name == layer:
            return x
    raise AssertionError(f"no layer {layer}")


# --- layer_features -------------------------------------------------------------------
def test_layer_features_in_batches_equals_one_pass_for_every_layer():
    model, x = LeNet5(seed=0), images(7)
    flat = layer_features(model, x, "flatten", batch_size=3)
    assert flat.shape == (7, 400) and flat.dtype == np.float32
    for name in ("conv1", "act1", "pool1", "conv2", "pool2", "flatten", "fc1", "fc3"):
        assert_allclose(layer_features(model, x, name, batch_size=2), model.features(x, name), rtol=1e-4, atol=1e-5)


def test_layer_features_restores_training_mode_and_validates():
    model = LeNet5(seed=0)
    layer_features(model, images(2), "fc1")
    assert model.training
    with pytest.raises(ValueError, match="no layer named 'conv3'"):
        layer_features(model, images(2), "conv3")
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        layer_features(model, images(2)[:, 0], "conv1")
    with pytest.raises(TypeError, match="float32 or float64"):
        layer_features(model, images(2).astype(np.int32), "conv1")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        layer_features(model, images(2), "conv1", batch_size=0)
    with pytest.raises(TypeError, match="Sequential"):
        layer_features(nn.ReLU(), images(2), "conv1")


def test_conv_layer_names():
    assert conv_layer_names(LeNet5()) == ["conv1", "conv2"]
    assert conv_layer_names(strided_stack()) == ["conv1", "conv2"]


# --- top patches against brute force -----------------------------------------------------
@pytest.mark.parametrize("distinct", [True, False])
def test_top_patches_are_the_k_highest_activations(distinct):
    model, x = LeNet5(seed=1), images(13, seed=2)
    k = 5
    found = top_patches(model, x, k=k, batch_size=4, distinct_images=distinct)
    assert list(found) == ["conv1", "conv2"]
    for name, patches in found.items():
        act = layer_features(model, x, name)                         # (N, OC, OH, OW), pre-activation
        N, OC, OH, OW = act.shape
        assert patches.values.shape == (OC, k) and patches.crops.shape[:2] == (OC, k)
        for c in range(OC):
            if distinct:
                expected = np.sort(act[:, c].reshape(N, -1).max(axis=1))[::-1][:k]
                assert len(set(patches.image[c].tolist())) == k
            else:
                expected = np.sort(act[:, c].ravel())[::-1][:k]
            assert_allclose(patches.values[c], expected, rtol=1e-5, atol=1e-6)
            at_positions = act[patches.image[c], c, patches.oy[c], patches.ox[c]]
            assert_allclose(patches.values[c], at_positions, rtol=1e-5, atol=1e-6)
            assert np.all(np.diff(patches.values[c]) <= 0)


def test_ties_go_to_the_earliest_image():
    model = LeNet5(seed=0)
    x = np.repeat(images(1, seed=3), 6, axis=0)                     # six identical images
    patches = top_patches(model, x, k=4, layers="conv1", batch_size=4)["conv1"]
    assert patches.image.tolist() == [[0, 1, 2, 3]] * 6


# --- each crop alone reproduces its activation --------------------------------------------
def assert_crops_reproduce(model, x, patches: TopPatches):
    N, C, H, W = x.shape
    row = {r.name: r for r in layer_geometry(model, (C, H, W))}[patches.layer]
    noise = np.random.default_rng(9).standard_normal((C, H, W)).astype(np.float32) * 3
    for c in range(patches.channels):
        for r in range(patches.k):
            img, oy, ox = int(patches.image[c, r]), int(patches.oy[c, r]), int(patches.ox[c, r])
            y0, y1, x0, x1 = input_region(row, oy, ox, (H, W))
            assert tuple(patches.region[c, r]) == (y0, y1, x0, x1)
            crop = patches.clipped_crop(c, r)
            np.testing.assert_array_equal(crop, x[img, :, y0:y1, x0:x1])
            # the rest of the box is exactly the part beyond the image (NaN), nothing else
            assert np.isnan(patches.crops[c, r]).sum() == C * (row.rf[0] * row.rf[1] - (y1 - y0) * (x1 - x0))
            for background in (np.zeros((C, H, W), np.float32), noise):
                canvas = background.copy()
                canvas[:, y0:y1, x0:x1] = crop
                value = forward_to(model, canvas[None], patches.layer)[0, c, oy, ox]
                assert_allclose(value, patches.values[c, r], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_model, shape", [(lambda: LeNet5(seed=4), (1, 28, 28)),
                                               (strided_stack, (2, 13, 15))])
@pytest.mark.parametrize("distinct", [True, False])
def test_each_crop_alone_reproduces_the_recorded_activation(make_model, shape, distinct, tmp_path):
    model, x = make_model(), images(6, *shape, seed=7)
    for name, patches in top_patches(model, x, k=4, batch_size=4, distinct_images=distinct).items():
        loaded = TopPatches.load(patches.save(tmp_path / f"{name}.npz"))
        assert_crops_reproduce(model, x, loaded)


def test_every_position_including_the_borders():
    # k = every position of the data set: each border crop (clipped by the padding) is checked too
    model, x = strided_stack(), images(2, 2, 13, 15, seed=8)
    OH, OW = layer_geometry(model, x.shape[1:])[-1].output_shape[1:]
    patches = top_patches(model, x, k=2 * OH * OW, layers=["conv2"], distinct_images=False)["conv2"]
    assert np.isnan(patches.crops).any()
    assert_crops_reproduce(model, x, patches)
    positions = set(zip(patches.image[0].tolist(), patches.oy[0].tolist(), patches.ox[0].tolist()))
    assert len(positions) == 2 * OH * OW


def test_conv1_crop_is_tight():
    # every pixel of a first-layer crop feeds the activation: the crop is not larger than the field
    model, x = LeNet5(seed=0), images(3, seed=1)
    patches = top_patches(model, x, k=2, layers="conv1")["conv1"]
    y0, y1, x0, x1 = patches.region[0, 0]
    img, oy, ox = patches.image[0, 0], patches.oy[0, 0], patches.ox[0, 0]
    for y in range(y0, y1):
        for xx in range(x0, x1):
            changed = x[img:img + 1].copy()
            changed[0, 0, y, xx] += 1
            assert forward_to(model, changed, "conv1")[0, 0, oy, ox] != patches.values[0, 0]


def test_top_patches_validation():
    model, x = LeNet5(), images(3)
    with pytest.raises(ValueError, match="k=4 exceeds the 3 images"):
        top_patches(model, x, k=4)
    with pytest.raises(ValueError, match="no spatial layout"):
        top_patches(model, x, k=1, layers=["flatten"])
    with pytest.raises(ValueError, match="no layer named 'conv9'"):
        top_patches(model, x, k=1, layers=["conv9"])
    with pytest.raises(ValueError, match="k must be at least 1"):
        top_patches(model, x, k=0)
    with pytest.raises(ValueError, match=r"expects 1 channels|expected input with 1 channels"):
        top_patches(model, images(3, c=2), k=1)
    with pytest.raises(ValueError, match="no Conv2d"):
        top_patches(nn.Sequential(nn.MaxPool2d(2)), x, k=1)


def test_load_refuses_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", values=np.zeros(3))
    with pytest.raises(ValueError, match="not a top-patches file"):
        TopPatches.load(tmp_path / "other.npz")


@pytest.mark.gpu
def test_gpu_matches_cpu():
    x = images(9, seed=3)
    cpu_model, gpu_model = LeNet5(seed=2), LeNet5(seed=2).to("gpu")
    cpu = top_patches(cpu_model, x, k=3, batch_size=4)
    gpu = top_patches(gpu_model, backend.to_device(x, "gpu"), k=3, batch_size=4)
    for name in cpu:
        assert_allclose(gpu[name].values, cpu[name].values, rtol=1e-4, atol=1e-4)
        # the GPU's positions are where the CPU computes the same activations, and its crops are the inputs there
        act = layer_features(cpu_model, x, name)
        for c in range(gpu[name].channels):
            at = act[gpu[name].image[c], c, gpu[name].oy[c], gpu[name].ox[c]]
            assert_allclose(at, gpu[name].values[c], rtol=1e-4, atol=1e-4)
        assert_crops_reproduce(cpu_model, x, TopPatches(**{**vars(gpu[name]), "values": cpu_values_at(act, gpu[name])}))
    assert_allclose(layer_features(gpu_model, x, "flatten"), layer_features(cpu_model, x, "flatten"),
                    rtol=1e-4, atol=1e-4)


def cpu_values_at(act, patches):
    """The CPU activations at a TopPatches' positions, (OC, k)."""
    channels = np.arange(patches.channels)[:, None]
    return act[patches.image, channels, patches.oy, patches.ox]


# --- learned features feed a simple classifier --------------------------------------------
def softmax_regression_accuracy(train_x, train_y, test_x, test_y, steps=300, lr=0.5, l2=1e-3):
    """A numpy logistic-regression head (full-batch gradient descent) on standardised inputs."""
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = 10
    weight = np.zeros((train_x.shape[1], classes))
    bias = np.zeros(classes)
    onehot = np.eye(classes)[train_y]
    for _ in range(steps):
        logits = train_x @ weight + bias
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        grad = (probs - onehot) / len(train_x)
        weight -= lr * (train_x.T @ grad + l2 * weight)
        bias -= lr * grad.sum(axis=0)
    return float(((test_x @ weight + bias).argmax(axis=1) == test_y).mean())


@pytest.mark.slow
@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"real MNIST files not found in {MNIST_DIR}")
def test_a_head_on_learned_features_beats_the_same_head_on_pixels():
    from gpucnn.data import DATASETS, load_dataset, normalize
    from gpucnn.ops import softmax_cross_entropy, softmax_cross_entropy_backward
    raw, labels = load_dataset("mnist", "test", data_dir=MNIST_DIR, download=False)
    spec = DATASETS["mnist"]
    x = normalize(raw, spec.mean, spec.std)
    # the feature extractor: LeNet-5 trained briefly on the first 2,000 test images
    model = LeNet5(seed=0)
    opt = optim.Adam(list(model.parameters()), lr=2e-3)
    order = np.random.default_rng(0).permutation(2000)
    batch = 20
    for step in range(300):
        idx = order[(step * batch) % 2000:(step * batch) % 2000 + batch]
        opt.zero_grad()
        _, probs = softmax_cross_entropy(model(x[idx]), labels[idx])
        model.backward(softmax_cross_entropy_backward(probs, labels[idx]))
        opt.step()
    # the head sees 500 labelled images the net never saw, and is scored on 2,000 others
    head_train, held_out = slice(2000, 2500), slice(8000, 10000)
    train_features = layer_features(model, x[head_train], "flatten")
    test_features = layer_features(model, x[held_out], "flatten")
    assert train_features.shape == (500, 400)
    on_features = softmax_regression_accuracy(train_features, labels[head_train], test_features, labels[held_out])
    on_pixels = softmax_regression_accuracy(x[head_train].reshape(500, -1), labels[head_train],
                                            x[held_out].reshape(2000, -1), labels[held_out])
    print(f"held-out accuracy: head on features {on_features:.3f}, on pixels {on_pixels:.3f}")
    assert on_features > on_pixels + 0.03, (on_features, on_pixels)
