"""The captured training step over BatchNorm, residual blocks and global average pooling, on the emulator.

A small residual network (BatchNorm2d after every convolution, a basic block with a projection
shortcut and one with the identity, global average pooling, BatchNorm1d after a bias-free Linear in the head) trains a few
steps on the emulator: the recorded (captured) step must equal the eager step bit for bit, running
statistics and batch counters included (the running statistics are updated by the kernels inside the
recording), both must follow the CPU path, and a step launches only gpucnn's kernels.
"""
from __future__ import annotations

import numpy as np
import pytest

from gpucnn import backend, nn, ops, optim
from gpucnn.step import TrainStep
from tests.helpers import kernel_names_of_a_guarded_step

pytestmark = pytest.mark.emulator

BATCH = 4
STEPS = 4
RELATIVE_TOL = 2e-5  # ||emulator - cpu|| / ||cpu|| per parameter and running statistic after STEPS steps (measured: <= 5.1e-6)
NORM_KERNELS = {"batch_norm_stats_partial", "batch_norm_stats_finalize", "batch_norm_forward_train",
                "batch_norm_backward_partial", "batch_norm_backward_finalize", "batch_norm_backward_data",
                "global_avg_pool2d_forward", "global_avg_pool2d_backward", "add_forward"}


def _model(seed=3):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False, rng=rng), nn.BatchNorm2d(4), nn.ReLU(),
        nn.BasicBlock(4, 6, stride=2, rng=rng),   # projection shortcut: 1x1 conv + BatchNorm
        nn.BasicBlock(6, 6, rng=rng),             # identity shortcut
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 5, bias=False, rng=rng), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3, rng=rng))
    model.input_shape = (1, 7, 7)  # odd sizes: 7 -> 4 after the stride-2 block
    return model


def _batches(count, seed=0):
    rng = np.random.default_rng(seed)
    return [((1 + 2 * rng.standard_normal((BATCH, 1, 7, 7))).astype(np.float32), rng.integers(0, 3, BATCH))
            for _ in range(count)]


def _train_emulator(batches, graph):
    model = _model().to("emulator")
    step = TrainStep(model, optim.SGD(list(model.parameters()), lr=0.05, momentum=0.9), BATCH, graph=graph)
    for x, y in batches:
        step(backend.to_device(x, "emulator"), backend.to_device(y, "emulator"))
    return model, step


def _train_cpu(batches):
    model = _model()
    opt = optim.SGD(list(model.parameters()), lr=0.05, momentum=0.9)
    for x, y in batches:
        opt.zero_grad()
        _, probs = ops.softmax_cross_entropy(model(x), y)
        model.backward(ops.softmax_cross_entropy_backward(probs, y), input_grad=False)
        opt.step()
    return model


def _host_state(model):
    return {name: np.array(backend.to_numpy(value)) for name, value in model.state_dict().items()}


def test_recorded_step_equals_the_eager_step_bit_for_bit_running_statistics_included():
    batches = _batches(STEPS, seed=1)
    eager, eager_step = _train_emulator(batches, graph=False)
    recorded, recorded_step = _train_emulator(batches, graph=True)
    assert recorded_step.recorded and recorded_step.runtime.launches
    eager_state, recorded_state = _host_state(eager), _host_state(recorded)
    assert list(eager_state) == list(recorded_state)
    assert any(name.endswith("running_var") for name in eager_state)
    for name, value in eager_state.items():
        assert np.array_equal(value, recorded_state[name]), f"{name} differs between the recorded and the eager step"
    initial = _host_state(_model())
    for name, value in recorded_state.items():
        if name.endswith(("running_mean", "running_var")):  # moved by the replays themselves
            assert not np.array_equal(value, initial[name]), f"{name} was not updated"
        if name.endswith("num_batches_tracked"):
            assert int(value) == STEPS, f"{name} counted {int(value)} batches, not {STEPS}"
    assert eager_step.totals() == recorded_step.totals()


def test_emulator_steps_follow_the_cpu():
    batches = _batches(STEPS, seed=2)
    cpu = _host_state(_train_cpu(batches))
    emulated, _ = _train_emulator(batches, graph=True)
    for name, value in _host_state(emulated).items():
        if name.endswith("num_batches_tracked"):
            assert int(value) == int(cpu[name]) == STEPS, name
            continue
        error = np.linalg.norm(value - cpu[name]) / max(np.linalg.norm(cpu[name]), 1e-12)
        assert error <= RELATIVE_TOL, f"{name}: relative error {error:.2e}"


def test_a_step_launches_the_norm_kernels_and_nothing_foreign():
    batches = _batches(3, seed=3)
    _, step = _train_emulator(batches[:2], graph=False)
    names = kernel_names_of_a_guarded_step(step, batches[2])  # asserts no NumPy op, allocation or host read
    assert NORM_KERNELS <= set(names)
    assert names.count("batch_norm_stats_finalize") == 7  # the stem, two per block, the projection, the head
