"""Streams, events and the stand-in's device: every operation runs on a stream, in order.

What the stand-in checks here, beyond what NumPy would do:

- **Stream capture.** While a stream captures, operations issued to it are kept (a Graph replays
  them) instead of run. Allocation, synchronisation, a host read, and any use of the legacy default
  stream are refused with CuPy's CUDARuntimeError (cudaErrorStreamCaptureUnsupported /
  cudaErrorStreamCaptureImplicit) and invalidate the capture, so ``end_capture()`` then raises
  cudaErrorStreamCaptureInvalidated, as CUDA does.
- **Stream order.** Every allocation remembers the stream and time of its last write. Using it on
  another stream, or reading it on the host, before that write is ordered (same stream; the legacy
  stream's implicit synchronisation with blocking streams; ``wait_event``; a synchronize) raises
  StreamOrderError, the stand-in's own error: on a GPU that is a race, not an exception.
"""
from __future__ import annotations

import itertools
import threading
import time
import weakref

from cupy.cuda.runtime import CAPTURE_IMPLICIT, CAPTURE_INVALIDATED, CAPTURE_UNSUPPORTED, CUDARuntimeError


class StreamOrderError(RuntimeError):
    """An array was used where its last write is not ordered before the use (a race on a GPU)."""


_clock = itertools.count(1)
_local = threading.local()      # .stack: the streams made current by ``with``/``use()``, innermost last
_streams = weakref.WeakSet()    # every stream made (the legacy stream's implicit synchronisation)
_host_done = {}                 # stream -> the time up to which the host has waited for it
_last_write = {}                # id(allocation) -> (stream, time)
_captures = []                  # the streams capturing now
_live_bytes = [0]               # bytes of live allocations (the memory pool's used_bytes)


def _merge(into: dict, other: dict) -> None:
    for stream, when in other.items():
        if when > into.get(stream, 0):
            into[stream] = when


class Stream:
    """CuPy's cupy.cuda.Stream: ``with stream:`` makes it current; ``Stream.null`` is the legacy stream."""

    null = None  # set below

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        self._null = bool(null)
        self._non_blocking = bool(non_blocking)
        self._priority = 0 if priority is None else int(priority)
        self.seq = 0            # time of the last operation on this stream
        self.seen = {}          # other stream -> the time up to which this stream is ordered after it
        self.capture = None     # the kept operations while capturing
        self.invalidated = False
        _streams.add(self)

    def __repr__(self):
        return f"<Stream {self.ptr} (device 0) stand-in>"

    @property
    def ptr(self):
        return 0 if self._null else id(self)

    @property
    def is_non_blocking(self):
        return self._non_blocking

    @property
    def priority(self):
        return self._priority

    @property
    def done(self):
        _refuse_in_capture("cudaStreamQuery")
        return True

    def __enter__(self):
        _stack().append(self)
        return self

    def __exit__(self, *exc):
        _stack().pop()

    def use(self):
        stack = _stack()
        stack[0:1] = [self]
        return self

    def synchronize(self):
        _refuse_in_capture("cudaStreamSynchronize")
        _host_waits_for(self)

    def record(self, event=None):
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event):
        if event._stream is not None:
            _merge(self.seen, event._seen)
            _merge(self.seen, {event._stream: event._seq})

    def begin_capture(self, mode=None):
        if self._null or self.capture is not None:
            raise CUDARuntimeError(CAPTURE_UNSUPPORTED)
        self.capture, self.invalidated = [], False
        _captures.append(self)

    def is_capturing(self):
        return self.capture is not None

    def end_capture(self):
        from cupy.cuda.graph import Graph  # noqa: PLC0415 - graph imports this module

        if self.capture is None:
            raise CUDARuntimeError(1)
        nodes, self.capture = self.capture, None
        _captures.remove(self)
        if self.invalidated:
            raise CUDARuntimeError(CAPTURE_INVALIDATED)
        return Graph(nodes)


Stream.null = Stream(null=True)


def _stack():
    if not hasattr(_local, "stack"):
        _local.stack = [Stream.null]
    return _local.stack


def get_current_stream(device_id=-1):
    return _stack()[-1]


def stream_of_pointer(ptr):
    """The stream whose ``ptr`` is ``ptr`` (0: the legacy stream)."""
    for stream in list(_streams):
        if stream.ptr == ptr:
            return stream
    raise CUDARuntimeError(1)


