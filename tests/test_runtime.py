"""gpucnn.cuda.runtime without a GPU: CupyRuntime's handle cache on a CuPy stand-in, in-place arguments."""
from __future__ import annotations

import types

import numpy as np
import pytest

from gpucnn.cuda import optim as cuda_optim
from gpucnn.cuda.runtime import COMPILE_OPTIONS, CupyRuntime, kernel_array, kernel_inout_array
from gpucnn.emulator import EmulatorRuntime


class FakeCupy:
    """Just what CupyRuntime touches of CuPy: RawModule(code, options).get_function and Device().id."""

    ndarray = np.ndarray
    __name__ = "fakecupy"

    def __init__(self):
        self.device_id = 0
        self.modules = []          # (source, options) per RawModule built
        self.get_function_calls = []
        fake = self

        class RawModule:
            def __init__(self, code, options):
                fake.modules.append((code, options))

            def get_function(self, name):
                fake.get_function_calls.append(name)
                return object()   # a new handle each time, as CuPy's RawKernel

        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=self.device_id))


def test_cupy_runtime_caches_function_handles_per_file_name_and_device():
    cupy = FakeCupy()
    rt = CupyRuntime(xp=cupy)
    first = rt.function("elementwise.cu", "relu_forward")
    for _ in range(5):
        assert rt.function("elementwise.cu", "relu_forward") is first
    backward = rt.function("elementwise.cu", "relu_backward")
    assert backward is not first
    assert cupy.get_function_calls == ["relu_forward", "relu_backward"]
    assert len(cupy.modules) == 1 and cupy.modules[0][1] == COMPILE_OPTIONS
    assert 'extern "C" __global__ void relu_forward' in cupy.modules[0][0]

    cupy.device_id = 1      # another GPU: its own module and handles
    on_device_1 = rt.function("elementwise.cu", "relu_forward")
    assert on_device_1 is not first and rt.function("elementwise.cu", "relu_forward") is on_device_1
    assert len(cupy.modules) == 2 and cupy.get_function_calls == ["relu_forward", "relu_backward", "relu_forward"]
    cupy.device_id = 0
    assert rt.function("elementwise.cu", "relu_forward") is first


def test_kernel_inout_array_returns_the_array_itself_and_refuses_a_strided_one():
    rt = EmulatorRuntime()
    param = np.zeros(6, np.float32)
    assert kernel_inout_array(rt, param, "param", ndim=1) is param
    with pytest.raises(ValueError, match=r"param is updated in place, so it must be C-contiguous"):
        kernel_inout_array(rt, param[::2], "param", ndim=1)
    with pytest.raises(ValueError, match="m is updated in place"):
        kernel_inout_array(rt, np.zeros((3, 2), np.float32).T, "m")
    with pytest.raises(TypeError, match="float32"):     # the kernel_array checks come first
        kernel_inout_array(rt, np.zeros(6), "param")
    # read-only arguments are still copied to a contiguous array
    assert kernel_array(rt, param[::2], "grad").flags.c_contiguous


def test_a_strided_gradient_is_read_and_the_contiguous_state_updated_in_place():
    rt = EmulatorRuntime()
    param = np.ones(4, np.float32)
    grad_storage = np.array([1, 9, -2, 9, 3, 9, -4, 9], np.float32)
    exp_avg, exp_avg_sq = np.zeros(4, np.float32), np.zeros(4, np.float32)
    step, lr = np.zeros(1, np.int32), np.full(1, 0.1)
    cuda_optim.advance_step(step, runtime=rt)
    cuda_optim.adam_update(param, grad_storage[::2], exp_avg, exp_avg_sq, step, lr, runtime=rt)
    assert step[0] == 1
    np.testing.assert_allclose(exp_avg, 0.1 * np.array([1, -2, 3, -4]), rtol=1e-6)
    # the first Adam step moves every parameter by lr against the sign of its gradient
    np.testing.assert_allclose(param, 1 - 0.1 * np.sign([1, -2, 3, -4]), rtol=1e-5)
