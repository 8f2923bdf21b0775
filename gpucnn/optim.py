"""Optimizers (SGD, Adam, AdamW) and learning-rate schedulers (StepLR, CosineAnnealingLR,
ReduceLROnPlateau, and LinearWarmup in front of any of them).

The update rules are PyTorch's, written out (g is a parameter's gradient, p its
values, t the step count starting at 1):

    SGD    g += wd*p ; b = g (first step) or b = mu*b + g ; g = g + mu*b (nesterov) or b ; p -= lr*g
    Adam   g += wd*p ; m = b1*m + (1-b1)*g ; v = b2*v + (1-b2)*g^2
           p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
    AdamW  p *= 1 - lr*wd, then Adam's update without the L2 term

On the CPU, updates happen in place on ``Parameter.data``, parameter by
parameter; parameters whose ``grad`` is None are skipped. On a kernel device
(gpu, emulator) SGD, Adam and AdamW run fused instead, whoever calls them: at
the first ``zero_grad``, ``step`` or ``load_state_dict`` with float32 parameters
there, a gpucnn.cuda.optim.FusedOptimizer takes the rule over (``fused``),
packs the parameters into one flat buffer and updates all of them with one
launch of kernels/optim.cu per step; ``zero_grad`` then zeroes the flat
gradient (every ``grad`` a view of it, never None), and ``state_dict`` keeps
this module's format. All parameters form one group sharing ``lr``, which
schedulers change between epochs.
"""
from __future__ import annotations

import math

import numpy as np

from gpucnn import backend
from gpucnn.nn.module import Parameter


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, not {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    return value


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def _at_least(value, name: str, low: float) -> float:
    value = _number(value, name)
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}.")
    return value


