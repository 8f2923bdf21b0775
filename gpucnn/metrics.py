"""The metrics log ``metrics.jsonl``: one JSON object per epoch, written by the trainer, read by ``visualize``.

Each line holds epoch, train_loss, train_acc, test_loss, test_acc, lr,
images_per_s and seconds. Lines are appended, flushed and fsynced one epoch at a
time; a resumed run first drops the lines of epochs after its checkpoint, so an
epoch appears once (a reader still keeps the last line of an epoch seen twice).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
METRIC_KEYS = ("epoch", "train_loss", "test_loss", "train_acc", "test_acc")   # what a reader needs in a line


def append_metrics(path, record: dict) -> None:
    """Append one epoch's record to the log at ``path``, on disk before this returns."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


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
