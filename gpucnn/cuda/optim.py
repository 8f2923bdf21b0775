"""Fused optimizer updates (``kernels/optim.cu``): every parameter in one flat buffer, one launch per step.

``FlatParameters`` packs a model's parameters into one contiguous float32 buffer and makes each
``Parameter.data`` a view of it; gradients get a second flat buffer whose views become
``Parameter.grad``, so layers' ``accumulate_grad`` (``grad += ...``) writes straight into it.
``FusedOptimizer`` runs a gpucnn.optim SGD, Adam or AdamW instance (its *rule*: hyperparameters,
lr, ``state_dict`` format) over those buffers, updating every parameter with two launches:
``optim_advance_step`` and the update. ``FusedSGD``, ``FusedAdam`` and ``FusedAdamW`` build one
from the rule's arguments (plus ``runtime``); ``fused(optimizer)`` makes the twin of an existing one.
The step count and the learning rate live
in device arrays, so a captured CUDA graph replays steps correctly and schedulers still work.

The buffers never move: pack after ``model.to(device)``, and keep the same optimizer for the run.
A plain SGD/Adam/AdamW on a kernel device gets its FusedOptimizer by itself (gpucnn.optim,
``rule.fused``), so the README's loop and the Trainer share one set of buffers.

Writing gradients straight into the flat buffer (for backward launchers): after ``zero_grad()``
each ``Parameter.grad`` is ``flat.grad_views[i]``, a C-contiguous float32 view of ``flat.grad``
that starts on a 256-byte boundary (ALIGN_ELEMENTS), shaped like the parameter and zero until a
backward adds to it. A launcher may pass ``p.grad`` itself as its output argument
(``kernel_inout_array`` accepts it) and store the parameter's whole gradient there, not add to it,
where the layer is the parameter's only user in the step; ``gather()`` then finds the view in
place and copies nothing, and the update reads it with the rest in its one launch. The gaps
between parameters stay zero in ``data`` and ``grad``, so the update leaves them zero.
"""
from __future__ import annotations

import numpy as np

from gpucnn import backend, optim
from gpucnn.cuda.runtime import (active_runtime, ceil_div, check_int32_count, device_runtime, kernel_array,
                                 kernel_inout_array)
from gpucnn.cuda.tensor import fill
from gpucnn.nn.module import Parameter

KERNEL_FILE = "optim.cu"
THREADS_PER_BLOCK = 256
MAX_BLOCKS = 1024       # the update kernels loop over the rest (grid-stride)
ALIGN_ELEMENTS = 64     # each parameter starts at a multiple of 256 bytes in the flat buffers


def _grid(count: int) -> tuple[int, int, int]:
    return (max(1, min(ceil_div(count, THREADS_PER_BLOCK), MAX_BLOCKS)), 1, 1)


def _flat(rt, array, name, count=None, inout=False):
    """A (count,) float32 buffer; ``inout``: the kernel updates it, so it must not be a copy."""
    array = (kernel_inout_array if inout else kernel_array)(rt, array, name, ndim=1)
    if count is not None and array.shape[0] != count:
        raise ValueError(f"{name} must have shape ({count},) like param, not {tuple(array.shape)}.")
    return array


def _device_scalars(rt, step, lr):
    step = kernel_array(rt, step, "step", dtype=np.int32, ndim=1)
    lr = kernel_array(rt, lr, "lr", dtype=np.float64, ndim=1)
    if step.shape != (1,) or lr.shape != (1,):
        raise ValueError(f"step and lr must each hold one element, not shapes {tuple(step.shape)} and "
                         f"{tuple(lr.shape)}.")
    return step, lr


def advance_step(step, *, runtime=None):
    """step[0] += 1 on the device; step (1,) int32. Launch it before each update."""
    rt = active_runtime(runtime)
    step = kernel_inout_array(rt, step, "step", dtype=np.int32, ndim=1)
    if step.shape != (1,):
        raise ValueError(f"step must hold one element, not shape {tuple(step.shape)}.")
    # writes step[0]: one thread adds one
    rt.function(KERNEL_FILE, "optim_advance_step")((1, 1, 1), (1, 1, 1), (step,))


