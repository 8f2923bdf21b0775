"""Metrics: the training log ``metrics.jsonl``, and per-class results on label arrays.

``confusion_matrix`` and ``per_class_accuracy`` take true and predicted labels
(N,) (NumPy, CuPy or lists of ints) and answer "which classes get mixed up?";
``gpucnn evaluate`` prints them and ``gpucnn visualize`` draws the matrix.

The log ``metrics.jsonl`` holds one JSON object per epoch, written by the trainer, read by ``visualize``;
``metrics.csv`` beside it holds the same records as a table (a header row, then one row per epoch) for
spreadsheets and pandas, rewritten from the log whenever the log changes.

Each line holds epoch, train_loss, train_acc, test_loss, test_acc, lr,
images_per_s and seconds. Lines are appended, flushed and fsynced one epoch at a
time; a resumed run first drops the lines of epochs after its checkpoint, so an
epoch appears once (a reader still keeps the last line of an epoch seen twice).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from gpucnn import backend
from gpucnn.files import write_atomically

METRICS_FILE = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
METRIC_KEYS = ("epoch", "train_loss", "test_loss", "train_acc", "test_acc")   # what a reader needs in a line


def append_metrics(path, record: dict) -> None:
    """Append one epoch's record to the log at ``path``, on disk before this returns."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    write_metrics_csv(path)


def write_metrics_csv(path) -> Path:
    """Rewrite ``metrics.csv`` beside the log at ``path`` from its complete lines; returns the CSV's path.

    Columns: every key of the records, in the order they first appear (epoch, train_loss, ...).
    """
    path = Path(path)
    records = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []:
        if math.isfinite(_line_epoch(line)):
            records.append(json.loads(line))
    columns = list(dict.fromkeys(key for record in records for key in record))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return write_atomically(path.with_name(METRICS_CSV), lambda f: f.write(text.getvalue().encode("utf-8")),
                            durable=False)  # derived from the log: a crash costs nothing


def _line_epoch(line: str) -> float:
    """The epoch of a log line; infinity for a blank line or one torn by a killed run."""
    if not line.endswith("\n") or not line.strip():
        return math.inf
    try:
        return json.loads(line).get("epoch", 0)
    except (ValueError, AttributeError):
        return math.inf


def trim_metrics(path, completed_epochs: int) -> None:
    """Drop the lines of epochs after ``completed_epochs`` (and torn ones); a missing log stays missing."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _line_epoch(line) <= completed_epochs]
    if len(kept) != len(lines):  # a full disk leaves the log as it was, and no temporary file
        write_atomically(path, lambda f: f.write("".join(kept).encode("utf-8")))
        write_metrics_csv(path)


def check_records(records) -> None:
    """Refuse anything but a non-empty list of records holding every METRIC_KEYS entry."""
    if not isinstance(records, (list, tuple)) or not records:
        raise ValueError("training_curves needs a non-empty list of per-epoch metric records.")
    for i, record in enumerate(records):
        missing = _missing_keys(record)
        if missing:
            raise ValueError(f"metric record {i} lacks {', '.join(missing)}.")


def _missing_keys(record) -> list[str]:
    return [key for key in METRIC_KEYS if not isinstance(record, dict) or key not in record]


def read_metrics(path) -> list[dict]:
    """The per-epoch records of a ``metrics.jsonl`` written by the trainer, sorted by epoch.

    Each record must hold epoch, train_loss, test_loss, train_acc and test_acc;
    when an epoch appears more than once (a run resumed over itself) the last wins.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist.")
    by_epoch = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{path} line {number} is not JSON.") from None
            missing = _missing_keys(record)
            if missing:
                raise ValueError(f"{path} line {number} lacks {', '.join(missing)}; is it a gpucnn metrics.jsonl?")
            by_epoch[int(record["epoch"])] = record
    if not by_epoch:
        raise ValueError(f"metrics file {path} holds no epochs yet.")
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


# --- per-class results ------------------------------------------------------------
def _label_array(values, name: str) -> np.ndarray:
    """``values`` as a host int64 array (N,); refuses other shapes, floats and negative labels."""
    array = backend.to_numpy(values) if backend.is_array(values) else np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class labels (N,), not shape {array.shape}.")
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer class labels, not {array.dtype}.")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        raise ValueError(f"{name} holds a negative label ({int(array.min())}).")
    return array


def _label_pair(labels, predictions, num_classes):
    """(labels (N,), predictions (N,), K) checked: the same N, every label below K."""
    labels, predictions = _label_array(labels, "labels"), _label_array(predictions, "predictions")
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions.")
    largest = int(max(labels.max(initial=-1), predictions.max(initial=-1)))
    if num_classes is None:
        num_classes = largest + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, not {num_classes!r}.")
    if largest >= num_classes:
        raise ValueError(f"label {largest} is out of range for {num_classes} classes.")
    return labels, predictions, int(num_classes)


def confusion_matrix(labels, predictions, num_classes: int | None = None) -> np.ndarray:
    """Counts (K, K) int64: entry [i, j] is how many images of true class i were predicted as class j.

    labels and predictions (N,) ints; K = ``num_classes`` (default: the largest label + 1).
    The diagonal holds the correct predictions; row i sums to the number of images of class i.
    """
    labels, predictions, K = _label_pair(labels, predictions, num_classes)
    return np.bincount(labels * K + predictions, minlength=K * K).reshape(K, K)


def per_class_accuracy(labels, predictions, num_classes: int | None = None) -> np.ndarray:
    """(K,) float64: for each true class, the fraction of its images predicted right (its recall).

    NaN for a class without images. The mean over the images is the accuracy;
    the mean over the classes weighs every class alike.
    """
    matrix = confusion_matrix(labels, predictions, num_classes)
    counts = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.diag(matrix) / counts, np.nan)
