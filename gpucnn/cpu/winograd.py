"""3x3 stride-1 convolutions by Winograd's F(2x2, 3x3): 16 products where im2col needs 36 multiplies per pair.

Each 2x2 block of outputs (a "tile") comes from a 4x4 block of the padded input. With the fixed
matrices below, a tile's output is

    Y = A^T [ U (*) V ] A,   U = G g G^T (the weight, 4x4 per channel pair),   V = B^T d B (the input)

where (*) sums over input channels: at each of the 16 positions of the 4x4 transform it is one
matrix product (OC, C) x (C, tiles), 2.25x fewer multiply-adds than the direct convolution. The
transforms are additions and subtractions on whole (C, tiles) planes, which NumPy runs as long
contiguous loops in the CHWN layout (each tile's N images are one contiguous run).

The two gradients are the transposes of the same linear maps:
- grad_x is this convolution of grad_y with the weight flipped and its channels swapped;
- grad_g = G^T [ sum over tiles  (A grad_Y A^T) V^T ] G: 16 products (OC, tiles) x (tiles, C),
  summed over chunks of tiles in chunk order.

Float32 error: every transform coefficient is 0, +-1 or +-1/2 (the weight's G) and V sums at most 4
inputs, so the rounding is that of the direct sum times a small constant, but over a tile's 4x4 input
patch rather than each output's 3x3 window. Stated bound, tested against the float64 reference
(tests/test_winograd.py): |error| <= 1e-6 x the largest sum of |x| |w| over the windows of the tile's
four outputs (forward; grad_x likewise with grad_y), x the sum of |grad_y| |x| over the kernel's nine
taps (grad_weight), x the sum of |grad_y| (grad_bias). Measured worst on those cases and on vgg-small's
channel counts: 1.3e-7, about one float32 epsilon; im2col + BLAS errs about half as much.

Chunks are bands of tile rows (and, when one tile row of a large batch is too big, slices of the
batch) fixed by the shapes alone; each writes its own outputs or its own partial sum, so results
do not depend on the number of threads. Only float32 uses this path: float64 keeps im2col (its
tests ask for 1e-11, which this summation order does not promise).
"""
from __future__ import annotations

import numpy as np

from gpucnn.cpu.threads import run_chunks, scratch

# Bytes of transformed input (16 x C x tiles floats) per chunk: the chunk's V and M stay in L2/L3.
CHUNK_BYTES = 6 << 20
MIN_CHUNKS = 4                 # so that both threads get work
BIAS_POSITION = 5              # position (1, 1) of the 4x4 transform reaches all four outputs with weight 1
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
# A with its last column's sign dropped (the weight gradient's transform skips that negation and
# folds it into G here, an exact change of sign).
_G_SIGNED = _G * np.array([1.0, 1.0, 1.0, -1.0])[:, None]


def applies(x, weight, g) -> bool:
    """Whether this path computes the convolution of geometry g: float32, 3x3, stride 1, padding 1, no
    dilation, even height and width (whole 2x2 tiles)."""
    return (x.dtype == np.float32 and weight.dtype == np.float32 and (g.KH, g.KW, g.SH, g.SW) == (3, 3, 1, 1)
            and (g.PH, g.PW, g.DH, g.DW) == (1, 1, 1, 1) and g.H % 2 == 0 and g.W % 2 == 0)


def weight_transform(weight, bias=None):
    """U (16, OC, C [+1]) = G g G^T at every channel pair; with a bias, its last column holds the bias
    at BIAS_POSITION and zeros elsewhere (the input side supplies a matching row of ones)."""
    OC, C = weight.shape[:2]
    U = np.empty((16, OC, C + (bias is not None)), weight.dtype)
    U[:, :, :C] = _two_sided(_U_MAP, weight.reshape(OC * C, 9).T).reshape(16, OC, C)
    if bias is not None:
        U[:, :, C] = 0
        U[BIAS_POSITION, :, C] = bias
    return U


def _two_sided(kron_map, columns):
    """kron_map (16 or 9 rows) @ columns, in the columns' dtype, with BLAS at one thread (run_chunks'
    serial path), so that the bits do not depend on the thread count. One float32 product took 1.2 ms
    for 256 x 256 kernels, against 6.9 ms through float64."""
    out = {}

    def work(_):
        out["product"] = kron_map.astype(columns.dtype) @ columns
    run_chunks(work, 1)
    return out["product"]


