"""Launchers for the matrix-product kernels in ``kernels/linear.cu``.

``linear_forward`` / ``linear_backward`` have the signatures of gpucnn.ops.linear plus ``runtime``
(None: the process-wide CupyRuntime); ``linear_forward`` also fuses ReLU. ``matmul`` is the general
product behind them, for any (ROWS, DEPTH) x (DEPTH, COLS) shapes. The code is the same for CuPy arrays on a GPU
and NumPy arrays under the emulator. No cuBLAS is involved, so every launch can be captured in a
CUDA graph, and every sum runs in a fixed order (bitwise reproducible).
"""
from __future__ import annotations

import numpy as np

from gpucnn.cuda.runtime import ceil_div, check_int32_count, active_runtime, kernel_array, kernel_matrix

KERNEL_FILE = "linear.cu"
TILE_M, TILE_N, TILE_K = 64, 64, 16   # rows, columns, depth of a tile, as #defined in kernels/linear.cu
TILE_BLOCK = (16, 16, 1)              # each thread computes 4 x 4 elements of a 64 x 64 tile
COLSUM_ROWS = 8                       # COLSUM_ROWS in kernels/linear.cu
THREADS_PER_BLOCK = 256               # 1-D launches
MAX_GRID_YZ = 65535
# Split-k (GEMM's name; here the depth axis): when the output has few tiles, the depth axis is cut
# into slices summed by separate blocks (then added in slice order), so that about TARGET_BLOCKS
# blocks keep the GPU busy. A slice spans at least MIN_SLICE_TILES steps of TILE_K.
TARGET_BLOCKS = 256
MIN_SLICE_TILES = 4
MAX_SLICES = 32


