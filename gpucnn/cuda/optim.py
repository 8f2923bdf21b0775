"""Fused optimizer updates (``kernels/optim.cu``): every parameter in one flat buffer, one launch per step.

``FlatParameters`` packs a model's parameters into one contiguous float32 buffer and makes each
``Parameter.data`` a view of it; gradients get a second flat buffer whose views become
``Parameter.grad``, so layers' ``accumulate_grad`` (``grad += ...``) writes straight into it.
``FusedSGD``, ``FusedAdam`` and ``FusedAdamW`` follow gpucnn.optim's SGD, Adam and AdamW (same
arguments plus ``runtime``, same update, same ``state_dict`` format) but update every parameter
with two launches: ``optim_advance_step`` and the update. The step count and the learning rate live
in device arrays, so a captured CUDA graph replays steps correctly and schedulers still work.

The buffers never move: pack after ``model.to(device)``, and keep the same optimizer for the run.
"""
from __future__ import annotations

import numpy as np

from gpucnn import backend, optim
from gpucnn.cuda.runtime import ceil_div, check_int32_count, default_runtime, kernel_array, kernel_inout_array
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
    rt = runtime if runtime is not None else default_runtime()
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
    rt = runtime if runtime is not None else default_runtime()
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
    rt = runtime if runtime is not None else default_runtime()
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
        self.runtime = runtime if runtime is not None else default_runtime()
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

    def zero_grad(self) -> None:
        """Zero the flat gradient and make every ``Parameter.grad`` a view of it."""
        self.grad.fill(0)
        for p, view in zip(self.params, self.grad_views):
            p.grad = view

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
            if p.grad is None:
                raise ValueError(f"parameter {i} {p.shape} has no gradient; a fused optimizer updates every "
                                 "parameter at once, so each needs one (call zero_grad() before backward).")
            if p.grad is not self.grad_views[i]:
                if tuple(p.grad.shape) != p.shape:
                    raise ValueError(f"a gradient of shape {tuple(p.grad.shape)} does not match its parameter "
                                     f"{p.shape}.")
                self.grad_views[i][...] = kernel_array(self.runtime, p.grad, f"parameter {i}'s grad")
                p.grad = self.grad_views[i]


class _Fused:
    """What the fused optimizers share: the flat buffers, device step and lr, state_dict conversion."""

    reference_type = ""  # the gpucnn.optim class whose state_dict format this one shares

    def _setup_flat(self, runtime, state_names):
        self.flat = FlatParameters(self.params, runtime)
        rt = self.flat.runtime
        self._state_buffers = {name: rt.zeros((self.flat.count,), np.float32) for name in state_names}
        self._step = rt.zeros((1,), np.int32)
        self._lr_device = rt.zeros((1,), np.float64)
        self._lr_device[...] = self.lr
        self.flat.zero_grad()

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value) -> None:
        optim.Optimizer.lr.fset(self, value)
        if getattr(self, "_lr_device", None) is not None:
            self._lr_device[...] = self._lr

    @property
    def runtime(self):
        return self.flat.runtime

    @property
    def step_count(self) -> int:
        """Steps taken so far (read from the device)."""
        return int(backend.to_numpy(self._step)[0])

    def zero_grad(self) -> None:
        """Zero the flat gradient buffer; every ``Parameter.grad`` becomes its view (never None)."""
        self.flat.zero_grad()

    def step(self) -> None:
        """Advance the device step count and update every parameter with one fused launch."""
        self.flat.gather()
        advance_step(self._step, runtime=self.runtime)
        self._launch_update()

    def _state_entries(self, step: int) -> list[dict]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The format of the matching gpucnn.optim optimizer (type "SGD", "Adam" or "AdamW")."""
        return {"type": self.reference_type, "hyperparameters": self.hyperparameters(),
                "state": self._state_entries(self.step_count)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict()`` of this optimizer or of its gpucnn.optim counterpart.

        Everything is validated (by the counterpart's rules) before anything changes; the
        parameters must share one step count, since the fused update keeps one.
        """
        if isinstance(state_dict, dict) and state_dict.get("type") == self.reference_type:
            state_dict = {**state_dict, "type": type(self).__name__}
        saved_state, saved_hyper = self.state, self.hyperparameters()
        optim.Optimizer.load_state_dict(self, state_dict)  # validates; sets self.state with per-parameter arrays
        try:
            step = self._load_buffers(self.state)
        except ValueError:
            self.state = saved_state
            self._set_hyperparameters(**saved_hyper)
            raise
        self.state = [{} for _ in self.params]
        self._step[...] = step
        self._lr_device[...] = self.lr

    def _load_buffers(self, entries) -> int:
        raise NotImplementedError

    def _copy_into(self, name: str, i: int, value) -> None:
        # Optimizer.load_state_dict has already put value on the parameter's device.
        self.flat.view(self._state_buffers[name], i)[...] = value


