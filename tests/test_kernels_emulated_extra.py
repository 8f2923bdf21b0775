"""The linear, loss, element-wise and optimizer kernels on the CPU emulator, through the real launchers,
against the NumPy reference (gpucnn.ops, gpucnn.optim).

Every case runs under the forward, reverse and random thread orders; odd sizes fill no tile. Mutation
tests check that the comparisons catch deliberately broken kernels.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from gpucnn import optim
from gpucnn.cuda import activation as cuda_activation
from gpucnn.cuda import linear as cuda_linear
from gpucnn.cuda import loss as cuda_loss
from gpucnn.cuda import optim as cuda_optim
from gpucnn.cuda import runtime as cuda_runtime
from gpucnn.models import LeNet5
from gpucnn.nn import Parameter
from gpucnn.ops import loss as ops_loss
from gpucnn.testing.emulator import EmulatorBuildError, EmulatorError, EmulatorRuntime
from tests.kernel_cases import NoLaunchRuntime, assert_close
from tests.kernel_cases_extra import (LINEAR_CASES, LOSS_CASES, MATMUL_CASES, OPTIM_CASES, OPTIM_TOL, RELU_SHAPES,
                                      LinearCase, LossCase, case_id, check_fused_optimizer, check_linear, check_loss,
                                      check_matmul, check_relu, loss_inputs)

ORDERS = ("forward", "reverse", "random")
KERNELS = cuda_runtime.kernels_dir()

pytestmark = pytest.mark.emulator


@pytest.fixture(scope="module", params=ORDERS)
def emulator(request):
    return EmulatorRuntime(order=request.param, seed=5)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=case_id)
def test_linear_matches_reference(case, emulator):
    check_linear(case, runtime=emulator)


@pytest.mark.parametrize("case", MATMUL_CASES, ids=case_id)
def test_matmul_transposes_bias_relu(case, emulator):
    check_matmul(case, runtime=emulator)


@pytest.mark.parametrize("case", LOSS_CASES, ids=case_id)
def test_softmax_cross_entropy_matches_reference(case, emulator):
    check_loss(case, runtime=emulator)


@pytest.mark.parametrize("shape", RELU_SHAPES, ids=str)
def test_relu_matches_reference(shape, emulator):
    check_relu(shape, runtime=emulator)


@pytest.mark.parametrize("case", OPTIM_CASES, ids=case_id)
def test_fused_optimizer_matches_reference(case, emulator):
    check_fused_optimizer(case, runtime=emulator)


def test_split_k_covers_k_exactly():
    for m, n, k in [(1, 1, 1), (5, 3, 1000), (10, 84, 4096), (4096, 120, 400), (64, 64, 16), (3, 7, 17)]:
        slices, k_slice = cuda_linear.split_k(m, n, k)
        assert 1 <= slices <= cuda_linear.MAX_SLICES
        assert k_slice % cuda_linear.TILE_K == 0
        assert (slices - 1) * k_slice < k <= slices * k_slice, (m, n, k, slices, k_slice)
    assert cuda_linear.split_k(5, 3, 1000)[0] > 1 and cuda_linear.split_k(4096, 4096, 64)[0] == 1


def test_column_sums_fixed_order_and_odd_columns(emulator):
    g = np.random.default_rng(1).standard_normal((77, 45)).astype(np.float32)
    sums = cuda_linear.column_sums(g, runtime=emulator)
    assert_close("column sums", sums, g.astype(np.float64).sum(axis=0).astype(np.float32), 1e-5)


def test_grid_stride_loops_cover_every_element(emulator, monkeypatch):
    # One block (256 threads) must walk thousands of elements.
    monkeypatch.setattr(cuda_activation, "MAX_BLOCKS", 1)
    monkeypatch.setattr(cuda_optim, "MAX_BLOCKS", 1)
    check_relu((3, 1000), runtime=emulator)
    check_fused_optimizer(OPTIM_CASES[0], runtime=emulator, steps=2)


def test_fused_adam_trains_lenet_like_adam(emulator):
    """LeNet-5 from one seed, one batch, four steps: FusedAdam's weights follow Adam's."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 4)
    models = [LeNet5(seed=0), LeNet5(seed=0)]
    optimizers = [optim.Adam(models[0].parameters(), lr=1e-3),
                  cuda_optim.FusedAdam(list(models[1].parameters()), lr=1e-3, runtime=emulator)]
    for _ in range(4):
        for model, opt in zip(models, optimizers):
            opt.zero_grad()
            _, probs = ops_loss.softmax_cross_entropy(model(x), labels)
            model.backward(ops_loss.softmax_cross_entropy_backward(probs, labels))
            opt.step()
        for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            assert_close(name, q.data, p.data, OPTIM_TOL)
    assert optimizers[1].step_count == 4



