"""Launchers for the linear layer's matrix products, on the GEMM core of ``kernels/gemm.cu``.

``linear_forward`` / ``linear_backward`` have the signatures of gpucnn.ops.linear plus ``runtime``
(None: the process-wide CupyRuntime); ``linear_forward`` also fuses ReLU. ``matmul`` is the general
product behind them, for any (ROWS, DEPTH) x (DEPTH, COLS) shapes. The code is the same for CuPy arrays on a GPU
and NumPy arrays under the emulator. No cuBLAS is involved, so every launch can be captured in a
CUDA graph, and every sum runs in a fixed order (bitwise reproducible).
"""
from __future__ import annotations

import numpy as np

from gpucnn.cuda import gemm
from gpucnn.cuda.runtime import check_int32_count, active_runtime, kernel_array, kernel_matrix, output_array


def matmul(a, b, *, trans_a=False, trans_b=False, bias=None, relu=False, row_sums=False, mask=None, out=None,
           sums_out=None, runtime=None):
    """c = op(a) @ op(b) [+ bias] [then max(0, .)], all float32, on the GEMM core (gpucnn.cuda.gemm).

    op(a) is a (ROWS, DEPTH), or a.T when ``trans_a`` (a stored (DEPTH, ROWS)); op(b) is b
    (DEPTH, COLS), or b.T when ``trans_b`` (b stored (COLS, DEPTH)); bias (COLS,) or None -> c (ROWS, COLS).
    ``row_sums``: also the sums of op(a)'s rows (ROWS,), as one more column of the same product
    (op(b) gets a column of ones); returns (c, sums) then. mask (ROWS, COLS) or None: c is zeroed
    where mask is not > 0 (a ReLU's backward, fused; no split-k then). out / sums_out: arrays to write
    c and the sums into (C-contiguous float32 of their shapes) instead of new ones.
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
    if mask is not None:
        mask = kernel_array(rt, mask, "mask", ndim=2)
        if tuple(mask.shape) != (rows, cols):
            raise ValueError(f"mask must have the product's shape {(rows, cols)}, not {tuple(mask.shape)}.")
    c = output_array(rt, out, (rows, cols), "out")
    sums = output_array(rt, sums_out, (rows,), "sums_out") if row_sums else None
    _launch(rt, a, b, trans_a, trans_b, bias, relu, c, sums, rows, cols, depth, mask)
    return (c, sums) if row_sums else c


def _launch(rt, a, b, trans_a, trans_b, bias, relu, c, sums, rows, cols, depth, mask=None):
    """Launch the product into c (and the row sums into sums, when not None); split-k when the plan says."""
    gemm_cols = cols + (1 if sums is not None else 0)
    plan = gemm.plan(rows, gemm_cols, depth, split=mask is None)
    mask_args = (mask if mask is not None else a, np.int32(0 if mask is None else 1))
    has_bias = bias is not None
    flags = (np.int32(1 if trans_a else 0), np.int32(1 if trans_b else 0), np.int32(plan.depth_slice))
    ones = np.int32(1 if sums is not None else 0)
    extra = sums if sums is not None else c   # a float pointer the kernel never writes without the ones column
    bias_arg = bias if has_bias else a
    sizes = (np.int32(rows), np.int32(cols), np.int32(depth))
    if plan.slices == 1:
        # writes c (and sums): one block per output tile, bias and ReLU applied in place
        rt.function(gemm.KERNEL_FILE, "gemm_matmul")(
            plan.grid, plan.block, (a, b, bias_arg, c, extra, *sizes, *flags, np.int32(has_bias),
                                    np.int32(1 if relu else 0), ones, *mask_args), shared_mem=plan.shared_bytes)
        return
    partial = rt.empty((plan.slices, rows, gemm_cols), np.float32)
    # writes partial: slice z holds the product over depth slice z (the ones column included)
    rt.function(gemm.KERNEL_FILE, "gemm_matmul")(
        plan.grid, plan.block, (a, b, bias_arg, partial, extra, *sizes, *flags, np.int32(0), np.int32(0), ones,
                                *mask_args), shared_mem=plan.shared_bytes)
    gemm.reduce_slices(rt, partial, c, sums, rows, gemm_cols, cols, bias=bias, relu=relu)


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


def linear_backward(grad_y, x, weight, with_bias=True, with_grad_x=True, input_relu=False, grad_weight_out=None,
                    grad_bias_out=None, *, runtime=None):
    """Gradients of linear_forward (without ReLU).

    grad_y (N, OUT), x (N, IN), weight (OUT, IN) -> (grad_x (N, IN) or None when ``with_grad_x`` is
    False, grad_weight (OUT, IN), grad_bias (OUT,) or None when ``with_bias`` is False).
    input_relu: x is a ReLU's output; grad_x is zeroed where x is not > 0 (that ReLU's backward, in
    the product's epilogue). grad_weight_out / grad_bias_out: where to write those gradients.
    """
    rt = active_runtime(runtime)
    grad_y = kernel_matrix(rt, grad_y, "grad_y")
    x = kernel_matrix(rt, x, "x")
    weight = kernel_matrix(rt, weight, "weight")
    _check_weight(x, weight)
    if tuple(grad_y.shape) != (x.shape[0], weight.shape[0]):
        raise ValueError(f"grad_y must have shape {(x.shape[0], weight.shape[0])}, not {tuple(grad_y.shape)}.")
    grad_x = matmul(grad_y, weight, mask=x if input_relu else None, runtime=rt) if with_grad_x else None
    if with_bias:  # the bias gradient is the row sums of grad_y^T: one more column of the same product
        grad_weight, grad_bias = matmul(grad_y, x, trans_a=True, row_sums=True, out=grad_weight_out,
                                        sums_out=grad_bias_out, runtime=rt)
        return grad_x, grad_weight, grad_bias
    return grad_x, matmul(grad_y, x, trans_a=True, out=grad_weight_out, runtime=rt), None
