"""Optimizers against hand-computed updates and PyTorch's formulas written out; schedulers; checkpoints."""
import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gpucnn import optim
from gpucnn.nn import Parameter


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