class _Recorder:
    """Runs kernels through ``inner`` and keeps each launch, the way a captured CUDA graph keeps them."""

    def __init__(self, inner):
        self.inner, self.xp, self.launches = inner, inner.xp, []

    def function(self, file, name):
        kernel = self.inner.function(file, name)

        def launch(grid, block, args, shared_mem=0):
            self.launches.append((kernel, grid, block, args, shared_mem))
            kernel(grid, block, args, shared_mem=shared_mem)
        return launch

    def empty(self, shape, dtype):
        return self.inner.empty(shape, dtype)

    def zeros(self, shape, dtype):
        return self.inner.zeros(shape, dtype)


@pytest.mark.parametrize("case", [OPTIM_CASES[2], OPTIM_CASES[4]], ids=case_id)
def test_replayed_launches_follow_the_device_step_and_lr(case, emulator):
    """One step's launches, replayed unchanged (as a CUDA graph replays them), take the step count and
    the learning rate from the device: four replays, lr lowered before the last two, equal four eager
    steps of the reference with the same gradient."""
    rng = np.random.default_rng(9)
    start = rng.standard_normal(300).astype(np.float32)
    grad = rng.standard_normal(300).astype(np.float32)
    recorder = _Recorder(emulator)
    fused_param, reference_param = Parameter(start.copy()), Parameter(start.copy())
    settings = dict(case.settings)
    fused = case.fused([fused_param], runtime=recorder, **settings)
    reference = case.reference([reference_param], **settings)
    fused.zero_grad()  # launches a fill of the gradient buffer: not part of the replayed update
    fused_param.grad[...] = grad
    recorder.launches.clear()
    fused.step()
    launches = list(recorder.launches)
    assert [launch[0].name for launch in launches][0] == "optim_advance_step"
    for replay in range(3):
        if replay == 1:
            fused._lr_device[...] = settings["lr"] / 4  # what FusedAdam.lr = ... writes, and all a replay sees
        for kernel, grid, block, args, shared_mem in launches:
            kernel(grid, block, args, shared_mem=shared_mem)
    for t in range(4):
        if t == 2:
            reference.lr = settings["lr"] / 4
        reference_param.grad = grad.copy()
        reference.step()
    assert fused.step_count == 4
    assert_close("parameter", fused_param.data, reference_param.data, OPTIM_TOL)


def test_fused_state_dict_matches_the_reference_format(emulator):
    rng = np.random.default_rng(4)
    shapes = [(3, 4), (5,)]
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(4)]
    ref_params = [Parameter(a.copy()) for a in start]
    fused_params = [Parameter(a.copy()) for a in start]
    reference = optim.Adam(ref_params, lr=1e-2)
    fused = cuda_optim.FusedAdam(fused_params, lr=1e-2, runtime=emulator)
    assert fused.state_dict()["state"] == [{}, {}]

    def step(opt, params, gs):
        opt.zero_grad()
        for p, g in zip(params, gs):
            p.accumulate_grad(g)
        opt.step()
    for gs in grads[:2]:
        step(reference, ref_params, gs)
        step(fused, fused_params, gs)
    saved = fused.state_dict()
    assert saved["type"] == "Adam" and saved["hyperparameters"] == reference.hyperparameters()
    for mine, theirs in zip(saved["state"], reference.state_dict()["state"]):
        assert mine["step"] == theirs["step"] == 2
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(key, mine[key], theirs[key], 1e-6)

    # A reference checkpoint loads into a fresh fused optimizer, which then continues identically.
    resumed_params = [Parameter(p.data.copy()) for p in ref_params]
    resumed = cuda_optim.FusedAdam(resumed_params, lr=0.5, runtime=emulator)
    resumed.load_state_dict(reference.state_dict())
    assert resumed.lr == 1e-2 and resumed.step_count == 2
    for gs in grads[2:]:
        step(reference, ref_params, gs)
        step(resumed, resumed_params, gs)
    for p, q in zip(ref_params, resumed_params):
        assert_close("resumed", q.data, p.data, OPTIM_TOL)

    # And the fused checkpoint loads into the reference optimizer.
    back = optim.Adam([Parameter(p.data.copy()) for p in resumed_params], lr=1.0)
    back.load_state_dict(resumed.state_dict())
    assert back.state[0]["step"] == 4


