"""The training loop: Trainer (fit, evaluate, train_step), metrics log and checkpoints.

Data live on the training device for the whole run: ``fit`` copies the
normalised images and labels there once and gathers every batch by index on
the device. A step makes no host round trip: loss and correct counts are summed
on the device and read back only when the progress bar refreshes (every
``REFRESH_STEPS`` steps) and at the end of an epoch.

Files written to ``out_dir`` (when given):

- ``metrics.jsonl``: one JSON object per epoch (epoch, train_loss, train_acc,
  test_loss, test_acc, lr, images_per_s, seconds), each line flushed and fsynced;
- ``metrics.csv``: the same records as a table, rewritten after every line;
- ``checkpoint.npz``: the latest state, after every epoch and on Ctrl-C;
- ``best.npz``: the epoch with the best watched metric so far (``gpucnn.watch``:
  the highest accuracy, or ``monitor="loss"`` the lowest loss, of the validation
  split when ``fit`` has one, else of the test split).

Early stopping: ``fit(..., patience=N)`` stops after N epochs in a row without
a better watched metric (``trainer.stopped_early``); a ReduceLROnPlateau
scheduler steps on the same metric.

Resuming (``fit(resume=path)``) continues exactly where the checkpoint stopped,
at an epoch boundary or in the middle of an epoch: the batch order is a
function of (seed, epoch), and the checkpoint holds the weights, optimizer and
scheduler state, the Dropout generators and the partial epoch sums, so on the
CPU the final weights equal an uninterrupted run's bit for bit.

Ctrl-C and SIGTERM: the first SIGINT or SIGTERM during ``fit`` asks the loop to
stop after the current step; it writes ``checkpoint.npz`` (mid-epoch, resumable
exactly) and returns with ``trainer.interrupted`` set (``trainer.stop_signal``
says which). A second one interrupts at once without saving. While ``fit`` runs
the trainer owns ``out_dir`` (``gpucnn.runfolder``); a file it cannot write (a
full disk) stops it with a TrainingError naming the file.

Data-parallel (``Trainer(comm=distributed.init(device))`` on every rank of an
MPI job, see ``gpucnn.distributed``): rank 0's weights are broadcast at the
start, each step averages the gradients over the ranks, the epoch sums are
reduced over the ranks at every refresh (with any rank's stop request), and
only rank 0 writes the files above and shows progress.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm  # a widget in Jupyter, text in a terminal

from gpucnn import backend, distributed, runfolder
from gpucnn.checkpoint import CheckpointError, check_resumable, load_checkpoint, rule_name, save_checkpoint
from gpucnn.cpu import optim as cpu_optim
from gpucnn.cpu import split
from gpucnn.cuda import optim as cuda_optim
from gpucnn.data import Augment, BatchIterator
from gpucnn.grad_mode import no_grad
from gpucnn.metrics import METRICS_FILE, append_metrics, trim_metrics
from gpucnn.nn import Module
from gpucnn.ops import softmax_cross_entropy, softmax_cross_entropy_backward
from gpucnn.step import TrainStep
from gpucnn.utils import check_int
from gpucnn.watch import Watch

CHECKPOINT_FILE = "checkpoint.npz"
BEST_FILE = "best.npz"
REFRESH_STEPS = 10  # read the device-side metrics back every this many steps
EVAL_BATCH_SIZE = 500


class TrainingError(RuntimeError):
    """Training cannot go on: the loss became NaN or infinite, or memory ran out."""


def _check_data(data, name: str):
    """Validate ``(images (N, C, H, W) float, labels (N,) int)`` and return the pair."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{name} must be a pair (images, labels), not {type(data).__name__}.")
    images, labels = data
    for part, array in (("images", images), ("labels", labels)):
        if not (backend.is_array(array)):
            raise TypeError(f"{name} {part} must be a NumPy or CuPy array, not {type(array).__name__}.")
    if images.ndim != 4:
        raise ValueError(f"{name} images must have shape (N, C, H, W), not {tuple(images.shape)}.")
    if images.dtype.kind != "f":
        raise TypeError(f"{name} images must be float (normalised), not {images.dtype}.")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{name} labels must be integers of shape (N,), not {labels.dtype} {tuple(labels.shape)}.")
    if len(images) != len(labels):
        raise ValueError(f"{name} has {len(images)} images but {len(labels)} labels.")
    if len(images) == 0:
        raise ValueError(f"{name} is empty.")
    # Checked once per call here, not in every layer: layers let NaN propagate (see docs/faults.md).
    finite = backend.get_array_module(images).isfinite(images).all(axis=(1, 2, 3))
    if not bool(finite.all()):
        bad = np.flatnonzero(~backend.to_numpy(finite))
        raise ValueError(f"{name} images hold NaN or infinite values ({len(bad)} of {len(images)} images, "
                         f"the first at index {int(bad[0])}); clean the data before training.")
    return images, labels


