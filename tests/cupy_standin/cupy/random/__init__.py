"""CuPy's cupy.random for the stand-in: RandomState draws on the host, results are device arrays."""
from __future__ import annotations

import numpy as np


class RandomState:
    """CuPy's RandomState (its draws differ from CuPy's cuRAND ones; only shapes and dtypes match)."""

    def __init__(self, seed=None, method=None):
        self._host = np.random.RandomState(seed)

    def seed(self, seed=None):
        self._host.seed(seed)

    def _device(self, values, dtype):
        import cupy  # noqa: PLC0415 - cupy imports this module

        return cupy.asarray(np.asarray(values).astype(dtype, copy=False))

    def standard_normal(self, size=None, dtype=float):
        return self._device(self._host.standard_normal(size), dtype)

    def normal(self, loc=0.0, scale=1.0, size=None, dtype=float):
        return self._device(self._host.normal(loc, scale, size), dtype)

    def uniform(self, low=0.0, high=1.0, size=None, dtype=float):
        return self._device(self._host.uniform(low, high, size), dtype)

    def random_sample(self, size=None, dtype=float):
        return self._device(self._host.random_sample(size), dtype)

    def rand(self, *size, **kwarg):
        return self.random_sample(size or None, kwarg.get("dtype", float))

    def randn(self, *size, **kwarg):
        return self.standard_normal(size or None, kwarg.get("dtype", float))

    def randint(self, low, high=None, size=None, dtype=int):
        return self._device(self._host.randint(low, high, size), dtype)

    def permutation(self, num):
        return self._device(self._host.permutation(num), np.int64)


_global = RandomState()


def seed(seed=None):
    _global.seed(seed)


def get_random_state():
    return _global


def standard_normal(size=None, dtype=float):
    return _global.standard_normal(size, dtype)


def uniform(low=0.0, high=1.0, size=None, dtype=float):
    return _global.uniform(low, high, size, dtype)


def rand(*size, **kwarg):
    return _global.rand(*size, **kwarg)


def randn(*size, **kwarg):
    return _global.randn(*size, **kwarg)