class FusedAdam(_Fused, optim.Adam):
    """gpucnn.optim.Adam over flat buffers: one advance-step and one update launch per step.

    Same arguments as Adam plus ``runtime`` (None: the process-wide CupyRuntime; an
    EmulatorRuntime runs the kernels on NumPy parameters).
    """

    reference_type = "Adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, runtime=None):
        optim.Adam.__init__(self, params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._setup_flat(runtime, ("exp_avg", "exp_avg_sq"))

    def _launch_update(self) -> None:
        adam_update(self.flat.data, self.flat.grad, self._state_buffers["exp_avg"],
                    self._state_buffers["exp_avg_sq"], self._step, self._lr_device, self.betas, self.eps,
                    self.weight_decay, self.decoupled_weight_decay, runtime=self.runtime)

    def _state_entries(self, step: int) -> list[dict]:
        if step == 0:
            return [{} for _ in self.params]
        m = backend.to_numpy(self._state_buffers["exp_avg"])
        v = backend.to_numpy(self._state_buffers["exp_avg_sq"])
        return [{"step": step, "exp_avg": np.array(self.flat.view(m, i), copy=True),
                 "exp_avg_sq": np.array(self.flat.view(v, i), copy=True)} for i in range(len(self.params))]

    def _load_buffers(self, entries) -> int:
        steps = {entry.get("step", 0) for entry in entries}
        if len(steps) != 1:
            raise ValueError(f"the parameters' step counts differ ({sorted(steps)}); {type(self).__name__} keeps "
                             "one step count for all of them.")
        for name in ("exp_avg", "exp_avg_sq"):
            self._state_buffers[name].fill(0)
            for i, entry in enumerate(entries):
                if name in entry:
                    self._copy_into(name, i, entry[name])
        return steps.pop()


class FusedAdamW(FusedAdam):
    """gpucnn.optim.AdamW (decoupled weight decay) over flat buffers; see FusedAdam."""

    decoupled_weight_decay = True
    reference_type = "AdamW"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, runtime=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, runtime=runtime)


class FusedSGD(_Fused, optim.SGD):
    """gpucnn.optim.SGD (momentum, Nesterov, L2) over flat buffers: two launches per step.

    Same arguments as SGD plus ``runtime``.
    """

    reference_type = "SGD"

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0, *, runtime=None):
        optim.SGD.__init__(self, params, lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        self._setup_flat(runtime, ("momentum_buffer",))

    def _launch_update(self) -> None:
        sgd_update(self.flat.data, self.flat.grad, self._state_buffers["momentum_buffer"], self._step,
                   self._lr_device, self.momentum, self.nesterov, self.weight_decay, runtime=self.runtime)

    def _state_entries(self, step: int) -> list[dict]:
        if step == 0 or not self.momentum:
            return [{} for _ in self.params]
        buf = backend.to_numpy(self._state_buffers["momentum_buffer"])
        return [{"momentum_buffer": np.array(self.flat.view(buf, i), copy=True)} for i in range(len(self.params))]

    def _load_buffers(self, entries) -> int:
        started = {"momentum_buffer" in entry for entry in entries}
        if len(started) != 1:
            raise ValueError(f"some parameters have a momentum buffer and some do not; {type(self).__name__} "
                             "keeps one for all of them.")
        self._state_buffers["momentum_buffer"].fill(0)
        for i, entry in enumerate(entries):
            if "momentum_buffer" in entry:
                self._copy_into("momentum_buffer", i, entry["momentum_buffer"])
        # SGD keeps no step count; what matters is whether the buffer has started.
        return 1 if started.pop() else 0
