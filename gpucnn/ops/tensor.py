"""In-place helpers a training step needs on every device: ``add_into`` (gradient accumulation) and ``fill``."""
from __future__ import annotations

from gpucnn import dispatch
from gpucnn.ops import check_float_array, check_same_kind


def _check_add_into(out, x) -> None:
    check_float_array(out, "out", nonempty=False)
    check_float_array(x, "x", nonempty=False)
    check_same_kind(out, "out", x=x)
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"x has shape {tuple(x.shape)} but out has {tuple(out.shape)}; they must match.")


def _check_fill(out, value) -> None:
    check_float_array(out, "out", nonempty=False)


def add_into(out, x):
    """out += x in place (same shape, dtype and device); returns out."""
    return dispatch.run("tensor", "add_into", _check_add_into, out, x)


def fill(out, value):
    """out[...] = value in place; returns out."""
    return dispatch.run("tensor", "fill", _check_fill, out, value)


def add_into_reference(out, x):
    out += x
    return out


def fill_reference(out, value):
    out.fill(value)
    return out
