"""The training loop: Trainer (fit, evaluate, train_step), metrics log and checkpoints.

Data live on the training device for the whole run: ``fit`` copies the
normalised images and labels there once and gathers every batch by index on
the device. A step makes no host round trip: loss and correct counts are summed
on the device and read back only when the progress bar refreshes (every
``REFRESH_STEPS`` steps) and at the end of an epoch.

Files written to ``out_dir`` (when given):

- ``metrics.jsonl``: one JSON object per epoch (epoch, train_loss, train_acc,
  test_loss, test_acc, lr, images_per_s, seconds), each line flushed and fsynced;
- ``checkpoint.npz``: the latest state, after every epoch and on Ctrl-C;
- ``best.npz``: the epoch with the highest test accuracy so far.

Resuming (``fit(resume=path)``) continues exactly where the checkpoint stopped,
at an epoch boundary or in the middle of an epoch: the batch order is a
function of (seed, epoch), and the checkpoint holds the weights, optimizer and
scheduler state, the Dropout generators and the partial epoch sums, so on the
CPU the final weights equal an uninterrupted run's bit for bit.

Ctrl-C: the first SIGINT during ``fit`` asks the loop to stop after the
current step; it writes ``checkpoint.npz`` (mid-epoch, resumable exactly) and
returns with ``trainer.interrupted`` set. A second Ctrl-C interrupts at once
without saving.
"""
from __future__ import annotations

import json
import math
import operator
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpucnn import backend
from gpucnn.checkpoint import CheckpointError, check_state_fits, load_checkpoint, save_checkpoint
from gpucnn.data import BatchIterator
from gpucnn.nn import Module
from gpucnn.ops import softmax_cross_entropy, softmax_cross_entropy_backward

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.npz"
BEST_FILE = "best.npz"
REFRESH_STEPS = 10  # read the device-side metrics back every this many steps
EVAL_BATCH_SIZE = 500


class TrainingError(RuntimeError):
    """Training cannot go on: the loss became NaN or infinite."""


def _count(value, name: str, minimum: int) -> int:
    """``value`` as an int >= minimum (bools and floats refused)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {value!r}.")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}.") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {value}.")
    return value


def _check_data(data, name: str):
    """Validate ``(images (N, C, H, W) float, labels (N,) int)`` and return the pair."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{name} must be a pair (images, labels), not {type(data).__name__}.")
    images, labels = data
    for part, array in (("images", images), ("labels", labels)):
        if not (isinstance(array, np.ndarray) or backend.is_gpu_array(array)):
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
    return images, labels


class _StopRequest:
    """While active, the first Ctrl-C (SIGINT) only sets ``requested``; a second one raises at once.

    Signal handlers can only be installed from the main thread; elsewhere
    Ctrl-C keeps its default behaviour (a KeyboardInterrupt, nothing saved).
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("interrupt: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc_info):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
        return False


def describe_epoch(record: dict, epochs: int) -> str:
    """One console line for an epoch's metrics record."""
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} "
            f"acc {record['train_acc']:.2%}  test loss {record['test_loss']:.4f} acc {record['test_acc']:.2%}  "
            f"lr {record['lr']:.3g}  {record['images_per_s']:,.0f} img/s  {record['seconds']:.1f} s")