class Event:
    """CuPy's cupy.cuda.Event: records a point on a stream; ``synchronize`` waits for it on the host."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._disable_timing = bool(disable_timing)
        self._stream, self._seq, self._seen, self._time, self._in_capture = None, 0, {}, None, False

    def record(self, stream=None):
        stream = get_current_stream() if stream is None else stream
        if stream._null and _captures:
            _invalidate_captures()
            raise CUDARuntimeError(CAPTURE_IMPLICIT)
        self._stream, self._seq, self._seen = stream, stream.seq, dict(stream.seen)
        self._in_capture = stream.capture is not None
        self._time = time.perf_counter()

    @property
    def done(self):
        _refuse_in_capture("cudaEventQuery")
        return True

    def synchronize(self):
        _refuse_in_capture("cudaEventSynchronize")
        if self._stream is not None:
            _merge(_host_done, self._seen)
            _merge(_host_done, {self._stream: self._seq})


def get_elapsed_time(start_event, end_event):
    """Milliseconds between two recorded events (host time: the stand-in measures nothing on a GPU)."""
    for event in (start_event, end_event):
        if event._time is None or event._disable_timing or event._in_capture:
            raise CUDARuntimeError(1)
    return 1000.0 * (end_event._time - start_event._time)


# ---- the operations of the device --------------------------------------------------------------

def _refuse_in_capture(what):
    if _captures:
        _invalidate_captures()
        raise CUDARuntimeError(CAPTURE_UNSUPPORTED)


def _invalidate_captures():
    for stream in _captures:
        stream.invalidated = True


def _root(array):
    while getattr(array, "base", None) is not None and hasattr(array.base, "__array_interface__"):
        array = array.base
    return array


def _ordered(stream, array, where):
    last = _last_write.get(id(_root(array)))
    if last is None:
        return
    writer, when = last
    if writer is stream or stream.seen.get(writer, 0) >= when or _host_done.get(writer, 0) >= when:
        return
    raise StreamOrderError(f"{where}: an array last written on {writer!r} is used on {stream!r} without "
                           "ordering (no wait_event or synchronize in between); on a GPU this is a race.")


def _implicit_synchronisation(stream):
    """The legacy stream waits for every blocking stream, and blocking streams wait for it."""
    legacy = Stream.null
    if stream is legacy:
        for other in list(_streams):
            if other is not legacy and not other._non_blocking:
                _merge(stream.seen, other.seen)
                stream.seen[other] = max(stream.seen.get(other, 0), other.seq)
    elif not stream._non_blocking:
        _merge(stream.seen, legacy.seen)
        stream.seen[legacy] = max(stream.seen.get(legacy, 0), legacy.seq)


def run_now(stream, fn, reads, writes, what):
    """Run ``fn`` as an operation on ``stream``: its arrays' last writes must be ordered before it."""
    _implicit_synchronisation(stream)
    for array in (*reads, *writes):
        _ordered(stream, array, what)
    result = fn() if fn is not None else None
    stream.seq = next(_clock)
    for array in writes:
        _last_write[id(_root(array))] = (stream, stream.seq)
    return result


def launch(fn, reads, writes, stream=None, what="an operation"):
    """Issue ``fn`` (reading ``reads``, writing ``writes``: NumPy arrays) on ``stream`` (None: the current one).

    On a capturing stream it is kept for the graph; on the legacy stream during a capture it is refused.
    """
    stream = get_current_stream() if stream is None else stream
    if stream._null and _captures:
        _invalidate_captures()
        raise CUDARuntimeError(CAPTURE_IMPLICIT)
    if stream.capture is not None:
        stream.capture.append((fn, tuple(reads), tuple(writes), what))
        return None
    return run_now(stream, fn, reads, writes, what)


def allocate(array, written=True, what="an allocation"):
    """Account a new device allocation (NumPy ``array``); refused during a capture."""
    _refuse_in_capture(what)
    root = _root(array)
    key, nbytes = id(root), root.nbytes
    _live_bytes[0] += nbytes
    weakref.finalize(root, _free, key, nbytes)
    if written:
        run_now(get_current_stream(), None, (), (array,), what)


def _free(key, nbytes):
    _live_bytes[0] -= nbytes
    _last_write.pop(key, None)


def _host_waits_for(stream):
    _merge(_host_done, stream.seen)
    _host_done[stream] = stream.seq


def host_read(arrays, what="a host read"):
    """A device-to-host copy on the current stream, waited for: refused in a capture; the arrays'
    last writes must be ordered before it."""
    _refuse_in_capture(what)
    stream = get_current_stream()
    _implicit_synchronisation(stream)
    _host_waits_for(stream)
    for array in arrays:
        last = _last_write.get(id(_root(array)))
        if last is not None and _host_done.get(last[0], 0) < last[1]:
            raise StreamOrderError(f"{what}: an array last written on {last[0]!r} is read on the host after "
                                   f"synchronising only {stream!r}; on a GPU this reads stale data.")


def synchronize_all(what="cudaDeviceSynchronize"):
    _refuse_in_capture(what)
    for stream in list(_streams):
        _host_waits_for(stream)


def live_bytes():
    return _live_bytes[0]