def test_fused_load_refuses_mixed_step_counts(emulator):
    params = [Parameter(np.zeros(3, np.float32)), Parameter(np.zeros(2, np.float32))]
    fused = cuda_optim.FusedAdam(params, runtime=emulator)
    state = {"type": "Adam", "hyperparameters": fused.hyperparameters(),
             "state": [{"step": 1, "exp_avg": np.zeros(3), "exp_avg_sq": np.zeros(3)}, {}]}
    with pytest.raises(ValueError, match="step counts differ"):
        fused.load_state_dict(state)
    assert fused.step_count == 0 and fused.lr == 1e-3


def test_flat_parameters_views_and_gather(emulator):
    params = [Parameter(np.arange(6, dtype=np.float32).reshape(2, 3)), Parameter(np.ones(70, np.float32))]
    fused = cuda_optim.FusedSGD(params, lr=0.5, runtime=emulator)
    flat = fused.flat
    assert flat.offsets == (0, 64) and flat.count == 192
    np.testing.assert_array_equal(flat.data[:6], np.arange(6))
    assert not flat.data[6:64].any()
    assert np.shares_memory(params[0].data, flat.data) and np.shares_memory(params[1].grad, flat.grad)

    # A gradient that replaced the view is copied in; a parameter array that replaced its view too.
    params[0].grad = np.full((2, 3), 2.0, np.float32)
    params[1].data = np.zeros(70, np.float32)
    fused.step()
    np.testing.assert_array_equal(params[0].data, np.arange(6).reshape(2, 3) - 1.0)
    np.testing.assert_array_equal(params[1].data, np.zeros(70))
    assert np.shares_memory(params[1].data, flat.data)
    assert not flat.data[6:64].any() and not flat.data[134:].any()  # the gaps stay zero

    params[1].grad = None
    with pytest.raises(ValueError, match="no gradient"):
        fused.step()


def test_results_are_bitwise_identical_across_thread_orders():
    rng = np.random.default_rng(8)
    x, weight = rng.standard_normal((300, 37)).astype(np.float32), rng.standard_normal((11, 37)).astype(np.float32)
    grad_y = rng.standard_normal((300, 11)).astype(np.float32)
    logits, labels = loss_inputs(LossCase("orders", 300, 11))
    results = []
    for order in ORDERS:
        rt = EmulatorRuntime(order=order, seed=13)
        outputs = [cuda_linear.linear_forward(x, weight, None, runtime=rt),
                   *cuda_linear.linear_backward(grad_y, x, weight, runtime=rt),
                   *cuda_loss.softmax_cross_entropy(logits, labels, runtime=rt)]
        results.append(outputs)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


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


def test_nan_logit_makes_its_row_nan(emulator):
    logits, labels = loss_inputs(LossCase("nan", 4, 40))
    logits[2, 35] = np.nan
    loss, probs = cuda_loss.softmax_cross_entropy(logits, labels, runtime=emulator)
    ref_loss, ref_probs = ops_loss.softmax_cross_entropy(logits, labels)
    assert np.isnan(loss) and np.isnan(ref_loss)
    assert_close("probs", probs, ref_probs, 1e-5)


# ---- mutation tests: a broken copy of a kernel file must be caught -------------------------------

def _broken_copy(tmp_path, file, mutate):
    source = (KERNELS / file).read_text()
    broken = mutate(source)
    assert broken != source, "the mutation did not change the kernel source"
    for other in KERNELS.glob("*.cu"):  # a check may launch kernels of other files too (fill, add_into)
        (tmp_path / other.name).write_text(other.read_text())
    (tmp_path / file).write_text(broken)
    return tmp_path


def _remove_barrier(kernel: str, index: int):
    def mutate(source):
        start = source.index(f"void {kernel}(")
        end = source.find('extern "C"', start)
        end = len(source) if end < 0 else end
        spots = [m.start() for m in re.finditer(r"__syncthreads\(\);", source[start:end])]
        cut = start + spots[index]
        return source[:cut] + source[cut + len("__syncthreads();"):]
    return mutate


def _caught(kernels_folder, check) -> bool:
    """True when the check fails (or the emulator refuses the kernel) under some thread order."""
    for order in ORDERS:
        rt = EmulatorRuntime(order=order, seed=2, kernels_dir=kernels_folder)
        try:
            check(rt)
        except EmulatorBuildError:
            raise  # a mutation that does not compile proves nothing
        except (EmulatorError, AssertionError):
            return True
    return False


# k = 50 takes four TILE_K steps, so the barrier before the next load matters too.
MUTATION_LINEAR = LinearCase("mutation", 40, 50, 70)


