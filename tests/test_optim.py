"""Optimizers against hand-computed updates and PyTorch's formulas written out; schedulers; checkpoints."""
import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gpucnn import optim
from gpucnn import backend as gpucnn_backend
from gpucnn.cpu import optim as cpu_optim
from gpucnn.cuda import optim as cuda_optim
from gpucnn.models import LeNet5
from gpucnn.nn import Parameter
from gpucnn.ops import loss as ops_loss
from gpucnn.testing.recording import RecordingRuntime
from gpucnn.testing.recording import replay as replay_launches
from tests.helpers import NoLaunchRuntime, assert_close, assert_refused_before_launch, f32
from tests.kernel_cases import (
    OPTIM_CASES,
    OPTIM_TOL,
    broken_kernel_copy,
    caught_under_some_order,
    case_id,
    check_fused_optimizer,
    copy_kernels,
)
from tests.test_conv import run_twice_on_gpu


def scalar_param(value=1.0, dtype=np.float64):
    return Parameter(np.array([value], dtype=dtype))


def run(optimizer, param, grads):
    """Feed the given gradients one step each; return the parameter value after every step."""
    values = []
    for g in grads:
        param.grad = np.array([g], dtype=param.dtype)
        optimizer.step()
        values.append(float(param.data[0]))
    return values


# ---------------------------------------------------------------- SGD by hand
def test_sgd_plain_by_hand():
    p = scalar_param(1.0)
    # p -= 0.1 * g
    assert_allclose(run(optim.SGD([p], lr=0.1), p, [1.0, 2.0, -1.0]), [0.9, 0.7, 0.8])


def test_sgd_momentum_by_hand():
    p = scalar_param(1.0)
    # b1 = g = 1           -> p = 1 - 0.1*1     = 0.9
    # b2 = 0.9*1 + 1 = 1.9  -> p = 0.9 - 0.19   = 0.71
    # b3 = 0.9*1.9 + 1 = 2.71 -> p = 0.71 - 0.271 = 0.439
    assert_allclose(run(optim.SGD([p], lr=0.1, momentum=0.9), p, [1.0, 1.0, 1.0]), [0.9, 0.71, 0.439])


def test_sgd_nesterov_by_hand():
    p = scalar_param(1.0)
    # b1 = 1,   step g + 0.9*b1 = 1.9  -> p = 1 - 0.19    = 0.81
    # b2 = 1.9, step g + 0.9*b2 = 2.71 -> p = 0.81 - 0.271 = 0.539
    assert_allclose(run(optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True), p, [1.0, 1.0]), [0.81, 0.539])


def test_sgd_weight_decay_by_hand():
    p = scalar_param(2.0)
    # g' = g + 0.5*p = 1 + 1 = 2 -> p = 2 - 0.1*2 = 1.8 ; g' = 1 + 0.9 = 1.9 -> p = 1.8 - 0.19 = 1.61
    assert_allclose(run(optim.SGD([p], lr=0.1, weight_decay=0.5), p, [1.0, 1.0]), [1.8, 1.61])


def pytorch_sgd(p, grads, lr, momentum, nesterov, weight_decay):
    """torch.optim.SGD's rule written out for a sequence of gradients."""
    p, buf = p.copy(), None
    for g in grads:
        g = g + weight_decay * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    return p


@pytest.mark.parametrize("momentum, nesterov, weight_decay", [
    (0.0, False, 0.0), (0.9, False, 0.0), (0.8, True, 0.0), (0.9, True, 1e-2), (0.5, False, 0.1)])