@dataclass
class EpochSums:
    """What one epoch has added up so far (a partial epoch in a mid-epoch checkpoint).

    ``loss`` (sum of per-image losses) and ``correct`` are 0-d float64 / int64 arrays
    on the training device, so a step adds to them without a host round trip;
    ``seen`` images, ``steps`` and ``seconds`` are host numbers. ``synced`` holds
    (loss, correct, seen) as every rank had them at the last synchronisation
    (distributed runs); ``stopped`` says the epoch's loop ended on a stop request.
    """
    loss: Any
    correct: Any
    seen: int = 0
    steps: int = 0
    seconds: float = 0.0
    stopped: bool = False
    synced: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @classmethod
    def start(cls, xp, partial: dict | None = None) -> "EpochSums":
        """Zero sums, or those of a checkpoint's partial epoch (``to_partial``'s dict)."""
        if partial is None:
            return cls(xp.zeros((), dtype=np.float64), xp.zeros((), dtype=np.int64))
        loss, correct, seen = float(partial["loss"]), int(partial["correct"]), int(partial["seen"])
        return cls(xp.asarray(loss, dtype=np.float64), xp.asarray(correct, dtype=np.int64), seen,
                   int(partial["steps"]), float(partial["seconds"]), synced=np.array([loss, correct, seen], float))

    def to_partial(self) -> dict:
        """The host dict a mid-epoch checkpoint stores (its format predates this class)."""
        return {"loss": backend.to_numpy(self.loss), "correct": backend.to_numpy(self.correct),
                "seen": self.seen, "steps": self.steps, "seconds": self.seconds}

    def host_totals(self) -> np.ndarray:
        """(loss, correct, seen) as float64 on the host (one device read)."""
        return np.array([float(self.loss), int(self.correct), self.seen], dtype=np.float64)


# Ctrl-C; what Slurm, `docker stop` and `timeout` send; a closed terminal or a dropped ssh session (SIGHUP,
# left ignored under nohup).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class _StopRequest:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM only sets ``requested`` (and ``signal``, the
    one that came); a second one stops at once: KeyboardInterrupt for Ctrl-C, SystemExit(128 + signal) for
    SIGTERM (143) and SIGHUP (129).

    Signal handlers can only be installed from the main thread; elsewhere the
    signals keep their default behaviour (nothing saved).
    """

    def __init__(self):
        self.requested = False
        self.signal = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:  # the second signal: stop now, unsaved (SIGTERM with its usual status, 143)
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.requested = True
        self.signal = signal.Signals(signum)
        try:  # after SIGHUP the terminal may be gone: the checkpoint matters, this line does not
            if signum == signal.SIGINT:
                tqdm.write("interrupt: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")
            else:
                tqdm.write(f"{self.signal.name}: stopping after this step and saving a checkpoint")
        except OSError:
            pass

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signum == getattr(signal, "SIGHUP", None) and signal.getsignal(signum) == signal.SIG_IGN:
                    continue  # nohup: the user asked the run to outlive the terminal
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        return False


def describe_epoch(record: dict, epochs: int) -> str:
    """One console line for an epoch's metrics record."""
    val = f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.2%}  " if "val_loss" in record else ""
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} "
            f"acc {record['train_acc']:.2%}  {val}test loss {record['test_loss']:.4f} acc {record['test_acc']:.2%}  "
            f"lr {record['lr']:.3g}  {record['images_per_s']:,.0f} img/s  {record['seconds']:.1f} s")


def evaluate(model, images, labels, batch_size: int = EVAL_BATCH_SIZE, return_predictions: bool = False) -> dict:
    """Mean softmax cross-entropy loss and accuracy (a fraction in [0, 1]) of ``model``.

    images (N, C, H, W) float and labels (N,) int on the model's device. With
    ``return_predictions`` the dict also holds "predictions": the predicted classes (N,)
    int64 on the host, for gpucnn.metrics.confusion_matrix and per_class_accuracy.
    Batches run in order in eval mode and under no_grad(); the previous mode is restored.
    The sums stay on the device and are read back once.
    """
    images, labels = _check_data((images, labels), "evaluation data")
    batch_size = check_int(batch_size, "batch_size", 1)
    xp = backend.get_array_module(images)
    was_training = model.training
    model.eval()
    try:
        loss_sum = xp.zeros((), dtype=np.float64)
        correct = xp.zeros((), dtype=np.int64)
        predicted = []
        with no_grad():
            for start in range(0, len(images), batch_size):
                x, y = images[start:start + batch_size], labels[start:start + batch_size]
                logits = model(x)
                loss, _ = softmax_cross_entropy(logits, y)
                loss_sum += loss * len(y)
                classes = logits.argmax(axis=1)
                correct += (classes == y).sum()
                if return_predictions:
                    predicted.append(classes)
    finally:
        model.train(was_training)
    n = len(images)
    result = {"loss": float(loss_sum) / n, "accuracy": int(correct) / n}
    if return_predictions:
        result["predictions"] = backend.to_numpy(xp.concatenate(predicted)).astype(np.int64, copy=False)
    return result


