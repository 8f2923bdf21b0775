"""The training step on gpucnn's kernels, checked on the CPU through the emulator device.

LeNet-5 (both variants) trained a few steps on the emulator must follow the CPU path; the recorded
(captured) step must equal the eager step bit for bit; recording must refuse what a CUDA graph
cannot hold; and a step must launch only gpucnn's kernels, the first convolution computing no
input gradient.
"""
from __future__ import annotations

import numpy as np
import pytest

from gpucnn import backend, nn, ops, optim
from gpucnn.cuda.graph import CaptureError
from gpucnn.cuda.optim import FusedOptimizer
from gpucnn.models import LeNet5
from gpucnn.step import TrainStep
from tests.helpers import kernel_names_of_a_guarded_step

pytestmark = pytest.mark.emulator

BATCH = 8
STEPS = 3
RELATIVE_TOL = 1e-5  # ||emulator - cpu|| / ||cpu|| per parameter after STEPS steps (measured: <= 7.2e-7)

# Every kernel a modern LeNet-5 step with Adam launches: nothing else (no cuBLAS, no CuPy kernel).
# No fill or add_into (the backward writes the gradients into the fused optimizer's flat buffer) and
# no ReLU launches (each runs inside the pool or linear kernel before it and the data gradient after it).
LENET5_STEP_KERNELS = {
    "conv2d_forward_tiled", "max_pool2d_forward", "gemm_matmul", "gemm_reduce_slices", "softmax_xent_forward",
    "softmax_xent_accumulate", "softmax_xent_backward", "max_pool2d_backward", "conv2d_small_backward_data",
    "conv2d_small_backward_weight", "optim_advance_step", "adam_update",
}
LENET5_MAX_LAUNCHES = 30    # issue 18's goal (54 before it)
VGG_SMALL_MAX_LAUNCHES = 45  # (88 before it)


def _batches(count, batch=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, batch))
            for _ in range(count)]


def _make_optimizer(kind, params):
    if kind == "adam":
        return optim.Adam(params, lr=1e-3)
    return optim.SGD(params, lr=0.05, momentum=0.9)


def _train_cpu(variant, kind, batches):
    model = LeNet5(variant=variant, seed=5)
    opt = _make_optimizer(kind, list(model.parameters()))
    for x, y in batches:
        opt.zero_grad()
        logits = model(x)
        _, probs = ops.softmax_cross_entropy(logits, y)
        assert model.backward(ops.softmax_cross_entropy_backward(probs, y), input_grad=False) is None
        opt.step()
    return model


def _train_emulator(variant, kind, batches, graph):
    model = LeNet5(variant=variant, seed=5).to("emulator")
    step = TrainStep(model, _make_optimizer(kind, list(model.parameters())), len(batches[0][1]), graph=graph)
    for x, y in batches:
        step(backend.to_device(x, "emulator"), backend.to_device(y, "emulator"))
    return model, step


def _host_parameters(model):
    return {name: np.array(backend.to_numpy(p.data)) for name, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["modern", "classic"])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_lenet5_steps_on_the_emulator_follow_the_cpu(variant, kind):
    batches = _batches(STEPS)
    cpu = _host_parameters(_train_cpu(variant, kind, batches))
    emulated, step = _train_emulator(variant, kind, batches, graph=False)
    for name, value in _host_parameters(emulated).items():
        # Norm-wise: Adam turns the float rounding of a near-zero gradient element (summed in another
        # order) into a visible change of that one element, which an element-wise bound would flag.
        error = np.linalg.norm(value - cpu[name]) / np.linalg.norm(cpu[name])
        assert error <= RELATIVE_TOL, f"{variant}/{kind} {name}: relative error {error:.2e}"
        assert not np.array_equal(cpu[name], LeNet5(variant=variant, seed=5).state_dict()[name]), \
            f"{name} did not train"
    assert isinstance(step.optimizer, FusedOptimizer) and step.optimizer.step_count == STEPS


def test_recorded_step_equals_the_eager_step_bit_for_bit():
    batches = _batches(5, seed=1)
    eager, eager_step = _train_emulator("modern", "adam", batches, graph=False)
    recorded, recorded_step = _train_emulator("modern", "adam", batches, graph=True)
    assert recorded_step.recorded and recorded_step.runtime.launches
    for (name, a), b in zip(_host_parameters(eager).items(), _host_parameters(recorded).values()):
        assert np.array_equal(a, b), f"{name} differs between the recorded and the eager step"
    assert eager_step.totals() == recorded_step.totals()
    loss_sum, correct = recorded_step.totals()
    assert np.isfinite(loss_sum) and loss_sum > 0 and 0 <= correct <= 5 * BATCH


def test_replays_follow_a_learning_rate_change():
    """The lr lives on the device: a replay after ``lr = 0`` leaves every weight as it was."""
    batches = _batches(3, seed=2)
    model, step = _train_emulator("modern", "adam", batches[:2], graph=True)
    before = _host_parameters(model)
    step.optimizer.lr = 0.0
    x, y = batches[2]
    step(backend.to_device(x, "emulator"), backend.to_device(y, "emulator"))
    for name, value in _host_parameters(model).items():
        assert np.array_equal(value, before[name]), name


