"""Per-step metrics and a timeline, written by each process for ``distrib launch --metrics/--timeline``.

When the launcher sets ``DISTRIB_METRICS_DIR``, each process writes there:

- ``metrics.<rank>.csv``: one row per :func:`step_end` with columns ``step, rank, loss,
  step_time_s, bytes_sent`` and then any extra field, sorted by name (a field a row lacks is
  empty). ``step`` counts from 0, ``step_time_s`` is the wall time since the previous
  :func:`step_end` (or since first use), ``bytes_sent`` the bytes this process's transport sent
  during the step (for step 0, since the transport started: the column sums to the total);
- ``timeline.<rank>.json``: Chrome-trace events (a JSON list, valid after every flush) from
  :func:`span`, :func:`instant` and one ``step`` span per step, with ``pid`` = rank.

Both are flushed at every :func:`step_end` and at exit; the launcher merges the ranks' files.
Without ``DISTRIB_METRICS_DIR`` every function is a cheap no-op. Servers write
``metrics.s<index>.csv`` / ``timeline.s<index>.json`` (their trace ``pid`` is their transport rank).
"""

from __future__ import annotations

import atexit
import csv
import json
import os
import threading
import time
from contextlib import nullcontext

__all__ = ["COLUMNS", "enabled", "record", "step_end", "span", "instant", "flush"]

COLUMNS = ("step", "rank", "loss", "step_time_s", "bytes_sent")  # always first, in this order

_lock = threading.Lock()
_recorder = None
_checked = False
_NULL_SPAN = nullcontext()


def _get():
    """The process's recorder, created on first use; None when metrics are off."""
    global _recorder, _checked
    if not _checked:
        with _lock:
            if not _checked:
                directory = os.environ.get("DISTRIB_METRICS_DIR")
                _recorder = _Recorder(directory) if directory else None
                _checked = True
    return _recorder


def enabled() -> bool:
    """Whether this process records metrics (``DISTRIB_METRICS_DIR`` is set)."""
    return _get() is not None


def record(**fields) -> None:
    """Add fields (``loss=...``; 1-element tensors are fine) to the current step's row."""
    rec = _get()
    if rec is not None:
        rec.record(fields)


def step_end(**fields) -> None:
    """Close the current step: write its row (with ``fields`` added) and flush both files."""
    rec = _get()
    if rec is not None:
        rec.step_end(fields)


def span(name: str, cat: str = "comm", **args):
    """Context manager recording a complete ("X") timeline event around its block."""
    rec = _get()
    return _NULL_SPAN if rec is None else _Span(rec, name, cat, args)


def instant(name: str, cat: str = "mark", **args) -> None:
    """Record an instant ("i") timeline event now."""
    rec = _get()
    if rec is not None:
        rec.event({"name": name, "cat": cat, "ph": "i", "s": "t", "ts": rec.now_us()}, args)


def flush() -> None:
    """Write out what is pending (also done at every :func:`step_end` and at exit)."""
    rec = _get()
    if rec is not None:
        rec.flush()


def _reset() -> None:
    """Flush and forget the recorder, re-reading the environment at next use (for tests)."""
    global _recorder, _checked
    with _lock:
        if _recorder is not None:
            _recorder.close()
        _recorder, _checked = None, False


def _bytes_sent() -> int:
    # Imported lazily: metrics must work (and stay cheap) before or without a transport.
    try:
        from distrib import context

        return int(context.bytes_sent())
    except Exception:  # no context module yet, not initialized...: nothing was sent
        return 0


def _plain(value):
    """Tensors and numpy scalars as Python numbers."""
    return value.item() if hasattr(value, "item") else value


class _Span:
    """One timed block; records itself on exit."""

    __slots__ = ("rec", "name", "cat", "args", "start")

    def __init__(self, rec, name, cat, args):
        self.rec, self.name, self.cat, self.args = rec, name, cat, args

    def __enter__(self):
        self.start = self.rec.now_us()
        return self

    def __exit__(self, *exc):
        end = self.rec.now_us()
        self.rec.event({"name": self.name, "cat": self.cat, "ph": "X", "ts": self.start,
                        "dur": round(end - self.start, 3)}, self.args)
        return False


