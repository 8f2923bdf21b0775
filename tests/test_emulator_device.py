"""The "emulator" device end to end: dispatch, models, the Trainer, checkpoints across devices, the CLI.

Arrays on the emulator are EmulatorArray (host memory); every op runs gpucnn's CUDA kernels under
the CPU emulator. The CLI run trains on a few hundred real MNIST digits from ../shared.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpucnn import backend, dispatch, nn, ops, optim
from gpucnn.checkpoint import load_checkpoint
from gpucnn.cpu.optim import HostFusedOptimizer
from gpucnn.cuda.optim import FusedOptimizer
from gpucnn.data import write_idx
from gpucnn.data.idx import read_idx
from gpucnn.models import LeNet5
from gpucnn.train import Trainer
from tests.helpers import run_cli
from tests.synthetic_data import quadrant_images

pytestmark = pytest.mark.emulator

MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


def test_arrays_on_the_emulator_keep_their_device_through_the_ops():
    rng = np.random.default_rng(0)
    x = backend.to_device(rng.standard_normal((2, 3, 7, 7)).astype(np.float32), "emulator")
    weight = backend.to_device(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "emulator")
    assert backend.device_of(x) == "emulator" and backend.resolve_device("emulator") == "emulator"
    y = ops.conv2d_forward(x, weight, None, padding=1)
    pooled, argmax = ops.max_pool2d_forward(ops.relu_forward(y), 2)
    assert isinstance(pooled, backend.EmulatorArray) and backend.device_of(argmax) == "emulator"
    with dispatch.cpu_path("reference"):
        expected = ops.conv2d_forward(backend.to_numpy(x), backend.to_numpy(weight), None, padding=1)
    np.testing.assert_allclose(backend.to_numpy(y), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"weight and x must be on the same device \(cpu vs emulator\)"):
        ops.conv2d_forward(x, backend.to_numpy(weight), None)


def test_the_dispatch_table_picks_by_device():
    assert dispatch.launcher("conv", "conv2d_forward").__module__ == "gpucnn.cuda.conv"
    assert dispatch.cpu_implementation("conv", "conv2d_forward", "reference").__name__ == "conv2d_forward_reference"
    for family, name in (("linear", "linear_forward"), ("loss", "softmax_cross_entropy"),
                         ("activation", "tanh_backward"), ("tensor", "add_into"), ("pool", "avg_pool2d_backward")):
        assert callable(dispatch.launcher(family, name)) and callable(dispatch.cpu_implementation(family, name))
    with pytest.raises(ValueError, match="CPU path"):
        with dispatch.cpu_path("fastest"):
            pass


def test_features_on_the_emulator_match_the_cpu():
    x = np.random.default_rng(4).standard_normal((3, 1, 28, 28)).astype(np.float32)
    on_cpu = LeNet5(seed=4).features(x, "flatten")
    on_emulator = LeNet5(seed=4).to("emulator").features(backend.to_device(x, "emulator"), "flatten")
    np.testing.assert_allclose(backend.to_numpy(on_emulator), on_cpu, rtol=1e-5, atol=1e-6)


def test_float64_parameters_are_refused_on_a_kernel_device():
    with pytest.raises(ValueError, match=r"float32 kernels, but parameter conv1.weight is float64; call model.float"):
        LeNet5().double().to("emulator")


def _quadrant_data(n, seed):
    images, labels = quadrant_images(n, seed)
    return (images[:, None].astype(np.float32) / 255.0 - 0.2), labels.astype(np.int64)


def test_trainer_on_the_emulator_uses_fused_steps_and_its_checkpoint_moves_to_the_cpu(tmp_path):
    train, test = _quadrant_data(96, 0), _quadrant_data(40, 1)
    for graph in (False, True):
        model = LeNet5(num_classes=4, seed=2)
        opt = optim.Adam(list(model.parameters()), lr=3e-3)
        trainer = Trainer(model, opt, optim.CosineAnnealingLR(opt, T_max=2), device="emulator",
                          out_dir=tmp_path / f"graph-{graph}", seed=1, graph=graph)
        assert isinstance(trainer.optimizer, FusedOptimizer) and trainer.optimizer.rule is opt
        history = trainer.fit(train, test, epochs=2, batch_size=32, progress=False)
        assert history[-1]["lr"] > 0 and history[-1]["train_loss"] < history[0]["train_loss"]
    saved = [load_checkpoint(tmp_path / f"graph-{graph}" / "checkpoint.npz") for graph in (False, True)]
    for name in saved[0]["model"]:  # captured or not, the same weights, bit for bit
        np.testing.assert_array_equal(saved[0]["model"][name], saved[1]["model"][name])
    assert saved[0]["trainer"]["optimizer_class"] == "Adam"

    # The emulator's checkpoint resumes on the CPU (Adam fused over NumPy buffers there), and trains on.
    model = LeNet5(num_classes=4, seed=9)
    opt = optim.Adam(list(model.parameters()), lr=3e-3)
    trainer = Trainer(model, opt, optim.CosineAnnealingLR(opt, T_max=3), device="cpu", out_dir=tmp_path / "graph-True",
                      seed=1)
    record = trainer.fit(train, test, epochs=3, batch_size=32, resume=tmp_path / "graph-True" / "checkpoint.npz",
                         progress=False)[-1]
    assert isinstance(trainer.optimizer, HostFusedOptimizer) and trainer.optimizer.rule is opt
    assert record["epoch"] == 3 and trainer.optimizer.step_count == 9
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 9


def test_sequential_with_dropout_trains_eagerly_on_the_emulator():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.25, rng=0), nn.Linear(8, 2))
    opt = optim.SGD(list(model.parameters()), lr=0.1)
    trainer = Trainer(model, opt, device="emulator", graph=False)
    x = rng.standard_normal((24, 1, 4, 4)).astype(np.float32)
    y = (x.reshape(24, -1).sum(axis=1) > 0).astype(np.int64)
    history = trainer.fit((x, y), (x, y), epochs=2, batch_size=8, progress=False)
    assert np.isfinite(history[-1]["train_loss"])


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    if not (MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the real MNIST test set is not at {MNIST}")
    images, labels = read_idx(MNIST / "t10k-images-idx3-ubyte.gz"), read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    folder = tmp_path_factory.mktemp("mnist")
    write_idx(folder / "train-images-idx3-ubyte", images[:320])
    write_idx(folder / "train-labels-idx1-ubyte", labels[:320])
    write_idx(folder / "t10k-images-idx3-ubyte", images[9000:9128])
    write_idx(folder / "t10k-labels-idx1-ubyte", labels[9000:9128])
    return folder


def test_cli_trains_real_mnist_on_the_emulator_and_evaluates_on_the_cpu(mnist_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--device", "emulator", "--dataset", "mnist", "--data-dir", mnist_dir, "--epochs", 1,
                     "--batch-size", 32, "--out", out, "--no-download", "--quiet")
    assert "device: emulator" in result.stdout
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["epoch"] == 1 and record["test_acc"] > 0.2  # 10 classes: chance is 0.1
    evaluated = run_cli("evaluate", out / "checkpoint.npz", "--device", "cpu", "--data-dir", mnist_dir,
                        "--no-download").stdout
    assert f"accuracy {record['test_acc']:.2%}" in evaluated
