"""Finite-difference gradient checks in float64, for tests of every op and layer.

The usual pattern: project an op's output onto fixed random weights R to get a scalar
``f = sum(op(x) * R)``; the analytic gradient of f with respect to x is the op's
backward applied to ``grad_y = R``; the numerical one perturbs x element by element.

    x = rng.standard_normal((2, 3, 5, 5))
    R = rng.standard_normal(op(x).shape)
    grad_x = op_backward(R, x)
    assert_gradient_close(lambda: float((op(x) * R).sum()), x, grad_x)
"""
from __future__ import annotations

import numpy as np


def numerical_gradient(fn, array: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences (f(a + eps) - f(a - eps)) / (2 eps) for every element of ``array``.

    fn takes no arguments, reads ``array`` (which is perturbed in place and restored)
    and returns a scalar. array must be a float64 NumPy array, so that eps=1e-6 leaves
    an error near 1e-9 relative. Returns an array of array's shape.
    """
    if not isinstance(array, np.ndarray) or array.dtype != np.float64:
        raise TypeError(f"numerical_gradient needs a float64 NumPy array, not {getattr(array, 'dtype', type(array).__name__)}.")
    if eps <= 0:
        raise ValueError(f"eps must be positive, not {eps!r}.")
    grad = np.empty_like(array)
    flat = array.reshape(-1)  # a view: writing it perturbs array itself
    if not np.shares_memory(flat, array):
        raise ValueError("numerical_gradient needs an array whose elements can be perturbed in place (contiguous).")
    grad_flat = grad.reshape(-1)
    for i in range(flat.size):
        original = flat[i]
        flat[i] = original + eps
        f_plus = float(fn())
        flat[i] = original - eps
        f_minus = float(fn())
        flat[i] = original
        grad_flat[i] = (f_plus - f_minus) / (2 * eps)
    return grad


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max(max |actual|, max |expected|, 1e-12): one number for a whole array."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"cannot compare shapes {actual.shape} and {expected.shape}.")
    scale = max(np.abs(actual).max(initial=0.0), np.abs(expected).max(initial=0.0), 1e-12)
    return float(np.abs(actual - expected).max(initial=0.0) / scale)


def assert_gradient_close(fn, array: np.ndarray, analytic, eps: float = 1e-6, rtol: float = 1e-7) -> float:
    """Assert that ``analytic`` matches the numerical gradient of fn with respect to array.

    Returns the relative error (see relative_error); raises AssertionError above rtol.
    """
    numerical = numerical_gradient(fn, array, eps)
    error = relative_error(analytic, numerical)
    if not error <= rtol:  # also catches NaN
        raise AssertionError(f"analytic and numerical gradients differ: relative error {error:.3g} > {rtol:.3g}")
    return error