class Trainer:
    """Trains a classifier with softmax cross-entropy.

    ``model`` maps float images (N, C, H, W) to logits (N, classes) and has
    ``backward``; ``optimizer`` (over the model's parameters) has ``step``,
    ``zero_grad`` and ``state_dict``/``load_state_dict``; ``scheduler`` (optional)
    has ``step`` once per epoch and the same state methods. ``device`` is
    ``"cpu"``, ``"gpu"`` or ``"auto"``; the model is moved there. ``out_dir``
    (optional) receives metrics and checkpoints; ``seed`` fixes the batch order;
    ``config`` is a JSON-able dict stored in checkpoints (dataset, lr, ...), to
    which the trainer adds the model's ``config``, the batch size and the seed.

    ``comm`` (optional) is a ``gpucnn.distributed`` communicator, e.g.
    ``distributed.init(device)`` in every rank of ``mpirun -n N``: ``fit`` then
    trains data-parallel (``batch_size`` per rank, gradients averaged every
    step, metrics over all ranks, files and progress from rank 0 only). None: one
    process, as without ``gpucnn.distributed``.

    ``augment`` (optional, one process only) is a ``gpucnn.data.Augment``: each training batch
    is cropped and flipped at random, reproducibly from the seed (see gpucnn.data.augment); the
    checkpoint records it and a resumed run must use the same.
    """

    def __init__(self, model, optimizer, scheduler=None, device="cpu", out_dir=None, seed=0, config=None,
                 comm=None, graph=None, augment=None):
        if not isinstance(model, Module):
            raise TypeError(f"model must be a gpucnn.nn.Module, not {type(model).__name__}.")
        for name, obj, methods in (("optimizer", optimizer, ("step", "zero_grad", "state_dict", "load_state_dict")),
                                   ("scheduler", scheduler, ("step", "state_dict", "load_state_dict"))):
            if obj is None and name == "scheduler":
                continue
            missing = [m for m in methods if not callable(getattr(obj, m, None))]
            if missing:
                raise TypeError(f"{name} {type(obj).__name__} lacks {', '.join(missing)}().")
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config must be a dict or None, not {type(config).__name__}.")
        if comm is not None and not isinstance(comm, distributed.Communicator):
            raise TypeError(f"comm must be a gpucnn.distributed.Communicator or None, not {type(comm).__name__}.")
        self.device = backend.resolve_device(device)
        if self.device == "cpu":
            split.threads.check_setting()  # a bad GPUCNN_CPU_THREADS or GPUCNN_CPU_PROCESSES is refused before
            split.processes()              # any data is copied
        if comm is not None and comm.device not in (None, self.device):
            raise ValueError(f"comm was made for the {comm.device} but the trainer runs on the {self.device}.")
        self.comm = distributed.Communicator() if comm is None else comm
        self._averager = None  # packs the gradients for the allreduce of distributed steps
        self.model = model.to(self.device)
        # The optimizer runs fused where it can (same rule, state format and name in checkpoints): over
        # flat NumPy buffers on the cpu, with optim.cu on a kernel device, where single-process steps
        # also run as TrainStep objects, replayed as CUDA graphs when ``graph``.
        on_kernels = self.device in backend.KERNEL_DEVICES
        fusable = isinstance(optimizer, cuda_optim.FusedOptimizer) or type(optimizer) in cuda_optim.STATE_BUFFERS
        if on_kernels and fusable:
            self.optimizer = cuda_optim.fused(optimizer)
        elif self.device == "cpu" and cpu_optim.fusable(optimizer):
            self.optimizer = cpu_optim.fused(optimizer)
        else:
            self.optimizer = optimizer
        self.graph = (self.device == "gpu") if graph is None else bool(graph)
        if augment is not None and not isinstance(augment, Augment):
            raise TypeError(f"augment must be a gpucnn.data.Augment or None, not {type(augment).__name__}.")
        if augment is not None and self.comm.distributed:
            raise ValueError("augmentation is not available in distributed training yet; train without --augment "
                             "or in one process.")
        self.augment = augment
        self._steps = {}  # batch size -> TrainStep (kernel devices, one process)
        self._split = None  # the cpu's SplitStep once made; False when the model or settings exclude it
        self._uses_steps = on_kernels and fusable and not self.comm.distributed
        self._step_sums = backend.to_device(np.zeros(2), self.device) if self._uses_steps else None
        self.scheduler = scheduler
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.seed = check_int(seed, "seed", 0)
        self.config = dict(config or {})
        self.xp = backend.xp_for(self.device)
        self.interrupted = False
        self.stop_signal = None      # the signal that stopped fit (SIGINT or SIGTERM), when interrupted
        self.stopped_early = False   # the last fit ended on its patience
        self.best_accuracy = None    # the watched split's accuracy in the best epoch
        self.watch = Watch()
        self._val_data = None        # fit's validation split, on the device
        self.checkpoint_path = None  # the last checkpoint written (or resumed from)

    # --- one step and evaluation --------------------------------------------
    def train_step(self, x, y):
        """Forward, softmax cross-entropy, backward and optimizer step on one batch.

        x (N, C, H, W) float and y (N,) int on the trainer's device. Returns
        ``(loss, correct)``: the mean loss and the number of correct predictions,
        as 0-d arrays on the device (``float()`` reads them back).
        """
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"train_step needs x (N, C, H, W) and y (N,) of the same N, "
                             f"not {tuple(x.shape)} and {tuple(y.shape)}.")
        self.optimizer.zero_grad()
        if self.comm.distributed and len(y) == 0:
            # A short last batch can leave this rank without images: it adds nothing but takes the average.
            self._average_gradients(0)
            self.optimizer.step()
            return self.xp.zeros((), dtype=np.float32), self.xp.zeros((), dtype=np.int64)
        split = self._split_step(len(y))
        if split is not None:  # half the batch in a worker process (gpucnn.cpu.split)
            loss_sum, correct = split(x, y)
            self.optimizer.step()
            return np.asarray(loss_sum / len(y)), np.asarray(correct, dtype=np.int64)
        logits = self.model(x)
        loss, probs = softmax_cross_entropy(logits, y)
        self.model.backward(softmax_cross_entropy_backward(probs, y), input_grad=False)  # images need no gradient
        if self.comm.distributed:
            self._average_gradients(len(y))
        self.optimizer.step()
        correct = (logits.argmax(axis=1) == y).sum()
        return loss, correct

    def _split_step(self, batch: int):
        """The SplitStep for this batch size on the cpu; with one process, ``split.serial_step`` (the same
        arithmetic, in ``split.SerialStep``: runs repeat bit for bit on any number of cores); None: a plain step."""
        if self._split is False:
            return None
        if self._split is None:
            if self.device != "cpu" or self.comm.distributed or not split.splittable(self.model):
                self._split = False
                return None
            if split.processes() == 1:
                self._split = split.SerialStep(self.model)
        if self._split is None or batch > self._split.capacity:
            if self._split is not None:
                self._split.close()
            self._split = split.SplitStep(self.model, batch)
        return self._split

    def evaluate(self, data, batch_size: int = EVAL_BATCH_SIZE) -> dict:
        """Mean loss and accuracy (a fraction in [0, 1]) of the model on ``(images, labels)``.

        images (N, C, H, W) float, labels (N,) int, on any device (copied to the
        trainer's device). Runs in eval mode and restores the previous mode.
        """
        images, labels = self._to_device(_check_data(data, "data"))
        return evaluate(self.model, images, labels, batch_size)

    def _average_gradients(self, count: int) -> None:
        if self._averager is None:
            self._averager = distributed.GradientAverager(self.model.parameters(), self.comm)
        self._averager.average(count)

    def _evaluate_over_ranks(self, images, labels) -> dict:
        """``evaluate`` on the whole test set; distributed, each rank takes a slice and the sums are reduced."""
        if not self.comm.distributed:
            return evaluate(self.model, images, labels, batch_size=EVAL_BATCH_SIZE)
        start, stop = distributed.shard_bounds(len(labels), self.comm.rank, self.comm.size)
        sums = np.zeros(2)  # loss sum, correct count
        if stop > start:
            part = evaluate(self.model, images[start:stop], labels[start:stop], batch_size=EVAL_BATCH_SIZE)
            sums[:] = part["loss"] * (stop - start), part["accuracy"] * (stop - start)
        self.comm.allreduce_sum(sums)
        return {"loss": float(sums[0]) / len(labels), "accuracy": round(sums[1]) / len(labels)}

    # --- the loop -----------------------------------------------------------
    def fit(self, train_data, test_data, epochs: int, batch_size: int, resume=None, progress: bool = True,
            reschedule: bool = False, val_data=None, patience: int | None = None, monitor: str = "accuracy") -> list:
        """Train until ``epochs`` epochs are complete (counting those of a resumed checkpoint), or stop early.

        ``val_data`` (optional, like test_data): a validation split evaluated after
        every epoch (``val_loss``, ``val_acc`` in the records); it, not the test
        split, is then watched. ``monitor`` ("accuracy" or "loss") is the watched
        metric: it picks best.npz and steps a ReduceLROnPlateau scheduler;
        ``patience`` N stops the run after N epochs in a row without improving it.

        ``reschedule`` (with ``resume``): keep the scheduler's own settings (made for the new
        total of epochs) and take only its epoch count from the checkpoint, for a run extended
        past the epochs it was planned for.

        train_data / test_data: ``(images (N, C, H, W) float, labels (N,) int)``.
        ``resume``: a checkpoint path to continue from; it must have been written
        with the same seed and batch size. Returns the per-epoch metric records
        of this call. Raises TrainingError when the loss becomes NaN or infinite
        (the last good checkpoint stays as it was).

        Distributed (``comm``), ``batch_size`` is per rank and a step trains on
        ``comm.size * batch_size`` images; every rank passes the same data, and
        resumes from the same checkpoint (written by rank 0) on as many ranks.
        A stop request (Ctrl-C, SIGINT) on any rank takes effect on all ranks at
        the next metrics refresh (every REFRESH_STEPS steps, and at epoch end).
        """
        train_images, train_labels = self._to_device(_check_data(train_data, "train_data"))
        test_images, test_labels = self._to_device(_check_data(test_data, "test_data"))
        self._val_data = None if val_data is None else self._to_device(_check_data(val_data, "val_data"))
        self.watch = Watch(monitor, patience)
        self.stopped_early = False
        epochs = check_int(epochs, "epochs", 1)
        batch_size = check_int(batch_size, "batch_size", 1)
        batches = self._batches(train_images, train_labels, batch_size)
        main_rank = self.comm.rank == 0  # the one that writes files and shows progress
        owns_folder = self.out_dir is not None and main_rank
        if owns_folder:
            runfolder.claim(self.out_dir)  # the run owns its folder until fit returns (see gpucnn.runfolder)
        try:
            return self._fit(batches, (test_images, test_labels), (len(train_labels), epochs, batch_size), resume,
                             progress and main_rank, reschedule)
        finally:
            if owns_folder:
                runfolder.release(self.out_dir)

    def _fit(self, batches, test_data, sizes, resume, progress, reschedule) -> list:
        """fit's loop once the data are on the device; ``sizes`` is (training images, epochs, batch size)."""
        train_count, epochs, batch_size = sizes
        self.interrupted, self.stop_signal = False, None
        start_epoch, start_step, partial = 0, 0, None
        if resume is not None:
            start_epoch, start_step, partial = self._resume(resume, epochs, batch_size, len(batches), reschedule)
        self.comm.check_same("the run (training images, test images, batch size, seed, epochs, start epoch, step)",
                             (train_count, len(test_data[1]), batch_size, self.seed, epochs, start_epoch,
                              start_step))
        self._check_same_settings()
        self.comm.broadcast_parameters(self.model.parameters())

        history = []
        if self.watch.should_stop:   # resumed from a run that had already stopped early
            return self._stop_early(history, progress)
        with _StopRequest() as stop:
            for epoch in range(start_epoch, epochs):
                batches.set_epoch(epoch, start_batch=start_step if epoch == start_epoch else 0)
                sums = self._train_epoch(batches, epoch, epochs, partial if epoch == start_epoch else None,
                                         batch_size, stop, progress)
                if sums.stopped and sums.steps < len(batches):
                    self._guarded(lambda: self._save_latest(epoch, sums.steps, sums, batch_size), CHECKPOINT_FILE)
                    self._stopped(progress, stop)
                    return history
                record = self._finish_epoch(epoch, sums, test_data, batch_size)
                history.append(record)
                if progress:
                    tqdm.write(describe_epoch(record, epochs))
                if self.watch.should_stop:
                    return self._stop_early(history, progress)
                if self.comm.any(stop.requested):
                    self._stopped(progress, stop)
                    return history
        return history

    def _check_same_settings(self) -> None:
        """Distributed: every rank must train what rank 0 trains (the model, optimizer, its hyperparameters,
        the schedule and the run config), else ranks would average different runs; ValueError naming it."""
        if not self.comm.distributed:
            return
        rule = getattr(self.optimizer, "rule", self.optimizer)
        hyper = rule.hyperparameters() if callable(getattr(rule, "hyperparameters", None)) else None
        settings = {"model": getattr(self.model, "config", None),
                    "parameter shapes": [tuple(p.shape) for p in self.model.parameters()],
                    "optimizer": rule_name(self.optimizer), "optimizer settings": hyper,
                    "scheduler": None if self.scheduler is None else type(self.scheduler).__name__,
                    "run config": self.config}
        for what, value in settings.items():
            self.comm.check_same(what, value)

    def _batches(self, images, labels, batch_size: int):
        """The epochs' batches: shuffled by (seed, epoch); distributed, this rank's share of each batch."""
        if self.comm.distributed:
            return distributed.ShardedBatchIterator(images, labels, batch_size, self.comm.rank, self.comm.size,
                                                    seed=self.seed)
        return BatchIterator(images, labels, batch_size, shuffle=True, seed=self.seed, augment=self.augment)

    def _resume(self, path, epochs: int, batch_size: int, steps_per_epoch: int, reschedule: bool):
        """Restore the checkpoint at ``path`` for a run of ``epochs`` epochs; returns (epoch, step, partial)."""
        start_epoch, start_step, partial = self._restore(path, batch_size, steps_per_epoch, reschedule)
        if start_epoch >= epochs:
            raise ValueError(f"the checkpoint {path} has already completed {start_epoch} epochs; "
                             f"ask for more than {start_epoch} epochs to continue it.")
        if self.comm.rank == 0:
            self._guarded(lambda: self._trim_metrics(start_epoch), METRICS_FILE)
        return start_epoch, start_step, partial

    def _train_epoch(self, batches, epoch, epochs, partial, batch_size, stop, progress) -> EpochSums:
        """Run the remaining steps of one epoch; returns the (device-side) sums of the epoch so far."""
        sums = EpochSums.start(self.xp, partial)
        if self._uses_steps:  # the kernel steps add into one device buffer, read back at each refresh
            self._step_sums[...] = backend.to_device(sums.host_totals()[:2], self.device)
        self.model.train()
        started = time.perf_counter()
        seconds_before = sums.seconds
        bar = tqdm(total=len(batches), initial=sums.steps, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                   disable=not progress, dynamic_ncols=True, leave=False)
        try:
            for x, y in batches:
                self._step_and_sum(x, y, sums, batch_size)
                bar.update(1)
                # Distributed ranks look at stop requests only when they synchronise, so they stop together.
                stopping = stop.requested and not self.comm.distributed
                if sums.steps % REFRESH_STEPS == 0 or sums.steps == len(batches) or stopping:
                    sums.seconds = seconds_before + time.perf_counter() - started
                    stopping = self._refresh(sums, stop, epoch, bar)
                if stopping:
                    sums.stopped = True
                    break
        finally:
            bar.close()
        return sums

    def _refresh(self, sums: EpochSums, stop, epoch, bar) -> bool:
        """Read the sums back (over all ranks), check the loss, update the bar; returns whether to stop."""
        self._read_step_sums(sums)
        stopping = self._sync_sums(sums, stop)
        mean_loss = float(sums.loss) / sums.seen  # the host round trip of this refresh
        self._check_finite(mean_loss, "training", epoch, sums.steps)
        bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{int(sums.correct) / sums.seen:.2%}",
                        img_s=f"{sums.seen / max(sums.seconds, 1e-9):,.0f}", refresh=False)
        return stopping

    def _step_and_sum(self, x, y, sums: EpochSums, batch_size: int) -> None:
        """One training step; its loss sum and correct count go into ``sums`` (or the device buffer)."""
        try:
            if self._uses_steps:
                step = self._steps.get(len(y))
                if step is None:  # one per batch size: the full batches' and a short last batch's
                    step = self._steps[len(y)] = TrainStep(self.model, self.optimizer, len(y), graph=self.graph,
                                                           sums=self._step_sums)
                step(x, y)
            else:
                loss, correct = self.train_step(x, y)
                sums.loss += loss * len(y)
                sums.correct += correct
        except split.WorkerError as exc:
            raise TrainingError(f"{str(exc).rstrip('.')}; training stopped and {self._kept_text()}.") from None
        except Exception as exc:
            if not backend.is_out_of_memory(exc):
                raise
            raise TrainingError(self._out_of_memory_text(exc, batch_size)) from None
        sums.seen += len(y)
        sums.steps += 1

    def _read_step_sums(self, sums: EpochSums) -> None:
        if self._uses_steps:
            loss_sum, correct = (float(v) for v in backend.to_numpy(self._step_sums))
            sums.loss, sums.correct = np.float64(loss_sum), np.int64(round(correct))

    def _sync_sums(self, sums: EpochSums, stop) -> bool:
        """Make the epoch sums of every rank the sums over all ranks; returns whether any rank asked to stop.

        One process: nothing changes, and the answer is its own stop request.
        Distributed: each rank contributes what it added since the last
        synchronisation (one small MPI allreduce), so all ranks then hold the
        same sums, the ones the metrics and checkpoints report.
        """
        if not self.comm.distributed:
            return stop.requested
        change = np.append(sums.host_totals() - sums.synced, float(stop.requested))
        self.comm.allreduce_sum(change)
        total = sums.synced + change[:3]
        total[1:] = np.round(total[1:])  # counts
        sums.loss = self.xp.asarray(total[0], dtype=np.float64)
        sums.correct = self.xp.asarray(int(total[1]), dtype=np.int64)
        sums.seen = int(total[2])
        sums.synced = total
        return bool(change[3] > 0)

    def _stop_early(self, history: list, progress: bool) -> list:
        self.stopped_early = True
        if progress:
            tqdm.write(self.watch.describe_stop("validation" if self._val_data is not None else "test"))
        return history

    def _finish_epoch(self, epoch, sums: EpochSums, test_data, batch_size) -> dict:
        """Evaluate, step the scheduler, write checkpoints and the metrics line; returns the record."""
        evaluated = time.perf_counter()
        test = self._evaluate_over_ranks(*test_data)
        self._check_finite(test["loss"], "test", epoch, sums.steps)
        val = None if self._val_data is None else self._evaluate_over_ranks(*self._val_data)
        watched = test if val is None else val
        lr = self._current_lr()
        if self.scheduler is not None:
            if getattr(self.scheduler, "needs_value", False):
                self.scheduler.step(self.watch.value(watched))
            else:
                self.scheduler.step()
        improved = self.watch.update(watched, epoch + 1)
        if improved:
            self.best_accuracy = watched["accuracy"]
        extra = {} if val is None else {"val_loss": val["loss"], "val_acc": val["accuracy"]}
        record = {
            "epoch": epoch + 1,
            "train_loss": float(sums.loss) / sums.seen,
            "train_acc": int(sums.correct) / sums.seen,
            "test_loss": test["loss"],
            "test_acc": test["accuracy"],
            **extra,
            "lr": lr,
            "images_per_s": sums.seen / max(sums.seconds, 1e-9),
            "seconds": sums.seconds + time.perf_counter() - evaluated,
        }
        if self.out_dir is not None:
            # checkpoint.npz last: a run killed before it resumes from the previous epoch, which
            # drops this metrics line and rewrites best.npz with the same bits, so nothing is lost.
            if self.comm.rank == 0:
                self._guarded(lambda: self._append_metrics(record), METRICS_FILE)
                if improved:
                    self._guarded(lambda: self._save(self.out_dir / BEST_FILE, epoch + 1, 0, None, batch_size),
                                  BEST_FILE)
            self._guarded(lambda: self._save_latest(epoch + 1, 0, None, batch_size), CHECKPOINT_FILE)
        return record

    def _stopped(self, progress, stop=None) -> None:
        self.interrupted = True
        self.stop_signal = None if stop is None else stop.signal
        if progress:
            where = f"saved {self.checkpoint_path}" if self.checkpoint_path else "no out_dir, nothing saved"
            tqdm.write(f"interrupted: {where}")

    def _check_finite(self, value, phase, epoch, step) -> None:
        if math.isfinite(value):
            return
        if self.checkpoint_path is not None:
            kept = f"the last good checkpoint, {self.checkpoint_path}, is unchanged"
        else:
            kept = "no checkpoint had been written yet"
        raise TrainingError(f"the {phase} loss became {value} in epoch {epoch + 1} (by step {step}); "
                            f"training stopped and {kept}; try a smaller learning rate.")

    def _guarded(self, write, name: str):
        """``write()``; an OSError (a full disk, a folder gone) becomes a TrainingError naming the file."""
        try:
            return write()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise TrainingError(f"could not write {self.out_dir / name} ({reason}); training stopped and "
                                f"{self._kept_text()}; free some space (or fix the folder) and resume.") from None

    def _kept_text(self) -> str:
        return (f"the last good checkpoint, {self.checkpoint_path}, is unchanged" if self.checkpoint_path
                else "no checkpoint had been written yet")

    def _out_of_memory_text(self, exc, batch_size) -> str:
        kept = self._kept_text()
        return (f"training on the {self.device} ran out of memory at batch size {batch_size} "
                f"({type(exc).__name__}: {exc}); "
                f"training stopped and {kept}; try a smaller batch size (--batch-size {max(1, batch_size // 2)}).")

    # --- state ----------------------------------------------------------------
    def _to_device(self, data):
        images, labels = data
        labels = labels if labels.dtype == np.int64 else labels.astype(np.int64)
        return backend.to_device(images, self.device), backend.to_device(labels, self.device)

    def _current_lr(self) -> float:
        if self.scheduler is not None and callable(getattr(self.scheduler, "get_last_lr", None)):
            return float(self.scheduler.get_last_lr()[0])
        return float(self.optimizer.lr)

    def _generators(self) -> dict:
        """``"module.attribute" -> numpy Generator`` for every Generator a module holds (Dropout's)."""
        found = {}
        for module_name, module in self.model.named_modules():
            for attr, value in vars(module).items():
                if isinstance(value, np.random.Generator):
                    found[f"{module_name}.{attr}" if module_name else attr] = value
        return found

    def _save(self, path: Path, epoch: int, step: int, sums, batch_size: int) -> Path:
        partial = None if sums is None else sums.to_partial()
        config = {**self.config, "model": getattr(self.model, "config", None), "batch_size": batch_size,
                  "seed": self.seed}
        return save_checkpoint(
            path,
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=None if self.scheduler is None else self.scheduler.state_dict(),
            epoch=epoch,
            step=step,
            rng={name: gen.bit_generator.state for name, gen in self._generators().items()},
            trainer={"seed": self.seed, "batch_size": batch_size, "ranks": self.comm.size,
                     "best_accuracy": self.best_accuracy, "watch": self.watch.state_dict(),
                     "partial": partial, "optimizer_class": rule_name(self.optimizer),
                     "scheduler_class": None if self.scheduler is None else type(self.scheduler).__name__,
                     "augment": None if self.augment is None else self.augment.describe()},
            config=config,
        )

    def _save_latest(self, epoch, step, sums, batch_size) -> None:
        if self.out_dir is not None:
            path = self.out_dir / CHECKPOINT_FILE
            # Only rank 0 writes; every rank knows the path (for messages and resuming).
            self.checkpoint_path = self._save(path, epoch, step, sums, batch_size) if self.comm.rank == 0 else path

    def _restore(self, path, batch_size: int, steps_per_epoch: int, reschedule: bool = False):
        """Load a checkpoint into the model, optimizer, scheduler and generators; returns (epoch, step, partial)."""
        ckpt = load_checkpoint(path)
        generators = self._generators()
        check_resumable(ckpt, path, self.model, self.optimizer, self.scheduler, generators,
                        seed=self.seed, batch_size=batch_size, ranks=self.comm.size, steps_per_epoch=steps_per_epoch)
        state = ckpt["trainer"]
        stored_augment = state.get("augment")  # absent in checkpoints from before augmentation: none
        own_augment = None if self.augment is None else self.augment.describe()
        if stored_augment != own_augment:
            stored_name = "none" if stored_augment is None else stored_augment["name"]
            own_name = "none" if own_augment is None else own_augment["name"]
            raise ValueError(f"checkpoint {path} was trained with augmentation {stored_name} but this run asks for "
                             f"{own_name}; resume with the same augmentation so the run continues exactly.")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"], keep_settings=reschedule)
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path}: its optimizer or scheduler state does not fit ({exc}).") \
                from None
        self.model.load_state_dict(ckpt["model"])
        for name, gen in generators.items():
            gen.bit_generator.state = ckpt["rng"][name]
        self.best_accuracy = state["best_accuracy"]
        if "watch" in state:
            self.watch.load_state_dict(state["watch"])
        elif self.watch.monitor == "accuracy":   # a checkpoint from before Watch: its best test accuracy
            self.watch.best = state["best_accuracy"]
        self.checkpoint_path = Path(path)
        return ckpt["epoch"], ckpt["step"], state["partial"]

    def _trim_metrics(self, completed_epochs: int) -> None:
        """Drop metrics lines of epochs after the resumed checkpoint (e.g. when resuming from best.npz)."""
        if self.out_dir is not None:
            trim_metrics(self.out_dir / METRICS_FILE, completed_epochs)

    def _append_metrics(self, record: dict) -> None:
        append_metrics(self.out_dir / METRICS_FILE, record)