class Optimizer:
    """Shared machinery: the parameter list, ``lr``, per-parameter state, checkpoints."""

    # names of the per-parameter state entries; "step" is an int, the others arrays shaped like p
    state_arrays: tuple = ()
    has_step_count = False

    def __init__(self, params, lr):
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list.")
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"{type(self).__name__} parameter {i} is a {type(p).__name__}, not a Parameter.")
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{type(self).__name__} got the same Parameter more than once.")
        if _number(lr, "lr") <= 0:
            raise ValueError(f"lr must be greater than 0, got {lr}.")
        self.params = params
        self.lr = lr
        self.state = [{} for _ in params]
        self.fused = None  # the fused optimizer running this rule, once one does (see the module docstring)

    @property
    def lr(self) -> float:
        """The learning rate; settable (0 is allowed so schedulers can anneal to it)."""
        return self._lr

    @lr.setter
    def lr(self, value) -> None:
        self._lr = _at_least(value, "lr", 0.0)

    def hyperparameters(self) -> dict:
        """The optimizer's settings as plain Python values."""
        raise NotImplementedError

    def _set_hyperparameters(self, **values) -> None:
        raise NotImplementedError

    def _update(self, p: Parameter, state: dict) -> None:
        raise NotImplementedError

    def _runner(self):
        """The fused optimizer that runs this rule: the one already made, or one made now where the
        parameters are float32 arrays on a kernel device and the rule is SGD, Adam or AdamW; else None."""
        if self.fused is None and type(self) in (SGD, Adam, AdamW):
            devices = {backend.device_of(p.data) for p in self.params}
            if len(devices) == 1 and devices <= set(backend.KERNEL_DEVICES) and \
                    all(p.data.dtype == np.float32 for p in self.params):
                from gpucnn.cuda import optim as cuda_optim  # noqa: PLC0415 - it builds on this module

                grads = [p.grad for p in self.params]
                cuda_optim.fused(self)  # sets self.fused; binds every grad to its zeroed view
                for p, grad in zip(self.params, grads):
                    if grad is not None:  # gradients computed before the first step are kept (step copies them in)
                        p.grad = grad
        return self.fused

    def zero_grad(self) -> None:
        """Set every parameter's grad to None (fused: zero the flat gradient; each grad is a view of it)."""
        runner = self._runner()
        if runner is not None:
            runner.zero_grad()
            return
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Apply one update to every parameter that has a gradient (fused: to every parameter, one launch)."""
        runner = self._runner()
        if runner is not None:
            runner.step()
            return
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            if tuple(p.grad.shape) != p.shape:
                raise ValueError(f"a gradient of shape {tuple(p.grad.shape)} does not match its parameter {p.shape}.")
            self._update(p, state)

    def state_dict(self) -> dict:
        """Type, hyperparameters and per-parameter state (NumPy copies of buffers, step counts)."""
        if self.fused is not None:
            return self.fused.state_dict()
        state = []
        for entry in self.state:
            state.append({k: (int(v) if k == "step" else np.array(backend.to_numpy(v), copy=True))
                          for k, v in entry.items()})
        return {"type": type(self).__name__, "hyperparameters": self.hyperparameters(), "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict()``; buffers go to each parameter's current device and dtype.

        Everything is validated before anything changes; mismatches raise ValueError.
        """
        runner = self._runner()
        if runner is not None:
            runner.load_state_dict(state_dict)
        else:
            self.load_rule_state(state_dict)

    def load_rule_state(self, state_dict: dict) -> None:
        """load_state_dict into this object's own ``state`` (per-parameter arrays), even where a fused
        optimizer runs the rule: the fused one validates and reads checkpoints through it."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or set(state_dict) != {"type", "hyperparameters", "state"}:
            raise ValueError(f"{name}.load_state_dict expects a dict with keys 'type', 'hyperparameters', 'state'.")
        if state_dict["type"] != name:
            raise ValueError(f"this state belongs to a {state_dict['type']} optimizer, not a {name}.")
        entries = state_dict["state"]
        if len(entries) != len(self.params):
            raise ValueError(f"the state holds {len(entries)} parameters but this {name} has {len(self.params)}.")
        allowed = set(self.state_arrays) | ({"step"} if self.has_step_count else set())
        new_state = []
        for i, (entry, p) in enumerate(zip(entries, self.params)):
            unknown = set(entry) - allowed
            if unknown:
                raise ValueError(f"state of parameter {i} has unknown entries {sorted(unknown)} for {name}.")
            loaded = {}
            for key, value in entry.items():
                if key == "step":
                    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                        raise ValueError(f"state of parameter {i}: step must be a non-negative int, got {value!r}.")
                    loaded[key] = int(value)
                    continue
                value = np.asarray(backend.to_numpy(value))
                if tuple(value.shape) != p.shape:
                    raise ValueError(f"state of parameter {i}: {key!r} has shape {tuple(value.shape)}, "
                                     f"but the parameter has shape {p.shape}.")
                loaded[key] = backend.to_device(np.array(value, dtype=p.dtype, copy=True), p.device)
            new_state.append(loaded)
        previous = self.hyperparameters()
        try:
            self._set_hyperparameters(**state_dict["hyperparameters"])
        except TypeError as exc:
            self._set_hyperparameters(**previous)
            raise ValueError(f"the hyperparameters do not fit {name}: {exc}") from None
        except ValueError:
            self._set_hyperparameters(**previous)
            raise
        self.state = new_state

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({settings})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay."""

    state_arrays = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, lr)
        self._set_hyperparameters(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)

    def hyperparameters(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}

    def _set_hyperparameters(self, lr, momentum, nesterov, weight_decay) -> None:
        momentum = _at_least(momentum, "momentum", 0.0)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be True or False, not {nesterov!r}.")
        if nesterov and momentum == 0:
            raise ValueError("Nesterov momentum needs momentum > 0.")
        self.weight_decay = _at_least(weight_decay, "weight_decay", 0.0)
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov

    def _update(self, p: Parameter, state: dict) -> None:
        g = p.grad
        if self.weight_decay:
            g = g + self.weight_decay * p.data
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= self.momentum
                buf += g
            g = g + self.momentum * buf if self.nesterov else buf
        p.data -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; ``weight_decay`` adds L2 to the gradient."""

    state_arrays = ("exp_avg", "exp_avg_sq")
    has_step_count = True
    decoupled_weight_decay = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        self._set_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def hyperparameters(self) -> dict:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}

    def _set_hyperparameters(self, lr, betas, eps, weight_decay) -> None:
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"betas must be a pair of numbers, not {betas!r}.") from None
        for i, beta in enumerate((beta1, beta2)):
            beta = _number(beta, f"betas[{i}]")
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}.")
        self.eps = _at_least(eps, "eps", 0.0)
        self.weight_decay = _at_least(weight_decay, "weight_decay", 0.0)
        self.lr, self.betas = lr, (float(beta1), float(beta2))

    def _update(self, p: Parameter, state: dict) -> None:
        xp = backend.get_array_module(p.data)
        beta1, beta2 = self.betas
        g = p.grad
        if self.weight_decay:
            if self.decoupled_weight_decay:
                p.data *= 1.0 - self.lr * self.weight_decay
            else:
                g = g + self.weight_decay * p.data
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= beta1
        m += (1.0 - beta1) * g
        v *= beta2
        v += (1.0 - beta2) * g * g
        bias_correction1 = 1.0 - beta1 ** t
        bias_correction2 = 1.0 - beta2 ** t
        denom = xp.sqrt(v) / math.sqrt(bias_correction2) + self.eps
        p.data -= (self.lr / bias_correction1) * m / denom


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr*wd before each update."""

    decoupled_weight_decay = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class LRScheduler:
    """Sets ``optimizer.lr`` from the epoch count; call ``step()`` once per epoch.

    ``base_lr`` is the optimizer's lr when the scheduler is made; ``last_epoch``
    counts ``step()`` calls.
    """

    def __init__(self, optimizer: Optimizer):
        # A fused optimizer (gpucnn.cuda.optim) is steered through its rule, a gpucnn.optim Optimizer.
        if not isinstance(getattr(optimizer, "rule", optimizer), Optimizer):
            raise TypeError(f"{type(self).__name__} needs an Optimizer, not {type(optimizer).__name__}.")
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_epoch = 0

    def lr_at(self, epoch: int) -> float:
        """The learning rate for ``epoch`` (0 = before the first step)."""
        raise NotImplementedError

    def _settings(self) -> dict:
        raise NotImplementedError

    def step(self) -> None:
        """Advance one epoch and set the optimizer's lr for it."""
        self.last_epoch += 1
        self.optimizer.lr = self.lr_at(self.last_epoch)

    def get_last_lr(self) -> list[float]:
        """The current learning rate, as a one-element list (PyTorch returns one per group)."""
        return [self.optimizer.lr]

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, "base_lr": self.base_lr, "last_epoch": self.last_epoch,
                **self._settings()}

    def load_state_dict(self, state_dict: dict, keep_settings: bool = False) -> None:
        """Restore a ``state_dict()`` and set the optimizer's lr for the restored epoch.

        ``keep_settings`` keeps this scheduler's own settings (T_max, step_size, ...) and takes
        only the epoch count and base lr from the state: a run extended past its planned epochs
        gets a schedule that spans the new total.
        """
        name = type(self).__name__
        expected = {"type", "base_lr", "last_epoch", *self._settings()}
        if not isinstance(state_dict, dict):
            raise ValueError(f"{name}.load_state_dict expects a dict, not {type(state_dict).__name__}.")
        if state_dict.get("type") != name:
            raise ValueError(f"this state belongs to a {state_dict.get('type')}, not a {name}.")
        if set(state_dict) != expected:
            raise ValueError(f"{name}.load_state_dict expects a dict with keys {sorted(expected)}.")
        epoch = state_dict["last_epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"last_epoch must be a non-negative int, got {epoch!r}.")
        base_lr = _number(state_dict["base_lr"], "base_lr")
        if base_lr <= 0:
            raise ValueError(f"base_lr must be greater than 0, got {base_lr}.")
        if not keep_settings:
            self._set_settings(**{k: state_dict[k] for k in self._settings()})
        self.base_lr, self.last_epoch = base_lr, int(epoch)
        self.optimizer.lr = self.lr_at(self.last_epoch)

    def _set_settings(self, **settings) -> None:
        raise NotImplementedError


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1):
        super().__init__(optimizer)
        self._set_settings(step_size=step_size, gamma=gamma)

    def _set_settings(self, step_size, gamma) -> None:
        step_size, gamma = _positive_int(step_size, "step_size"), _number(gamma, "gamma")
        if gamma <= 0:
            raise ValueError(f"gamma must be greater than 0, got {gamma}.")
        self.step_size, self.gamma = step_size, gamma

    def _settings(self) -> dict:
        return {"step_size": self.step_size, "gamma": self.gamma}

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2 (PyTorch's closed form)."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0):
        super().__init__(optimizer)
        self._set_settings(T_max=T_max, eta_min=eta_min)

    def _set_settings(self, T_max, eta_min) -> None:
        self.T_max, self.eta_min = _positive_int(T_max, "T_max"), _at_least(eta_min, "eta_min", 0.0)

    def _settings(self) -> dict:
        return {"T_max": self.T_max, "eta_min": self.eta_min}

    def lr_at(self, epoch: int) -> float:
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2


class ReduceLROnPlateau:
    """Multiplies the lr by ``factor`` once a watched value has not improved for more than ``patience`` epochs.

    Call ``step(value)`` once per epoch with the value (a validation loss with
    ``mode="min"``, an accuracy with ``mode="max"``). As PyTorch's (threshold mode
    "rel"): the value improves on the best one when it is below ``best * (1 -
    threshold)`` ("min") or above ``best * (1 + threshold)`` ("max"); after a cut
    the count of bad epochs starts again; the lr never goes below ``min_lr``.
    """

    needs_value = True   # the Trainer passes the watched metric to step()

    def __init__(self, optimizer: Optimizer, mode: str = "min", factor: float = 0.1, patience: int = 2,
                 threshold: float = 1e-4, min_lr: float = 0.0):
        if not isinstance(getattr(optimizer, "rule", optimizer), Optimizer):
            raise TypeError(f"ReduceLROnPlateau needs an Optimizer, not {type(optimizer).__name__}.")
        self.optimizer = optimizer
        self._set_settings(mode=mode, factor=factor, patience=patience, threshold=threshold, min_lr=min_lr)
        self.best = None          # the best value seen (None before the first step)
        self.bad_epochs = 0       # epochs since the best one, or since the last cut
        self.last_epoch = 0

    def _set_settings(self, mode, factor, patience, threshold, min_lr) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}.")
        factor = _number(factor, "factor")
        if not 0 < factor < 1:
            raise ValueError(f"factor must be between 0 and 1, got {factor}.")
        self.mode, self.factor = mode, factor
        self.patience = _positive_int(patience, "patience")
        self.threshold, self.min_lr = _at_least(threshold, "threshold", 0.0), _at_least(min_lr, "min_lr", 0.0)

    def _settings(self) -> dict:
        return {"mode": self.mode, "factor": self.factor, "patience": self.patience, "threshold": self.threshold,
                "min_lr": self.min_lr}

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best * (1 - self.threshold) if self.best > 0 else value < self.best
        return value > self.best * (1 + self.threshold) if self.best > 0 else value > self.best

    def step(self, value) -> None:
        """End of an epoch whose watched value is ``value``: count it; cut the lr after more than ``patience`` bad."""
        value = _number(value, "the watched value")
        self.last_epoch += 1
        if self._improves(value):
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:   # as PyTorch: more than ``patience`` bad epochs
            self.optimizer.lr = max(self.min_lr, self.optimizer.lr * self.factor)
            self.bad_epochs = 0

    def get_last_lr(self) -> list[float]:
        return [self.optimizer.lr]

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, "lr": self.optimizer.lr, "best": self.best,
                "bad_epochs": self.bad_epochs, "last_epoch": self.last_epoch, **self._settings()}

    def load_state_dict(self, state_dict: dict, keep_settings: bool = False) -> None:
        """Restore a ``state_dict()``: the lr, the best value and the count of bad epochs."""
        expected = {"type", "lr", "best", "bad_epochs", "last_epoch", *self._settings()}
        if not isinstance(state_dict, dict) or state_dict.get("type") != type(self).__name__ \
                or set(state_dict) != expected:
            raise ValueError(f"ReduceLROnPlateau.load_state_dict expects its own state_dict() "
                             f"(keys {sorted(expected)}).")
        if not keep_settings:
            self._set_settings(**{k: state_dict[k] for k in self._settings()})
        self.best = None if state_dict["best"] is None else _number(state_dict["best"], "best")
        self.bad_epochs = int(state_dict["bad_epochs"])
        self.last_epoch = int(state_dict["last_epoch"])
        self.optimizer.lr = _number(state_dict["lr"], "lr")