def test_sgd_matches_pytorch_formula(momentum, nesterov, weight_decay):
    rng = np.random.default_rng(0)
    start = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) for _ in range(5)]
    p = Parameter(start.copy())
    sgd = optim.SGD([p], lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    for g in grads:
        p.grad = g.copy()
        sgd.step()
    assert_allclose(p.data, pytorch_sgd(start, grads, 0.05, momentum, nesterov, weight_decay), rtol=1e-12)


# ---------------------------------------------------------------- Adam / AdamW
def test_adam_first_step_moves_by_lr_times_sign():
    # t=1: m = 0.1 g, v = 0.001 g^2; m/(1-0.9) = g, sqrt(v)/sqrt(1-0.999) = |g| -> step lr*g/(|g|+eps)
    p = Parameter(np.array([1.0, -2.0, 0.5]))
    adam = optim.Adam([p], lr=0.01)
    p.grad = np.array([3.0, -0.5, 1e-3])
    adam.step()
    g = np.array([3.0, -0.5, 1e-3])
    assert_allclose(p.data, [1.0, -2.0, 0.5] - 0.01 * g / (np.abs(g) + 1e-8), rtol=1e-12)
    assert_allclose(p.data, [0.99, -1.99, 0.49], rtol=1e-5)


def pytorch_adam(p, grads, lr, betas, eps, weight_decay, decoupled):
    """torch.optim.Adam / AdamW written out for a sequence of gradients."""
    p = p.copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("cls, weight_decay", [(optim.Adam, 0.0), (optim.Adam, 0.1), (optim.AdamW, 0.0),
                                               (optim.AdamW, 0.1)])
def test_adam_and_adamw_match_pytorch_formula(cls, weight_decay):
    rng = np.random.default_rng(1)
    start = rng.standard_normal(10)
    grads = [rng.standard_normal(10) for _ in range(6)]
    p = Parameter(start.copy())
    opt = cls([p], lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    for g in grads:
        p.grad = g.copy()
        opt.step()
    expected = pytorch_adam(start, grads, 0.02, (0.8, 0.99), 1e-6, weight_decay, cls is optim.AdamW)
    assert_allclose(p.data, expected, rtol=1e-10)


def test_adamw_decay_is_decoupled_from_the_gradient():
    # with a zero gradient AdamW only shrinks p by (1 - lr*wd) per step; Adam's L2 term instead
    # becomes the gradient and moves p by about lr per step
    pw, pa = scalar_param(2.0), scalar_param(2.0)
    adamw = optim.AdamW([pw], lr=0.1, weight_decay=0.5)
    adam = optim.Adam([pa], lr=0.1, weight_decay=0.5)
    assert_allclose(run(adamw, pw, [0.0, 0.0]), [2.0 * 0.95, 2.0 * 0.95 ** 2], rtol=1e-12)
    assert_allclose(run(adam, pa, [0.0]), [2.0 - 0.1], rtol=1e-6)
    assert optim.AdamW([scalar_param()]).weight_decay == 1e-2


def test_updates_are_in_place_and_keep_float32():
    p = Parameter(np.ones((2, 2), np.float32))
    data = p.data
    for opt in (optim.SGD([p], lr=0.1, momentum=0.9), optim.Adam([p]), optim.AdamW([p])):
        p.grad = np.full((2, 2), 0.5, np.float32)
        opt.step()
        assert p.data is data and p.data.dtype == np.float32
    assert all(v.dtype == np.float32 for k, v in opt.state[0].items() if k != "step")


def test_parameters_without_grad_are_skipped_and_zero_grad_clears():
    a, b = scalar_param(1.0), scalar_param(1.0)
    sgd = optim.SGD([a, b], lr=0.1)
    a.grad = np.array([1.0])
    sgd.step()
    assert a.data[0] == pytest.approx(0.9) and b.data[0] == 1.0
    sgd.zero_grad()
    assert a.grad is None and b.grad is None


def test_lr_is_settable():
    p = scalar_param(1.0)
    sgd = optim.SGD([p], lr=0.1)
    sgd.lr = 0.5
    assert run(sgd, p, [1.0]) == [0.5]
    with pytest.raises(ValueError, match="lr"):
        sgd.lr = -1.0


@pytest.mark.parametrize("make, error", [
    (lambda p: optim.SGD(p, lr=0.0), ValueError),
    (lambda p: optim.SGD(p, lr=-0.1), ValueError),
    (lambda p: optim.SGD(p, lr="fast"), TypeError),
    (lambda p: optim.SGD(p, lr=0.1, momentum=-0.5), ValueError),
    (lambda p: optim.SGD(p, lr=0.1, nesterov=True), ValueError),
    (lambda p: optim.SGD(p, lr=0.1, weight_decay=-1), ValueError),
    (lambda p: optim.Adam(p, betas=(1.0, 0.999)), ValueError),
    (lambda p: optim.Adam(p, betas=(0.9, -0.1)), ValueError),
    (lambda p: optim.Adam(p, betas=0.9), TypeError),
    (lambda p: optim.Adam(p, eps=-1e-8), ValueError),
    (lambda p: optim.AdamW(p, lr=float("nan")), ValueError),
    (lambda p: optim.SGD([], lr=0.1), ValueError),
    (lambda p: optim.SGD([np.zeros(3)], lr=0.1), TypeError),
    (lambda p: optim.SGD(p + p, lr=0.1), ValueError),
])
def test_hyperparameters_are_validated(make, error):
    with pytest.raises(error):
        make([scalar_param()])


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("make", [
    lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda ps: optim.Adam(ps, lr=0.01, weight_decay=1e-3),
    lambda ps: optim.AdamW(ps, lr=0.01, betas=(0.8, 0.9)),
])
def test_state_dict_round_trip_gives_identical_next_steps(make):
    rng = np.random.default_rng(2)
    params = [Parameter(rng.standard_normal((3, 2)).astype(np.float32)),
              Parameter(rng.standard_normal(4).astype(np.float32))]
    opt = make(params)
    for _ in range(3):
        for p in params:
            p.grad = rng.standard_normal(p.shape).astype(np.float32)
        opt.step()
    saved = opt.state_dict()
    clones = [Parameter(p.data.copy()) for p in params]
    restored = make(clones)
    restored.lr = 123.0  # overwritten by the load
    restored.load_state_dict(saved)
    assert restored.hyperparameters() == opt.hyperparameters()
    for _ in range(2):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
        for p, c, g in zip(params, clones, grads):
            p.grad, c.grad = g.copy(), g.copy()
        opt.step()
        restored.step()
    for p, c in zip(params, clones):
        assert_array_equal(p.data, c.data)
    # the saved buffers are copies, untouched by later steps
    assert all(isinstance(v, (int, np.ndarray)) for entry in saved["state"] for v in entry.values())


def test_load_state_dict_is_validated_before_anything_changes():
    p = Parameter(np.zeros(3, np.float32))
    adam = optim.Adam([p], lr=0.01)
    p.grad = np.ones(3, np.float32)
    adam.step()
    good = adam.state_dict()
    with pytest.raises(ValueError, match="belongs to a SGD"):
        adam.load_state_dict(optim.SGD([p], lr=0.1).state_dict())
    with pytest.raises(ValueError, match="holds 2 parameters"):
        adam.load_state_dict({**good, "state": good["state"] * 2})
    bad_shape = {**good, "state": [{**good["state"][0], "exp_avg": np.zeros(4, np.float32)}]}
    with pytest.raises(ValueError, match=r"'exp_avg' has shape \(4,\)"):
        adam.load_state_dict(bad_shape)
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        adam.load_state_dict({**good, "hyperparameters": {**good["hyperparameters"], "betas": (1.5, 0.9)}})
    with pytest.raises(ValueError, match="do not fit"):
        adam.load_state_dict({**good, "hyperparameters": {"lr": 0.1}})
    assert adam.hyperparameters() == good["hyperparameters"]
    with pytest.raises(ValueError, match="keys"):
        adam.load_state_dict({"state": []})


# ---------------------------------------------------------------- schedulers
def test_step_lr_values():
    sgd = optim.SGD([scalar_param()], lr=1.0)
    sched = optim.StepLR(sgd, step_size=2, gamma=0.5)
    seen = [sched.get_last_lr()[0]]
    for _ in range(6):
        sched.step()
        seen.append(sched.get_last_lr()[0])
    assert_allclose(seen, [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125])
    assert sgd.lr == pytest.approx(0.125)


def test_cosine_annealing_values():
    sgd = optim.SGD([scalar_param()], lr=0.1)
    sched = optim.CosineAnnealingLR(sgd, T_max=4, eta_min=0.01)
    seen = [sgd.lr]
    for _ in range(4):
        sched.step()
        seen.append(sgd.lr)
    # eta_min + (0.1 - eta_min) * (1 + cos(pi*t/4)) / 2 at t = 0..4
    expected = [0.1, 0.01 + 0.09 * (1 + math.sqrt(0.5)) / 2, 0.055, 0.01 + 0.09 * (1 - math.sqrt(0.5)) / 2, 0.01]
    assert_allclose(seen, expected, rtol=1e-12)


def test_scheduler_state_dict_round_trip_and_validation():
    sgd = optim.SGD([scalar_param()], lr=0.1)
    sched = optim.CosineAnnealingLR(sgd, T_max=10)
    for _ in range(3):
        sched.step()
    saved = sched.state_dict()
    other_opt = optim.SGD([scalar_param()], lr=0.1)
    other = optim.CosineAnnealingLR(other_opt, T_max=10)
    other.load_state_dict(saved)
    assert other.last_epoch == 3 and other_opt.lr == sgd.lr
    sched.step()
    other.step()
    assert other.get_last_lr() == sched.get_last_lr()
    with pytest.raises(ValueError, match="belongs to a StepLR"):
        other.load_state_dict(optim.StepLR(sgd, step_size=3).state_dict())
    with pytest.raises(ValueError, match="T_max"):
        other.load_state_dict({**saved, "T_max": 0})
    with pytest.raises(ValueError, match="step_size"):
        optim.StepLR(sgd, step_size=0)
    with pytest.raises(ValueError, match="gamma"):
        optim.StepLR(sgd, step_size=1, gamma=0)
    with pytest.raises(TypeError, match="needs an Optimizer"):
        optim.StepLR("sgd", step_size=1)


# ------------------------------------------------------------------ the host fused optimizer (gpucnn.cpu.optim), against these

@pytest.mark.parametrize("case", OPTIM_CASES, ids=case_id)
def test_host_fused_optimizer_equals_its_rule_bit_for_bit(case):
    """The same gradients into the rule and into its fused twin over flat NumPy buffers, lr lowered
    half-way: the same parameters after every step, bit for bit (the same float32 arithmetic)."""
    made = []

    def make_fused(params, **settings):
        made.append(cpu_optim.fused(case.reference(params, **settings)))
        return made[-1]
    final = check_fused_optimizer(case, steps=6, make_fused=make_fused, exact=True)
    fused = made[0]
    assert fused.step_count == 6
    # Its checkpoint is the rule's format: it loads into a plain rule, which then steps identically.
    back_params = [Parameter(a.copy()) for a in final]
    back = case.reference(back_params, **dict(case.settings))
    back.load_state_dict(fused.state_dict())
    for opt, params in ((back, back_params), (fused, fused.params)):
        opt.zero_grad()
        for p in params:
            p.accumulate_grad(np.ones(p.shape, np.float32))
        opt.step()
    for p, q in zip(back_params, fused.params):
        assert_array_equal(p.data, q.data)


def test_host_fused_optimizer_takes_only_float32_numpy_parameters():
    assert cpu_optim.fusable(optim.Adam([Parameter(np.zeros(3, np.float32))]))
    assert not cpu_optim.fusable(optim.Adam([Parameter(np.zeros(3, np.float64))]))
    assert not cpu_optim.fusable(optim.Adam([Parameter(gpucnn_backend.to_device(np.zeros(3, np.float32),
                                                                                 "emulator"))]))
    with pytest.raises(ValueError, match="on the emulator"):
        cpu_optim.HostFusedOptimizer(optim.Adam([Parameter(gpucnn_backend.to_device(np.zeros(3, np.float32),
                                                                                      "emulator"))]))
    with pytest.raises(TypeError, match="float32"):
        cpu_optim.HostFusedOptimizer(optim.Adam([Parameter(np.zeros(3, np.float64))]))


# ------------------------------------------------------------------ the fused optimizers (gpucnn.cuda.optim) under the emulator, against these

@pytest.mark.emulator
@pytest.mark.parametrize("case", OPTIM_CASES, ids=case_id)
def test_fused_optimizer_matches_reference(case, emulator):
    check_fused_optimizer(case, runtime=emulator)


@pytest.mark.emulator
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


@pytest.mark.emulator
@pytest.mark.parametrize("case", [OPTIM_CASES[2], OPTIM_CASES[4]], ids=case_id)
def test_replayed_launches_follow_the_device_step_and_lr(case, emulator):
    """One step's launches, replayed unchanged (as a CUDA graph replays them), take the step count and
    the learning rate from the device: four replays, lr lowered before the last two, equal four eager
    steps of the reference with the same gradient."""
    rng = np.random.default_rng(9)
    start = rng.standard_normal(300).astype(np.float32)
    grad = rng.standard_normal(300).astype(np.float32)
    recorder = RecordingRuntime(emulator)
    fused_param, reference_param = Parameter(start.copy()), Parameter(start.copy())
    settings = dict(case.settings)
    fused = case.fused([fused_param], runtime=recorder, **settings)
    reference = case.reference([reference_param], **settings)
    fused.zero_grad()  # launches a fill of the gradient buffer: not part of the replayed update
    fused_param.grad[...] = grad
    recorder.take()
    fused.step()
    launches = recorder.take()
    assert [launch.name for launch in launches][0] == "optim_advance_step"
    for replay in range(3):
        if replay == 1:
            fused._lr_device[...] = settings["lr"] / 4  # what FusedAdam.lr = ... writes, and all a replay sees
        replay_launches(launches)
    for t in range(4):
        if t == 2:
            reference.lr = settings["lr"] / 4
        reference_param.grad = grad.copy()
        reference.step()
    assert fused.step_count == 4
    assert_close("parameter", fused_param.data, reference_param.data, OPTIM_TOL)


@pytest.mark.emulator
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


@pytest.mark.emulator
def test_fused_load_refuses_mixed_step_counts(emulator):
    params = [Parameter(np.zeros(3, np.float32)), Parameter(np.zeros(2, np.float32))]
    fused = cuda_optim.FusedAdam(params, runtime=emulator)
    state = {"type": "Adam", "hyperparameters": fused.hyperparameters(),
             "state": [{"step": 1, "exp_avg": np.zeros(3), "exp_avg_sq": np.zeros(3)}, {}]}
    with pytest.raises(ValueError, match="step counts differ"):
        fused.load_state_dict(state)
    assert fused.step_count == 0 and fused.lr == 1e-3


@pytest.mark.emulator
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


@pytest.mark.emulator
def test_mutation_wrong_adam_coefficient_is_caught(tmp_path):
    def wrong_beta(source):
        return source.replace("const float b2 = (float)beta2;", "const float b2 = (float)beta1;")
    assert caught_under_some_order(broken_kernel_copy(tmp_path, "optim.cu", wrong_beta),
                   lambda rt: check_fused_optimizer(OPTIM_CASES[0], runtime=rt, steps=3))



@pytest.mark.emulator
def test_unmutated_copy_is_not_flagged(tmp_path):
    assert not caught_under_some_order(copy_kernels(tmp_path),
                                       lambda rt: check_fused_optimizer(OPTIM_CASES[0], runtime=rt, steps=3))


def test_fused_optimizers_validate_like_the_reference():
    rt = NoLaunchRuntime()
    with pytest.raises(ValueError, match="empty parameter list"):
        cuda_optim.FusedAdam([], runtime=rt)
    with pytest.raises(ValueError, match="betas"):
        cuda_optim.FusedAdam([Parameter(f32(2))], betas=(1.0, 0.9), runtime=rt)
    with pytest.raises(TypeError, match="float32"):
        cuda_optim.FusedSGD([Parameter(np.zeros(2))], lr=0.1, runtime=rt)
    with pytest.raises(ValueError, match="Nesterov"):
        cuda_optim.FusedSGD([Parameter(f32(2))], lr=0.1, nesterov=True, runtime=rt)


# ------------------------------------------------------------------ the fused optimizers on a real GPU

@pytest.mark.gpu
@pytest.mark.parametrize("case", OPTIM_CASES, ids=case_id)
def test_fused_optimizer_on_gpu(case):
    run_twice_on_gpu(check_fused_optimizer, case)


@pytest.mark.gpu
def test_fused_adam_replays_from_a_cuda_graph():
    """advance_step + adam_update captured once and replayed three times, with lr lowered before the
    last replay, equal three eager steps of gpucnn.optim.Adam (the step count lives on the device)."""
    cp = gpucnn_backend.cupy_module()
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
    # The inputs were written on the legacy stream, which a non-blocking stream does not wait for.
    stream.wait_event(cp.cuda.Stream.null.record())
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



# ------------------------------------------------------------------ launcher refusals: before any kernel runs

@pytest.mark.parametrize("call, error, message", [
    (lambda rt: cuda_optim.adam_update(f32(4), f32(3), f32(4), f32(4), np.zeros(1, np.int32),
                                       np.zeros(1), runtime=rt), ValueError, "grad"),
    (lambda rt: cuda_optim.adam_update(f32(4), f32(4), f32(4), f32(4), np.zeros(1, np.int64),
                                       np.zeros(1), runtime=rt), TypeError, "int32"),
    (lambda rt: cuda_optim.sgd_update(f32(4), f32(4), f32(4), np.zeros(2, np.int32), np.zeros(1),
                                      runtime=rt), ValueError, "one element"),
    (lambda rt: cuda_optim.sgd_update(f32(4), f32(4), f32(4), np.zeros(1, np.int32), f32(1),
                                      runtime=rt), TypeError, "float64"),
    (lambda rt: cuda_optim.advance_step(np.zeros((1, 1), np.int32), runtime=rt), ValueError, "1 dim"),
    # arguments updated in place: a contiguous copy would be updated and the caller's array left as it was
    (lambda rt: cuda_optim.adam_update(f32(8)[::2], f32(4), f32(4), f32(4), np.zeros(1, np.int32),
                                       np.zeros(1), runtime=rt), ValueError, "param is updated in place"),
    (lambda rt: cuda_optim.adam_update(f32(4), f32(4), f32(4), f32(8)[1::2], np.zeros(1, np.int32),
                                       np.zeros(1), runtime=rt), ValueError, "exp_avg_sq is updated in place"),
    (lambda rt: cuda_optim.sgd_update(f32(4), f32(4), f32(4, 2)[:, 0], np.zeros(1, np.int32), np.zeros(1),
                                      runtime=rt), ValueError, "momentum_buffer is updated in place"),])
def test_launchers_refuse_bad_inputs_before_any_kernel_is_launched(call, error, message):
    assert_refused_before_launch(call, error, message)


# ------------------------------------------------------------------ the README's library loop on a kernel device

@pytest.mark.emulator
def test_the_readme_loop_runs_one_fused_update_on_the_emulator():
    """optim.Adam(model.parameters()) with zero_grad/step, as in the README, on the emulator: only
    gpucnn's kernels run (no NumPy op on device arrays), one adam_update a step, and the weights and
    the state_dict equal those of the per-parameter rule on the CPU."""
    from gpucnn import ops  # noqa: PLC0415
    from gpucnn.cuda import runtime as cuda_runtime  # noqa: PLC0415
    from gpucnn.models import LeNet5  # noqa: PLC0415

    class Recording:
        device = "emulator"

        def __init__(self, base):
            self.base, self.xp, self.names = base, base.xp, []

        def function(self, file, name):
            kernel = self.base.function(file, name)
            return lambda *args, **kwargs: (self.names.append(name), kernel(*args, **kwargs))[1]

        def empty(self, shape, dtype):
            return self.base.empty(shape, dtype)

        def zeros(self, shape, dtype):
            return self.base.zeros(shape, dtype)

    def refuse(kind, what):
        if kind == "numpy":
            raise AssertionError(f"a NumPy op on device arrays in the optimizer: {what}")

    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((4, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 4)) for _ in range(2)]
    results = {}
    for device in ("cpu", "emulator"):
        model = LeNet5(seed=0).to(device)
        opt = optim.Adam(model.parameters(), lr=1e-3)
        recording = Recording(cuda_runtime.device_runtime("emulator"))
        for xb, yb in batches:
            xb, yb = gpucnn_backend.to_device(xb, device), gpucnn_backend.to_device(yb, device)
            with cuda_runtime.wrapping(recording):
                opt.zero_grad()
                loss, probs = ops.softmax_cross_entropy(model(xb), yb)
                model.backward(ops.softmax_cross_entropy_backward(probs, yb))
                recording.names.clear()
                with gpucnn_backend.emulator_guard(refuse):
                    opt.step()
            if device == "emulator":
                assert recording.names == ["optim_advance_step", "adam_update"]
        results[device] = (model.state_dict(), opt.state_dict())
    assert results["emulator"][1]["state"][0]["step"] == 2 and isinstance(optim.Adam, type)
    for name, value in results["cpu"][0].items():
        np.testing.assert_allclose(results["emulator"][0][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    for cpu_entry, emulator_entry in zip(results["cpu"][1]["state"], results["emulator"][1]["state"]):
        assert cpu_entry["step"] == emulator_entry["step"]
        np.testing.assert_allclose(emulator_entry["exp_avg"], cpu_entry["exp_avg"], rtol=1e-4, atol=1e-7)
