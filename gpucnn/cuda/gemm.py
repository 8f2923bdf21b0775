"""Launch shapes for the GEMM core of ``kernels/gemm.cu``, shared by the linear and convolution launchers.

The core multiplies one T x T tile of the output per block, 8 x 8 outputs per thread (T = 64 with
64 threads, or T = 128 with 256 threads), and may cut the depth axis into slices (split-k) that
``gemm_reduce_slices`` adds in slice order. ``plan`` picks both from the problem's shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpucnn.cuda.runtime import ceil_div, check_int32_count

KERNEL_FILE = "gemm.cu"
THREAD_TILE = 8               # THREAD_TILE in kernels/gemm.cu
SMS = 132                     # an H100/H200; the choice only needs the order of magnitude
TARGET_BLOCKS = 2 * SMS       # enough blocks for every SM to have two
BIG_TILE_MIN_BLOCKS = SMS     # 128 x 128 tiles only when they still give every SM a block
MAX_SLICES = 32
MIN_SLICE_STEPS = 8           # a slice spans at least this many depth steps of the tile
MAX_GRID_Y = 65535
THREADS_PER_BLOCK = 256       # gemm_reduce_slices


@dataclass(frozen=True)
class GemmPlan:
    """How one product is launched: tile side, depth slices and slice length, grid, block, shared bytes."""
    tile: int
    slices: int
    depth_slice: int
    grid: tuple
    block: tuple
    shared_bytes: int


def plan(rows: int, cols: int, depth: int, split: bool = True) -> GemmPlan:
    """The launch for c (rows, cols) = a (rows, depth) @ b (depth, cols); ``split=False`` forbids split-k.

    The 128 x 128 tile (twice the operand reuse of 64 x 64) when both sides fill it and it still gives
    every SM a block; then as many depth slices (<= 32, each >= 8 depth steps) as bring the block count
    to about two per SM.
    """
    big = ceil_div(rows, 128) * ceil_div(cols, 128)
    tile = 128 if rows >= 128 and cols >= 128 and big >= BIG_TILE_MIN_BLOCKS else 64
    step = tile // THREAD_TILE
    tiles = ceil_div(rows, tile) * ceil_div(cols, tile)
    if ceil_div(rows, tile) > MAX_GRID_Y:
        raise ValueError(f"a product with {rows} rows needs more than {MAX_GRID_Y} block rows.")
    steps = ceil_div(depth, step)
    slices = 1
    if split:
        slices = max(1, min(MAX_SLICES, ceil_div(TARGET_BLOCKS, tiles), steps // MIN_SLICE_STEPS))
    depth_slice = ceil_div(steps, slices) * step
    slices = ceil_div(depth, depth_slice)
    if slices > 1:
        check_int32_count("the split-k partial sums", slices * rows * cols)
    side = tile // THREAD_TILE
    # two stages of the op_a and op_b tiles, each (tile/8 depths, tile)
    shared = 2 * 2 * step * tile * np.dtype(np.float32).itemsize
    return GemmPlan(tile, slices, depth_slice, (ceil_div(cols, tile), ceil_div(rows, tile), slices),
                    (side, side, 1), shared)


def reduce_slices(rt, partial, out, extra, rows: int, cols: int, out_cols: int, bias=None, relu=False):
    """out (rows, out_cols) [and extra (rows) from column out_cols] = partial's slices summed in order, + bias, ReLU."""
    slices = int(partial.shape[0])
    has_bias = bias is not None
    # writes out (and extra): the slices of partial added in slice order, then bias and ReLU
    rt.function(KERNEL_FILE, "gemm_reduce_slices")(
        (ceil_div(rows * cols, THREADS_PER_BLOCK), 1, 1), (THREADS_PER_BLOCK, 1, 1),
        (partial, bias if has_bias else partial, out, extra if extra is not None else out,
         np.int32(rows), np.int32(cols), np.int32(out_cols), np.int32(slices), np.int32(1 if has_bias else 0),
         np.int32(1 if relu else 0)))
