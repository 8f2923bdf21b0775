"""BatchNorm1d and BatchNorm2d: PyTorch's batch normalisation, with explicit backward.

Training mode normalises each channel with the batch's mean and biased variance and moves
the running statistics toward the batch's (the running variance toward the unbiased
variance); eval mode normalises with the running statistics. ``running_mean``,
``running_var`` and ``num_batches_tracked`` are buffers: saved in ``state_dict`` and
checkpoints, never seen by the optimizer. The op updates the running statistics in place on
their device, so a recorded training step (gpucnn.step) updates them on every replay.
"""
from __future__ import annotations

import numpy as np

from gpucnn import backend, ops
from gpucnn.nn.module import Module, Parameter
from gpucnn.utils import check_int


class _BatchNorm(Module):
    """Shared parts of BatchNorm1d/2d; ``_ndims`` lists the input ranks the subclass takes."""

    _ndims: tuple = ()
    fuses_next_relu = True  # Sequential hands it a following ReLU: forward(x, relu=True)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        super().__init__()
        self.num_features = check_int(num_features, "num_features", 1)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive number, not {eps!r}.")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be a number in [0, 1], not {momentum!r} (None, PyTorch's "
                             "cumulative average, is not supported).")
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.affine = bool(affine)
        C = self.num_features
        if self.affine:
            self.weight = Parameter(np.ones(C, np.float32))
            self.bias = Parameter(np.zeros(C, np.float32))
        else:  # fixed scale 1 and shift 0 for the op: buffers of no state_dict, moved and cast by _apply
            self._identity = (np.ones(C, np.float32), np.zeros(C, np.float32))
        self.register_buffer("running_mean", np.zeros(C, np.float32))
        self.register_buffer("running_var", np.ones(C, np.float32))
        self.register_buffer("num_batches_tracked", np.zeros((), np.int64))

    def _scale_shift(self):
        """(weight, bias) arrays for the op: the parameters, or fixed ones/zeros like running_mean."""
        if self.affine:
            return self.weight.data, self.bias.data
        ones, zeros = self._identity
        like = self.running_mean
        if ones.dtype != like.dtype or backend.device_of(ones) != backend.device_of(like):
            device = backend.device_of(like)
            ones = backend.to_device(np.ones(self.num_features, like.dtype), device)
            zeros = backend.to_device(np.zeros(self.num_features, like.dtype), device)
            self._identity = (ones, zeros)
        return ones, zeros

    def forward(self, x, relu=False):
        """x (N, C, ...) -> y of the same shape, normalised per channel (batch or running statistics).

        relu=True: a following ReLU fused (max(0, y)); backward then takes the ReLU's output
        gradient and runs the ReLU's backward too.
        """
        self._check_norm_input(x)
        weight, bias = self._scale_shift()
        if self.training:
            y, mean, invstd = ops.batch_norm_forward(x, weight, bias, self.running_mean, self.running_var,
                                                     self.momentum, self.eps, relu=relu)
            self.count_batch()
            self._save(x=x, mean=mean, invstd=invstd, y=y if relu else None, output_shape=tuple(y.shape))
        else:
            y = ops.batch_norm_forward_eval(x, weight, bias, self.running_mean, self.running_var, self.eps, relu=relu)
            self._save(eval_mode=True, output_shape=tuple(y.shape))
        return y

    def count_batch(self) -> None:
        """One more training batch seen (a replayed step, which runs no Python, calls this itself)."""
        self.num_batches_tracked[...] += 1

    def backward(self, grad_output, input_grad=True):
        """grad_output (shape of y) -> grad_input; adds weight.grad and bias.grad when affine.

        Only after a training-mode forward (the gradient through the batch statistics).
        """
        self._check_grad_output(grad_output)
        if "eval_mode" in self._cache:
            raise RuntimeError(f"{self!r}: backward() after an eval-mode forward is not supported; call "
                               "model.train() before the forward whose gradient you need.")
        weight, _ = self._scale_shift()
        grad_x, grad_weight, grad_bias = ops.batch_norm_backward(grad_output, self._saved("x"), weight,
                                                                 self._saved("mean"), self._saved("invstd"),
                                                                 y=self._saved("y"))
        if self.affine:
            self.weight.accumulate_grad(grad_weight)
            self.bias.accumulate_grad(grad_bias)
        return grad_x if input_grad else None

    def _check_norm_input(self, x) -> None:
        self._check_input(x, channels=self.num_features, channels_name="features")
        if x.ndim not in self._ndims:
            raise ValueError(f"{self!r} expected a {' or '.join(f'{n}-D' for n in self._ndims)} input, "
                             f"got shape {tuple(x.shape)}.")
        if x.dtype != self.running_mean.dtype:
            raise TypeError(f"{self!r} expected {self.running_mean.dtype} input (like its running statistics), "
                            f"got {x.dtype}.")
        if backend.device_of(x) != backend.device_of(self.running_mean):
            raise ValueError(f"input is on {backend.device_of(x)} but {self!r}'s running statistics are on "
                             f"{backend.device_of(self.running_mean)}; call model.to({backend.device_of(x)!r}).")
        if self.training and x.size // x.shape[1] < 2:
            raise ValueError(f"{self!r} in training mode needs more than one value per channel, got input of "
                             f"shape {tuple(x.shape)}; use a batch of at least 2 or eval().")

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation over (N, H, W) for each channel of x (N, C, H, W), PyTorch's semantics."""

    _ndims = (4,)


class BatchNorm1d(_BatchNorm):
    """Batch normalisation over N (and L) for each feature of x (N, C) or (N, C, L), PyTorch's semantics."""

    _ndims = (2, 3)
