"""The training step on a kernel device, built once and replayed: forward, loss, backward, update.

``TrainStep(model, optimizer, batch_size)`` is made once per (model, optimizer, batch size) for a
model on the ``"gpu"`` or the ``"emulator"``. Each call copies the batch into the step's static
input buffers and runs the step:

- the first call runs it eagerly and plans it: every buffer it touches is allocated then and held
  by the step (gpucnn.cuda.graph.StepRuntime);
- with ``graph=True`` the second call records it (CuPy stream capture into a CUDA graph on the
  GPU; the launch list on the emulator, where recording refuses any allocation, host read,
  synchronisation or foreign op) and every call from then on replays the recording;
- with ``graph=False`` every call runs the Python code again on the held buffers (eager).

Only gpucnn's kernels run inside: the layers' (through gpucnn.dispatch), the loss and its sums
(kernels/loss.cu), gradient accumulation and zeroing (elementwise.cu) and the fused optimizer
(optim.cu). BatchNorm's running statistics are updated in place on the device by its kernels, so
replays update them too. The loss sum and the correct count accumulate on the device in ``sums``; the
learning rate and Adam's step count live on the device, so replays follow a scheduler. Both
modes launch the same kernels in the same order, so they give bitwise identical weights.
"""
from __future__ import annotations

import contextlib

import numpy as np

from gpucnn import backend, nn
from gpucnn.cuda import loss as cuda_loss
from gpucnn.cuda.graph import StepRuntime
from gpucnn.cuda.optim import fused
from gpucnn.cuda.runtime import device_runtime
from gpucnn.utils import check_int


class TrainStep:
    """One softmax cross-entropy training step of ``model`` with ``optimizer`` at ``batch_size``.

    model: a gpucnn.nn.Module on "gpu" or "emulator" taking (B, C, H, W) float32; optimizer: a
    gpucnn.optim SGD/Adam/AdamW or a gpucnn.cuda.optim fused optimizer over the model's
    parameters (made fused here; ``self.optimizer`` is the one to keep using). ``sums``: an
    optional (2,) float64 device array (loss sum, correct count) to accumulate into, shared by
    several steps (e.g. the one for a short last batch); by default the step has its own.
    """

    def __init__(self, model, optimizer, batch_size: int, graph: bool = True, sums=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a gpucnn.nn.Module, not {type(model).__name__}.")
        self.device = model.device
        if self.device not in backend.KERNEL_DEVICES:
            raise ValueError(f"a TrainStep runs on a kernel device (gpu or emulator), but the model is on the "
                             f"{self.device}; call model.to('gpu') or model.to('emulator') first.")
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.graph = bool(graph)
        if self.graph:
            dropout = [name for name, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
            if dropout:
                raise ValueError(f"a captured step cannot hold Dropout ({dropout[0]}): its mask is drawn on the "
                                 "host every step; use graph=False.")
        self.model = model
        self.optimizer = fused(optimizer)
        base = device_runtime(self.device)
        self.runtime = StepRuntime(base, self.device)
        input_shape = getattr(model, "input_shape", None)
        self._x = None if input_shape is None else base.empty((self.batch_size, *input_shape), np.float32)
        self._y = base.empty((self.batch_size,), np.int32)
        self.sums = base.zeros((2,), np.float64) if sums is None else sums
        self.recorded = False

    def __call__(self, x, y) -> None:
        """One step on x (B, C, H, W) float32 and y (B,) int labels, both on the model's device."""
        self._check_batch(x, y)
        if self._x is None:
            self._x = device_runtime(self.device).empty(tuple(x.shape), np.float32)
        with self._on_stream():
            self.optimizer.sync_lr()  # a scheduler may have changed it; replays read it from the device
            self._x[...] = x  # device-to-device copies into the static inputs, outside the graph
            self._y[...] = y
            if not self.runtime.planned:
                self.runtime.run(self._body, "plan")
            elif not self.graph:
                self.runtime.run(self._body, "reuse")
            else:
                if not self.recorded:
                    self.runtime.run(self._body, "record")  # its Python counted this batch in BatchNorm
                    self.recorded = True
                    self.runtime.replay()
                else:
                    self.runtime.replay()
                    self._count_replayed_batch()

    def _count_replayed_batch(self) -> None:
        """A replay runs no Python: each training BatchNorm's batch counter (a host number) is bumped here.

        Its running statistics were updated on the device by the replayed kernels themselves.
        """
        for module in self.model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.training:
                module.count_batch()

    def _body(self) -> None:
        model, optimizer = self.model, self.optimizer
        optimizer.zero_grad(set_to_none=True)  # backward writes the gradients into the flat buffer
        logits = model(self._x)
        rt = self.runtime
        probs = cuda_loss.softmax_cross_entropy_totals(logits, self._y, self.sums, runtime=rt)
        grad_logits = cuda_loss.softmax_cross_entropy_backward(probs, self._y, check_labels=False, runtime=rt)
        model.backward(grad_logits, input_grad=False)
        optimizer.step()

    def totals(self) -> tuple[float, int]:
        """(loss sum, correct count) accumulated since the last reset (reads the device)."""
        with self._on_stream():
            loss_sum, correct = (float(v) for v in backend.to_numpy(self.sums))
        return loss_sum, int(round(correct))

    def reset_totals(self, loss_sum: float = 0.0, correct: int = 0) -> None:
        """Set the device sums (0 by default; a resumed epoch's partial sums otherwise)."""
        with self._on_stream():
            self.sums[...] = backend.to_device(np.array([loss_sum, correct], np.float64), self.device)

    def _check_batch(self, x, y) -> None:
        for name, array in (("x", x), ("y", y)):
            if backend.device_of(array) != self.device:
                raise ValueError(f"{name} is on the {backend.device_of(array)} but the step runs on the "
                                 f"{self.device}; move the batch there first.")
        if x.ndim != 4 or x.dtype != np.float32 or x.shape[0] != self.batch_size:
            raise ValueError(f"x must be float32 of shape ({self.batch_size}, C, H, W) for this step, not "
                             f"{x.dtype} {tuple(x.shape)}.")
        if self._x is not None and tuple(x.shape) != tuple(self._x.shape):
            raise ValueError(f"x must have shape {tuple(self._x.shape)} for this step, not {tuple(x.shape)}.")
        if y.ndim != 1 or y.shape[0] != self.batch_size or y.dtype.kind not in "iu":
            raise ValueError(f"y must be integer labels of shape ({self.batch_size},), not {y.dtype} {tuple(y.shape)}.")

    def _on_stream(self):
        return self.runtime.stream if self.device == "gpu" else contextlib.nullcontext()
