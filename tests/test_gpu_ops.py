"""The kernels on a real GPU (CuPy) against the NumPy reference: the emulated tests' cases, plus sizes
that need many blocks. Two runs must give bitwise identical results (no float atomics anywhere).
Skipped by tests/conftest.py where CuPy or a GPU is missing.
"""
from __future__ import annotations

import numpy as np
import pytest

from gpucnn import backend
from gpucnn.cuda import conv2d_forward
from tests.kernel_cases import (CONV_CASES, POOL_CASES, ConvCase, PoolCase, case_id, check_avg_pool, check_conv,
                                check_max_pool)

pytestmark = pytest.mark.gpu

MULTI_GRID_CONV = [
    ConvCase("lenet_conv1_batch64", 64, 1, 28, 28, 6, (5, 5), padding=(2, 2), relu=True),
    ConvCase("lenet_conv2_batch64", 64, 6, 14, 14, 16, (5, 5)),
    ConvCase("wide_channels_batch16", 16, 24, 33, 31, 40, (3, 3), stride=(2, 2), padding=(1, 1)),
]
MULTI_GRID_POOL = [
    PoolCase("lenet_pool_batch64", 64, 6, 28, 28, (2, 2)),
    PoolCase("overlapping_batch32", 32, 16, 31, 29, (3, 3), (2, 2), (1, 1)),
]


def _to_gpu(array):
    return backend.to_device(array, "gpu")


def _run_twice(check, case):
    first = check(case, runtime=None, to_device=_to_gpu, to_host=backend.to_numpy)
    second = check(case, runtime=None, to_device=_to_gpu, to_host=backend.to_numpy)
    for a, b in zip(first, second):
        if a is None:
            assert b is None
        else:
            assert a.tobytes() == b.tobytes(), "two runs gave different bits"


@pytest.mark.parametrize("case", CONV_CASES + MULTI_GRID_CONV, ids=case_id)
def test_conv2d_on_gpu(case):
    _run_twice(check_conv, case)


@pytest.mark.parametrize("case", POOL_CASES + MULTI_GRID_POOL, ids=case_id)
def test_max_pool2d_on_gpu(case):
    _run_twice(check_max_pool, case)


@pytest.mark.parametrize("case", POOL_CASES + MULTI_GRID_POOL, ids=case_id)
def test_avg_pool2d_on_gpu(case):
    _run_twice(check_avg_pool, case)


def test_gpu_launchers_refuse_host_arrays():
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(TypeError, match="cupy.ndarray"):
        conv2d_forward(x, _to_gpu(np.zeros((1, 1, 3, 3), np.float32)), None)
