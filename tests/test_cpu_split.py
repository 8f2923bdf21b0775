"""The split CPU training step (gpucnn.cpu.split): half the batch in a worker process, the same
gradient as one process up to float rounding, repeatable bit for bit, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from gpucnn import models, nn, ops, optim
from gpucnn.cpu import split
from gpucnn.train import Trainer


def _batch(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, n)


def _one_process_gradients(model, x, y):
    model.zero_grad()
    logits = model(x)
    loss, probs = ops.softmax_cross_entropy(logits, y)
    model.backward(ops.softmax_cross_entropy_backward(probs, y), input_grad=False)
    return float(loss) * len(y), int((logits.argmax(axis=1) == y).sum()), [p.grad.copy() for p in model.parameters()]


def _split_gradients(model, x, y):
    step = split.SplitStep(model, len(y))
    try:
        model.zero_grad()
        loss_sum, correct = step(x, y)
        assert step._worker is not None  # a batch of 64 runs half in the worker
        return loss_sum, correct, [p.grad.copy() for p in model.parameters()]
    finally:
        step.close()


def test_split_gradient_is_the_whole_batch_gradient_and_repeats_bit_for_bit():
    x, y = _batch()
    loss_one, correct_one, grads_one = _one_process_gradients(models.LeNet5(seed=0), x, y)
    loss_split, correct_split, grads_split = _split_gradients(models.LeNet5(seed=0), x, y)
    assert correct_split == correct_one
    assert loss_split == pytest.approx(loss_one, rel=1e-6)
    for (name, _), g1, g2 in zip(models.LeNet5(seed=0).named_parameters(), grads_one, grads_split):
        scale = float(np.abs(g1).max())
        assert float(np.abs(g2 - g1).max()) <= 1e-5 * scale, name
    again = _split_gradients(models.LeNet5(seed=0), x, y)[2]
    for g2, g3 in zip(grads_split, again):
        np.testing.assert_array_equal(g2, g3)


def test_the_worker_follows_the_parameters_as_they_change():
    x, y = _batch()
    model = models.LeNet5(seed=0)
    opt = optim.SGD(list(model.parameters()), lr=0.1)
    step = split.SplitStep(model, 64)
    try:
        for _ in range(3):
            opt.zero_grad()
            step(x, y)
            opt.step()
        model.zero_grad()
        step(x, y)
        split_grads = [p.grad.copy() for p in model.parameters()]
    finally:
        step.close()
    _, _, one = _one_process_gradients(model, x, y)  # the same weights, in this process alone
    for g1, g2 in zip(one, split_grads):
        assert float(np.abs(g2 - g1).max()) <= 1e-5 * float(np.abs(g1).max())


def test_small_batches_and_closed_steps():
    x, y = _batch(16)
    model = models.LeNet5(seed=0)
    step = split.SplitStep(model, 64)
    model.zero_grad()
    step(x, y)
    assert step._worker is None  # below MIN_SPLIT_BATCH: this process alone
    with pytest.raises(ValueError, match="up to 64 images"):
        step(*_batch(65))
    step(*_batch(64))
    step.close()
    assert step._worker is None
    step.close()  # twice is fine


def test_errors_in_the_worker_are_raised_here():
    model = models.LeNet5(seed=0)
    step = split.SplitStep(model, 64)
    x, y = _batch()
    y[-1] = 10  # out of range, in the worker's half only
    try:
        with pytest.raises(ValueError, match="label"):
            step(x, y)
        y[-1] = 3
        step(x, y)  # the worker goes on serving
    finally:
        step.close()


def test_a_dead_worker_is_one_clear_error():
    model = models.LeNet5(seed=0)
    step = split.SplitStep(model, 64)
    x, y = _batch()
    step(x, y)
    step._worker["process"].kill()
    step._worker["process"].wait()
    with pytest.raises(RuntimeError, match="GPUCNN_CPU_PROCESSES=1"):
        step(x, y)
    assert step._worker is None


def test_models_that_draw_random_numbers_are_not_split():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Dropout(0.5, rng=0))
    assert not split.splittable(model)
    with pytest.raises(ValueError, match="Dropout"):
        split.SplitStep(model, 64)
    assert split.splittable(nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Dropout(0.0, rng=0)))


def test_processes_setting(monkeypatch):
    monkeypatch.setenv("GPUCNN_CPU_PROCESSES", "3")
    with pytest.raises(ValueError, match="1 or 2"):
        split.processes()
    monkeypatch.setenv("GPUCNN_CPU_PROCESSES", "1")
    assert split.processes() == 1
    monkeypatch.delenv("GPUCNN_CPU_PROCESSES")
    monkeypatch.setattr(split.threads, "THREADS", 1)
    assert split.processes() == 1
    monkeypatch.setattr(split.threads, "THREADS", 2)
    assert split.processes() == 2


def _fit(monkeypatch, processes: str):
    monkeypatch.setenv("GPUCNN_CPU_PROCESSES", processes)
    monkeypatch.setattr(split.threads, "THREADS", 2)
    rng = np.random.default_rng(1)
    train = (rng.standard_normal((200, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 200))
    test = (rng.standard_normal((50, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 50))
    model = models.LeNet5(seed=0)
    trainer = Trainer(model, optim.Adam(list(model.parameters()), lr=1e-3), device="cpu", seed=0)
    history = trainer.fit(train, test, epochs=2, batch_size=64, progress=False)
    used = trainer._split
    if used:
        used.close()
    return history, [p.data.copy() for p in model.parameters()], used


def test_the_trainer_splits_its_cpu_steps_unless_told_not_to(monkeypatch):
    split_history, split_weights, used = _fit(monkeypatch, "2")
    assert isinstance(used, split.SplitStep)
    again_history, again_weights, _ = _fit(monkeypatch, "2")
    for a, b in zip(split_weights, again_weights):  # seeded runs repeat bit for bit
        np.testing.assert_array_equal(a, b)
    assert [r["train_loss"] for r in again_history] == [r["train_loss"] for r in split_history]
    one_history, one_weights, used = _fit(monkeypatch, "1")
    assert isinstance(used, split.SerialStep)  # one process, the split's arithmetic: the same bits
    for a, b in zip(split_weights, one_weights):
        np.testing.assert_array_equal(a, b)
    assert one_history == [{**r, "images_per_s": o["images_per_s"], "seconds": o["seconds"]}
                           for r, o in zip(split_history, one_history)]


def test_an_error_in_this_half_leaves_the_worker_in_step():
    model = models.LeNet5(seed=0)
    step = split.SplitStep(model, 64)
    x, y = _batch()
    try:
        y[0] = -1  # this process's half
        with pytest.raises(ValueError, match="label"):
            step(x, y)
        y[0] = 1
        model.zero_grad()
        loss_sum, _ = step(x, y)  # answered by this step's worker part, not the failed one's
        model.zero_grad()
        assert step(x, y)[0] == loss_sum
    finally:
        step.close()


def test_a_worker_that_cannot_start_says_why(monkeypatch):
    # /bin/sh in place of Python: it cannot run the worker's code and says so on its stderr
    monkeypatch.setattr(split.sys, "executable", "/bin/sh")
    step = split.SplitStep(models.LeNet5(seed=0), 64)
    with pytest.raises(RuntimeError, match="stopped .*it said: .+; run with GPUCNN_CPU_PROCESSES=1"):
        step(*_batch())
    assert step._worker is None


def test_an_unpicklable_model_is_one_clear_error():
    model = models.LeNet5(seed=0)
    model.fc3.note = lambda: None  # a lambda does not pickle
    with pytest.raises(ValueError, match="cannot be copied to the worker"):
        split.SplitStep(model, 64)(*_batch())
