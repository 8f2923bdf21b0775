"""Small helpers shared by every op: the shape vocabulary lives here.

N batch, C input channels, H/W input height/width, OC output channels,
KH/KW kernel size, SH/SW stride, PH/PW zero padding, DH/DW dilation,
OH/OW output height/width.
"""
from __future__ import annotations

import functools
import operator


def pair(value, name: str = "value") -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(2, 3) -> (2, 3)``. Refuses anything else with a clear message."""
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value  # what the layers store: every op call asks for its pairs again
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, not {value!r}")
    if isinstance(value, int) or (hasattr(value, "__index__") and not hasattr(value, "__len__")):
        v = int(value)
        return (v, v)
    try:
        a, b = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints, not {value!r}") from None
    if isinstance(a, bool) or isinstance(b, bool) or not all(hasattr(v, "__index__") for v in (a, b)):
        raise TypeError(f"{name} must be an int or a pair of ints, not {value!r}")
    return (int(a), int(b))


def cached_when_hashable(function):
    """``function`` with its results kept for arguments that can be dict keys (every layer's call asks
    for the same few geometries); other arguments (a list for a pair, say) run it afresh. Only results
    are kept, so a call that raises raises every time."""
    cached = functools.lru_cache(maxsize=256)(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if kwargs:
            return function(*args, **kwargs)
        try:
            return cached(*args)
        except TypeError as exc:
            if "unhashable" not in str(exc):
                raise
            return function(*args)
    return wrapper


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length along one axis: ``(size + 2*padding - dilation*(kernel-1) - 1) // stride + 1``.

    The same formula serves convolution and pooling (pooling has dilation 1).
    """
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_int(value, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; bools, floats and other types are refused with TypeError."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {value!r}.")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}.") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {value}.")
    return value