def adam_update(param, grad, exp_avg, exp_avg_sq, step, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                decoupled=False, *, runtime=None):
    """One Adam (``decoupled``: AdamW) update, in place, of flat float32 buffers of one length.

    param, grad, exp_avg, exp_avg_sq (COUNT,) float32; step (1,) int32, the step count t >= 1 of
    this update (advance_step first); lr (1,) float64. Writes param, exp_avg and exp_avg_sq.
    """
    rt = active_runtime(runtime)
    param = _flat(rt, param, "param", inout=True)
    count = param.shape[0]
    grad = _flat(rt, grad, "grad", count)
    exp_avg = _flat(rt, exp_avg, "exp_avg", count, inout=True)
    exp_avg_sq = _flat(rt, exp_avg_sq, "exp_avg_sq", count, inout=True)
    step, lr = _device_scalars(rt, step, lr)
    check_int32_count("param", count)
    beta1, beta2 = (float(b) for b in betas)
    # writes param, exp_avg, exp_avg_sq: a grid-stride loop, one thread per element at a time
    rt.function(KERNEL_FILE, "adam_update")(
        _grid(count), (THREADS_PER_BLOCK, 1, 1),
        (param, grad, exp_avg, exp_avg_sq, step, lr, np.float64(beta1), np.float64(beta2), np.float64(eps),
         np.float64(weight_decay), np.int32(1 if decoupled else 0), np.int32(count)))


def sgd_update(param, grad, momentum_buffer, step, lr, momentum=0.0, nesterov=False, weight_decay=0.0, *,
               runtime=None):
    """One SGD update, in place, of flat float32 buffers of one length.

    param, grad, momentum_buffer (COUNT,) float32 (the buffer is neither read nor written when
    momentum is 0); step (1,) int32, the step count t >= 1 of this update (t == 1 starts the
    momentum buffer from the gradient); lr (1,) float64. Writes param and momentum_buffer.
    """
    rt = active_runtime(runtime)
    param = _flat(rt, param, "param", inout=True)
    count = param.shape[0]
    grad = _flat(rt, grad, "grad", count)
    momentum_buffer = _flat(rt, momentum_buffer, "momentum_buffer", count, inout=True)
    step, lr = _device_scalars(rt, step, lr)
    check_int32_count("param", count)
    # writes param and momentum_buffer: a grid-stride loop, one thread per element at a time
    rt.function(KERNEL_FILE, "sgd_update")(
        _grid(count), (THREADS_PER_BLOCK, 1, 1),
        (param, grad, momentum_buffer, step, lr, np.float64(momentum), np.int32(1 if nesterov else 0),
         np.float64(weight_decay), np.int32(count)))


