"""Fast ReLU on NumPy arrays: the signatures and results of gpucnn.ops.activation's relu functions.

Both keep their input's memory order (CHWN stays CHWN) and work on it as one flat run,
in chunks the threads share. The other activations use the reference.
"""
from __future__ import annotations

import numpy as np

from gpucnn.cpu.threads import even_ranges, run_chunks

# Elements per chunk: large enough to hide the hand-over, small enough to share out.
CHUNK_ELEMENTS = 1 << 17
_ZERO_ROWS = {}


def _zero_row(length: int, dtype) -> np.ndarray:
    """A read-only row of zeros: np.maximum against it runs about twice as fast as against a scalar 0."""
    key = (length, np.dtype(dtype))
    row = _ZERO_ROWS.get(key)
    if row is None:
        row = _ZERO_ROWS[key] = np.zeros(length, dtype)
        row.flags.writeable = False
    return row


def relu_inplace(a) -> None:
    """a = max(a, 0) for a 2-D array with contiguous rows; NaN stays NaN."""
    np.maximum(a, _zero_row(a.shape[-1], a.dtype), out=a)


def _flat_in_memory_order(a):
    """(flat view of a's memory, axes order) when a is a permuted view of contiguous memory, else (None, None)."""
    order = sorted(range(a.ndim), key=lambda axis: -a.strides[axis])
    view = a.transpose(order)
    if not view.flags.c_contiguous:
        return None, None
    return view.reshape(-1), order


def _like(a, order):
    """An empty array shaped like a whose memory follows the axes order `order` (as a's does)."""
    shape = tuple(a.shape[axis] for axis in order)
    out = np.empty(shape, a.dtype)
    return out, out.transpose(np.argsort(order))


def _elementwise(a, b, body):
    """out with a's shape and memory order; body(a_part, b_part|None, out_part) on flat chunks of it."""
    a_flat, order = _flat_in_memory_order(a)
    if a_flat is None:
        a = np.ascontiguousarray(a)
        a_flat, order = a.reshape(-1), list(range(a.ndim))
    b_flat = None
    if b is not None:
        b_flat = b.transpose(order)
        b_flat = b_flat.reshape(-1) if b_flat.flags.c_contiguous else np.ascontiguousarray(b_flat).reshape(-1)
    out_memory, out = _like(a, order)
    out_flat = out_memory.reshape(-1)
    ranges = even_ranges(a_flat.size, max(1, a_flat.size // CHUNK_ELEMENTS))

    def work(i):
        start, stop = ranges[i]
        body(a_flat[start:stop], None if b_flat is None else b_flat[start:stop], out_flat[start:stop])

    run_chunks(work, len(ranges), a_flat.size / len(ranges))
    return out


def relu_forward(x):
    """y = max(x, 0), any shape, in x's memory order; NaN stays NaN."""
    if x.size == 0:
        return np.maximum(x, 0)

    def body(x_part, _, y_part):
        np.maximum(x_part, _zero_row(x_part.size, x_part.dtype), out=y_part)

    return _elementwise(x, None, body)


def relu_backward(grad_y, y):
    """grad_x = grad_y * (y > 0), in y's memory order; a NaN in grad_y stays NaN where y <= 0."""
    if y.size == 0:
        return grad_y * (y > 0)

    def body(y_part, grad_y_part, grad_x_part):
        np.multiply(grad_y_part, np.greater(y_part, 0).view(np.uint8), out=grad_x_part)

    return _elementwise(y, grad_y, body)
