"""Cases and checks shared by the emulated-kernel tests and the GPU tests.

Each check runs one case through gpucnn.cuda (on whatever runtime and device it is given) and
compares every output with the NumPy reference in gpucnn.ops, with tolerances relative to the
reference's magnitude. It returns the kernel outputs on the host, so callers can also compare
two runs bitwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpucnn.cuda import conv as cuda_conv
from gpucnn.cuda import pool as cuda_pool
from gpucnn.ops import conv as ops_conv
from gpucnn.ops import pool as ops_pool
from gpucnn.utils import conv_output_size

# max|kernel - reference| <= tol * max(1, max|reference|)
FORWARD_TOL = 1e-5
GRAD_X_TOL = 1e-5
GRAD_PARAM_TOL = 5e-5  # weight and bias gradients sum over N*OH*OW terms


@dataclass(frozen=True)
class ConvCase:
    name: str
    n: int
    c: int
    h: int
    w: int
    oc: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    relu: bool = False
    bias: bool = True


@dataclass(frozen=True)
class PoolCase:
    name: str
    n: int
    c: int
    h: int
    w: int
    kernel: tuple[int, int]
    stride: tuple[int, int] | None = None
    padding: tuple[int, int] = (0, 0)


CONV_CASES = [
    ConvCase("batch1_3x3", 1, 1, 8, 8, 1, (3, 3)),
    ConvCase("kernel_1x1", 2, 3, 5, 7, 4, (1, 1)),
    ConvCase("kernel_7x7_pad_k-1", 1, 2, 12, 10, 3, (7, 7), padding=(6, 3)),
    ConvCase("nonsquare_stride2", 2, 3, 9, 13, 5, (3, 3), stride=(2, 2), padding=(1, 1)),
    ConvCase("stride3_pad2", 1, 2, 11, 10, 4, (3, 2), stride=(3, 3), padding=(2, 1)),
    ConvCase("mixed_stride_dilation", 1, 2, 11, 13, 3, (3, 2), stride=(2, 3), padding=(2, 1), dilation=(2, 2)),
    ConvCase("dilation2", 2, 2, 10, 9, 3, (3, 3), padding=(2, 2), dilation=(2, 2), relu=True),
    ConvCase("kernel_fills_padded_input", 2, 3, 5, 6, 2, (7, 8), padding=(1, 1)),
    ConvCase("odd_channels_no_bias", 1, 5, 6, 6, 7, (3, 3), padding=(1, 1), bias=False),
    ConvCase("lenet_conv1_relu", 2, 1, 28, 28, 6, (5, 5), padding=(2, 2), relu=True),
    ConvCase("lenet_conv2", 2, 6, 14, 14, 16, (5, 5)),
    ConvCase("exact_tile", 1, 2, 10, 18, 3, (3, 3)),
    ConvCase("two_tiles_partly_empty", 1, 2, 37, 37, 9, (3, 3)),
    # The dilated 3x3 window spans 121x121: its tile cannot fit in shared memory, so the
    # launcher takes the direct kernel.
    ConvCase("direct_fallback", 1, 1, 128, 128, 2, (3, 3), dilation=(60, 60)),
]


def _random_conv_cases(seed: int, count: int) -> list[ConvCase]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        kh, kw = (int(k) for k in rng.integers(1, 6, size=2))
        dh, dw = (int(d) for d in rng.integers(1, 3, size=2))
        ph, pw = int(rng.integers(0, kh)), int(rng.integers(0, kw))
        h = int(rng.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 16))
        w = int(rng.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 16))
        cases.append(ConvCase(
            f"random{seed}_{i}", int(rng.integers(1, 3)), int(rng.integers(1, 5)), h, w,
            int(rng.integers(1, 12)), (kh, kw), stride=tuple(int(s) for s in rng.integers(1, 4, size=2)),
            padding=(ph, pw), dilation=(dh, dw), relu=bool(rng.integers(0, 2)), bias=bool(rng.integers(0, 2))))
    return cases


CONV_CASES += _random_conv_cases(seed=2024, count=4)

POOL_CASES = [
    PoolCase("lenet_2x2", 2, 6, 28, 28, (2, 2)),
    PoolCase("batch1_odd_size", 1, 5, 7, 7, (2, 2)),
    PoolCase("3x3_s2_p1_nonsquare", 1, 3, 7, 9, (3, 3), (2, 2), (1, 1)),
    PoolCase("overlapping_s1_p1", 2, 2, 6, 5, (3, 3), (1, 1), (1, 1)),
    PoolCase("rect_window_mixed_stride", 2, 1, 6, 5, (3, 2), (1, 3), (1, 1)),
    PoolCase("stride3", 1, 2, 10, 11, (3, 3), (3, 3)),
    PoolCase("window_fills_padded_input", 1, 2, 1, 3, (3, 5), (1, 1), (1, 2)),
    PoolCase("kernel_1x1", 1, 2, 4, 3, (1, 1)),
]


def _random_pool_cases(seed: int, count: int) -> list[PoolCase]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        kh, kw = (int(k) for k in rng.integers(1, 5, size=2))
        ph, pw = int(rng.integers(0, kh // 2 + 1)), int(rng.integers(0, kw // 2 + 1))
        h = int(rng.integers(max(1, kh - 2 * ph), 14))
        w = int(rng.integers(max(1, kw - 2 * pw), 14))
        cases.append(PoolCase(f"random{seed}_{i}", int(rng.integers(1, 3)), int(rng.integers(1, 4)), h, w,
                              (kh, kw), tuple(int(s) for s in rng.integers(1, 4, size=2)), (ph, pw)))
    return cases


POOL_CASES += _random_pool_cases(seed=7, count=4)


def case_id(case) -> str:
    return case.name


def assert_close(name: str, actual, reference, tol: float) -> None:
    """max|actual - reference| <= tol * max(1, max|reference|), with NaN where the reference has NaN."""
    actual = np.asarray(actual)
    reference = np.asarray(reference)
    assert actual.shape == reference.shape, f"{name}: shape {actual.shape} != reference {reference.shape}"
    assert actual.dtype == reference.dtype, f"{name}: dtype {actual.dtype} != reference {reference.dtype}"
    nan = np.isnan(reference)
    assert np.array_equal(np.isnan(actual), nan), f"{name}: NaN positions differ from the reference"
    if nan.all():
        return
    error = float(np.abs(actual[~nan].astype(np.float64) - reference[~nan]).max())
    bound = tol * max(1.0, float(np.abs(reference[~nan]).max()))
    assert error <= bound, f"{name}: max abs error {error:.3g} > {bound:.3g}"


def conv_inputs(case: ConvCase, seed: int = 0):
    """x, weight, bias (or None) and grad_y for a case, float32."""
    rng = np.random.default_rng(seed)
    kh, kw = case.kernel
    oh = conv_output_size(case.h, kh, case.stride[0], case.padding[0], case.dilation[0])
    ow = conv_output_size(case.w, kw, case.stride[1], case.padding[1], case.dilation[1])
    x = rng.standard_normal((case.n, case.c, case.h, case.w)).astype(np.float32)
    weight = rng.standard_normal((case.oc, case.c, kh, kw)).astype(np.float32)
    bias = rng.standard_normal(case.oc).astype(np.float32) if case.bias else None
    grad_y = rng.standard_normal((case.n, case.oc, oh, ow)).astype(np.float32)
    return x, weight, bias, grad_y


def check_conv(case: ConvCase, runtime=None, to_device=np.asarray, to_host=np.asarray, seed: int = 0):
    """Forward and backward of one conv case against gpucnn.ops; returns the kernel outputs on the host."""
    x, weight, bias, grad_y = conv_inputs(case, seed)
    geometry = dict(stride=case.stride, padding=case.padding, dilation=case.dilation)
    dev = {k: None if v is None else to_device(v) for k, v in
           dict(x=x, weight=weight, bias=bias, grad_y=grad_y).items()}

    y = to_host(cuda_conv.conv2d_forward(dev["x"], dev["weight"], dev["bias"], relu=case.relu,
                                         runtime=runtime, **geometry))
    assert_close("y", y, ops_conv.conv2d_forward(x, weight, bias, relu=case.relu, **geometry), FORWARD_TOL)

    grads = cuda_conv.conv2d_backward(dev["grad_y"], dev["x"], dev["weight"], with_bias=case.bias,
                                      runtime=runtime, **geometry)
    grad_x, grad_weight, grad_bias = (None if g is None else to_host(g) for g in grads)
    ref_x, ref_weight, ref_bias = ops_conv.conv2d_backward(grad_y, x, weight, with_bias=case.bias, **geometry)
    assert_close("grad_x", grad_x, ref_x, GRAD_X_TOL)
    assert_close("grad_weight", grad_weight, ref_weight, GRAD_PARAM_TOL)
    if case.bias:
        assert_close("grad_bias", grad_bias, ref_bias, GRAD_PARAM_TOL)
    else:
        assert grad_bias is None and ref_bias is None
    return y, grad_x, grad_weight, grad_bias


def pool_output_shape(case: PoolCase):
    stride = case.kernel if case.stride is None else case.stride
    return (case.n, case.c, conv_output_size(case.h, case.kernel[0], stride[0], case.padding[0]),
            conv_output_size(case.w, case.kernel[1], stride[1], case.padding[1]))


def tie_free(shape, rng):
    """Distinct values (a shuffled, scaled range), so every window has one maximum."""
    count = int(np.prod(shape))
    return (rng.permutation(count).astype(np.float32) / count - 0.5).reshape(shape)


def check_max_pool(case: PoolCase, x=None, runtime=None, to_device=np.asarray, to_host=np.asarray, seed: int = 0):
    """Max pool forward (argmax exactly) and backward against gpucnn.ops; tie-free input unless x is given."""
    rng = np.random.default_rng(seed)
    if x is None:
        x = tie_free((case.n, case.c, case.h, case.w), rng)
    grad_y = rng.standard_normal(pool_output_shape(case)).astype(np.float32)
    window = dict(kernel_size=case.kernel, stride=case.stride, padding=case.padding)

    y, argmax = cuda_pool.max_pool2d_forward(to_device(x), runtime=runtime, **window)
    y, argmax = to_host(y), to_host(argmax)
    ref_y, ref_argmax = ops_pool.max_pool2d_forward(x, **window)
    assert argmax.dtype == np.int32
    np.testing.assert_array_equal(argmax, ref_argmax)
    np.testing.assert_array_equal(y, ref_y)  # the maximum is one of the inputs: exact

    grad_x = to_host(cuda_pool.max_pool2d_backward(to_device(grad_y), to_device(ref_argmax), x.shape,
                                                   runtime=runtime, **window))
    ref_grad_x = ops_pool.max_pool2d_backward(grad_y, ref_argmax, x.shape, **window)
    assert_close("grad_x", grad_x, ref_grad_x, GRAD_X_TOL)
    return y, argmax, grad_x


def check_avg_pool(case: PoolCase, runtime=None, to_device=np.asarray, to_host=np.asarray, seed: int = 0):
    """Average pool forward and backward against gpucnn.ops."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((case.n, case.c, case.h, case.w)).astype(np.float32)
    grad_y = rng.standard_normal(pool_output_shape(case)).astype(np.float32)
    window = dict(kernel_size=case.kernel, stride=case.stride, padding=case.padding)

    y = to_host(cuda_pool.avg_pool2d_forward(to_device(x), runtime=runtime, **window))
    assert_close("y", y, ops_pool.avg_pool2d_forward(x, **window), FORWARD_TOL)
    grad_x = to_host(cuda_pool.avg_pool2d_backward(to_device(grad_y), x.shape, runtime=runtime, **window))
    assert_close("grad_x", grad_x, ops_pool.avg_pool2d_backward(grad_y, x.shape, **window), GRAD_X_TOL)
    return y, grad_x


class NoLaunchRuntime:
    """A runtime (see gpucnn.cuda.runtime) on NumPy whose kernels must never be reached: the launcher
    has to refuse invalid inputs before it asks for a kernel."""

    xp = np

    def __init__(self):
        self.launched = []

    def function(self, file, name):
        self.launched.append(name)
        raise AssertionError(f"kernel {name} was launched although the inputs were invalid")

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype)

