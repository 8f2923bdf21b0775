"""Kernel cases of every op family (conv, pool, linear, loss, activation, optim) and the launcher checks.

The cases are shared by the op modules (tests/test_conv.py, test_pool.py, ...: the public ops over the
backend fixture, against tests/loops.py), the property tests and the VGG-shape tests. Each check_*
runs one case through a launcher of gpucnn.cuda (on whatever runtime and device it is given) and
compares every output with the NumPy reference, with tolerances relative to the reference's
magnitude; it returns the kernel outputs on the host, so callers can also compare two runs bitwise.
The launcher checks serve what the public ops do not reach: a given runtime (mutated kernel copies,
a capped grid), the fused optimizers and matmul's transposes.
"""
from __future__ import annotations

import re
from collections import namedtuple
from dataclasses import dataclass

import numpy as np

from gpucnn import optim
from gpucnn.cuda import activation as cuda_activation
from gpucnn.cuda import conv as cuda_conv
from gpucnn.cuda import linear as cuda_linear
from gpucnn.cuda import loss as cuda_loss
from gpucnn.cuda import optim as cuda_optim
from gpucnn.cuda import runtime as cuda_runtime
from gpucnn.cuda import pool as cuda_pool
from gpucnn.nn import Parameter
from gpucnn.ops import activation as ops_activation
from gpucnn.ops import conv as ops_conv
from gpucnn.ops import linear as ops_linear
from gpucnn.ops import loss as ops_loss
from gpucnn.ops import pool as ops_pool
from gpucnn.emulator import EmulatorBuildError, EmulatorError, EmulatorRuntime
from gpucnn.utils import conv_output_size
from tests.helpers import assert_close, tie_free

# max|kernel - reference| <= tol * max(1, max|reference|)
FORWARD_TOL = 1e-5
GRAD_X_TOL = 1e-5
GRAD_PARAM_TOL = 5e-5  # weight and bias gradients sum over N*OH*OW terms (the batch in linear)
OPTIM_TOL = 1e-6      # per step, relative to max(1, max |parameter|)


@dataclass(frozen=True)
class ConvCase:
    """x (N, C, H, W) convolved with weight (OC, C, KH, KW), bias (OC) or none, ReLU when asked."""

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
    """x (N, C, H, W) pooled over a KH x KW window (stride None: the window)."""

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


# ---------------------------------------------------------------- linear, loss, activation, optim

@dataclass(frozen=True)
class LinearCase:
    """x (N, D_IN) @ weight (D_OUT, D_IN).T + bias, ReLU when asked."""

    name: str
    n: int
    d_in: int
    d_out: int
    relu: bool = False
    bias: bool = True


# op(a) @ op(b), op a transpose when asked: (M, K) @ (K, N)
MatmulCase = namedtuple("MatmulCase", "name m k n trans_a trans_b")


@dataclass(frozen=True)
class LossCase:
    """logits (N, K classes) and labels (N)."""

    name: str
    n: int
    k: int
    scale: float = 3.0   # logits ~ scale * N(0, 1)


@dataclass(frozen=True)
class OptimCase:
    """A fused optimizer and its gpucnn.optim counterpart, with the same settings."""

    name: str
    reference: type
    fused: type
    settings: tuple      # (name, value) pairs for both constructors


LINEAR_CASES = [
    LinearCase("one_by_one", 1, 1, 1),
    LinearCase("odd_no_full_tile", 3, 5, 7),
    LinearCase("odd_two_tiles_relu", 67, 130, 75, relu=True),
    LinearCase("exact_tile", 64, 16, 64),
    LinearCase("lenet_fc1_relu", 8, 400, 120, relu=True),
    LinearCase("lenet_fc3_no_bias", 8, 84, 10, bias=False),
    # k = 1000 splits the forward product; the slices are added by linear_reduce_slices with bias and ReLU.
    LinearCase("long_k_split_relu", 5, 1000, 3, relu=True),
    # a batch of 300 splits the weight-gradient product (k = N).
    LinearCase("tall_batch_split", 300, 9, 5),
]

MATMUL_CASES = [
    MatmulCase(f"{'t' if ta else 'n'}{'t' if tb else 'n'}_{m}x{k}x{n}", m, k, n, ta, tb)
    for (m, k, n) in ((37, 45, 29), (70, 17, 66))
    for ta in (False, True) for tb in (False, True)
]

LOSS_CASES = [
    LossCase("two_classes_one_row", 1, 2),
    LossCase("lenet_batch", 37, 10),
    LossCase("classes_past_one_warp", 9, 33),
    LossCase("hundred_classes", 5, 100),
    LossCase("rows_past_mean_block", 600, 3),
    LossCase("large_logits", 7, 10, scale=1e4),
]

RELU_SHAPES = [(1,), (3, 5, 7), (2, 6, 28, 28), (1000,)]

