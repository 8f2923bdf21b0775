"""Softmax cross-entropy (mean over the batch), forward beside backward: dispatchers and the NumPy reference.

On the kernel devices the launchers check the label range too, which reads the labels back from
the device once per call; the captured training step (gpucnn.step) skips that read.
"""
from __future__ import annotations

import numpy as np

from gpucnn import backend, dispatch
from gpucnn.ops import check_float_array


def _check(scores, labels, scores_name: str) -> None:
    check_float_array(scores, scores_name, ndim=2)
    N, CLASSES = scores.shape
    dtype = getattr(labels, "dtype", None)
    if dtype is None or dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array, not {dtype if dtype is not None else type(labels).__name__}.")
    if tuple(labels.shape) != (N,):
        raise ValueError(f"labels must have shape ({N},) to match the batch, not {tuple(labels.shape)}.")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= CLASSES:
        raise ValueError(f"labels must lie in [0, {CLASSES}), but range over [{low}, {high}].")


def _check_forward(logits, labels) -> None:
    _check(logits, labels, "logits")


def _check_backward(probs, labels) -> None:
    _check(probs, labels, "probs")


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against integer labels; returns (loss, probs).

    logits (N, CLASSES) float, labels (N,) ints in [0, CLASSES) -> loss a 0-d array of the logits'
    dtype (use float(loss)), probs (N, CLASSES) the softmax, kept for the backward pass.
    Log-sum-exp with the row maximum subtracted, so large logits do not overflow.
    """
    return dispatch.run("loss", "softmax_cross_entropy", _check_forward, logits, labels)


def softmax_cross_entropy_backward(probs, labels):
    """Gradient of the mean loss: probs (N, CLASSES), labels (N,) -> grad_logits (N, CLASSES) = (probs - onehot) / N."""
    return dispatch.run("loss", "softmax_cross_entropy_backward", _check_backward, probs, labels)


def log_softmax(logits):
    """log softmax(logits) over the classes: (N, CLASSES) -> (N, CLASSES), on the logits' device.

    The row maximum is subtracted first, so large logits do not overflow.
    """
    xp = backend.get_array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits):
    """softmax(logits) over the classes: (N, CLASSES) -> probabilities (N, CLASSES), on the logits' device."""
    return backend.get_array_module(logits).exp(log_softmax(logits))


def softmax_cross_entropy_reference(logits, labels):
    N = logits.shape[0]
    log_probs = log_softmax(logits)
    loss = -log_probs[np.arange(N), labels].mean()
    return np.asarray(loss, dtype=logits.dtype), np.exp(log_probs)


def softmax_cross_entropy_backward_reference(probs, labels):
    N = probs.shape[0]
    grad_logits = probs.copy()
    grad_logits[np.arange(N), labels] -= 1
    grad_logits /= N
    return grad_logits