def split_k(rows: int, cols: int, depth: int) -> tuple[int, int]:
    """(slices, depth_slice) for a product of these sizes: how many depth slices and how long each is."""
    tiles = ceil_div(rows, TILE_M) * ceil_div(cols, TILE_N)
    depth_tiles = ceil_div(depth, TILE_K)
    slices = max(1, min(depth_tiles // MIN_SLICE_TILES, ceil_div(TARGET_BLOCKS, tiles), MAX_SLICES))
    depth_slice = ceil_div(depth_tiles, slices) * TILE_K
    return ceil_div(depth, depth_slice), depth_slice


def matmul(a, b, *, trans_a=False, trans_b=False, bias=None, relu=False, runtime=None):
    """c = op(a) @ op(b) [+ bias] [then max(0, .)], all float32.

    op(a) is a (ROWS, DEPTH), or a.T when ``trans_a`` (a stored (DEPTH, ROWS)); op(b) is b
    (DEPTH, COLS), or b.T when ``trans_b`` (b stored (COLS, DEPTH)); bias (COLS,) or None -> c (ROWS, COLS).
    """
    rt = active_runtime(runtime)
    a = kernel_matrix(rt, a, "a")
    b = kernel_matrix(rt, b, "b")
    rows, depth = (a.shape[1], a.shape[0]) if trans_a else a.shape
    depth_b, cols = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if depth_b != depth:
        raise ValueError(f"op(a) has {depth} columns (a shape {tuple(a.shape)}, trans_a={bool(trans_a)}) but op(b) "
                         f"has {depth_b} rows (b shape {tuple(b.shape)}, trans_b={bool(trans_b)}); they must match.")
    if bias is not None:
        bias = kernel_array(rt, bias, "bias", ndim=1)
        if bias.shape[0] != cols:
            raise ValueError(f"bias must have shape ({cols},) to match the {cols} output columns, "
                             f"not {tuple(bias.shape)}.")
    rows, cols, depth = int(rows), int(cols), int(depth)
    check_int32_count("c", rows * cols)
    if ceil_div(rows, TILE_M) > MAX_GRID_YZ:
        raise ValueError(f"op(a) has {rows} rows; at most {MAX_GRID_YZ * TILE_M} fit the kernel's grid.")
    has_bias = bias is not None
    bias_arg = bias if has_bias else a  # a float pointer the kernels never read when has_bias is 0

    slices, depth_slice = split_k(rows, cols, depth)
    check_int32_count("the split-k partial sums", slices * rows * cols)
    grid = (ceil_div(cols, TILE_N), ceil_div(rows, TILE_M), slices)
    c = rt.empty((rows, cols), np.float32)
    flags = (np.int32(1 if trans_a else 0), np.int32(1 if trans_b else 0), np.int32(depth_slice))
    if slices == 1:
        # writes c: one block per 64 x 64 tile, bias and ReLU applied in place
        rt.function(KERNEL_FILE, "linear_matmul_tiled")(
            grid, TILE_BLOCK, (a, b, bias_arg, c, np.int32(rows), np.int32(cols), np.int32(depth), *flags,
                               np.int32(has_bias), np.int32(1 if relu else 0)))
        return c
    partial = rt.empty((slices, rows, cols), np.float32)
    # writes partial: slice z holds the product over depth in [z*depth_slice, (z+1)*depth_slice)
    rt.function(KERNEL_FILE, "linear_matmul_tiled")(
        grid, TILE_BLOCK, (a, b, bias_arg, partial, np.int32(rows), np.int32(cols), np.int32(depth), *flags,
                           np.int32(0), np.int32(0)))
    # writes c: the slices summed in slice order, then bias and ReLU
    rt.function(KERNEL_FILE, "linear_reduce_slices")(
        (ceil_div(rows * cols, THREADS_PER_BLOCK), 1, 1), (THREADS_PER_BLOCK, 1, 1),
        (partial, bias_arg, c, np.int32(rows), np.int32(cols), np.int32(slices), np.int32(has_bias),
         np.int32(1 if relu else 0)))
    return c


def column_sums(g, *, runtime=None):
    """The sum of each column: g (ROWS, COLS) float32 -> (COLS,), each summed in a fixed order."""
    rt = active_runtime(runtime)
    g = kernel_matrix(rt, g, "g")
    rows, cols = (int(s) for s in g.shape)
    out = rt.empty((cols,), np.float32)
    # writes out: one block per 32 columns, COLSUM_ROWS threads per column, added in row-group order
    rt.function(KERNEL_FILE, "linear_column_sums")(
        (ceil_div(cols, 32), 1, 1), (32, COLSUM_ROWS, 1), (g, out, np.int32(rows), np.int32(cols)))
    return out


def _check_weight(x, weight):
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight expects {weight.shape[1]} input features (shape {tuple(weight.shape)}) "
                         f"but x has {x.shape[1]} (shape {tuple(x.shape)}).")


def linear_forward(x, weight, bias, relu=False, *, runtime=None):
    """y = x @ weight.T + bias, then max(0, .) when ``relu``.

    x (N, IN), weight (OUT, IN) as in PyTorch, bias (OUT,) or None -> y (N, OUT), all float32.
    """
    rt = active_runtime(runtime)
    x = kernel_matrix(rt, x, "x")
    weight = kernel_matrix(rt, weight, "weight")
    _check_weight(x, weight)
    if bias is not None:
        bias = kernel_array(rt, bias, "bias", ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight, not {tuple(bias.shape)}.")
    return matmul(x, weight, trans_b=True, bias=bias, relu=relu, runtime=rt)


def linear_backward(grad_y, x, weight, with_bias=True, with_grad_x=True, *, runtime=None):
    """Gradients of linear_forward (without ReLU).

    grad_y (N, OUT), x (N, IN), weight (OUT, IN) -> (grad_x (N, IN) or None when ``with_grad_x`` is
    False, grad_weight (OUT, IN), grad_bias (OUT,) or None when ``with_bias`` is False).
    """
    rt = active_runtime(runtime)
    grad_y = kernel_matrix(rt, grad_y, "grad_y")
    x = kernel_matrix(rt, x, "x")
    weight = kernel_matrix(rt, weight, "weight")
    _check_weight(x, weight)
    if tuple(grad_y.shape) != (x.shape[0], weight.shape[0]):
        raise ValueError(f"grad_y must have shape {(x.shape[0], weight.shape[0])}, not {tuple(grad_y.shape)}.")
    grad_x = matmul(grad_y, weight, runtime=rt) if with_grad_x else None
    grad_weight = matmul(grad_y, x, trans_a=True, runtime=rt)
    grad_bias = column_sums(grad_y, runtime=rt) if with_bias else None
    return grad_x, grad_weight, grad_bias