OPTIM_CASES = [
    OptimCase("adam", optim.Adam, cuda_optim.FusedAdam, (("lr", 1e-2),)),
    OptimCase("adam_l2", optim.Adam, cuda_optim.FusedAdam,
              (("lr", 1e-2), ("betas", (0.8, 0.99)), ("eps", 1e-6), ("weight_decay", 0.1))),
    OptimCase("adamw", optim.AdamW, cuda_optim.FusedAdamW, (("lr", 1e-2), ("weight_decay", 0.05))),
    OptimCase("sgd_plain", optim.SGD, cuda_optim.FusedSGD, (("lr", 0.1),)),
    OptimCase("sgd_momentum", optim.SGD, cuda_optim.FusedSGD, (("lr", 0.05), ("momentum", 0.9))),
    OptimCase("sgd_nesterov_l2", optim.SGD, cuda_optim.FusedSGD,
              (("lr", 0.05), ("momentum", 0.9), ("nesterov", True), ("weight_decay", 0.01))),
]

# Shapes of a small model's parameters: odd sizes, so the flat buffer has gaps between them.
PARAM_SHAPES = [(6, 1, 5, 5), (6,), (16, 6, 5, 5), (16,), (10, 33), (10,), (1,)]


def _matrix(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def check_linear(case: LinearCase, runtime=None, to_device=np.asarray, to_host=np.asarray, seed: int = 0):
    """Forward (bias, ReLU) and backward of one case against gpucnn.ops.linear; host outputs."""
    rng = np.random.default_rng(seed)
    x, weight = _matrix(rng, (case.n, case.d_in)), _matrix(rng, (case.d_out, case.d_in))
    bias = _matrix(rng, (case.d_out,)) if case.bias else None
    grad_y = _matrix(rng, (case.n, case.d_out))
    dev_bias = None if bias is None else to_device(bias)

    y = to_host(cuda_linear.linear_forward(to_device(x), to_device(weight), dev_bias, relu=case.relu,
                                           runtime=runtime))
    reference = ops_linear.linear_forward(x, weight, bias)
    if case.relu:
        reference = np.maximum(reference, 0)
    assert_close("y", y, reference, FORWARD_TOL)

    grads = cuda_linear.linear_backward(to_device(grad_y), to_device(x), to_device(weight), with_bias=case.bias,
                                        runtime=runtime)
    grad_x, grad_weight, grad_bias = (None if g is None else to_host(g) for g in grads)
    ref_x, ref_weight, ref_bias = ops_linear.linear_backward(grad_y, x, weight, with_bias=case.bias)
    assert_close("grad_x", grad_x, ref_x, FORWARD_TOL)
    assert_close("grad_weight", grad_weight, ref_weight, GRAD_PARAM_TOL)
    if case.bias:
        assert_close("grad_bias", grad_bias, ref_bias, GRAD_PARAM_TOL)
    else:
        assert grad_bias is None
    return y, grad_x, grad_weight, grad_bias


def check_matmul(case: MatmulCase, runtime=None, to_device=np.asarray, to_host=np.asarray, seed: int = 0):
    """op(a) @ op(b) + bias, then ReLU, against NumPy in float64."""
    rng = np.random.default_rng(seed)
    a = _matrix(rng, (case.k, case.m) if case.trans_a else (case.m, case.k))
    b = _matrix(rng, (case.n, case.k) if case.trans_b else (case.k, case.n))
    bias = _matrix(rng, (case.n,))
    c = to_host(cuda_linear.matmul(to_device(a), to_device(b), trans_a=case.trans_a, trans_b=case.trans_b,
                                   bias=to_device(bias), relu=True, runtime=runtime))
    op_a = a.T if case.trans_a else a
    op_b = b.T if case.trans_b else b
    reference = np.maximum(op_a.astype(np.float64) @ op_b + bias, 0).astype(np.float32)
    assert_close("c", c, reference, FORWARD_TOL)
    return c


def loss_inputs(case: LossCase, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = (case.scale * rng.standard_normal((case.n, case.k))).astype(np.float32)
    labels = rng.integers(0, case.k, case.n)
    return logits, labels


def check_loss(case: LossCase, runtime=None, to_device=np.asarray, to_host=np.asarray, seed: int = 0):
    """Softmax cross-entropy forward (mean loss, probs) and backward against gpucnn.ops.loss."""
    logits, labels = loss_inputs(case, seed)
    loss, probs = cuda_loss.softmax_cross_entropy(to_device(logits), to_device(labels), runtime=runtime)
    loss, probs = to_host(loss), to_host(probs)
    ref_loss, ref_probs = ops_loss.softmax_cross_entropy(logits, labels)
    assert loss.shape == () and loss.dtype == np.float32
    assert_close("loss", loss, ref_loss, FORWARD_TOL)
    assert_close("probs", probs, ref_probs, FORWARD_TOL)
    grad = to_host(cuda_loss.softmax_cross_entropy_backward(to_device(ref_probs), to_device(labels),
                                                            runtime=runtime))
    assert_close("grad_logits", grad, ops_loss.softmax_cross_entropy_backward(ref_probs, labels), FORWARD_TOL)
    return loss, probs, grad


def check_relu(shape, runtime=None, to_device=np.asarray, to_host=np.asarray, seed: int = 0):
    """ReLU forward and backward against gpucnn.ops.activation (exact: no arithmetic)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[::7] = 0.0   # the kink: the gradient there is 0
    x.reshape(-1)[3::11] = np.nan
    grad_y = rng.standard_normal(shape).astype(np.float32)
    y = to_host(cuda_activation.relu_forward(to_device(x), runtime=runtime))
    ref_y = ops_activation.relu_forward(x)
    np.testing.assert_array_equal(y, ref_y)
    grad_x = to_host(cuda_activation.relu_backward(to_device(grad_y), to_device(ref_y), runtime=runtime))
    np.testing.assert_array_equal(grad_x, ops_activation.relu_backward(grad_y, ref_y))
    return y, grad_x


def check_fused_optimizer(case: OptimCase, runtime=None, to_device=np.asarray, to_host=np.asarray, steps: int = 5,
                          seed: int = 0, make_fused=None, exact: bool = False):
    """Several steps of the fused optimizer against its gpucnn.optim counterpart, the same gradients fed
    to both, the learning rate lowered half-way as a scheduler would; returns the final parameters.

    make_fused(params, **settings): another fused optimizer than ``case.fused`` on ``runtime``;
    exact: the parameters must equal the reference's bit for bit (else within OPTIM_TOL)."""
    rng = np.random.default_rng(seed)
    initial = [rng.standard_normal(s).astype(np.float32) for s in PARAM_SHAPES]
    reference_params = [Parameter(a.copy()) for a in initial]
    fused_params = [Parameter(to_device(a.copy())) for a in initial]
    settings = dict(case.settings)
    reference = case.reference(reference_params, **settings)
    fused = make_fused(fused_params, **settings) if make_fused else case.fused(fused_params, runtime=runtime,
                                                                               **settings)
    for step in range(steps):
        if step == steps // 2:
            reference.lr = fused.lr = settings["lr"] / 3
        reference.zero_grad()
        fused.zero_grad()
        for p, q in zip(reference_params, fused_params):
            g = rng.standard_normal(p.shape).astype(np.float32)
            p.accumulate_grad(g)
            q.accumulate_grad(to_device(g))
        reference.step()
        fused.step()
        for i, (p, q) in enumerate(zip(reference_params, fused_params)):
            if exact:
                np.testing.assert_array_equal(to_host(q.data), p.data, err_msg=f"step {step + 1} parameter {i}")
            else:
                assert_close(f"step {step + 1} parameter {i}", to_host(q.data), p.data, OPTIM_TOL)
    return [to_host(q.data) for q in fused_params]


# ---------------------------------------------------------------- mutation tests: broken copies of a kernel file

EMULATOR_ORDERS = ("forward", "reverse", "random")
KERNELS = cuda_runtime.kernels_dir()


def broken_kernel_copy(tmp_path, file, mutate):
    """A copy of kernels/ in tmp_path with ``file`` changed by ``mutate`` (which must change it)."""
    source = (KERNELS / file).read_text()
    broken = mutate(source)
    assert broken != source, "the mutation did not change the kernel source"
    for other in KERNELS.glob("*.cu"):  # a check may launch kernels of other files too (fill, add_into)
        (tmp_path / other.name).write_text(other.read_text())
    (tmp_path / file).write_text(broken)
    return tmp_path


def remove_barrier(kernel: str, index: int):
    def mutate(source):
        start = source.index(f"void {kernel}(")
        end = source.find('extern "C"', start)
        end = len(source) if end < 0 else end
        spots = [m.start() for m in re.finditer(r"__syncthreads\(\);", source[start:end])]
        cut = start + spots[index]
        return source[:cut] + source[cut + len("__syncthreads();"):]
    return mutate


def caught_under_some_order(kernels_folder, check) -> bool:
    """True when the check fails (or the emulator refuses the kernel) under some thread order."""
    for order in EMULATOR_ORDERS:
        rt = EmulatorRuntime(order=order, seed=2, kernels_dir=kernels_folder)
        try:
            check(rt)
        except EmulatorBuildError:
            raise  # a mutation that does not compile proves nothing
        except (EmulatorError, AssertionError):
            return True
    return False


def kernel_define(file: str, name: str) -> int:
    """The value of ``#define NAME <int>`` in kernels/<file>."""
    return int(re.search(rf"#define {name} (\d+)", (KERNELS / file).read_text()).group(1))


def copy_kernels(tmp_path):
    """An unchanged copy of kernels/ in tmp_path."""
    for other in KERNELS.glob("*.cu"):
        (tmp_path / other.name).write_text(other.read_text())
    return tmp_path