def evaluate(model, images, labels, batch_size: int = EVAL_BATCH_SIZE) -> dict:
    """Mean softmax cross-entropy loss and accuracy (a fraction in [0, 1]) of ``model``.

    images (N, C, H, W) float and labels (N,) int on the model's device.
    Batches run in order in eval mode; the previous mode is restored. The sums
    stay on the device and are read back once.
    """
    images, labels = _check_data((images, labels), "evaluation data")
    batch_size = _count(batch_size, "batch_size", 1)
    xp = backend.get_array_module(images)
    was_training = model.training
    model.eval()
    try:
        loss_sum = xp.zeros((), dtype=np.float64)
        correct = xp.zeros((), dtype=np.int64)
        for start in range(0, len(images), batch_size):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            logits = model(x)
            loss, _ = softmax_cross_entropy(logits, y)
            loss_sum += loss * len(y)
            correct += (logits.argmax(axis=1) == y).sum()
    finally:
        model.train(was_training)
    n = len(images)
    return {"loss": float(loss_sum) / n, "accuracy": int(correct) / n}


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
    """

    def __init__(self, model, optimizer, scheduler=None, device="cpu", out_dir=None, seed=0, config=None):
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
        self.device = backend.resolve_device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.seed = _count(seed, "seed", 0)
        self.config = dict(config or {})
        self.xp = backend.xp_for(self.device)
        self.interrupted = False
        self.best_accuracy = None
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
        logits = self.model(x)
        loss, probs = softmax_cross_entropy(logits, y)
        self.model.backward(softmax_cross_entropy_backward(probs, y))
        self.optimizer.step()
        correct = (logits.argmax(axis=1) == y).sum()
        return loss, correct

    def evaluate(self, data, batch_size: int = EVAL_BATCH_SIZE) -> dict:
        """Mean loss and accuracy (a fraction in [0, 1]) of the model on ``(images, labels)``.

        images (N, C, H, W) float, labels (N,) int, on any device (copied to the
        trainer's device). Runs in eval mode and restores the previous mode.
        """
        images, labels = self._to_device(_check_data(data, "data"))
        return evaluate(self.model, images, labels, batch_size)

    # --- the loop -----------------------------------------------------------
    def fit(self, train_data, test_data, epochs: int, batch_size: int, resume=None, progress: bool = True) -> list:
        """Train until ``epochs`` epochs are complete (counting those of a resumed checkpoint).

        train_data / test_data: ``(images (N, C, H, W) float, labels (N,) int)``.
        ``resume``: a checkpoint path to continue from; it must have been written
        with the same seed and batch size. Returns the per-epoch metric records
        of this call. Raises TrainingError when the loss becomes NaN or infinite
        (the last good checkpoint stays as it was).
        """
        train_images, train_labels = self._to_device(_check_data(train_data, "train_data"))
        test_images, test_labels = self._to_device(_check_data(test_data, "test_data"))
        epochs = _count(epochs, "epochs", 1)
        batch_size = _count(batch_size, "batch_size", 1)
        batches = BatchIterator(train_images, train_labels, batch_size, shuffle=True, seed=self.seed)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)

        start_epoch, start_step, partial = 0, 0, None
        self.interrupted = False
        if resume is not None:
            start_epoch, start_step, partial = self._restore(resume, batch_size, len(batches))
            if start_epoch >= epochs:
                raise ValueError(f"the checkpoint {resume} has already completed {start_epoch} epochs; "
                                 f"ask for more than {start_epoch} epochs to continue it.")
            self._trim_metrics(start_epoch)

        history = []
        with _StopRequest() as stop:
            for epoch in range(start_epoch, epochs):
                batches.set_epoch(epoch, start_batch=start_step if epoch == start_epoch else 0)
                sums = self._train_epoch(batches, epoch, epochs, partial if epoch == start_epoch else None,
                                         batch_size, stop, progress)
                if stop.requested and sums["steps"] < len(batches):
                    self._save_latest(epoch, sums["steps"], sums, batch_size)
                    self._stopped(progress)
                    return history
                record = self._finish_epoch(epoch, sums, (test_images, test_labels), batch_size)
                history.append(record)
                if progress:
                    tqdm.write(describe_epoch(record, epochs))
                if stop.requested:
                    self._stopped(progress)
                    return history
        return history

    def _train_epoch(self, batches, epoch, epochs, partial, batch_size, stop, progress) -> dict:
        """Run the remaining steps of one epoch; returns the (device-side) sums of the epoch so far."""
        xp = self.xp
        if partial is None:
            sums = {"loss": xp.zeros((), dtype=np.float64), "correct": xp.zeros((), dtype=np.int64),
                    "seen": 0, "steps": 0, "seconds": 0.0}
        else:
            sums = {"loss": xp.asarray(partial["loss"], dtype=np.float64),
                    "correct": xp.asarray(partial["correct"], dtype=np.int64),
                    "seen": int(partial["seen"]), "steps": int(partial["steps"]),
                    "seconds": float(partial["seconds"])}
        self.model.train()
        started = time.perf_counter()
        seconds_before = sums["seconds"]
        bar = tqdm(total=len(batches), initial=sums["steps"], desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                   disable=not progress, dynamic_ncols=True, leave=False)
        try:
            for x, y in batches:
                loss, correct = self.train_step(x, y)
                sums["loss"] += loss * len(y)
                sums["correct"] += correct
                sums["seen"] += len(y)
                sums["steps"] += 1
                bar.update(1)
                last = sums["steps"] == len(batches)
                if sums["steps"] % REFRESH_STEPS == 0 or last or stop.requested:
                    mean_loss = float(sums["loss"]) / sums["seen"]  # the host round trip of this refresh
                    self._check_finite(mean_loss, "training", epoch, sums["steps"])
                    sums["seconds"] = seconds_before + time.perf_counter() - started
                    bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{int(sums['correct']) / sums['seen']:.2%}",
                                    img_s=f"{sums['seen'] / max(sums['seconds'], 1e-9):,.0f}", refresh=False)
                if stop.requested:
                    break
        finally:
            bar.close()
        return sums

    def _finish_epoch(self, epoch, sums, test_data, batch_size) -> dict:
        """Evaluate, step the scheduler, write checkpoints and the metrics line; returns the record."""
        evaluated = time.perf_counter()
        test = evaluate(self.model, *test_data, batch_size=EVAL_BATCH_SIZE)
        self._check_finite(test["loss"], "test", epoch, sums["steps"])
        lr = self._current_lr()
        if self.scheduler is not None:
            self.scheduler.step()
        improved = self.best_accuracy is None or test["accuracy"] > self.best_accuracy
        if improved:
            self.best_accuracy = test["accuracy"]
        record = {
            "epoch": epoch + 1,
            "train_loss": float(sums["loss"]) / sums["seen"],
            "train_acc": int(sums["correct"]) / sums["seen"],
            "test_loss": test["loss"],
            "test_acc": test["accuracy"],
            "lr": lr,
            "images_per_s": sums["seen"] / max(sums["seconds"], 1e-9),
            "seconds": sums["seconds"] + time.perf_counter() - evaluated,
        }
        if self.out_dir is not None:
            self._save_latest(epoch + 1, 0, None, batch_size)
            if improved:
                self._save(self.out_dir / BEST_FILE, epoch + 1, 0, None, batch_size)
            self._append_metrics(record)
        return record

    def _stopped(self, progress) -> None:
        self.interrupted = True
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
        partial = None
        if sums is not None:
            partial = {"loss": backend.to_numpy(sums["loss"]), "correct": backend.to_numpy(sums["correct"]),
                       "seen": sums["seen"], "steps": sums["steps"], "seconds": sums["seconds"]}
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
            trainer={"seed": self.seed, "batch_size": batch_size, "best_accuracy": self.best_accuracy,
                     "partial": partial, "optimizer_class": type(self.optimizer).__name__,
                     "scheduler_class": None if self.scheduler is None else type(self.scheduler).__name__},
            config=config,
        )

    def _save_latest(self, epoch, step, sums, batch_size) -> None:
        if self.out_dir is not None:
            self.checkpoint_path = self._save(self.out_dir / CHECKPOINT_FILE, epoch, step, sums, batch_size)

    def _restore(self, path, batch_size: int, steps_per_epoch: int):
        """Load a checkpoint into the model, optimizer, scheduler and generators; returns (epoch, step, partial)."""
        ckpt = load_checkpoint(path)
        required = ("model", "optimizer", "scheduler", "epoch", "step", "rng", "trainer")
        missing = [k for k in required if k not in ckpt]
        if missing:
            raise CheckpointError(f"checkpoint {path} cannot be resumed: it lacks {', '.join(missing)}.")
        check_state_fits(ckpt["model"], {name: p.data for name, p in self.model.named_parameters()})
        state = ckpt["trainer"]
        if state["seed"] != self.seed or state["batch_size"] != batch_size:
            raise ValueError(f"checkpoint {path} was trained with seed {state['seed']} and batch size "
                             f"{state['batch_size']}; resume with the same (got seed {self.seed}, "
                             f"batch size {batch_size}) so the batch order continues.")
        for part, obj in (("optimizer", self.optimizer), ("scheduler", self.scheduler)):
            stored = state[f"{part}_class"]
            current = None if obj is None else type(obj).__name__
            if stored != current:
                raise CheckpointError(f"checkpoint {path} holds {part} {stored} state, but this run uses {current}.")
        if not 0 <= ckpt["step"] < steps_per_epoch:
            raise CheckpointError(f"checkpoint {path} stopped at step {ckpt['step']} of an epoch, but an epoch "
                                  f"here has {steps_per_epoch} steps; resume on the same training data.")
        generators = self._generators()
        if set(ckpt["rng"]) != set(generators):
            raise CheckpointError(f"checkpoint {path} holds random generators {sorted(ckpt['rng'])}, "
                                  f"but the model has {sorted(generators)}.")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path}: its optimizer or scheduler state does not fit ({exc}).") \
                from None
        self.model.load_state_dict(ckpt["model"])
        for name, gen in generators.items():
            gen.bit_generator.state = ckpt["rng"][name]
        self.best_accuracy = state["best_accuracy"]
        self.checkpoint_path = Path(path)
        return ckpt["epoch"], ckpt["step"], state["partial"]

    def _trim_metrics(self, completed_epochs: int) -> None:
        """Drop metrics lines of epochs after the resumed checkpoint (e.g. when resuming from best.npz)."""
        path = None if self.out_dir is None else self.out_dir / METRICS_FILE
        if path is None or not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("epoch", 0) <= completed_epochs]
        if len(kept) != len(lines):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, path)

    def _append_metrics(self, record: dict) -> None:
        with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