def split_padded(a_chwn, TW: int):
    """The zero-padded (pad 1) input with even and odd columns apart: (C, H+2, 2, TW+1, N), where
    [c, h, p, k] holds padded column 2k+p. Every 4x4 tile's columns are then whole runs of TW*N numbers."""
    C, H, W, N = a_chwn.shape
    split = np.empty((C, H + 2, 2, TW + 1, N), a_chwn.dtype)
    split[:, 0] = 0
    split[:, H + 1] = 0
    split[:, 1: H + 1, 0, 0] = 0
    split[:, 1: H + 1, 1, TW] = 0

    def work(i):  # input column w sits at padded column w + 1
        split[i, 1: H + 1, 1, :TW] = a_chwn[i, :, 0::2]
        split[i, 1: H + 1, 0, 1:] = a_chwn[i, :, 1::2]

    run_chunks(work, C, H * W * N)
    return split


def _kron_map(G):
    """(16, 9): row (i, j), column (k, l) holds G[i, k] G[j, l], so that G g G^T of every 3x3 kernel g is one
    product with the kernels as columns (one BLAS call; einsum's loops took tens of ms at 256 x 256 channels).
    Its entries (products of 0, +-1/2, +-1) are exact in float32."""
    return np.kron(G, G)


_U_MAP, _GRAD_MAP = _kron_map(_G), _kron_map(_G_SIGNED)


