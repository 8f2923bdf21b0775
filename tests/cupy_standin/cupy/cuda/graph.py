"""CuPy's cupy.cuda.graph.Graph for the stand-in: the operations a capture kept, replayed in order."""
from __future__ import annotations

from cupy.cuda import stream as _stream


class Graph:
    """A captured stream's operations; ``launch(stream)`` runs them there (ordering checked again)."""

    def __init__(self, nodes):
        self._nodes = list(nodes)

    def upload(self, stream=None):
        """Nothing to upload on the host."""

    def launch(self, stream=None):
        stream = _stream.get_current_stream() if stream is None else stream
        if stream._null and _stream._captures:
            _stream._invalidate_captures()
            raise _stream.CUDARuntimeError(_stream.CAPTURE_IMPLICIT)
        for fn, reads, writes, what in self._nodes:
            if stream.capture is not None:
                stream.capture.append((fn, reads, writes, what))
            else:
                _stream.run_now(stream, fn, reads, writes, what)
