"""Softmax cross-entropy on every backend against row-by-row float64 loops (tests/loops.py) and finite
differences; NaN rows and unchecked labels under the emulator; mutation tests of loss.cu; the launchers'
refusals.

The float32 kernel cases (tests/kernel_cases.py) run on every backend of the ``backend`` fixture; on
the GPU twice, which must give the same bits.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest

from gpucnn.cuda import linear as cuda_linear
from gpucnn.cuda import loss as cuda_loss
from gpucnn.ops import loss as ops_loss
from gpucnn.ops import softmax_cross_entropy, softmax_cross_entropy_backward
from gpucnn.emulator import EmulatorRuntime
from gpucnn.testing.gradcheck import assert_gradient_close
from tests.conftest import EMULATOR_ORDERS
from tests.helpers import assert_same_bits, assert_close, assert_refused_before_launch, f32
from tests.kernel_cases import (
    FORWARD_TOL,
    LOSS_CASES,
    LossCase,
    broken_kernel_copy,
    caught_under_some_order,
    case_id,
    check_loss,
    copy_kernels,
    kernel_define,
    loss_inputs,
    remove_barrier,
)
from tests.loops import softmax_cross_entropy_backward_loops, softmax_cross_entropy_loops
from tests.test_conv import run_twice_on_gpu

FLOAT64 = pytest.mark.backends("reference", "fast")


# ------------------------------------------------------------------ float32 kernel cases, every backend

@lru_cache(maxsize=None)
def expected_loss(case: LossCase):
    logits, labels = loss_inputs(case)
    loss, probs = softmax_cross_entropy_loops(logits, labels)
    grad = softmax_cross_entropy_backward_loops(probs.astype(np.float32), labels)
    return np.float32(loss), probs.astype(np.float32), grad.astype(np.float32)


def run_loss_case(backend, case: LossCase):
    logits, labels = loss_inputs(case)
    loss, probs = softmax_cross_entropy(backend.to(logits), backend.to(labels))
    # the backward of the loops' probabilities, so its check does not inherit the forward's error
    probs_in = expected_loss(case)[1]
    grad = softmax_cross_entropy_backward(backend.to(probs_in), backend.to(labels))
    return backend.host((loss, probs, grad))


@pytest.mark.parametrize("case", LOSS_CASES, ids=case_id)
def test_softmax_cross_entropy_kernel_cases_match_loops(case, backend):
    outputs = loss, probs, grad = run_loss_case(backend, case)
    want_loss, want_probs, want_grad = expected_loss(case)
    assert loss.shape == () and loss.dtype == np.float32
    assert_close("loss", loss, want_loss, FORWARD_TOL)
    assert_close("probs", probs, want_probs, FORWARD_TOL)
    assert_close("grad_logits", grad, want_grad, FORWARD_TOL)
    if backend.device == "gpu":
        assert_same_bits(outputs, run_loss_case(backend, case))


# ------------------------------------------------------------------ float64 against loops and finite differences

@FLOAT64
def test_softmax_cross_entropy_value_and_gradient(backend):
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((6, 5)) * 2
    labels = np.array([0, 4, 2, 2, 1, 3])
    loss, probs = backend.host(softmax_cross_entropy(backend.to(logits), backend.to(labels)))
    expected = np.mean([math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(logits, labels)])
    assert loss.shape == () and abs(float(loss) - expected) < 1e-13
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-14)
    grad = backend.host(softmax_cross_entropy_backward(backend.to(probs), backend.to(labels)))
    assert_gradient_close(lambda: float(backend.host(softmax_cross_entropy(backend.to(logits), backend.to(labels)))[0]),
                          logits, grad)


@FLOAT64
def test_softmax_cross_entropy_is_stable_for_huge_logits(backend):
    logits = np.array([[1000.0, 0.0, -1000.0], [-5000.0, -5000.0, -4990.0]], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        loss, probs = backend.host(softmax_cross_entropy(backend.to(logits), backend.to(np.array([0, 2]))))
    assert loss.dtype == np.float32 and probs.dtype == np.float32
    assert abs(float(loss) - math.log1p(2 * math.exp(-10)) / 2) < 1e-6
    np.testing.assert_allclose(probs[0], [1, 0, 0], atol=1e-30)


def test_softmax_cross_entropy_rejects_bad_labels():
    logits = np.zeros((3, 4), np.float32)
    with pytest.raises(TypeError, match="labels must be an integer array"):
        softmax_cross_entropy(logits, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        softmax_cross_entropy(logits, np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), but range over \[0, 4\]"):
        softmax_cross_entropy(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        softmax_cross_entropy(logits[0], np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="labels must lie in"):
        softmax_cross_entropy_backward(logits, np.array([0, -1, 1]))


# ------------------------------------------------------------------ the launchers under the emulator: NaN, unchecked labels, thread orders

@pytest.mark.emulator
def test_bad_labels_give_nan_without_the_check(emulator):
    logits = np.zeros((3, 4), np.float32)
    labels = np.array([0, 4, 1])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        cuda_loss.softmax_cross_entropy(logits, labels, runtime=emulator)
    loss, probs = cuda_loss.softmax_cross_entropy(logits, labels, check_labels=False, runtime=emulator)
    assert np.isnan(loss)
    np.testing.assert_allclose(probs, 0.25)
    grad = cuda_loss.softmax_cross_entropy_backward(probs, labels, check_labels=False, runtime=emulator)
    assert np.isnan(grad[1]).all() and not np.isnan(grad[[0, 2]]).any()


@pytest.mark.emulator
def test_nan_logit_makes_its_row_nan(emulator):
    logits, labels = loss_inputs(LossCase("nan", 4, 40))
    logits[2, 35] = np.nan
    loss, probs = cuda_loss.softmax_cross_entropy(logits, labels, runtime=emulator)
    ref_loss, ref_probs = ops_loss.softmax_cross_entropy(logits, labels)
    assert np.isnan(loss) and np.isnan(ref_loss)
    assert_close("probs", probs, ref_probs, 1e-5)


@pytest.mark.emulator
def test_results_are_bitwise_identical_across_thread_orders():
    rng = np.random.default_rng(8)
    x, weight = rng.standard_normal((300, 37)).astype(np.float32), rng.standard_normal((11, 37)).astype(np.float32)
    grad_y = rng.standard_normal((300, 11)).astype(np.float32)
    logits, labels = loss_inputs(LossCase("orders", 300, 11))
    results = []
    for order in EMULATOR_ORDERS:
        rt = EmulatorRuntime(order=order, seed=13)
        outputs = [cuda_linear.linear_forward(x, weight, None, runtime=rt),
                   *cuda_linear.linear_backward(grad_y, x, weight, runtime=rt),
                   *cuda_loss.softmax_cross_entropy(logits, labels, runtime=rt)]
        results.append(outputs)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


# ------------------------------------------------------------------ mutation tests: a broken copy of loss.cu must be caught

@pytest.mark.emulator
@pytest.mark.parametrize("index", [0, 1], ids=["mean_before_tree", "mean_in_tree"])
def test_mutation_missing_barrier_is_caught(tmp_path, index):
    assert caught_under_some_order(broken_kernel_copy(tmp_path, "loss.cu", remove_barrier("softmax_xent_mean", index)),
                                   lambda rt: check_loss(LossCase("mutation", 600, 3), runtime=rt))


@pytest.mark.emulator
def test_mutation_partial_shuffle_mask_is_caught(tmp_path):
    def half_mask(source):
        return source.replace("__shfl_xor_sync(FULL_WARP, sum, offset)", "__shfl_xor_sync(0x0000ffffu, sum, offset)")
    assert caught_under_some_order(broken_kernel_copy(tmp_path, "loss.cu", half_mask),
                   lambda rt: check_loss(LossCase("mutation", 9, 33), runtime=rt))


@pytest.mark.emulator
def test_unmutated_copy_is_not_flagged(tmp_path):
    assert not caught_under_some_order(copy_kernels(tmp_path), lambda rt: (check_loss(LossCase("m", 600, 3), runtime=rt),
                                                                           check_loss(LossCase("m", 9, 33), runtime=rt)))


def test_python_constants_match_the_kernel_defines():
    assert kernel_define("loss.cu", "XENT_ROWS") == cuda_loss.XENT_ROWS
    assert kernel_define("loss.cu", "MEAN_THREADS") == cuda_loss.MEAN_THREADS


# ------------------------------------------------------------------ on a real GPU: sizes that need many blocks

MULTI_GRID_LOSS = [LossCase("batch4096", 4096, 10), LossCase("wide_1000_classes", 256, 1000)]



@pytest.mark.gpu
@pytest.mark.parametrize("case", MULTI_GRID_LOSS, ids=case_id)
def test_softmax_cross_entropy_on_many_gpu_blocks(case):
    run_twice_on_gpu(check_loss, case)


# ------------------------------------------------------------------ launcher refusals: before any kernel runs

@pytest.mark.parametrize("call, error, message", [
    (lambda rt: cuda_loss.softmax_cross_entropy(f32(3, 4), np.array([0, 1]), runtime=rt), ValueError, r"\(3,\)"),
    (lambda rt: cuda_loss.softmax_cross_entropy(f32(3, 4), np.zeros(3, np.float32), runtime=rt), TypeError,
     "integer"),
    (lambda rt: cuda_loss.softmax_cross_entropy(f32(3, 4), np.array([0, 1, 9]), runtime=rt), ValueError, "range"),
    (lambda rt: cuda_loss.softmax_cross_entropy(f32(3, 4), [0, 1, 2], runtime=rt), TypeError, "ndarray"),
    (lambda rt: cuda_loss.softmax_cross_entropy_backward(f32(3), np.array([0, 1, 2]), runtime=rt), ValueError,
     "2 dim"),
    (lambda rt: cuda_loss.softmax_cross_entropy(f32(2, 3), np.array([0.0, 1.0]), runtime=rt),
     TypeError, "labels must be an integer array, not float64"),
    (lambda rt: cuda_loss.softmax_cross_entropy(f32(2, 3), np.array([0, 3]), runtime=rt),
     ValueError, r"labels must lie in \[0, 3\), but range over \[0, 3\]"),
])
def test_launchers_refuse_bad_inputs_before_any_kernel_is_launched(call, error, message):
    assert_refused_before_launch(call, error, message)