def chunks(TH: int, TW: int, N: int, channels: int, groups: int = 1):
    """(th0, th1, n0, n1): bands of tile rows (and slices of the batch when one tile row is too big),
    from the shapes alone; a chunk holds 16 / groups positions of `channels` planes."""
    per_tile_row = 16 // groups * channels * TW * N * 4
    rows = max(1, min(CHUNK_BYTES // per_tile_row, -(-TH // max(1, MIN_CHUNKS // groups))))
    parts = max(1, per_tile_row // CHUNK_BYTES) if rows == 1 else 1
    n_bounds = [N * i // parts for i in range(parts + 1)]
    return [(th, min(th + rows, TH), n_bounds[i], n_bounds[i + 1])
            for th in range(0, TH, rows) for i in range(parts)]


def _tile_rows(split, chunk, i: int, t) -> None:
    """t (C, tb, 2, TW+1, n) = row i of B^T d for every tile row of the chunk (row i of B^T is
    [1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0] or [0, 1, 0, -1])."""
    th0, th1, n0, n1 = chunk
    tb = th1 - th0
    rows = split[:, 2 * th0: 2 * th1 + 2, :, :, n0:n1]

    def d(k):
        return rows[:, k: k + 2 * tb: 2]
    if i == 0:
        np.subtract(d(0), d(2), out=t)
    elif i == 1:
        np.add(d(1), d(2), out=t)
    elif i == 2:
        np.subtract(d(2), d(1), out=t)
    else:
        np.subtract(d(1), d(3), out=t)


def input_transform(split, chunk, V, i: int) -> None:
    """V (4, C, tb, TW, n) = positions 4i..4i+3 of B^T d B of every 4x4 tile of the chunk (from split_padded)."""
    th0, th1, n0, n1 = chunk
    C, _, _, TW1, _ = split.shape
    TW = TW1 - 1
    t = scratch("winograd_rows", (C, th1 - th0, 2, TW1, n1 - n0), split.dtype)
    _tile_rows(split, chunk, i, t)
    even, odd = t[:, :, 0], t[:, :, 1]
    c0, c1, c2, c3 = even[:, :, :TW], odd[:, :, :TW], even[:, :, 1:], odd[:, :, 1:]
    np.subtract(c0, c2, out=V[0])
    np.add(c1, c2, out=V[1])
    np.subtract(c2, c1, out=V[2])
    np.subtract(c1, c3, out=V[3])


def output_transform(M, y_band, relu: bool) -> None:
    """y_band (OC, 2 tb, W, n) = A^T M A of every tile; M (16, OC, tb, TW, n)."""
    OC, tb, TW, n = M.shape[1:]
    s = scratch("winograd_s", (2, 4, OC, tb, TW, n), M.dtype)
    for j in range(4):
        np.add(M[j], M[4 + j], out=s[0, j])
        s[0, j] += M[8 + j]
        np.subtract(M[4 + j], M[8 + j], out=s[1, j])
        s[1, j] -= M[12 + j]
    for a in range(2):
        left, right = y_band[:, a::2, 0::2], y_band[:, a::2, 1::2]
        np.add(s[a, 0], s[a, 1], out=left)
        left += s[a, 2]
        np.subtract(s[a, 1], s[a, 2], out=right)
        right -= s[a, 3]
        if relu:
            np.maximum(left, 0, out=left)
            np.maximum(right, 0, out=right)


def conv3x3(split, U, relu: bool = False):
    """y (OC, H, W, N) = the convolution whose transformed weight is U (from weight_transform) of the
    input from split_padded; with a bias column in U, the bias is added."""
    C, HP, _, TW1, N = split.shape
    OC, C1 = U.shape[1:]
    TH, TW = (HP - 2) // 2, TW1 - 1
    y = np.empty((OC, HP - 2, 2 * TW, N), split.dtype)
    parts = chunks(TH, TW, N, max(C1, OC))

    def work(k):
        th0, th1, n0, n1 = chunk = parts[k]
        tiles = (th1 - th0) * TW * (n1 - n0)
        V = scratch("winograd_v", (16, C1, th1 - th0, TW, n1 - n0), split.dtype)
        for i in range(4):
            input_transform(split, chunk, V[4 * i: 4 * i + 4, :C], i)
        if C1 > C:  # the bias row: ones at BIAS_POSITION, zeros elsewhere
            V[:, C] = 0
            V[BIAS_POSITION, C] = 1
        M = scratch("winograd_m", (16, OC, th1 - th0, TW, n1 - n0), split.dtype)
        np.matmul(U, V.reshape(16, C1, tiles), out=M.reshape(16, OC, tiles))
        output_transform(M, y[:, 2 * th0: 2 * th1, :, n0:n1], relu)

    run_chunks(work, len(parts), 16 * OC * C1 * TW * N * (TH / len(parts)))
    return y


def grad_transform(grad_split, chunk, dM, i: int) -> None:
    """dM (4, OC, tb, TW, n) = row i of A grad_Y A^T for every 2x2 output tile of the chunk, with the last
    row's and column's negation left out (_G_SIGNED puts it back). grad_split: grad_y by split_padded."""
    th0, th1, n0, n1 = chunk
    OC, _, _, TW1, _ = grad_split.shape
    band = grad_split[:, 1 + 2 * th0: 1 + 2 * th1, :, :, n0:n1]
    top, bottom = band[:, 0::2], band[:, 1::2]               # (OC, tb, 2, TW+1, n)
    if i in (1, 2):
        row = scratch("winograd_grad_row", top.shape, grad_split.dtype)
        (np.add if i == 1 else np.subtract)(top, bottom, out=row)
    else:
        row = top if i == 0 else bottom
    left, right = row[:, :, 1, : TW1 - 1], row[:, :, 0, 1:]   # output columns 2 tw and 2 tw + 1
    dM[0][...] = left
    np.add(left, right, out=dM[1])
    np.subtract(left, right, out=dM[2])
    dM[3][...] = right


def weight_gradient(grad_split, split, with_bias: bool):
    """(grad_weight (OC, C, 3, 3), grad_bias (OC,) | None) from grad_y and the input, both by split_padded.

    Chunks are (row i of the transform, band of tiles): each owns 4 of the 16 products, summed over
    the bands in band order."""
    C, HP, _, TW1, N = split.shape
    OC = grad_split.shape[0]
    C1 = C + with_bias
    TH, TW = (HP - 2) // 2, TW1 - 1
    bands = chunks(TH, TW, N, max(C1, OC), groups=4)
    partial = np.empty((len(bands), 16, OC, C1), split.dtype)

    def work(k):
        i, band = divmod(k, len(bands))
        th0, th1, n0, n1 = chunk = bands[band]
        tiles = (th1 - th0) * TW * (n1 - n0)
        V = scratch("winograd_v", (4, C1, th1 - th0, TW, n1 - n0), split.dtype)
        input_transform(split, chunk, V[:, :C], i)
        if with_bias:
            V[:, C] = 1  # only BIAS_POSITION's column is read back
        dM = scratch("winograd_m", (4, OC, th1 - th0, TW, n1 - n0), split.dtype)
        grad_transform(grad_split, chunk, dM, i)
        np.matmul(dM.reshape(4, OC, tiles), V.reshape(4, C1, tiles).transpose(0, 2, 1),
                  out=partial[band, 4 * i: 4 * i + 4])

    run_chunks(work, 4 * len(bands), 4 * OC * C1 * TW * N * (TH / len(bands)))
    total = partial[0].copy()
    for band in range(1, len(bands)):  # band order: the same sum on every run
        total += partial[band]
    grad_4x4 = np.ascontiguousarray(total[:, :, :C]).reshape(16, OC * C)
    grad_weight = np.ascontiguousarray(_two_sided(_GRAD_MAP.T, grad_4x4).T).reshape(OC, C, 3, 3)
    grad_bias = total[BIAS_POSITION, :, C].copy() if with_bias else None
    return grad_weight, grad_bias


def flipped(weight):
    """The weight of the input gradient's convolution: (C, OC, 3, 3), each kernel turned by 180 degrees."""
    return np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