class _Recorder:
    """Rows and events of this process, appended to its two files."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        role = os.environ.get("DISTRIB_ROLE", "worker")
        index = int(os.environ.get("DISTRIB_RANK", "0"))
        if role == "server":
            self.rank = f"s{index}"
            self.pid = int(os.environ.get("DISTRIB_SIZE", "0")) + index  # its transport rank
            title = f"server {index}"
        else:
            self.rank, self.pid, title = str(index), index, f"rank {index}"
        self.csv_path = os.path.join(directory, f"metrics.{self.rank}.csv")
        self.trace_path = os.path.join(directory, f"timeline.{self.rank}.json")
        self.lock = threading.Lock()
        self.closed = False
        self.step = 0
        self.pending: dict = {}
        self.columns: list[str] | None = None  # of the CSV written so far
        self.csv_file = None
        self.trace_file = None
        self.trace_end = 0  # file offset where the closing "]" goes
        self.tids: dict[int, int] = {}
        # Timestamps: wall clock at start (to line ranks up) plus a monotonic offset.
        self.wall0_us = time.time() * 1e6
        self.perf0 = time.perf_counter()
        self.events = [
            {"name": "process_name", "ph": "M", "pid": self.pid, "tid": 0, "args": {"name": title}},
            {"name": "process_sort_index", "ph": "M", "pid": self.pid, "tid": 0, "args": {"sort_index": self.pid}},
        ]
        self.step_start = self.now_us()
        self.bytes_before = 0  # step 0 counts every byte sent so far: the column sums to the total
        atexit.register(self.close)

    def now_us(self) -> float:
        return round(self.wall0_us + (time.perf_counter() - self.perf0) * 1e6, 3)

    def _tid(self) -> int:
        ident = threading.get_ident()
        tid = self.tids.get(ident)
        if tid is None:  # first event of this thread: name it in the trace
            tid = self.tids[ident] = len(self.tids)
            name = threading.current_thread().name
            self.events.append({"name": "thread_name", "ph": "M", "pid": self.pid, "tid": tid,
                                "args": {"name": name}})
        return tid

    def event(self, ev: dict, args: dict) -> None:
        with self.lock:
            if self.closed:
                return
            ev["pid"], ev["tid"] = self.pid, self._tid()
            if args:
                ev["args"] = {k: _plain(v) for k, v in args.items()}
            self.events.append(ev)

    def record(self, fields: dict) -> None:
        with self.lock:
            if self.closed:
                return
            self.pending.update({k: _plain(v) for k, v in fields.items()})

    def step_end(self, fields: dict) -> None:
        now = self.now_us()
        sent = _bytes_sent()
        with self.lock:
            if self.closed:
                return
            row = {"step_time_s": round((now - self.step_start) / 1e6, 6),
                   "bytes_sent": sent - self.bytes_before}
            row.update(self.pending)
            row.update({k: _plain(v) for k, v in fields.items()})
            row["step"], row["rank"] = self.step, self.rank
            self.events.append({"name": "step", "cat": "step", "ph": "X", "ts": self.step_start,
                                "dur": round(now - self.step_start, 3), "pid": self.pid,
                                "tid": self._tid(), "args": {"step": self.step}})
            self._write_row(row)
            self.step += 1
            self.pending = {}
            self.step_start, self.bytes_before = now, sent
            self._flush_events()

    def _write_row(self, row: dict) -> None:
        extra = sorted(k for k in row if k not in COLUMNS and (self.columns is None or k not in self.columns))
        if self.csv_file is None or extra:
            # New columns: rewrite the file with the wider header (rare: usually step 0 only).
            old_rows = []
            if self.csv_file is not None:
                self.csv_file.close()
                with open(self.csv_path, newline="") as f:
                    old_rows = list(csv.DictReader(f))
            known = [] if self.columns is None else [c for c in self.columns if c not in COLUMNS]
            self.columns = [*COLUMNS, *sorted(set(known) | set(extra))]
            self.csv_file = open(self.csv_path, "w", newline="")
            self.writer = csv.DictWriter(self.csv_file, self.columns, restval="")
            self.writer.writeheader()
            self.writer.writerows(old_rows)
        self.writer.writerow(row)
        self.csv_file.flush()

    def _flush_events(self) -> None:
        if not self.events:
            return
        # default=str: an odd span argument (a dtype, a device...) must not break training.
        body = ",\n".join(json.dumps(e, separators=(",", ":"), default=str) for e in self.events)
        self.events = []
        if self.trace_file is None:
            self.trace_file = open(self.trace_path, "w")
            self.trace_file.write("[\n" + body)
        else:
            self.trace_file.seek(self.trace_end)
            self.trace_file.write(",\n" + body)
        self.trace_end = self.trace_file.tell()
        self.trace_file.write("\n]\n")
        self.trace_file.truncate()
        self.trace_file.flush()

    def flush(self) -> None:
        with self.lock:
            if self.closed:
                return
            self._flush_events()
            if self.csv_file is not None:
                self.csv_file.flush()

    def close(self) -> None:
        """Flush and close both files; later calls record nothing (e.g. from other atexit hooks)."""
        if self.closed:
            return
        self.flush()
        with self.lock:
            self.closed = True
            for f in (self.csv_file, self.trace_file):
                if f is not None:
                    f.close()
