"""Fast 2-D convolution on NumPy arrays: the signatures and results of gpucnn.ops.conv.

im2col + matmul like the reference, but in chunks that threads share:
- forward and the weight gradient cut the OUTPUT ROWS into chunks; in the CHWN layout
  the rows [oh0, oh1) of every channel are one (OC, rows*OW*N) matrix with a row stride,
  which BLAS reads (grad_y) or writes (y) in place: no transposing copy of y or grad_y;
- the input gradient cuts the input CHANNELS (or, for many channels and small kernels,
  the BATCH) into chunks, which touch disjoint input pixels.
Every chunk's columns stay near COLUMN_CHUNK_BYTES, so they live in cache.
float32 3x3 stride-1 convolutions with padding 1 (vgg's) and enough channels go through
Winograd's F(2x2, 3x3) instead (gpucnn.cpu.winograd), where it measured faster.
x and grad_y may come in any memory order; y and grad_x are returned as (N, C, H, W)
views of CHWN-ordered arrays, which the fast pooling, ReLU and the next convolution
read as long contiguous runs.
"""
from __future__ import annotations

import numpy as np

from gpucnn.cpu import winograd
from gpucnn.cpu.activation import relu_inplace
from gpucnn.cpu.threads import chwn, even_ranges, run_chunks, run_tasks, scratch, shared_here
from gpucnn.ops.conv import ConvGeometry, conv2d_geometry

COLUMN_CHUNK_BYTES = 2 << 20
# Fewest chunks an op is cut into (when it has that many rows), so that every thread has work. The input
# gradient, whose chunks write disjoint pixels (so its results do not depend on them), takes 1 when its
# chunks run on one thread anyway (inside run_tasks): there each chunk only costs NumPy calls.
MIN_CHUNKS = 4
# Below this many multiply-adds (LeNet's conv2 at batch 64: 15 M) backward runs the weight and the input
# gradient side by side, one thread each, instead of handing each one's chunks out (measured at
# batch 64: 5.0 against 5.5 ms a training step; at batch 256, 62 M, the chunks were 2-3% faster).
TASKS_BELOW = 1 << 25
# Fewest rows of an input-gradient product cut by channels (else the batch is cut instead, whose chunks copy
# and add runs of only a few images). One thread, batch 128, ResNet-20's stride-2 convolutions (16 -> 32
# channels, 28x28): 3x3 11.8 -> 6.7 ms and 1x1 2.4 -> 1.1 ms from 24 rows down to 9 (one 3x3 channel).
MIN_GRAD_ROWS = 9
# Fewest input channels of the convolution that Winograd computes, per part ("input": grad_y's OC channels).
# Set from two threads (the goal's setting; the choice cannot follow the thread count, since results must
# not), wall time, alternating in one process, quiet machine, 3x3 convolutions with C = OC, batch 64, ms
# for Winograd / im2col (forward, weight gradient, input gradient; the input gradient's im2col is the
# flipped kernel's forward): 64 ch 8x8 3.5/2.5, 2.6/2.7, 3.4/2.4; 64 ch 32x32 32/31, 30/31, 44/31; 128 ch
# 16x16 22/26, 30/26, 21/26; 256 ch 8x8 18/22, 21/28, 20/25. On one thread Winograd wins a little more
# (64 ch 32x32 forward 58/65 ms, 128 ch weight gradient 49/59), and its many small NumPy calls share out
# worse: the first measurement, on one thread, had set 64 / 128 / 64.
WINOGRAD_MIN_CHANNELS = {"forward": 128, "weight": 256, "input": 128}
# Fewest input channels from which a same-size convolution's input gradient (below Winograd's channels,
# or float64) runs as the forward convolution of grad_y with the flipped kernels (im2col + one product)
# instead of a product and col2im's KH*KW scattered adds. In-process A/B, CPU time, one thread, batch 64,
# 3x3 padding 1: 16 channels on 32x32 20.2 -> 6.6 ms, 32 on 16x16 7.6 -> 5.0, 64 on 8x8 4.7 -> 3.6.
FLIPPED_MIN_CHANNELS = 16


