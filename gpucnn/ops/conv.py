"""2-D convolution (cross-correlation, as in PyTorch): the public dispatchers and the NumPy reference.

The NumPy path is im2col + one matrix product, in a channel-height-width-batch ("CHWN")
layout: the batch index is innermost, so every kernel offset (ky, kx) copies or adds
runs of OW*n contiguous numbers instead of short rows of OW. That keeps the single-
threaded copies (im2col) and adds (col2im) near memory speed, and one large matmul
replaces N small ones. The batch is processed in chunks whose columns fit in cache.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gpucnn import dispatch
from gpucnn.ops import check_float_array, check_same_kind
from gpucnn.utils import cached_when_hashable, conv_output_size, pair

# Bytes of im2col columns per batch chunk: small enough to stay in L2/L3 cache,
# large enough that the matmul stays efficient (measured on 2-core AVX2 machines).
COLUMN_CHUNK_BYTES = 2 * 2**20


ConvGeometry = NamedTuple("ConvGeometry", [(size, int) for size in "N C H W OC KH KW SH SW PH PW DH DW OH OW".split()])
ConvGeometry.__doc__ = "Every size of one convolution, in the shared shape vocabulary."



def conv2d_geometry(x, weight, bias=None, stride=1, padding=0, dilation=1) -> ConvGeometry:
    """Validate the arguments of a convolution and return its sizes.

    x (N, C, H, W), weight (OC, C, KH, KW), bias (OC,) or None, all the same float
    dtype and device. Raises TypeError/ValueError naming what is wrong.
    """
    check_float_array(x, "x", ndim=4)
    check_float_array(weight, "weight", ndim=4)
    check_same_kind(x, "x", weight=weight, bias=bias)
    N, C, H, W = (int(s) for s in x.shape)
    OC, weight_channels, KH, KW = (int(s) for s in weight.shape)
    if weight_channels != C:
        raise ValueError(f"weight expects {weight_channels} input channels (shape {tuple(weight.shape)}) "
                         f"but x has {C} (shape {tuple(x.shape)}).")
    if bias is not None:
        check_float_array(bias, "bias", ndim=1)
        if bias.shape[0] != OC:
            raise ValueError(f"bias must have shape ({OC},) to match weight, not {tuple(bias.shape)}.")
    SH, SW = pair(stride, "stride")
    PH, PW = pair(padding, "padding")
    DH, DW = pair(dilation, "dilation")
    if min(SH, SW) < 1:
        raise ValueError(f"stride must be positive, not {stride!r}.")
    if min(PH, PW) < 0:
        raise ValueError(f"padding must be non-negative, not {padding!r}.")
    if min(DH, DW) < 1:
        raise ValueError(f"dilation must be positive, not {dilation!r}.")
    span_h, span_w = DH * (KH - 1) + 1, DW * (KW - 1) + 1
    if span_h > H + 2 * PH or span_w > W + 2 * PW:
        raise ValueError(f"the (dilated) kernel {span_h}x{span_w} is larger than the padded input "
                         f"{H + 2 * PH}x{W + 2 * PW}.")
    return conv2d_sizes(x.shape, weight.shape, stride, padding, dilation)


@cached_when_hashable
def conv2d_sizes(x_shape, weight_shape, stride=1, padding=0, dilation=1) -> ConvGeometry:
    """The sizes of a convolution whose arguments conv2d_geometry has already accepted (no checks)."""
    N, C, H, W = (int(s) for s in x_shape)
    OC, _, KH, KW = (int(s) for s in weight_shape)
    SH, SW = pair(stride, "stride")
    PH, PW = pair(padding, "padding")
    DH, DW = pair(dilation, "dilation")
    OH = conv_output_size(H, KH, SH, PH, DH)
    OW = conv_output_size(W, KW, SW, PW, DW)
    return ConvGeometry(N, C, H, W, OC, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW)


def conv2d_forward(x, weight, bias, stride=1, padding=0, dilation=1, relu=False):
    """y = conv2d(x, weight) + bias, optionally followed by ReLU.

    x (N, C, H, W), weight (OC, C, KH, KW), bias (OC,) or None -> y (N, OC, OH, OW), with
    OH = (H + 2*PH - DH*(KH-1) - 1) // SH + 1 (OW likewise). stride, padding (zeros) and
    dilation are ints or (h, w) pairs. Runs where the arrays live (gpucnn.dispatch).
    """
    return dispatch.run("conv", "conv2d_forward", _check_forward, x, weight, bias, stride, padding, dilation, relu)


def conv2d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, with_bias=True, with_grad_x=True,
                    input_relu=False, grad_weight_out=None, grad_bias_out=None):
    """Gradients of conv2d_forward (without its ReLU) for the upstream gradient grad_y.

    grad_y (N, OC, OH, OW), x (N, C, H, W), weight (OC, C, KH, KW)
    -> grad_x (N, C, H, W), grad_weight (OC, C, KH, KW), grad_bias (OC,) or None when
    with_bias is False. A fused ReLU's gradient must be applied to grad_y by the caller.
    with_grad_x=False returns None for grad_x and skips its cost (about half of the
    backward), for a first layer whose input needs no gradient.
    input_relu=True: x is a ReLU's output and grad_x comes back through that ReLU too (zero where x
    is not > 0). grad_weight_out / grad_bias_out: arrays to write the gradients into (returned in
    their place); on a kernel device the kernels write them there directly.
    """
    outs = dict(grad_weight_out=grad_weight_out, grad_bias_out=grad_bias_out)
    if dispatch.on_kernel_device(grad_y, x, weight):
        return dispatch.run("conv", "conv2d_backward", check_backward, grad_y, x, weight, stride, padding, dilation,
                            with_bias, with_grad_x, input_relu=input_relu, **outs)
    grad_x, grad_weight, grad_bias = dispatch.run("conv", "conv2d_backward", check_backward, grad_y, x, weight,
                                                  stride, padding, dilation, with_bias, with_grad_x)
    if input_relu and grad_x is not None:
        from gpucnn.ops.activation import relu_backward  # noqa: PLC0415 - ops modules import each other lazily
        grad_x = relu_backward(grad_x, x)
    return grad_x, dispatch.write_into(grad_weight_out, grad_weight), dispatch.write_into(grad_bias_out, grad_bias)


def _check_forward(x, weight, bias, stride=1, padding=0, dilation=1, relu=False) -> None:
    conv2d_geometry(x, weight, bias, stride, padding, dilation)


def check_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, with_bias=True, with_grad_x=True,
                   input_relu=False, grad_weight_out=None, grad_bias_out=None):
    """Validate conv2d_backward's arguments (as the public op does) and return the sizes."""
    g = conv2d_geometry(x, weight, None, stride, padding, dilation)
    check_float_array(grad_y, "grad_y", ndim=4)
    check_same_kind(x, "x", grad_y=grad_y)
    if tuple(grad_y.shape) != (g.N, g.OC, g.OH, g.OW):
        raise ValueError(f"grad_y must have the output shape {(g.N, g.OC, g.OH, g.OW)}, "
                         f"not {tuple(grad_y.shape)}.")
    return g