class FlatParameters:
    """Parameters packed into one flat float32 buffer ``data``, their gradients into ``grad``.

    Parameter i occupies ``data[offsets[i] : offsets[i] + size_i]`` (offsets aligned to
    ALIGN_ELEMENTS; the gaps stay zero). ``Parameter.data`` becomes a view of ``data`` and, after
    ``zero_grad()``, ``Parameter.grad`` a view of ``grad``.
    """

    def __init__(self, params, runtime=None):
        self.runtime = runtime if runtime is not None else device_runtime("gpu")
        rt = self.runtime
        self.params = list(params)
        if not self.params:
            raise ValueError("FlatParameters got an empty parameter list.")
        offsets, total = [], 0
        for i, p in enumerate(self.params):
            if not isinstance(p, Parameter):
                raise TypeError(f"parameter {i} is a {type(p).__name__}, not a Parameter.")
            kernel_array(rt, p.data, f"parameter {i}'s data")
            offsets.append(total)
            total += ceil_div(p.size, ALIGN_ELEMENTS) * ALIGN_ELEMENTS
        check_int32_count("the flat parameter buffer", total)
        self.offsets = tuple(offsets)
        self.count = total
        self.data = rt.zeros((total,), np.float32)
        self.grad = rt.zeros((total,), np.float32)
        self.data_views = [self.view(self.data, i) for i in range(len(self.params))]
        self.grad_views = [self.view(self.grad, i) for i in range(len(self.params))]
        for p, view in zip(self.params, self.data_views):
            view[...] = p.data
            p.data = view

    def view(self, flat, i: int):
        """Parameter i's part of a flat buffer laid out like ``data``, shaped like the parameter."""
        p = self.params[i]
        return flat[self.offsets[i]:self.offsets[i] + p.size].reshape(p.shape)

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the flat gradient (one launch) and make every ``Parameter.grad`` a view of it.

        set_to_none=True (as PyTorch's): no launch; every ``Parameter.grad`` becomes None and its
        view waits in ``Parameter.grad_buffer``, so the next backward writes the gradients there
        instead of adding them to zeros. A parameter that gets none is zeroed by gather().
        """
        if not set_to_none:
            fill(self.grad, 0.0, runtime=self.runtime)
        for p, view in zip(self.params, self.grad_views):
            p.grad = None if set_to_none else view
            p.grad_buffer = view if set_to_none else None

    def gather(self) -> None:
        """Make sure the flat buffers hold every parameter's values and gradient.

        A ``Parameter.data`` or ``.grad`` replaced by another array (not the view) is copied in; a
        missing gradient raises ValueError, since one launch updates every parameter.
        """
        for i, p in enumerate(self.params):
            if p.data is not self.data_views[i]:
                if tuple(p.data.shape) != tuple(self.data_views[i].shape):
                    raise ValueError(f"parameter {i} changed shape from {tuple(self.data_views[i].shape)} "
                                     f"to {tuple(p.data.shape)}; build a new optimizer.")
                self.data_views[i][...] = kernel_array(self.runtime, p.data, f"parameter {i}'s data")
                p.data = self.data_views[i]
            if p.grad is None and p.grad_buffer is self.grad_views[i]:  # zero_grad(set_to_none=True), no backward
                fill(self.grad_views[i], 0.0, runtime=self.runtime)
                p.grad = self.grad_views[i]
            if p.grad is None:
                raise ValueError(f"parameter {i} {p.shape} has no gradient; a fused optimizer updates every "
                                 "parameter at once, so each needs one (call zero_grad() before backward).")
            if p.grad is not self.grad_views[i]:
                if tuple(p.grad.shape) != p.shape:
                    raise ValueError(f"a gradient of shape {tuple(p.grad.shape)} does not match its parameter "
                                     f"{p.shape}.")
                self.grad_views[i][...] = kernel_array(self.runtime, p.grad, f"parameter {i}'s grad")
                p.grad = self.grad_views[i]


class FusedOptimizer:
    """A gpucnn.optim optimizer (the *rule*) run over flat buffers: two launches per step.

    The rule (an SGD, Adam or AdamW instance) keeps what it always keeps: the hyperparameters
    and their checks, ``lr`` (which schedulers set) and the ``state_dict`` format; this object
    adds the flat buffers, the moments and the step count on the device. ``step()`` uploads the
    rule's lr when it changed, so a scheduler made for the rule steers the fused update, and a
    replayed graph reads the new value from the device.

    ``runtime`` None: the runtime of the parameters' device (gpu or emulator).
    """

    flat_type = FlatParameters  # the packing (gpucnn.cpu.optim packs NumPy buffers)

    def __init__(self, rule, runtime=None):
        if type(rule) not in STATE_BUFFERS:
            raise TypeError(f"a fused optimizer runs gpucnn.optim.SGD, Adam or AdamW, not {type(rule).__name__}.")
        if runtime is None:
            runtime = device_runtime(backend.common_device(*(p.data for p in rule.params)))
        self.rule = rule
        self.flat = self.flat_type(rule.params, runtime)
        rt = self.flat.runtime
        self.buffers = {name: rt.zeros((self.flat.count,), np.float32) for name in STATE_BUFFERS[type(rule)]}
        self._step = rt.zeros((1,), np.int32)
        self._lr_device = rt.zeros((1,), np.float64)
        self._lr_uploaded = None
        self.sync_lr()
        self.flat.zero_grad()
        rule.fused = self  # the rule's own zero_grad/step/state_dict now come here

    @property
    def params(self) -> list:
        return self.rule.params

    @property
    def lr(self) -> float:
        return self.rule.lr

    @lr.setter
    def lr(self, value) -> None:
        self.rule.lr = value
        self.sync_lr()

    @property
    def runtime(self):
        return self.flat.runtime

    @property
    def step_count(self) -> int:
        """Steps taken so far (read from the device)."""
        return int(backend.to_numpy(self._step)[0])

    def hyperparameters(self) -> dict:
        return self.rule.hyperparameters()

    def sync_lr(self) -> None:
        """Copy the rule's lr to the device when it changed (a host-to-device copy, outside any graph).

        ``step()`` does it; a replayed graph runs no Python, so its caller does it before each replay.
        """
        if self._lr_uploaded != self.rule.lr:
            self._lr_device[...] = self.rule.lr
            self._lr_uploaded = self.rule.lr

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the flat gradient buffer (one launch); every ``Parameter.grad`` becomes its view (never None).

        set_to_none=True: no launch; the next backward writes the gradients into the flat buffer
        (FlatParameters.zero_grad).
        """
        self.flat.zero_grad(set_to_none)

    def step(self) -> None:
        """Advance the device step count and update every parameter with one fused launch."""
        self.sync_lr()
        self.flat.gather()
        advance_step(self._step, runtime=self.runtime)
        rule, rt = self.rule, self.runtime
        if isinstance(rule, optim.Adam):
            adam_update(self.flat.data, self.flat.grad, self.buffers["exp_avg"], self.buffers["exp_avg_sq"],
                        self._step, self._lr_device, rule.betas, rule.eps, rule.weight_decay,
                        rule.decoupled_weight_decay, runtime=rt)
        else:
            sgd_update(self.flat.data, self.flat.grad, self.buffers["momentum_buffer"], self._step,
                       self._lr_device, rule.momentum, rule.nesterov, rule.weight_decay, runtime=rt)

    def state_dict(self) -> dict:
        """The rule's format (type "SGD", "Adam" or "AdamW"), read from the device buffers."""
        step = self.step_count
        if step == 0 or (isinstance(self.rule, optim.SGD) and not self.rule.momentum):
            entries = [{} for _ in self.params]  # no state yet, or SGD without momentum (none ever)
        else:
            host = {name: backend.to_numpy(buffer) for name, buffer in self.buffers.items()}
            entries = [{name: np.array(self.flat.view(host[name], i), copy=True) for name in host}
                       for i in range(len(self.params))]
            if self.rule.has_step_count:
                for entry in entries:
                    entry["step"] = step
        return {"type": type(self.rule).__name__, "hyperparameters": self.hyperparameters(), "state": entries}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict()`` of this optimizer or of its rule.

        Everything is validated (by the rule) before anything changes; the parameters must share
        one step count (and SGD's momentum buffers must all have started or none), since the fused
        update keeps one.
        """
        saved_state, saved_hyper = self.rule.state, self.rule.hyperparameters()
        self.rule.load_rule_state(state_dict)  # validates; fills rule.state with per-parameter arrays
        entries = self.rule.state
        try:
            step = self._check_uniform(entries)
        except ValueError:
            self.rule.state = saved_state
            self.rule._set_hyperparameters(**saved_hyper)
            raise
        for name, buffer in self.buffers.items():
            buffer[...] = 0
            for i, entry in enumerate(entries):
                if name in entry:
                    self.flat.view(buffer, i)[...] = entry[name]
        self.rule.state = [{} for _ in self.params]
        self._step[...] = step
        self.sync_lr()

    def _check_uniform(self, entries) -> int:
        """The one step count the entries share (SGD: 1 when its buffers have started, else 0)."""
        name = type(self).__name__
        if self.rule.has_step_count:
            steps = {entry.get("step", 0) for entry in entries}
            if len(steps) != 1:
                raise ValueError(f"the parameters' step counts differ ({sorted(steps)}); {name} keeps one "
                                 "step count for all of them.")
            return steps.pop()
        started = {"momentum_buffer" in entry for entry in entries}
        if len(started) != 1:
            raise ValueError(f"some parameters have a momentum buffer and some do not; {name} keeps one for "
                             "all of them.")
        return 1 if started.pop() else 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.rule!r})"


STATE_BUFFERS = {optim.SGD: ("momentum_buffer",), optim.Adam: ("exp_avg", "exp_avg_sq"),
                 optim.AdamW: ("exp_avg", "exp_avg_sq")}


class FusedAdam(FusedOptimizer):
    """gpucnn.optim.Adam over flat buffers: ``FusedAdam(params, lr, ...)`` with Adam's arguments plus ``runtime``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, runtime=None):
        super().__init__(optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), runtime)


class FusedAdamW(FusedOptimizer):
    """gpucnn.optim.AdamW (decoupled weight decay) over flat buffers; see FusedAdam."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, runtime=None):
        super().__init__(optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), runtime)


class FusedSGD(FusedOptimizer):
    """gpucnn.optim.SGD (momentum, Nesterov, L2) over flat buffers; see FusedAdam."""

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0, *, runtime=None):
        super().__init__(optim.SGD(params, lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay),
                         runtime)


def fused(optimizer, runtime=None) -> FusedOptimizer:
    """The fused twin of a gpucnn.optim optimizer (same rule object, so its schedulers still apply).

    A FusedOptimizer is returned as it is. Any state the rule already holds moves into the flat buffers.
    """
    if isinstance(optimizer, FusedOptimizer):
        return optimizer
    if type(optimizer.fused) is FusedOptimizer:
        return optimizer.fused  # made when the rule first ran on its kernel device, or by an earlier call
    state = optimizer.state_dict() if optimizer.fused is not None or any(optimizer.state) else None
    twin = FusedOptimizer(optimizer, runtime)
    if state is not None:
        twin.load_state_dict(state)
    return twin
