"""Gradient mode: ``no_grad()`` makes forward keep nothing for backward, as PyTorch's ``torch.no_grad``.

Inside ``with gpucnn.no_grad():`` (or a function decorated ``@gpucnn.no_grad()``) layers save no
inputs and max pooling computes no argmax, so inference does less work and holds less memory;
calling ``backward()`` after such a forward raises. The mode belongs to the running thread (a
context variable), so one thread evaluating does not switch off another's training.
"""
from __future__ import annotations

import contextlib
import contextvars

_grad_enabled = contextvars.ContextVar("gpucnn_grad_enabled", default=True)


def is_grad_enabled() -> bool:
    """False inside ``no_grad()``: forward passes keep nothing for backward."""
    return _grad_enabled.get()


@contextlib.contextmanager
def no_grad():
    """Within the block (or the decorated function), forward passes keep nothing for backward."""
    token = _grad_enabled.set(False)
    try:
        yield
    finally:
        _grad_enabled.reset(token)
