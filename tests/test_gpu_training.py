"""LeNet-5 training steps on the GPU against the CPU from the same weights (skipped without a GPU)."""
import numpy as np
import pytest

from gpucnn import backend, ops, optim
from gpucnn.models import LeNet5

pytestmark = pytest.mark.gpu


def train_steps(device, steps=5, batch_size=64):
    """Weights (name -> numpy array) after `steps` Adam steps on fixed random batches."""
    rng = np.random.default_rng(7)
    model = LeNet5(seed=0).to(device)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x = backend.to_device(rng.standard_normal((batch_size, 1, 28, 28), dtype=np.float32), device)
        y = backend.to_device(rng.integers(0, 10, batch_size), device)
        opt.zero_grad()
        loss, probs = ops.softmax_cross_entropy(model(x), y)
        model.backward(ops.softmax_cross_entropy_backward(probs, y))
        opt.step()
    return model.state_dict()


def test_lenet5_steps_on_gpu_match_cpu():
    cpu, gpu = train_steps("cpu"), train_steps("gpu")
    for name, expected in cpu.items():
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(gpu[name], expected, rtol=0, atol=1e-4 * scale, err_msg=name)


def test_two_gpu_runs_give_bitwise_identical_weights():
    first, second = train_steps("gpu"), train_steps("gpu")
    for name in first:
        assert np.array_equal(first[name], second[name]), name


def _train_step_object(graph, steps=5, batch_size=64):
    """Weights after `steps` captured (graph) or eager TrainStep calls on the same batches as train_steps."""
    from gpucnn.step import TrainStep  # noqa: PLC0415

    rng = np.random.default_rng(7)
    model = LeNet5(seed=0).to("gpu")
    step = TrainStep(model, optim.Adam(model.parameters(), lr=1e-3), batch_size, graph=graph)
    for _ in range(steps):
        x = backend.to_device(rng.standard_normal((batch_size, 1, 28, 28), dtype=np.float32), "gpu")
        y = backend.to_device(rng.integers(0, 10, batch_size), "gpu")
        step(x, y)
    backend.synchronize("gpu")
    return model.state_dict(), step


def test_captured_step_equals_eager_step_and_follows_the_cpu():
    captured, step = _train_step_object(graph=True)
    eager, _ = _train_step_object(graph=False)
    assert step.runtime.graph is not None
    cpu = train_steps("cpu")
    for name, expected in cpu.items():
        assert np.array_equal(captured[name], eager[name]), name
        error = np.linalg.norm(captured[name] - expected) / np.linalg.norm(expected)
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"
    loss_sum, correct = step.totals()
    assert np.isfinite(loss_sum) and 0 <= correct <= 5 * 64


def test_an_error_inside_a_capture_is_the_one_raised():
    """A body that CUDA refuses inside a capture (a synchronisation) surfaces that error, not the
    'capture invalidated' that end_capture raises afterwards; the step can then be recorded again."""
    from gpucnn.cuda.graph import StepRuntime  # noqa: PLC0415
    from gpucnn.cuda.runtime import default_runtime  # noqa: PLC0415

    step = StepRuntime(default_runtime(), "gpu")
    step.run(lambda: None, "plan")
    with pytest.raises(Exception, match="cudaErrorStreamCaptureUnsupported"):
        step.run(lambda: backend.synchronize("gpu"), "record")
    step.run(lambda: None, "record")
    step.replay()
