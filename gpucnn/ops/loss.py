"""Softmax cross-entropy (mean over the batch), forward beside backward; array-module generic."""
from __future__ import annotations

from gpucnn import backend
from gpucnn.ops import check_float_array


def _check_labels(labels, N: int, num_classes: int, reference) -> None:
    dtype = getattr(labels, "dtype", None)
    if dtype is None or dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array, not {dtype if dtype is not None else type(labels).__name__}.")
    if tuple(labels.shape) != (N,):
        raise ValueError(f"labels must have shape ({N},) to match the batch, not {tuple(labels.shape)}.")
    if backend.is_gpu_array(labels) != backend.is_gpu_array(reference):
        raise ValueError("labels must be on the same device as the logits/probabilities.")
    if backend.is_gpu_array(labels):
        return  # reading the range back would stall every training step on a host round trip
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), but range over [{low}, {high}].")


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against integer labels; returns (loss, probs).

    logits (N, K) float, labels (N,) ints in [0, K) -> loss a 0-d array of the logits'
    dtype (use float(loss)), probs (N, K) the softmax, kept for the backward pass.
    The label range is checked for NumPy arrays only: on the GPU it would cost a sync.
    Log-sum-exp with the row maximum subtracted, so large logits do not overflow.
    """
    check_float_array(logits, "logits", ndim=2)
    N, K = logits.shape
    _check_labels(labels, N, K, logits)
    xp = backend.get_array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[xp.arange(N), labels].mean()
    return xp.asarray(loss, dtype=logits.dtype), xp.exp(log_probs)


def softmax_cross_entropy_backward(probs, labels):
    """Gradient of the mean loss: probs (N, K), labels (N,) -> grad_logits (N, K) = (probs - onehot) / N."""
    check_float_array(probs, "probs", ndim=2)
    N, K = probs.shape
    _check_labels(labels, N, K, probs)
    xp = backend.get_array_module(probs)
    grad_logits = probs.copy()
    grad_logits[xp.arange(N), labels] -= 1
    grad_logits /= N
    return grad_logits
