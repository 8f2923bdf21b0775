"""Fast max pooling on NumPy arrays: the signatures and results of gpucnn.ops.pool's max-pool functions.

LeNet's 2x2 stride-2 unpadded pooling runs as a pairwise tournament on strided views,
in the input's own memory order (CHWN from the fast convolution: runs of N contiguous
numbers), cut along the outermost axis into chunks that keep the temporaries in cache.
LeNet's sizes run on the calling thread: memory-bound, they ran slower on two threads
(measured at batch 256: forward 0.68 against 0.57 ms, backward 0.71 against 0.52 ms); from
THREADED_MIN_ELEMENTS input values (vgg-small's) the chunks are shared out to the threads.
Other window shapes, and inputs holding NaN, use the reference, whose results these equal exactly.
"""
from __future__ import annotations

import numpy as np

from gpucnn.cpu.threads import empty_in_order, even_ranges, memory_order, run_chunks
from gpucnn.ops.pool import (max_pool2d_backward_reference, max_pool2d_forward_reference, max_pool2d_reference,
                             pool2d_geometry)

MAX_CHUNKS = 8
CHUNK_ELEMENTS = 1 << 16  # input elements per chunk at least: fewer, larger calls for small inputs
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (ky, kx) of window-local index ky*2 + kx
# Fewest input values from which the chunks run on the threads. Two threads, CHWN input, forward / backward
# in ms on the calling thread against on the threads: 64x64x32x32 7.3 / 3.9 -> 3.0 / 2.4, 256x64x32x32
# 28.7 / 32.7 -> 15.6 / 18.8, 64x128x16x16 (2 M values) 2.1 / 1.5 -> 2.0 / 1.3; LeNet's 256x6x28x28 even.
THREADED_MIN_ELEMENTS = 1 << 21


def _run(work, parts, size: int) -> None:
    """work(i) for every chunk: on the threads for large inputs, else here in order."""
    if size >= THREADED_MIN_ELEMENTS:
        run_chunks(work, len(parts))
    else:
        for i in range(len(parts)):
            work(i)


def _is_2x2(g) -> bool:
    return (g.KH, g.KW, g.SH, g.SW, g.PH, g.PW) == (2, 2, 2, 2, 0, 0)


def _outer_slices(shape, order):
    """Index tuples cutting the outermost memory axis (N or C) into up to MAX_CHUNKS pieces."""
    axis = order[0] if order[0] in (0, 1) else 0
    size = shape[0] * shape[1] * shape[2] * shape[3]
    slices = []
    for start, stop in even_ranges(shape[axis], max(1, min(MAX_CHUNKS, size // CHUNK_ELEMENTS))):
        index = [slice(None)] * 4
        index[axis] = slice(start, stop)
        slices.append(tuple(index))
    return slices


def _corners(x_part, g):
    """The (top_left, top_right, bottom_left, bottom_right) strided views of each 2x2 window's pixels."""
    rows, rows1 = slice(0, 2 * g.OH - 1, 2), slice(1, 2 * g.OH, 2)
    cols, cols1 = slice(0, 2 * g.OW - 1, 2), slice(1, 2 * g.OW, 2)
    return (x_part[:, :, rows, cols], x_part[:, :, rows, cols1],
            x_part[:, :, rows1, cols], x_part[:, :, rows1, cols1])


def max_pool2d_forward(x, kernel_size, stride=None, padding=0):
    """Max pooling: x (N, C, H, W) -> (y, argmax int32 window-local index), as the reference."""
    g = pool2d_geometry(x.shape, kernel_size, stride, padding)
    if not _is_2x2(g):
        return max_pool2d_forward_reference(x, kernel_size, stride, padding)
    order = memory_order(x)
    y = empty_in_order((g.N, g.C, g.OH, g.OW), x.dtype, order)
    argmax = empty_in_order((g.N, g.C, g.OH, g.OW), np.int32, order)
    parts = _outer_slices(x.shape, order)

    def work(i):
        part = parts[i]
        top_left, top_right, bottom_left, bottom_right = _corners(x[part], g)
        top = np.maximum(top_left, top_right)
        bottom = np.maximum(bottom_left, bottom_right)
        np.maximum(top, bottom, out=y[part])
        # Strict comparisons keep the earlier candidate on ties: left before right, top before bottom.
        use_bottom = bottom > top
        # right_wins = top's choice, or bottom's where the bottom row wins: bitwise logic, not
        # np.where (which branches per element: about 3x slower here).
        right_wins = top_right > top_left
        right_wins ^= (right_wins ^ (bottom_right > bottom_left)) & use_bottom
        out = argmax[part]
        np.add(right_wins, use_bottom, out=out, dtype=np.int32)
        np.add(out, use_bottom, out=out)

    _run(work, parts, x.size)
    if np.isnan(y).any():  # the comparisons above ignore NaN; the reference ranks it first
        return max_pool2d_forward_reference(x, kernel_size, stride, padding)
    return y, argmax


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max pooling without argmax: x (N, C, H, W) -> y in x's memory order, as the reference (NaN included:
    np.maximum propagates it, as the reference's loop does)."""
    g = pool2d_geometry(x.shape, kernel_size, stride, padding)
    if not _is_2x2(g):
        return max_pool2d_reference(x, kernel_size, stride, padding)
    order = memory_order(x)
    y = empty_in_order((g.N, g.C, g.OH, g.OW), x.dtype, order)
    for part in _outer_slices(x.shape, order):
        top_left, top_right, bottom_left, bottom_right = _corners(x[part], g)
        y_part = y[part]
        np.maximum(top_left, top_right, out=y_part)
        np.maximum(y_part, np.maximum(bottom_left, bottom_right), out=y_part)
    return y


def max_pool2d_backward(grad_y, argmax, x_shape, kernel_size, stride=None, padding=0):
    """Gradient of max pooling, as the reference: grad_x in argmax's memory order (CHWN after the fast forward)."""
    g = pool2d_geometry(x_shape, kernel_size, stride, padding)
    if not _is_2x2(g):
        return max_pool2d_backward_reference(grad_y, argmax, x_shape, kernel_size, stride, padding)
    order = memory_order(argmax)
    if memory_order(grad_y) != order:  # one memory order for every operand of the loop below
        grad_y_ordered = empty_in_order(grad_y.shape, grad_y.dtype, order)
        grad_y_ordered[...] = grad_y
        grad_y = grad_y_ordered
    grad_x = empty_in_order(tuple(x_shape), grad_y.dtype, order)
    if g.H % 2:
        grad_x[:, :, -1] = 0
    if g.W % 2:
        grad_x[:, :, :, -1] = 0
    parts = _outer_slices(grad_x.shape, order)

    def work(i):
        part = parts[i]
        grad_y_part, argmax_part, grad_x_part = grad_y[part], argmax[part], grad_x[part]
        for k, (ky, kx) in enumerate(_CORNERS):
            target = grad_x_part[:, :, ky: ky + 2 * g.OH - 1: 2, kx: kx + 2 * g.OW - 1: 2]
            np.multiply(grad_y_part, np.equal(argmax_part, k).view(np.uint8), out=target)

    _run(work, parts, grad_x.size)
    return grad_x
