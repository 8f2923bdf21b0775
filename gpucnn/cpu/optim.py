"""Fused optimizer updates on NumPy arrays: every parameter in one flat buffer, one update per step.

The CPU twin of gpucnn.cuda.optim: ``FusedOptimizer`` there packs the parameters and their
gradients into flat buffers and keeps the rule's hyperparameters, lr and checkpoint format;
``HostFusedOptimizer`` here does the same with NumPy buffers and runs the rule's own update once,
on one Parameter made of the flat buffers, with the flat moments as its state: element by element
the same arithmetic, so the results equal the rule's per-parameter step bit for bit. A LeNet-5 Adam
step then costs a dozen NumPy calls instead of a dozen per parameter (0.17 -> 0.11 ms a step).
"""
from __future__ import annotations

import numpy as np

from gpucnn import backend, optim
from gpucnn.cuda import optim as cuda_optim
from gpucnn.nn.module import Parameter


class HostRuntime:
    """What FlatParameters and FusedOptimizer ask of a runtime, for NumPy buffers: the array module."""

    device = "cpu"
    xp = np
    zeros = staticmethod(np.zeros)
    empty = staticmethod(np.empty)


HOST = HostRuntime()


class HostFlatParameters(cuda_optim.FlatParameters):
    """FlatParameters in NumPy buffers: the gradient is zeroed by NumPy, not by a launch."""

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the flat gradient; set_to_none is accepted and ignored (zeroing costs no launch here)."""
        self.grad.fill(0)
        for p, view in zip(self.params, self.grad_views):
            p.grad = view


class HostFusedOptimizer(cuda_optim.FusedOptimizer):
    """A gpucnn.optim SGD, Adam or AdamW instance (the rule) run over flat NumPy float32 buffers."""

    flat_type = HostFlatParameters

    def __init__(self, rule, runtime=None):
        for i, p in enumerate(getattr(rule, "params", ())):
            if backend.device_of(p.data) != "cpu":
                raise ValueError(f"parameter {i} is on the {backend.device_of(p.data)}; a host fused optimizer "
                                 "updates NumPy arrays (gpucnn.cuda.optim.fused is for kernel devices).")
        super().__init__(rule, HOST)

    def step(self) -> None:
        """Count the step and update every parameter with one call of the rule's update on the flat buffers."""
        self.flat.gather()
        flat = Parameter(self.flat.data)
        flat.grad = self.flat.grad
        step = int(self._step[0])
        if isinstance(self.rule, optim.Adam):
            state = {"step": step, "exp_avg": self.buffers["exp_avg"], "exp_avg_sq": self.buffers["exp_avg_sq"]}
        else:  # SGD: no buffer yet on its first step (it starts from the gradient), ours after
            started = step > 0 and self.rule.momentum
            state = {"momentum_buffer": self.buffers["momentum_buffer"]} if started else {}
        self.rule._update(flat, state)
        if "momentum_buffer" in state and state["momentum_buffer"] is not self.buffers["momentum_buffer"]:
            self.buffers["momentum_buffer"][...] = state["momentum_buffer"]
        self._step[0] = step + 1


def fusable(optimizer) -> bool:
    """Whether ``fused`` takes this optimizer: SGD/Adam/AdamW (or a fused one) over float32 NumPy parameters."""
    if isinstance(optimizer, HostFusedOptimizer):
        return True
    return type(optimizer) in cuda_optim.STATE_BUFFERS and \
        all(backend.device_of(p.data) == "cpu" and p.data.dtype == np.float32 for p in optimizer.params)


def fused(optimizer) -> HostFusedOptimizer:
    """The host fused twin of a gpucnn.optim optimizer (same rule object; its state moves into the buffers)."""
    if isinstance(optimizer, HostFusedOptimizer):
        return optimizer
    if isinstance(optimizer.fused, HostFusedOptimizer):
        return optimizer.fused  # the twin an earlier call made (the rule's steps run through it)
    state = optimizer.state_dict() if optimizer.fused is not None or any(optimizer.state) else None
    twin = HostFusedOptimizer(optimizer)
    if state is not None:
        twin.load_state_dict(state)
    return twin
