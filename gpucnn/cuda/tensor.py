"""Launchers for the in-place helpers in ``kernels/elementwise.cu``: ``add_into`` and ``fill``.

Same signatures as gpucnn.ops.tensor plus ``runtime``. Both write into their first argument, so
it must be C-contiguous (a strided array is refused, never silently copied).
"""
from __future__ import annotations

import numpy as np

from gpucnn.cuda.activation import KERNEL_FILE, THREADS_PER_BLOCK, grid_for
from gpucnn.cuda.runtime import active_runtime, kernel_array, kernel_inout_array


def add_into(out, x, *, runtime=None):
    """out += x, in place, for float32 arrays of one shape; returns out."""
    rt = active_runtime(runtime)
    target = kernel_inout_array(rt, out, "out")
    x = kernel_array(rt, x, "x")
    if tuple(x.shape) != tuple(target.shape):
        raise ValueError(f"x has shape {tuple(x.shape)} but out has {tuple(target.shape)}; they must match.")
    if target.size:
        # writes out: a grid-stride loop over the elements
        rt.function(KERNEL_FILE, "add_into")(grid_for(target.size), (THREADS_PER_BLOCK, 1, 1),
                                             (target, x, np.int64(target.size)))
    return out


def fill(out, value, *, runtime=None):
    """out[...] = value, in place, for a float32 array; returns out."""
    rt = active_runtime(runtime)
    target = kernel_inout_array(rt, out, "out")
    if target.size:
        # writes out: a grid-stride loop over the elements
        rt.function(KERNEL_FILE, "fill")(grid_for(target.size), (THREADS_PER_BLOCK, 1, 1),
                                         (target, np.float32(value), np.int64(target.size)))
    return out