def conv2d_forward(x, weight, bias, stride=1, padding=0, dilation=1, relu=False):
    """y = conv2d(x, weight) + bias [then ReLU]: x (N, C, H, W) -> y (N, OC, OH, OW) (a CHWN-ordered view)."""
    g = conv2d_geometry(x, weight, bias, stride, padding, dilation)
    if _winograd(x, weight, g, "forward"):
        split = winograd.split_padded(_as_chwn(x), g.W // 2)
        return winograd.conv3x3(split, winograd.weight_transform(weight, bias), relu).transpose(3, 0, 1, 2)
    K = g.C * g.KH * g.KW
    weight_matrix = weight.reshape(g.OC, K)
    if bias is not None:  # the bias rides on a row of ones in the columns
        weight_matrix = np.concatenate([weight_matrix, bias.reshape(g.OC, 1)], axis=1)
    rows = weight_matrix.shape[1]
    padded = _padded_chwn(x, g)
    y_chwn = np.empty((g.OC, g.OH, g.OW, g.N), x.dtype)
    row_ranges = _row_chunks(g, rows, x.itemsize)

    def work(i):
        oh0, oh1 = row_ranges[i]
        col = _im2col_rows(padded, g, oh0, oh1, bias is not None)
        out = y_chwn[:, oh0:oh1].reshape(g.OC, -1)
        np.matmul(weight_matrix, col, out=out)
        if relu:
            relu_inplace(out)

    run_chunks(work, len(row_ranges), _work(g, rows, row_ranges))
    return y_chwn.transpose(3, 0, 1, 2)


def conv2d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, with_bias=True, with_grad_x=True):
    """(grad_x | None, grad_weight, grad_bias | None) of conv2d_forward, as gpucnn.ops.conv.conv2d_backward.

    with_grad_x=False skips the input gradient entirely (the first layer's case).
    """
    g = conv2d_geometry(x, weight, None, stride, padding, dilation)
    K = g.C * g.KH * g.KW
    rows = K + with_bias
    grad_y_chwn = _as_chwn(grad_y)
    wino_weight = _winograd(x, weight, g, "weight")
    wino_input = with_grad_x and _winograd(x, weight, g, "input")
    grad_split = winograd.split_padded(grad_y_chwn, g.W // 2) if wino_weight or wino_input else None
    results = {}

    def weight_gradient():
        if wino_weight:
            results["winograd"] = winograd.weight_gradient(grad_split, winograd.split_padded(_as_chwn(x), g.W // 2),
                                                           with_bias)
        else:
            results["weight"] = _weight_gradient(grad_y_chwn, _padded_chwn(x, g), g, with_bias)

    def input_gradient():
        if wino_input:
            U = winograd.weight_transform(winograd.flipped(weight))
            results["x"] = winograd.conv3x3(grad_split, U).transpose(3, 0, 1, 2)
        elif _same_size(g) and g.C >= FLIPPED_MIN_CHANNELS:  # the flipped kernel's forward convolution
            results["x"] = conv2d_forward(grad_y_chwn.transpose(3, 0, 1, 2), _flipped(weight), None, 1,
                                          (g.PH, g.PW))
        else:
            results["x"] = _input_gradient(grad_y_chwn, weight, g)

    work = g.OC * rows * g.OH * g.OW * g.N
    if with_grad_x and work < TASKS_BELOW:  # the two gradients side by side, each on one thread
        run_tasks([weight_gradient, input_gradient], work)
    else:  # one after the other, each cut into chunks for the threads
        weight_gradient()
        if with_grad_x:
            input_gradient()
    if wino_weight:
        grad_weight, grad_bias = results["winograd"]
    else:
        grad_weight_matrix = results["weight"]
        grad_weight = np.ascontiguousarray(grad_weight_matrix[:, :K]).reshape(weight.shape)
        grad_bias = grad_weight_matrix[:, K].copy() if with_bias else None
    return results.get("x"), grad_weight, grad_bias


def _same_size(g: ConvGeometry) -> bool:
    """Stride 1, no dilation and padding (K - 1) / 2: the input gradient is this same kind of convolution
    of grad_y with each kernel turned by 180 degrees and its channels swapped."""
    return (g.SH, g.SW, g.DH, g.DW) == (1, 1, 1, 1) and (2 * g.PH, 2 * g.PW) == (g.KH - 1, g.KW - 1)


def _flipped(weight):
    """(C, OC, KH, KW): the input gradient's kernels, each turned by 180 degrees."""
    return np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


def _winograd(x, weight, g: ConvGeometry, part: str) -> bool:
    """Whether `part` ("forward", "weight" or "input" gradient) of this convolution runs through Winograd."""
    channels = g.OC if part == "input" else g.C
    return channels >= WINOGRAD_MIN_CHANNELS[part] and winograd.applies(x, weight, g)


def _weight_gradient(grad_y_chwn, padded, g: ConvGeometry, with_bias: bool):
    """(OC, C*KH*KW [+1]) grad_y times the columns' transpose, summed over row chunks in chunk order."""
    rows = g.C * g.KH * g.KW + with_bias
    row_ranges = _row_chunks(g, rows, padded.itemsize)
    partial = np.empty((len(row_ranges), rows, g.OC), padded.dtype)

    def work(i):
        oh0, oh1 = row_ranges[i]
        col = _im2col_rows(padded, g, oh0, oh1, with_bias)
        # The transpose, columns times grad_y's transpose: OpenBLAS packs the long inner dimension
        # of both operands faster this way round (one thread, 16-64 channels: 1.4-3.3x grad_y times
        # the columns' transpose). np.dot, not np.matmul: for this shape (few outputs, a long inner
        # dimension) matmul kept the GIL and the two threads ran one after the other.
        np.dot(col, grad_y_chwn[:, oh0:oh1].reshape(g.OC, -1).T, out=partial[i])

    run_chunks(work, len(row_ranges), _work(g, rows, row_ranges))
    total = partial[0].copy()
    for i in range(1, len(row_ranges)):  # chunk order: the same sum on every run
        total += partial[i]
    return total.T


def _copy(target, source) -> None:
    """target[...] = source. Not np.copyto: from im2col's strided window view np.copyto kept the GIL for
    part of the copy (two threads copying: 1.26x the speed of one, against 1.73x) and took 20 against
    16 us a call (conv1's columns, batch 64)."""
    target[...] = source


def _as_chwn(a):
    """The (C, H, W, N) layout of an (N, C, H, W) array: a view when its memory has that order, else a copy."""
    view = chwn(a)
    if view is not None:
        return view
    out = np.empty(a.shape[1:] + a.shape[:1], a.dtype)
    source = a.transpose(1, 2, 3, 0)
    run_chunks(lambda i: _copy(out[i], source[i]), out.shape[0], out[0].size)
    return out


def _padded_chwn(x, g: ConvGeometry):
    """x as a zero-padded (C, HP, WP, N) array (x's own memory when it is CHWN-ordered and unpadded)."""
    if g.PH == 0 and g.PW == 0:
        return _as_chwn(x)
    HP, WP = g.H + 2 * g.PH, g.W + 2 * g.PW
    padded = np.empty((g.C, HP, WP, g.N), x.dtype)
    source = x.transpose(1, 2, 3, 0)

    def work(i):  # one channel's plane: borders zeroed, the inside copied
        plane = padded[i]
        plane[: g.PH] = 0
        plane[g.PH + g.H:] = 0
        plane[g.PH: g.PH + g.H, : g.PW] = 0
        plane[g.PH: g.PH + g.H, g.PW + g.W:] = 0
        plane[g.PH: g.PH + g.H, g.PW: g.PW + g.W] = source[i]

    if g.C == 1:  # one plane: cut its rows instead, so both threads copy
        bands = even_ranges(g.H, 4)
        padded[:, : g.PH] = 0
        padded[:, g.PH + g.H:] = 0
        padded[:, :, : g.PW] = 0
        padded[:, :, g.PW + g.W:] = 0
        run_chunks(lambda i: _copy(padded[0, g.PH + bands[i][0]: g.PH + bands[i][1], g.PW: g.PW + g.W],
                                   source[0, bands[i][0]: bands[i][1]]),
                   len(bands), x.size // len(bands))
    else:
        run_chunks(work, g.C, x.size // g.C)
    return padded


def _min_input_gradient_chunks() -> int:
    return MIN_CHUNKS if shared_here() else 1


def _row_chunks(g: ConvGeometry, rows: int, itemsize: int):
    """(oh0, oh1) ranges of output rows whose columns fit COLUMN_CHUNK_BYTES, at least MIN_CHUNKS of them."""
    per_row = rows * g.OW * g.N * itemsize
    step = max(1, min(COLUMN_CHUNK_BYTES // per_row, -(-g.OH // MIN_CHUNKS)))
    return [(start, min(start + step, g.OH)) for start in range(0, g.OH, step)]


def _work(g: ConvGeometry, rows: int, ranges) -> float:
    """Multiply-adds per chunk (how much a thread gets for one hand-over)."""
    return g.OC * rows * g.OW * g.N * (g.OH / len(ranges))


def _window(padded, g: ConvGeometry, ky: int, kx: int, oh0: int, oh1: int):
    """The (C, oh1-oh0, OW, N) view of a padded (C, HP, WP, N) array that kernel offset (ky, kx) reads."""
    top = oh0 * g.SH + ky * g.DH
    left = kx * g.DW
    return padded[:, top: top + g.SH * (oh1 - oh0 - 1) + 1: g.SH, left: left + g.SW * (g.OW - 1) + 1: g.SW]


def _windows(padded, g: ConvGeometry, oh0: int, oh1: int):
    """The (C, KH, KW, oh1-oh0, OW, N) view of a padded (C, HP, WP, N) array: every kernel offset's
    window at once, so that im2col is one copy (in C) instead of KH*KW (in Python)."""
    sC, sH, sW, sN = padded.strides
    shape = (g.C, g.KH, g.KW, oh1 - oh0, g.OW, g.N)
    strides = (sC, g.DH * sH, g.DW * sW, g.SH * sH, g.SW * sW, sN)
    if padded.flags.c_contiguous:  # a view made on its memory directly: 1 us, as_strided takes 4
        return np.ndarray(shape, padded.dtype, buffer=padded, offset=oh0 * g.SH * sH, strides=strides)
    return np.lib.stride_tricks.as_strided(padded[:, oh0 * g.SH:], shape, strides, writeable=False)


def _im2col_rows(padded, g: ConvGeometry, oh0: int, oh1: int, ones_row: bool):
    """Columns (C*KH*KW [+1], (oh1-oh0)*OW*N) of output rows [oh0, oh1): rows (c, ky, kx), columns (oh, ow, n).

    A per-thread scratch buffer; with ones_row its last row is ones (for the bias).
    """
    K = g.C * g.KH * g.KW
    col = scratch("col", (K + ones_row, oh1 - oh0, g.OW, g.N), padded.dtype)
    _copy(col[:K].reshape(g.C, g.KH, g.KW, oh1 - oh0, g.OW, g.N), _windows(padded, g, oh0, oh1))
    if ones_row:
        col[K] = 1
    return col.reshape(K + ones_row, -1)


def _input_gradient(grad_y_chwn, weight, g: ConvGeometry):
    """grad_x (N, C, H, W), a CHWN-ordered view: columns W^T grad_y, then col2im, in disjoint chunks.

    Chunks of input channels when each chunk's product still has MIN_GRAD_ROWS rows or more (in
    CHWN order grad_y is then one (OC, OH*OW*N) matrix, no copy, and every col2im add runs over
    OW*N contiguous numbers); chunks of the batch otherwise (many channels and small kernels:
    one channel's 3x3 rows would make a product too narrow for BLAS).
    """
    per_channel = g.KH * g.KW * g.OH * g.OW * g.N * weight.itemsize
    channels = max(1, min(COLUMN_CHUNK_BYTES // per_channel, -(-g.C // _min_input_gradient_chunks())))
    if channels * g.KH * g.KW >= MIN_GRAD_ROWS:
        return _input_gradient_by_channels(grad_y_chwn, weight, g, channels)
    return _input_gradient_by_batch(grad_y_chwn, weight, g)


def _col2im(grad_col, target, g: ConvGeometry) -> None:
    """target (c, HP, WP, n) += every kernel offset's columns of grad_col (c, KH, KW, OH, OW, n)."""
    for ky in range(g.KH):
        for kx in range(g.KW):
            window = _window(target, g, ky, kx, 0, g.OH)
            np.add(window, grad_col[:, ky, kx], out=window)


def _input_gradient_by_channels(grad_y_chwn, weight, g: ConvGeometry, channels: int):
    K = g.C * g.KH * g.KW
    weight_t = weight.reshape(g.OC, K).T  # (K, OC), rows (c, ky, kx)
    grad_y_matrix = grad_y_chwn.reshape(g.OC, -1)
    HP, WP = g.H + 2 * g.PH, g.W + 2 * g.PW
    padded = g.PH > 0 or g.PW > 0
    grad_x_chwn = np.empty((g.C, g.H, g.W, g.N), weight.dtype)
    channel_ranges = [(start, min(start + channels, g.C)) for start in range(0, g.C, channels)]

    def work(i):
        c0, c1 = channel_ranges[i]
        grad_col = scratch("grad_col", (c1 - c0, g.KH, g.KW, g.OH, g.OW, g.N), weight.dtype)
        np.matmul(weight_t[c0 * g.KH * g.KW: c1 * g.KH * g.KW], grad_y_matrix,
                  out=grad_col.reshape((c1 - c0) * g.KH * g.KW, -1))
        target = scratch("grad_padded", (c1 - c0, HP, WP, g.N), weight.dtype) if padded else grad_x_chwn[c0:c1]
        target.fill(0)
        _col2im(grad_col, target, g)
        if padded:
            grad_x_chwn[c0:c1] = target[:, g.PH: g.PH + g.H, g.PW: g.PW + g.W]

    run_chunks(work, len(channel_ranges), g.OC * channels * g.KH * g.KW * g.OH * g.OW * g.N)
    return grad_x_chwn.transpose(3, 0, 1, 2)


def _input_gradient_by_batch(grad_y_chwn, weight, g: ConvGeometry):
    K = g.C * g.KH * g.KW
    weight_t = weight.reshape(g.OC, K).T
    HP, WP = g.H + 2 * g.PH, g.W + 2 * g.PW
    grad_x_chwn = np.empty((g.C, g.H, g.W, g.N), weight.dtype)
    per_image = K * g.OH * g.OW * weight.itemsize
    step = max(1, min(COLUMN_CHUNK_BYTES // per_image, -(-g.N // _min_input_gradient_chunks())))
    batch_ranges = [(start, min(start + step, g.N)) for start in range(0, g.N, step)]

    def work(i):
        start, stop = batch_ranges[i]
        n = stop - start
        grad_y_part = scratch("grad_y", (g.OC, g.OH, g.OW, n), weight.dtype)
        _copy(grad_y_part, grad_y_chwn[..., start:stop])
        grad_col = scratch("grad_col", (g.C, g.KH, g.KW, g.OH, g.OW, n), weight.dtype)
        np.matmul(weight_t, grad_y_part.reshape(g.OC, -1), out=grad_col.reshape(K, -1))
        grad_padded = scratch("grad_padded", (g.C, HP, WP, n), weight.dtype)
        grad_padded.fill(0)
        _col2im(grad_col, grad_padded, g)
        grad_x_chwn[..., start:stop] = grad_padded[:, g.PH: g.PH + g.H, g.PW: g.PW + g.W]

    run_chunks(work, len(batch_ranges), g.OC * K * g.OH * g.OW * step)
    return grad_x_chwn.transpose(3, 0, 1, 2)