class LinearWarmup:
    """Raises the lr linearly over ``warmup_epochs`` epochs, then hands over to ``after`` (or keeps it).

    Epoch k of the warm-up (k = 1 .. N) runs at base_lr * k / (N + 1); epoch N + 1
    runs at base_lr, where ``after`` (StepLR, CosineAnnealingLR, ReduceLROnPlateau
    or None, made on the same optimizer) starts its own count. Call ``step()``
    (``step(value)`` when ``after`` needs a value) once per epoch.
    """

    def __init__(self, optimizer: Optimizer, warmup_epochs: int, after=None):
        if not isinstance(getattr(optimizer, "rule", optimizer), Optimizer):
            raise TypeError(f"LinearWarmup needs an Optimizer, not {type(optimizer).__name__}.")
        if after is not None and getattr(after, "optimizer", None) is not optimizer:
            raise ValueError("LinearWarmup's after-schedule must steer the same optimizer.")
        self.optimizer, self.after = optimizer, after
        self.warmup_epochs = _positive_int(warmup_epochs, "warmup_epochs")
        self.base_lr = optimizer.lr
        self.last_epoch = 0
        self.optimizer.lr = self._warm_lr(0)

    @property
    def needs_value(self) -> bool:
        return bool(getattr(self.after, "needs_value", False))

    def _warm_lr(self, epoch: int) -> float:
        return self.base_lr * (epoch + 1) / (self.warmup_epochs + 1)

    def step(self, value=None) -> None:
        """Advance one epoch: the next warm-up lr, base_lr when the warm-up is over, then ``after``'s steps."""
        self.last_epoch += 1
        if self.last_epoch < self.warmup_epochs:
            self.optimizer.lr = self._warm_lr(self.last_epoch)
        elif self.last_epoch == self.warmup_epochs:
            self.optimizer.lr = self.base_lr
        elif self.after is not None:
            self.after.step(value) if self.needs_value else self.after.step()

    def get_last_lr(self) -> list[float]:
        return [self.optimizer.lr]

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, "warmup_epochs": self.warmup_epochs, "base_lr": self.base_lr,
                "last_epoch": self.last_epoch, "lr": self.optimizer.lr,
                "after": None if self.after is None else self.after.state_dict()}

    def load_state_dict(self, state_dict: dict, keep_settings: bool = False) -> None:
        """Restore a ``state_dict()``, the after-schedule's state included (``keep_settings``: see LRScheduler)."""
        expected = {"type", "warmup_epochs", "base_lr", "last_epoch", "lr", "after"}
        if not isinstance(state_dict, dict) or state_dict.get("type") != type(self).__name__ \
                or set(state_dict) != expected:
            raise ValueError(f"LinearWarmup.load_state_dict expects its own state_dict() (keys {sorted(expected)}).")
        if (state_dict["after"] is None) != (self.after is None):
            raise ValueError("this state was saved with a different after-schedule.")
        if not keep_settings:
            self.warmup_epochs = _positive_int(state_dict["warmup_epochs"], "warmup_epochs")
        self.base_lr = _number(state_dict["base_lr"], "base_lr")
        self.last_epoch = int(state_dict["last_epoch"])
        if self.after is not None:   # sets the lr of its own epoch (an LRScheduler recomputes it, a plateau restores it)
            self.after.load_state_dict(state_dict["after"], keep_settings=keep_settings)
        if self.last_epoch < self.warmup_epochs:
            self.optimizer.lr = self._warm_lr(self.last_epoch)
        elif self.last_epoch == self.warmup_epochs or self.after is None:
            self.optimizer.lr = self.base_lr