def test_a_step_launches_only_gpucnns_kernels_and_no_input_gradient_for_conv1():
    batches = _batches(3, seed=3)
    model, step = _train_emulator("modern", "adam", batches[:2], graph=False)
    names = kernel_names_of_a_guarded_step(step, batches[2])  # asserts no NumPy op, allocation or host read
    assert set(names) == LENET5_STEP_KERNELS
    assert names.count("conv2d_small_backward_data") == 1  # conv2's; conv1's input needs no gradient
    assert names.count("conv2d_forward_tiled") == 2
    assert len(names) <= LENET5_MAX_LAUNCHES, names


def test_a_vgg_small_step_stays_within_its_launch_budget_and_follows_the_cpu():
    from gpucnn.models import VGGSmall
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((2, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 2)
    cpu_model = VGGSmall(seed=3)
    opt = optim.Adam(list(cpu_model.parameters()), lr=1e-3)
    opt.zero_grad()
    _, probs = ops.softmax_cross_entropy(cpu_model(x), y)
    cpu_model.backward(ops.softmax_cross_entropy_backward(probs, y), input_grad=False)
    opt.step()
    model = VGGSmall(seed=3).to("emulator")
    step = TrainStep(model, optim.Adam(list(model.parameters()), lr=1e-3), 2, graph=False)
    step(backend.to_device(x, "emulator"), backend.to_device(y, "emulator"))
    names = step.runtime.kernel_names
    assert len(names) <= VGG_SMALL_MAX_LAUNCHES, names
    assert not {"fill", "add_into", "relu_forward", "relu_backward"} & set(names)
    # The gradients the step wrote into the flat buffer (Adam would turn rounding noise of
    # near-zero gradient elements into steps of lr, so the gradients are compared, not the weights).
    cpu = dict(cpu_model.named_parameters())
    for name, p in model.named_parameters():
        value, want = backend.to_numpy(p.grad), cpu[name].grad
        assert np.linalg.norm(value - want) <= 1e-5 * np.linalg.norm(want), name


class _Misbehaving(nn.Module):
    """An identity layer that does one thing a CUDA graph cannot hold, named by ``what``."""

    def __init__(self, what):
        super().__init__()
        self.what = what

    def forward(self, x):
        self._save(output_shape=tuple(x.shape))
        if self.what == "allocation":
            return x.copy()
        if self.what == "host read":
            backend.to_numpy(x)
        if self.what == "numpy":
            return x * 1.0
        if self.what == "synchronize":
            backend.synchronize("emulator")
        return x

    def backward(self, grad_output, input_grad=True):
        return grad_output


@pytest.mark.parametrize("what", ["allocation", "host read", "numpy", "synchronize"])
def test_recording_refuses_what_a_graph_cannot_hold(what):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), _Misbehaving(what), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    model.input_shape = (1, 6, 6)
    model.to("emulator")
    step = TrainStep(model, optim.Adam(list(model.parameters())), 4, graph=True)
    rng = np.random.default_rng(0)
    x = backend.to_device(rng.standard_normal((4, 1, 6, 6)).astype(np.float32), "emulator")
    y = backend.to_device(rng.integers(0, 3, 4), "emulator")
    step(x, y)  # the eager plan run is allowed to do anything
    with pytest.raises(CaptureError, match=f"{what} inside a recorded step"):
        step(x, y)


def test_a_step_refuses_a_cpu_model_a_wrong_batch_and_dropout():
    with pytest.raises(ValueError, match="kernel device"):
        TrainStep(LeNet5(), optim.Adam(list(LeNet5().parameters())), 4)
    model = LeNet5(seed=0).to("emulator")
    step = TrainStep(model, optim.Adam(list(model.parameters())), 4, graph=False)
    x = backend.to_device(np.zeros((3, 1, 28, 28), np.float32), "emulator")
    with pytest.raises(ValueError, match=r"shape \(4, C, H, W\)"):
        step(x, backend.to_device(np.zeros(3, np.int64), "emulator"))
    with pytest.raises(ValueError, match="is on the cpu"):
        step(np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64))
    dropped = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 2)).to("emulator")
    with pytest.raises(ValueError, match="Dropout"):
        TrainStep(dropped, optim.SGD(list(dropped.parameters()), lr=0.1), 4, graph=True)


def test_first_layer_input_gradient_is_skipped_on_the_cpu_too():
    x, y = _batches(1)[0]
    grads = []
    for input_grad in (True, False):
        model = LeNet5(seed=1)
        _, probs = ops.softmax_cross_entropy(model(x), y)
        result = model.backward(ops.softmax_cross_entropy_backward(probs, y), input_grad=input_grad)
        assert (result is None) == (not input_grad)
        grads.append([p.grad.copy() for p in model.parameters()])
    for with_input, without in zip(*grads):
        np.testing.assert_array_equal(with_input, without)