def conv2d_forward_reference(x, weight, bias, stride=1, padding=0, dilation=1, relu=False):
    """The NumPy reference of conv2d_forward (arguments already validated)."""
    return _forward_numpy(x, weight, bias, conv2d_sizes(x.shape, weight.shape, stride, padding, dilation), relu)


def conv2d_backward_reference(grad_y, x, weight, stride=1, padding=0, dilation=1, with_bias=True,
                              with_grad_x=True):
    """The NumPy reference of conv2d_backward (arguments already validated)."""
    g = conv2d_sizes(x.shape, weight.shape, stride, padding, dilation)
    return _backward_numpy(grad_y, x, weight, g, with_bias, with_grad_x)


# ---------------------------------------------------------------------------------------
# NumPy reference


def _batch_chunks(g: ConvGeometry, rows: int, itemsize: int):
    """(start, stop) pairs covering the batch so that each chunk's columns fit COLUMN_CHUNK_BYTES."""
    per_image = rows * g.OH * g.OW * itemsize
    step = max(1, COLUMN_CHUNK_BYTES // per_image)
    return [(start, min(start + step, g.N)) for start in range(0, g.N, step)]


class _Scratch:
    """Flat buffers that every chunk of one call reuses: fresh arrays per chunk would page-fault anew."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.buffers = {}

    def array(self, name: str, shape, zeroed: bool = False):
        size = int(np.prod(shape))
        buffer = self.buffers.get(name)
        if buffer is None or buffer.size < size:
            buffer = self.buffers[name] = np.empty(size, self.dtype)
        view = buffer[:size].reshape(shape)
        if zeroed:
            view.fill(0)
        return view


def _window(chwn, g: ConvGeometry, ky: int, kx: int):
    """The (C, OH, OW, n) view of a padded (C, HP, WP, n) array read by kernel offset (ky, kx)."""
    top, left = ky * g.DH, kx * g.DW
    return chwn[:, top: top + g.SH * (g.OH - 1) + 1: g.SH, left: left + g.SW * (g.OW - 1) + 1: g.SW]


def _im2col(x_chunk, g: ConvGeometry, ones_row: bool, scratch: _Scratch):
    """Columns (C*KH*KW [+1], OH*OW*n) of a batch chunk (n, C, H, W); rows (c, ky, kx), columns (oh, ow, n).

    With ones_row, a last row of ones lets the matmul add the bias.
    """
    n = x_chunk.shape[0]
    padded = scratch.array("padded", (g.C, g.H + 2 * g.PH, g.W + 2 * g.PW, n), zeroed=g.PH > 0 or g.PW > 0)
    padded[:, g.PH: g.PH + g.H, g.PW: g.PW + g.W] = x_chunk.transpose(1, 2, 3, 0)
    CKK = g.C * g.KH * g.KW
    col = scratch.array("col", (CKK + ones_row, g.OH, g.OW, n))
    col_by_offset = col[:CKK].reshape(g.C, g.KH, g.KW, g.OH, g.OW, n)
    for ky in range(g.KH):
        for kx in range(g.KW):
            col_by_offset[:, ky, kx] = _window(padded, g, ky, kx)
    if ones_row:
        col[CKK] = 1
    return col.reshape(CKK + ones_row, -1)


def _forward_numpy(x, weight, bias, g: ConvGeometry, relu: bool):
    weight_matrix = weight.reshape(g.OC, -1)
    if bias is not None:
        weight_matrix = np.concatenate([weight_matrix, bias.reshape(g.OC, 1)], axis=1)
    rows = weight_matrix.shape[1]
    scratch = _Scratch(x.dtype)
    y = np.empty((g.N, g.OC, g.OH, g.OW), x.dtype)
    for start, stop in _batch_chunks(g, rows, x.itemsize):
        col = _im2col(x[start:stop], g, bias is not None, scratch)
        y_chwn = scratch.array("y", (g.OC, g.OH, g.OW, stop - start))
        np.matmul(weight_matrix, col, out=y_chwn.reshape(g.OC, -1))
        if relu:
            np.maximum(y_chwn.transpose(3, 0, 1, 2), 0, out=y[start:stop])
        else:
            y[start:stop] = y_chwn.transpose(3, 0, 1, 2)
    return y


def _backward_numpy(grad_y, x, weight, g: ConvGeometry, with_bias: bool, with_grad_x: bool):
    CKK = g.C * g.KH * g.KW
    rows = CKK + with_bias
    weight_t = weight.reshape(g.OC, CKK).T  # (CKK, OC)
    grad_weight_matrix = np.zeros((g.OC, rows), x.dtype)  # last column: grad_bias, from the ones row
    grad_x = np.empty(x.shape, x.dtype) if with_grad_x else None
    scratch = _Scratch(x.dtype)
    for start, stop in _batch_chunks(g, rows, x.itemsize):
        n = stop - start
        col = _im2col(x[start:stop], g, with_bias, scratch)
        grad_y_chwn = scratch.array("grad_y", (g.OC, g.OH, g.OW, n))
        grad_y_chwn[...] = grad_y[start:stop].transpose(1, 2, 3, 0)
        grad_y_matrix = grad_y_chwn.reshape(g.OC, -1)
        grad_weight_matrix += grad_y_matrix @ col.T
        if with_grad_x:
            grad_x[start:stop] = _input_gradient(grad_y_matrix, weight_t, g, n, scratch)
    grad_weight = np.ascontiguousarray(grad_weight_matrix[:, :CKK]).reshape(weight.shape)
    grad_bias = grad_weight_matrix[:, CKK].copy() if with_bias else None
    return grad_x, grad_weight, grad_bias


def _input_gradient(grad_y_matrix, weight_t, g: ConvGeometry, n: int, scratch: _Scratch):
    """grad_x (n, C, H, W) view of one chunk from its grad_y (OC, OH*OW*n): columns, then col2im."""
    grad_col = scratch.array("grad_col", (g.C, g.KH, g.KW, g.OH, g.OW, n))
    np.matmul(weight_t, grad_y_matrix, out=grad_col.reshape(weight_t.shape[0], -1))
    # col2im: every offset adds its columns back onto the pixels it read.
    grad_padded = scratch.array("grad_padded", (g.C, g.H + 2 * g.PH, g.W + 2 * g.PW, n), zeroed=True)
    for ky in range(g.KH):
        for kx in range(g.KW):
            target = _window(grad_padded, g, ky, kx)
            np.add(target, grad_col[:, ky, kx], out=target)
    return grad_padded[:, g.PH: g.PH + g.H, g.PW: g.PW + g.W].transpose(3, 0, 1, 2)
