"""The watched metric of a run: it picks best.npz, stops the run early, and steers ReduceLROnPlateau.

``Watch(monitor="accuracy" | "loss", patience=None | N)`` follows one metric of
the split the trainer watches (the validation split when it has one, else the
test split) epoch by epoch. An epoch improves on the best when its accuracy is
higher, or its loss lower, than every earlier epoch's; ``patience`` epochs in a
row without improvement stop the run (``should_stop``). Its state goes into the
checkpoint, so a resumed run counts on exactly where it stopped.
"""
from __future__ import annotations

import math

from gpucnn.utils import check_int

MONITORS = ("accuracy", "loss")


class Watch:
    """Best value, its epoch, and epochs since it, of ``monitor`` ("accuracy" or "loss")."""

    def __init__(self, monitor: str = "accuracy", patience: int | None = None):
        if monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {MONITORS}, not {monitor!r}.")
        self.monitor = monitor
        self.patience = None if patience is None else check_int(patience, "patience", 1)
        self.best = None          # the best value so far (None before the first epoch)
        self.best_epoch = None
        self.bad_epochs = 0       # epochs since the best one

    def value(self, result: dict) -> float:
        """The watched number of an evaluation result ({"loss": ..., "accuracy": ...})."""
        return float(result[self.monitor])

    def update(self, result: dict, epoch: int) -> bool:
        """Count the evaluation ``result`` of ``epoch`` (1-based); True when it is the best so far."""
        value = self.value(result)
        if self.best is None or (math.isfinite(value) and self._better(value)):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def _better(self, value: float) -> bool:
        return value > self.best if self.monitor == "accuracy" else value < self.best

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` epochs in a row have not improved on the best."""
        return self.patience is not None and self.bad_epochs >= self.patience

    def describe_stop(self, split: str) -> str:
        """The console line of an early stop."""
        shown = f"{self.best:.2%}" if self.monitor == "accuracy" else f"{self.best:.4f}"
        return (f"early stop: the {split} {self.monitor} has not improved for {self.bad_epochs} epochs "
                f"(--patience {self.patience}); the best, {shown} in epoch {self.best_epoch}, is in best.npz")

    def state_dict(self) -> dict:
        return {"monitor": self.monitor, "best": self.best, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()`` of a Watch on the same metric (patience stays this Watch's)."""
        if not isinstance(state, dict) or state.get("monitor") != self.monitor:
            found = state.get("monitor") if isinstance(state, dict) else state
            raise ValueError(f"the checkpoint watched the {found}, but this run watches the {self.monitor}; "
                             "resume with the same --monitor.")
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], int(state["bad_epochs"])
