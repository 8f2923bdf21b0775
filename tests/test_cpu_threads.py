"""The fast CPU path's thread pool (gpucnn/cpu/threads.py) and dispatch: the fast path is what the public
ops run on NumPy arrays; training (LeNet-5, and ResNet-20 with its BatchNorm) repeats bit for bit whatever the
number of threads; a failing chunk
raises after every thread stops; the caller's NumPy error state holds in the helper threads.

The per-op value and gradient checks of the fast path are in tests/test_conv.py, test_pool.py,
test_activation.py and test_linear.py."""
from __future__ import annotations

import numpy as np
import pytest

from gpucnn import dispatch, models, ops, optim
from gpucnn.cpu import activation as fast_activation
from gpucnn.cpu import conv as fast_conv
from gpucnn.cpu import linear as fast_linear
from gpucnn.cpu import pool as fast_pool
from gpucnn.cpu import threads


def test_the_dispatch_picks_the_fast_path_for_numpy_arrays():
    for family, module, name in (("conv", fast_conv, "conv2d_forward"), ("conv", fast_conv, "conv2d_backward"),
                                 ("pool", fast_pool, "max_pool2d_forward"), ("pool", fast_pool, "max_pool2d_backward"),
                                 ("activation", fast_activation, "relu_forward"),
                                 ("linear", fast_linear, "linear_forward"), ("linear", fast_linear, "linear_backward")):
        assert dispatch.cpu_implementation(family, name) is getattr(module, name)
        assert dispatch.cpu_implementation(family, name, "reference").__name__ == name + "_reference"


def _train(steps, seed=0, batch=40, model_name="lenet5"):
    rng = np.random.default_rng(seed)
    size = 28 if model_name == "lenet5" else 12
    images = rng.standard_normal((steps * batch, 1, size, size)).astype(np.float32)
    labels = rng.integers(0, 10, steps * batch)
    model = models.LeNet5(seed=seed) if model_name == "lenet5" else \
        models.build_model(model_name, seed=seed, in_channels=1, input_size=size)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    losses, first_grads = [], None
    for step in range(steps):
        x, y = images[step * batch: (step + 1) * batch], labels[step * batch: (step + 1) * batch]
        opt.zero_grad()
        loss, probs = ops.softmax_cross_entropy(model(x), y)
        model.backward(ops.softmax_cross_entropy_backward(probs, y))
        if first_grads is None:
            first_grads = [p.grad.copy() for p in model.parameters()]
        opt.step()
        losses.append(float(loss))
    return losses, [p.data.copy() for p in model.parameters()], first_grads


@pytest.mark.parametrize("model_name", ["lenet5", "resnet20"])
def test_training_repeats_bit_for_bit_and_follows_the_reference(monkeypatch, model_name):
    with dispatch.cpu_path("reference"):
        losses_ref, _, grads_ref = _train(3, model_name=model_name)
    monkeypatch.setattr(threads, "MIN_PARALLEL_WORK", 0)
    runs = []
    for thread_count in (1, 2, 3):
        monkeypatch.setattr(threads, "THREADS", thread_count)
        runs.append(_train(3, model_name=model_name))
    for losses, weights, _ in runs[1:]:
        assert losses == runs[0][0]
        for got, want in zip(weights, runs[0][1]):
            np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(runs[0][0], losses_ref, rtol=1e-5)
    for got, want in zip(runs[0][2], grads_ref):  # the first step's gradients, from the same weights
        # BatchNorm's backward subtracts per-channel means: a few float32 cancellations in a deep network
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=(1e-6 if model_name == "lenet5" else 1e-5)
                                   * np.abs(want).max())


def test_a_failing_chunk_raises_after_every_thread_stops(monkeypatch):
    monkeypatch.setattr(threads, "THREADS", 3)
    done = []

    def work(i):
        if i == 2:
            raise RuntimeError("chunk 2 failed")
        done.append(i)

    with pytest.raises(RuntimeError, match="chunk 2 failed"):
        threads.run_chunks(work, 6)
    assert sorted(done) == [0, 1, 3, 4, 5]


def test_the_callers_numpy_error_state_holds_in_the_helper_threads(threaded):
    x = np.full((8, 3, 9, 9), 3e38, np.float32)
    weight = np.full((4, 3, 3, 3), 3e38, np.float32)
    with np.errstate(all="raise"):
        with pytest.raises(FloatingPointError):
            fast_conv.conv2d_forward(x, weight, None)
    with np.errstate(all="ignore"):
        import warnings  # noqa: PLC0415
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert np.isinf(fast_conv.conv2d_forward(x, weight, None)).all()


_FAULTS_PER_STEP = """
import resource, sys
import numpy as np
from gpucnn import models, ops, optim
from gpucnn.cpu import memory
model = models.LeNet5(seed=0)
opt = optim.Adam(list(model.parameters()), lr=1e-3)
x = np.random.default_rng(0).standard_normal((64, 1, 28, 28), dtype=np.float32)
labels = np.arange(64) % 10
def step():
    opt.zero_grad()
    _, probs = ops.softmax_cross_entropy(model(x), labels)
    model.backward(ops.softmax_cross_entropy_backward(probs, labels), input_grad=False)
    opt.step()
for _ in range(10):
    step()
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(memory.keep_freed_memory(), sorted(faults)[len(faults) // 2])  # the median step
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "confstr"), reason="glibc malloc tuning")
def test_freed_memory_stays_so_training_steps_do_not_page_fault():
    """With malloc tuned (the default, on glibc) the median LeNet-5 step at batch 64 touches no fresh
    pages after warm-up (untuned glibc gave 87-116 faults a step); GPUCNN_MALLOC_TUNING=0 leaves malloc
    alone."""
    import os
    import subprocess
    import sys
    if not os.confstr("CS_GNU_LIBC_VERSION"):
        pytest.skip("not glibc")
    env = {**os.environ, "GPUCNN_CPU_THREADS": "2"}
    tuned, faults = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP], env=env, capture_output=True,
                                   text=True, check=True).stdout.split()
    assert tuned == "True" and float(faults) < 10, (tuned, faults)
    env["GPUCNN_MALLOC_TUNING"] = "0"
    untuned = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
    assert untuned[0] == "False"
