"""Rank-prefixed output: every line a process writes is forwarded as ``[label] line``.

One reader thread per pipe; a lock keeps lines whole when many processes write at once. The
last lines of each process's stderr are kept for the failure summary (its traceback).
"""

from __future__ import annotations

import sys
import threading
from collections import deque

TAIL_LINES = 15


class Output:
    """Writes labelled lines to our stdout / stderr, one whole line at a time."""

    def __init__(self, stdout=None, stderr=None):
        self._streams = {
            "stdout": stdout if stdout is not None else _binary(sys.stdout),
            "stderr": stderr if stderr is not None else _binary(sys.stderr),
        }
        self._lock = threading.Lock()

    def line(self, stream: str, label: str | None, data: bytes) -> None:
        """Write one line (``data`` with or without its newline), prefixed ``[label] `` if given."""
        if not data.endswith(b"\n"):
            data += b"\n"
        if label is not None:
            data = b"[" + label.encode() + b"] " + data
        out = self._streams[stream]
        with self._lock:
            try:
                out.write(data)
                out.flush()
            except (OSError, ValueError):  # our own output was closed: keep draining the pipe
                pass

    def pump(self, pipe, stream: str, label: str, tail: deque | None = None) -> threading.Thread:
        """Start a daemon thread forwarding ``pipe`` line by line until it closes."""

        def run():
            with pipe:
                for data in iter(pipe.readline, b""):
                    self.line(stream, label, data)
                    if tail is not None:
                        tail.append(data.decode(errors="replace").rstrip("\n"))

        thread = threading.Thread(target=run, name=f"output-{label}-{stream}", daemon=True)
        thread.start()
        return thread


class _TextSink:
    """Bytes written to a text-only stream (such as a StringIO standing in for sys.stdout)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.stream.write(data.decode(errors="replace"))

    def flush(self) -> None:
        self.stream.flush()


def _binary(stream):
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()  # keep order with text already written
        return buffer
    return _TextSink(stream)


def new_tail() -> deque:
    """A buffer keeping the last :data:`TAIL_LINES` lines."""
    return deque(maxlen=TAIL_LINES)
