"""gpucnn.no_grad(): forward keeps nothing for backward, max pooling skips its argmax, outputs are
unchanged, and the mode is the running thread's, restored after errors."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import gpucnn
from gpucnn import nn, ops
from gpucnn.models import LeNet5
from gpucnn.train import evaluate


def _images(n=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)


def test_outputs_equal_and_nothing_is_kept(backend):
    model = LeNet5(seed=0).to(backend.device)
    x = backend.to(_images())
    with_grad = backend.host(model(x))
    # The ReLUs run inside their neighbours (kernels, or the CPU's conv/pool/linear) and keep nothing themselves.
    fused = set(model._last_fused)
    assert fused == {"act1", "act2", "act3", "act4"}
    assert all(bool(m._cache) != (name in fused) for name, m in model.named_children())  # what backward needs
    with gpucnn.no_grad():
        assert not gpucnn.is_grad_enabled()
        without = backend.host(model(x))
    assert gpucnn.is_grad_enabled()
    np.testing.assert_array_equal(without, with_grad)
    kept = {name: list(m._cache) for name, m in model.named_children()}
    assert kept == {name: [] if name in fused else ["no_grad"] for name in kept}, kept


def test_backward_after_a_no_grad_forward_says_so():
    layer = nn.Conv2d(1, 2, 3)
    with gpucnn.no_grad():
        y = layer(np.zeros((1, 1, 5, 5), np.float32))
    with pytest.raises(RuntimeError, match="no_grad"):
        layer.backward(np.ones_like(y))
    y = layer(np.zeros((1, 1, 5, 5), np.float32))  # a forward outside no_grad makes backward work again
    assert layer.backward(np.ones_like(y)).shape == (1, 1, 5, 5)


def test_max_pool_runs_the_op_without_argmax(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "max_pool2d_forward", lambda *a: calls.append("forward") or (_ for _ in ()).throw(
        AssertionError("max_pool2d_forward ran under no_grad")))
    pool = nn.MaxPool2d(2)
    x = np.arange(32, dtype=np.float32).reshape(1, 2, 4, 4)
    with gpucnn.no_grad():
        y = pool(x)
    np.testing.assert_array_equal(y, x.reshape(1, 2, 2, 2, 2, 2).max(axis=(3, 5)))
    assert calls == []


def test_mode_is_restored_after_an_error_and_works_as_a_decorator():
    with pytest.raises(ValueError):
        with gpucnn.no_grad():
            raise ValueError("inside")
    assert gpucnn.is_grad_enabled()

    @gpucnn.no_grad()
    def inside():
        return gpucnn.is_grad_enabled()

    assert inside() is False
    assert gpucnn.is_grad_enabled()


def test_mode_belongs_to_the_thread():
    seen = []
    started, release = threading.Event(), threading.Event()

    def other():
        started.set()
        release.wait(10)
        seen.append(gpucnn.is_grad_enabled())

    thread = threading.Thread(target=other)
    thread.start()
    started.wait(10)
    with gpucnn.no_grad():
        release.set()
        thread.join(10)
    assert seen == [True]


def test_evaluate_runs_under_no_grad_and_leaves_the_mode_on():
    model = LeNet5(seed=0)
    images, labels = _images(6), np.arange(6) % 10
    result = evaluate(model, images, labels, batch_size=4)
    assert gpucnn.is_grad_enabled()
    # every layer that ran marked its cache (the fused ReLUs did not run, so they have none)
    assert all(list(m._cache) == ([] if name in model._last_fused else ["no_grad"])
               for name, m in model.named_children())
    assert model._last_fused
    with gpucnn.no_grad():
        logits = model(images)
    loss, _ = ops.softmax_cross_entropy(logits, labels)
    assert result["loss"] == pytest.approx(float(loss), rel=1e-6)
    assert result["accuracy"] == np.mean(logits.argmax(axis=1) == labels)
