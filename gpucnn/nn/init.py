"""Weight initialisation for Conv2d and Linear (float32, on the CPU).

fan_in is the number of inputs feeding one output: C*KH*KW for a convolution,
IN for a linear layer. Both schemes draw from U(-bound, bound):

    kaiming (He, for ReLU nets):  bound = sqrt(6 / fan_in)   (variance 2 / fan_in)
    lecun   (for tanh nets):      bound = sqrt(3 / fan_in)   (variance 1 / fan_in)
"""
from __future__ import annotations

import math

import numpy as np

INIT_SCHEMES = {"kaiming": 6.0, "lecun": 3.0}


def make_rng(rng=None) -> np.random.Generator:
    """A numpy Generator from None (fresh entropy), an int seed, or a Generator (used as is)."""
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, not {type(rng).__name__}.")


def uniform_weight(shape: tuple, fan_in: int, scheme: str, rng: np.random.Generator) -> np.ndarray:
    """A float32 array of ``shape`` drawn from U(-bound, bound) for ``scheme`` ("kaiming" or "lecun")."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {sorted(INIT_SCHEMES)}, not {scheme!r}.")
    if fan_in < 1:
        raise ValueError(f"fan_in must be at least 1, got {fan_in}.")
    bound = math.sqrt(INIT_SCHEMES[scheme] / fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)
