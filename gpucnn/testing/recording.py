"""A kernel runtime that records every launch it makes, so that the launches can be replayed later.

The GPU benchmarks (bench/gpu_ops.py) time a launcher's kernels without its Python around them by
replaying what it recorded; tests use it to see which kernels a launcher runs. It wraps any runtime
with ``function``, ``empty`` and ``zeros`` (CupyRuntime, EmulatorRuntime).
"""
from __future__ import annotations

from gpucnn.cuda.graph import Launch, replay  # noqa: F401 - the launch record and its replay, shared with the step


class RecordingRuntime:
    """A runtime that launches through ``inner`` and records every launch, to be replayed later.

    Replays reuse the recorded argument arrays: refill the inputs in place for fresh data.
    """

    def __init__(self, inner):
        self.inner = inner
        self.xp = inner.xp
        self.launches: list[Launch] = []

    def function(self, file, name):
        kernel = self.inner.function(file, name)

        def launch(grid, block, args, shared_mem=0):
            self.launches.append(Launch(name, kernel, tuple(grid), tuple(block), tuple(args), shared_mem))
            kernel(grid, block, args, shared_mem=shared_mem)
        return launch

    def empty(self, shape, dtype):
        return self.inner.empty(shape, dtype)

    def zeros(self, shape, dtype):
        return self.inner.zeros(shape, dtype)

    @property
    def names(self) -> list[str]:
        """The names of the kernels recorded since the last take(), in launch order."""
        return [launch.name for launch in self.launches]

    def take(self) -> list[Launch]:
        """The launches recorded since the last take()."""
        launches, self.launches = self.launches, []
        return launches
