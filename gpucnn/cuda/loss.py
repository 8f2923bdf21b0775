"""Launchers for the softmax cross-entropy kernels in ``kernels/loss.cu``.

Same signatures as gpucnn.ops.loss plus ``runtime`` (None: the process-wide CupyRuntime) and
``check_labels``. The code is the same for CuPy arrays on a GPU and NumPy arrays under the emulator.
"""
from __future__ import annotations

import numpy as np

from gpucnn.cuda.runtime import active_runtime, ceil_div, kernel_inout_array, kernel_matrix

KERNEL_FILE = "loss.cu"
XENT_ROWS = 8           # XENT_ROWS in kernels/loss.cu: rows (one warp each) per block
MEAN_THREADS = 256      # MEAN_THREADS in kernels/loss.cu
THREADS_PER_BLOCK = 256


def _int32_labels(rt, labels, N: int, CLASSES: int, check_labels: bool):
    """labels as a contiguous int32 array of shape (N,); with ``check_labels``, each in [0, CLASSES)."""
    if not isinstance(labels, rt.xp.ndarray):
        raise TypeError(f"labels must be a {rt.xp.__name__}.ndarray for this runtime, "
                        f"not {type(labels).__module__}.{type(labels).__name__}.")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array, not {labels.dtype.name}.")
    if tuple(labels.shape) != (N,):
        raise ValueError(f"labels must have shape ({N},) to match the batch, not {tuple(labels.shape)}.")
    if check_labels:
        # Waits for the device; pass check_labels=False where that matters (a bad label then gives NaN).
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= CLASSES:
            raise ValueError(f"labels must lie in [0, {CLASSES}), but range over [{low}, {high}].")
    return rt.xp.ascontiguousarray(labels.astype(np.int32, copy=False))


def _forward_rows(rt, logits, labels):
    """(probs (N, CLASSES), row_loss (N,)): the softmax and each row's loss, one warp per row."""
    N, CLASSES = (int(s) for s in logits.shape)
    probs = rt.empty((N, CLASSES), np.float32)
    row_loss = rt.empty((N,), np.float32)
    # writes probs and row_loss
    rt.function(KERNEL_FILE, "softmax_xent_forward")(
        (ceil_div(N, XENT_ROWS), 1, 1), (32, XENT_ROWS, 1),
        (logits, labels, probs, row_loss, np.int32(N), np.int32(CLASSES)))
    return probs, row_loss


def softmax_cross_entropy(logits, labels, *, check_labels=True, runtime=None):
    """Mean cross-entropy of softmax(logits) against integer labels; returns (loss, probs).

    logits (N, CLASSES) float32, labels (N,) ints in [0, CLASSES) -> loss a 0-d float32 array (the
    mean over the batch, summed in a fixed order), probs (N, CLASSES) the softmax, kept for the
    backward pass.
    ``check_labels=False`` skips the range check, which waits for the device; a label outside
    [0, CLASSES) then makes the loss NaN.
    """
    rt = active_runtime(runtime)
    logits = kernel_matrix(rt, logits, "logits")
    N, CLASSES = (int(s) for s in logits.shape)
    labels = _int32_labels(rt, labels, N, CLASSES, check_labels)
    probs, row_loss = _forward_rows(rt, logits, labels)
    loss = rt.empty((1,), np.float32)
    # writes loss[0]: one block sums row_loss in a fixed order and divides by N
    rt.function(KERNEL_FILE, "softmax_xent_mean")((1, 1, 1), (MEAN_THREADS, 1, 1), (row_loss, loss, np.int32(N)))
    return loss.reshape(()), probs


def softmax_cross_entropy_backward(probs, labels, *, check_labels=True, runtime=None):
    """Gradient of the mean loss: probs (N, CLASSES), labels (N,) -> grad_logits (N, CLASSES).

    grad_logits = (probs - onehot(labels)) / N.
    """
    rt = active_runtime(runtime)
    probs = kernel_matrix(rt, probs, "probs")
    N, CLASSES = (int(s) for s in probs.shape)
    labels = _int32_labels(rt, labels, N, CLASSES, check_labels)
    grad_logits = rt.empty((N, CLASSES), np.float32)
    # writes grad_logits: one thread per element
    rt.function(KERNEL_FILE, "softmax_xent_backward")(
        (ceil_div(N * CLASSES, THREADS_PER_BLOCK), 1, 1), (THREADS_PER_BLOCK, 1, 1),
        (probs, labels, grad_logits, np.int32(N), np.int32(CLASSES)))
    return grad_logits


def softmax_cross_entropy_totals(logits, labels, totals, *, runtime=None):
    """Softmax cross-entropy for a training step that keeps its sums on the device; returns probs.

    logits (N, CLASSES) float32, labels (N,) int32 (not range-checked: that would read them back),
    totals (2,) float64 updated in place: totals[0] += the sum of the rows' losses, totals[1] += the
    number of rows whose first maximal logit is the label. probs (N, CLASSES) feeds
    softmax_cross_entropy_backward.
    """
    rt = active_runtime(runtime)
    logits = kernel_matrix(rt, logits, "logits")
    N, CLASSES = (int(s) for s in logits.shape)
    labels = _int32_labels(rt, labels, N, CLASSES, check_labels=False)
    totals = kernel_inout_array(rt, totals, "totals", dtype=np.float64, ndim=1)
    if totals.shape != (2,):
        raise ValueError(f"totals must have shape (2,) (loss sum, correct count), not {tuple(totals.shape)}.")
    probs, row_loss = _forward_rows(rt, logits, labels)
    # writes totals: one block adds the batch's loss sum and correct count, in a fixed order
    rt.function(KERNEL_FILE, "softmax_xent_accumulate")(
        (1, 1, 1), (MEAN_THREADS, 1, 1), (logits, labels, row_loss, totals, np.int32(N), np.int32(CLASSES)))
    return probs
