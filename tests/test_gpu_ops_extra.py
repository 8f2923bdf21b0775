"""The linear, loss, element-wise and optimizer kernels on a real GPU (CuPy) against the NumPy reference:
the emulated tests' cases plus sizes that need many blocks. Two runs must give bitwise identical results.
The fused update is also captured in a CUDA graph and replayed, as the captured training step will do.
Skipped by tests/conftest.py where CuPy or a GPU is missing.
"""
from __future__ import annotations

import numpy as np
import pytest

from gpucnn import backend, optim
from gpucnn.cuda import linear as cuda_linear
from gpucnn.cuda import optim as cuda_optim
from gpucnn.nn import Parameter
from tests.kernel_cases import assert_close
from tests.kernel_cases_extra import (LINEAR_CASES, LOSS_CASES, MATMUL_CASES, OPTIM_CASES, OPTIM_TOL, RELU_SHAPES,
                                      LinearCase, LossCase, case_id, check_fused_optimizer, check_linear, check_loss,
                                      check_matmul, check_relu)

pytestmark = pytest.mark.gpu

MULTI_GRID_LINEAR = [
    LinearCase("batch4096_fc1_relu", 4096, 400, 120, relu=True),
    LinearCase("batch4096_fc3", 4096, 84, 10),
    LinearCase("square_513", 513, 513, 513, relu=True),
]
MULTI_GRID_LOSS = [LossCase("batch4096", 4096, 10), LossCase("wide_1000_classes", 256, 1000)]
MULTI_GRID_RELU = [(4096, 6, 28, 28)]


def _to_gpu(array):
    return backend.to_device(array, "gpu")


def _run_twice(check, case, **kwargs):
    first = check(case, runtime=None, to_device=_to_gpu, to_host=backend.to_numpy, **kwargs)
    second = check(case, runtime=None, to_device=_to_gpu, to_host=backend.to_numpy, **kwargs)
    for a, b in zip(first, second):
        if a is None:
            assert b is None
        else:
            assert a.tobytes() == b.tobytes(), "two runs gave different bits"


@pytest.mark.parametrize("case", LINEAR_CASES + MULTI_GRID_LINEAR, ids=case_id)
def test_linear_on_gpu(case):
    _run_twice(check_linear, case)


@pytest.mark.parametrize("case", MATMUL_CASES, ids=case_id)
def test_matmul_on_gpu(case):
    _run_twice(lambda c, **kw: [check_matmul(c, **kw)], case)


@pytest.mark.parametrize("case", LOSS_CASES + MULTI_GRID_LOSS, ids=case_id)
def test_softmax_cross_entropy_on_gpu(case):
    _run_twice(check_loss, case)


@pytest.mark.parametrize("shape", RELU_SHAPES + MULTI_GRID_RELU, ids=str)
def test_relu_on_gpu(shape):
    _run_twice(check_relu, shape)


@pytest.mark.parametrize("case", OPTIM_CASES, ids=case_id)
def test_fused_optimizer_on_gpu(case):
    _run_twice(check_fused_optimizer, case)


def test_fused_adam_replays_from_a_cuda_graph():
    """advance_step + adam_update captured once and replayed three times, with lr lowered before the
    last replay, equal three eager steps of gpucnn.optim.Adam (the step count lives on the device)."""
    cp = backend.cupy_module()
    rng = np.random.default_rng(0)
    start = rng.standard_normal(1000).astype(np.float32)
    grads = rng.standard_normal(1000).astype(np.float32)  # the same gradient at every step
    param, grad = cp.asarray(start), cp.asarray(grads)
    exp_avg, exp_avg_sq = cp.zeros_like(param), cp.zeros_like(param)
    step, lr = cp.zeros(1, cp.int32), cp.full(1, 1e-2, cp.float64)

    # Compile and load optim.cu first: loading a module is not allowed while a stream captures.
    cuda_optim.adam_update(cp.zeros(1, cp.float32), cp.zeros(1, cp.float32), cp.zeros(1, cp.float32),
                           cp.zeros(1, cp.float32), cp.ones(1, cp.int32), cp.ones(1, cp.float64))
    cuda_optim.advance_step(cp.zeros(1, cp.int32))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        cuda_optim.advance_step(step)
        cuda_optim.adam_update(param, grad, exp_avg, exp_avg_sq, step, lr)
        graph = stream.end_capture()
        assert int(step.get()[0]) == 0, "capturing must not run the kernels"
        graph.launch(stream)
        graph.launch(stream)
        lr[...] = 5e-3
        graph.launch(stream)
        stream.synchronize()

    p = Parameter(start.copy())
    reference = optim.Adam([p], lr=1e-2)
    for t in range(3):
        if t == 2:
            reference.lr = 5e-3
        p.grad = grads.copy()
        reference.step()
    assert int(step.get()[0]) == 3
    assert_close("param", param.get(), p.data, OPTIM_TOL)


def test_split_k_product_is_bitwise_reproducible_on_many_blocks():
    cp = backend.cupy_module()
    a = cp.random.RandomState(1).standard_normal((120, 8192), dtype=cp.float32)
    b = cp.random.RandomState(2).standard_normal((8192, 84), dtype=cp.float32)
    assert cuda_linear.split_k(120, 84, 8192)[0] > 1
    first, second = cuda_linear.matmul(a, b), cuda_linear.matmul(a, b)
    assert first.get().tobytes() == second.get().tobytes()
    assert_close("c", first.get(), (a.get().astype(np.float64) @ b.get()).astype(np.float32), 1e-5)


def test_gpu_launchers_refuse_host_arrays():
    with pytest.raises(TypeError, match="cupy.ndarray"):
        cuda_linear.linear_forward(np.zeros((2, 3), np.float32), _to_gpu(np.zeros((4, 3), np.float32)), None)
