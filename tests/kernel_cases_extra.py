"""Cases and checks for the linear, loss, element-wise and optimizer kernels, shared by the emulated
tests (tests/test_kernels_emulated_extra.py) and the GPU tests (tests/test_gpu_ops_extra.py).

Each check runs one case through gpucnn.cuda on the runtime and device it is given and compares
every output with the NumPy reference (gpucnn.ops, gpucnn.optim), with tolerances relative to the
reference's magnitude. It returns the kernel outputs on the host, so callers can compare two runs
bitwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpucnn import optim
from gpucnn.cuda import activation as cuda_activation
from gpucnn.cuda import linear as cuda_linear
from gpucnn.cuda import loss as cuda_loss
from gpucnn.cuda import optim as cuda_optim
from gpucnn.nn import Parameter
from gpucnn.ops import activation as ops_activation
from gpucnn.ops import linear as ops_linear
from gpucnn.ops import loss as ops_loss
from tests.kernel_cases import assert_close

FORWARD_TOL = 1e-5
GRAD_TOL = 5e-5      # weight and bias gradients sum over the batch
OPTIM_TOL = 1e-6     # per step, relative to max(1, max |parameter|)


@dataclass(frozen=True)
class LinearCase:
    name: str
    n: int
    d_in: int
    d_out: int
    relu: bool = False
    bias: bool = True


@dataclass(frozen=True)
class MatmulCase:
    name: str
    m: int
    k: int
    n: int
    trans_a: bool
    trans_b: bool


@dataclass(frozen=True)
class LossCase:
    name: str
    n: int
    k: int
    scale: float = 3.0   # logits ~ scale * N(0, 1)


@dataclass(frozen=True)
class OptimCase:
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


def case_id(case) -> str:
    return case.name


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
    assert_close("grad_weight", grad_weight, ref_weight, GRAD_TOL)
    if case.bias:
        assert_close("grad_bias", grad_bias, ref_bias, GRAD_TOL)
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
                          seed: int = 0):
    """Several steps of the fused optimizer against its gpucnn.optim counterpart, the same gradients fed
    to both, the learning rate lowered half-way as a scheduler would; returns the final parameters."""
    rng = np.random.default_rng(seed)
    initial = [rng.standard_normal(s).astype(np.float32) for s in PARAM_SHAPES]
    reference_params = [Parameter(a.copy()) for a in initial]
    fused_params = [Parameter(to_device(a.copy())) for a in initial]
    settings = dict(case.settings)
    reference = case.reference(reference_params, **settings)
    fused = case.fused(fused_params, runtime=runtime, **settings)
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
            assert_close(f"step {step + 1} parameter {i}", to_host(q.data), p.data, OPTIM_TOL)
    return [to_host(q.data) for q in fused_params]
