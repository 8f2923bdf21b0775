"""CuPy's cupy.cuda.memory for the stand-in: OutOfMemoryError and a memory pool that counts live bytes."""
from __future__ import annotations

from cupy.cuda import stream as _stream


class OutOfMemoryError(MemoryError):
    """CuPy's: raised when an allocation does not fit."""

    def __init__(self, size, total, limit=0):
        self._size, self._total, self._limit = size, total, limit
        super().__init__(f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes).")

    def __reduce__(self):
        return (type(self), (self._size, self._total, self._limit))


class MemoryPool:
    """CuPy's MemoryPool: ``used_bytes`` counts the stand-in's live device arrays; nothing is cached."""

    def __init__(self, allocator=None):
        self._limit = 0

    def used_bytes(self):
        return _stream.live_bytes()

    def total_bytes(self):
        return _stream.live_bytes()

    def free_bytes(self):
        return 0

    def n_free_blocks(self):
        return 0

    def free_all_blocks(self, stream=None):
        _stream._refuse_in_capture("free_all_blocks")

    def free_all_free(self):
        self.free_all_blocks()

    def set_limit(self, size=None, fraction=None):
        self._limit = int(size or 0)

    def get_limit(self):
        return self._limit


class PinnedMemoryPool:
    """CuPy's PinnedMemoryPool (host memory: nothing to count)."""

    def __init__(self, allocator=None):
        pass

    def free_all_blocks(self):
        pass

    def n_free_blocks(self):
        return 0


_default_pool = MemoryPool()
_default_pinned_pool = PinnedMemoryPool()