@pytest.mark.parametrize("kernel, index, file, check", [
    ("linear_matmul_tiled", 0, "linear.cu", lambda rt: check_linear(MUTATION_LINEAR, runtime=rt)),
    ("linear_matmul_tiled", 1, "linear.cu", lambda rt: check_linear(MUTATION_LINEAR, runtime=rt)),
    ("linear_column_sums", 0, "linear.cu", lambda rt: check_linear(MUTATION_LINEAR, runtime=rt)),
    ("softmax_xent_mean", 0, "loss.cu", lambda rt: check_loss(LossCase("mutation", 600, 3), runtime=rt)),
    ("softmax_xent_mean", 1, "loss.cu", lambda rt: check_loss(LossCase("mutation", 600, 3), runtime=rt)),
], ids=["matmul_before_compute", "matmul_before_next_load", "column_sums", "mean_before_tree", "mean_in_tree"])
def test_mutation_missing_barrier_is_caught(tmp_path, kernel, index, file, check):
    assert _caught(_broken_copy(tmp_path, file, _remove_barrier(kernel, index)), check)


def test_mutation_partial_shuffle_mask_is_caught(tmp_path):
    def half_mask(source):
        return source.replace("__shfl_xor_sync(FULL_WARP, sum, offset)", "__shfl_xor_sync(0x0000ffffu, sum, offset)")
    assert _caught(_broken_copy(tmp_path, "loss.cu", half_mask),
                   lambda rt: check_loss(LossCase("mutation", 9, 33), runtime=rt))


def test_mutation_wrong_adam_coefficient_is_caught(tmp_path):
    def wrong_beta(source):
        return source.replace("const float b2 = (float)beta2;", "const float b2 = (float)beta1;")
    assert _caught(_broken_copy(tmp_path, "optim.cu", wrong_beta),
                   lambda rt: check_fused_optimizer(OPTIM_CASES[0], runtime=rt, steps=3))


@pytest.mark.parametrize("file", ["linear.cu", "loss.cu", "optim.cu"])
def test_unmutated_copies_are_not_flagged(tmp_path, file):
    for other in KERNELS.glob("*.cu"):
        (tmp_path / other.name).write_text(other.read_text())
    checks = {"linear.cu": lambda rt: check_linear(MUTATION_LINEAR, runtime=rt),
              "loss.cu": lambda rt: (check_loss(LossCase("m", 600, 3), runtime=rt),
                                     check_loss(LossCase("m", 9, 33), runtime=rt)),
              "optim.cu": lambda rt: check_fused_optimizer(OPTIM_CASES[0], runtime=rt, steps=3)}
    assert not _caught(tmp_path, checks[file])


# ---- launcher checks that need no kernel run -----------------------------------------------------

def _f32(*shape):
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("call, error, words", [
    (lambda rt: cuda_linear.linear_forward(_f32(2, 3).astype(np.float64), _f32(4, 3), None, runtime=rt),
     TypeError, "float32"),
    (lambda rt: cuda_linear.linear_forward(_f32(2, 3, 1), _f32(4, 3), None, runtime=rt), ValueError, "2 dim"),
    (lambda rt: cuda_linear.linear_forward(_f32(2, 3), _f32(4, 5), None, runtime=rt), ValueError, "input features"),
    (lambda rt: cuda_linear.linear_forward(_f32(2, 3), _f32(4, 3), _f32(5), runtime=rt), ValueError, "bias"),
    (lambda rt: cuda_linear.linear_forward(_f32(0, 3), _f32(4, 3), None, runtime=rt), ValueError, "zero-length"),
    (lambda rt: cuda_linear.linear_forward([[1.0]], _f32(4, 1), None, runtime=rt), TypeError, "ndarray"),
    (lambda rt: cuda_linear.linear_backward(_f32(2, 5), _f32(2, 3), _f32(4, 3), runtime=rt), ValueError, "grad_y"),
    (lambda rt: cuda_linear.matmul(_f32(2, 3), _f32(2, 3), runtime=rt), ValueError, "must match"),
    (lambda rt: cuda_linear.matmul(_f32(2, 3), _f32(3, 4), bias=_f32(3), runtime=rt), ValueError, "bias"),
    (lambda rt: cuda_linear.column_sums(_f32(3), runtime=rt), ValueError, "2 dim"),
    (lambda rt: cuda_loss.softmax_cross_entropy(_f32(3, 4), np.array([0, 1]), runtime=rt), ValueError, r"\(3,\)"),
    (lambda rt: cuda_loss.softmax_cross_entropy(_f32(3, 4), np.zeros(3, np.float32), runtime=rt), TypeError,
     "integer"),
    (lambda rt: cuda_loss.softmax_cross_entropy(_f32(3, 4), np.array([0, 1, 9]), runtime=rt), ValueError, "range"),
    (lambda rt: cuda_loss.softmax_cross_entropy(_f32(3, 4), [0, 1, 2], runtime=rt), TypeError, "ndarray"),
    (lambda rt: cuda_loss.softmax_cross_entropy_backward(_f32(3), np.array([0, 1, 2]), runtime=rt), ValueError,
     "2 dim"),
    (lambda rt: cuda_activation.relu_backward(_f32(3, 4), _f32(4, 3), runtime=rt), ValueError, "must match"),
    (lambda rt: cuda_activation.relu_forward(np.zeros(3, np.int32), runtime=rt), TypeError, "float32"),
    (lambda rt: cuda_optim.adam_update(_f32(4), _f32(3), _f32(4), _f32(4), np.zeros(1, np.int32),
                                       np.zeros(1), runtime=rt), ValueError, "grad"),
    (lambda rt: cuda_optim.adam_update(_f32(4), _f32(4), _f32(4), _f32(4), np.zeros(1, np.int64),
                                       np.zeros(1), runtime=rt), TypeError, "int32"),
    (lambda rt: cuda_optim.sgd_update(_f32(4), _f32(4), _f32(4), np.zeros(2, np.int32), np.zeros(1),
                                      runtime=rt), ValueError, "one element"),
    (lambda rt: cuda_optim.sgd_update(_f32(4), _f32(4), _f32(4), np.zeros(1, np.int32), _f32(1),
                                      runtime=rt), TypeError, "float64"),
    (lambda rt: cuda_optim.advance_step(np.zeros((1, 1), np.int32), runtime=rt), ValueError, "1 dim"),
    # arguments updated in place: a contiguous copy would be updated and the caller's array left as it was
    (lambda rt: cuda_optim.adam_update(_f32(8)[::2], _f32(4), _f32(4), _f32(4), np.zeros(1, np.int32),
                                       np.zeros(1), runtime=rt), ValueError, "param is updated in place"),
    (lambda rt: cuda_optim.adam_update(_f32(4), _f32(4), _f32(4), _f32(8)[1::2], np.zeros(1, np.int32),
                                       np.zeros(1), runtime=rt), ValueError, "exp_avg_sq is updated in place"),
    (lambda rt: cuda_optim.sgd_update(_f32(4), _f32(4), _f32(4, 2)[:, 0], np.zeros(1, np.int32), np.zeros(1),
                                      runtime=rt), ValueError, "momentum_buffer is updated in place"),
])
def test_launchers_refuse_bad_inputs_before_launch(call, error, words):
    with pytest.raises(error, match=words):
        call(NoLaunchRuntime())


def test_fused_optimizers_validate_like_the_reference():
    rt = NoLaunchRuntime()
    with pytest.raises(ValueError, match="empty parameter list"):
        cuda_optim.FusedAdam([], runtime=rt)
    with pytest.raises(ValueError, match="betas"):
        cuda_optim.FusedAdam([Parameter(_f32(2))], betas=(1.0, 0.9), runtime=rt)
    with pytest.raises(TypeError, match="float32"):
        cuda_optim.FusedSGD([Parameter(np.zeros(2))], lr=0.1, runtime=rt)
    with pytest.raises(ValueError, match="Nesterov"):
        cuda_optim.FusedSGD([Parameter(_f32(2))], lr=0.1, nesterov=True, runtime=rt)


def test_python_constants_match_the_kernel_defines():
    def define(file, name):
        return int(re.search(rf"#define {name} (\d+)", (KERNELS / file).read_text()).group(1))
    assert (define("linear.cu", "TILE_M"), define("linear.cu", "TILE_N"), define("linear.cu", "TILE_K")) == \
        (cuda_linear.TILE_M, cuda_linear.TILE_N, cuda_linear.TILE_K)
    assert cuda_linear.TILE_BLOCK[0] * 4 == cuda_linear.TILE_N and cuda_linear.TILE_BLOCK[1] * 4 == cuda_linear.TILE_M
    assert define("linear.cu", "COLSUM_ROWS") == cuda_linear.COLSUM_ROWS
    assert define("loss.cu", "XENT_ROWS") == cuda_loss.XENT_ROWS
    assert define("loss.cu", "MEAN_THREADS") == cuda_loss.MEAN_THREADS

