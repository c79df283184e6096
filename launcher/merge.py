"""Merge the per-process files of ``distrib.metrics`` into one CSV and one Chrome trace.

``metrics.<rank>.csv`` files become one CSV (one header: the fixed columns, then every extra
column sorted; rows sorted by step, then rank, servers last); ``timeline.<rank>.json`` files
become one ``{"traceEvents": [...]}`` file for chrome://tracing or Perfetto.
"""

from __future__ import annotations

import csv
import glob
import json
import os

# Same as distrib.metrics.COLUMNS (not imported: that would import torch into the launcher).
COLUMNS = ("step", "rank", "loss", "step_time_s", "bytes_sent")


def _rank_key(rank: str) -> tuple[int, int]:
    """Workers ("3") by rank, then servers ("s0") by index."""
    server = rank.startswith("s")
    digits = rank[1:] if server else rank
    return (int(server), int(digits) if digits.isdigit() else -1)


def _row_key(row: dict) -> tuple:
    step = row.get("step", "")
    return (int(step) if step.lstrip("-").isdigit() else -1, _rank_key(row.get("rank", "")))


def merge_metrics(directory: str, out_path: str) -> int:
    """Write ``out_path`` from the directory's ``metrics.*.csv``; returns the number of rows."""
    rows, extra = [], set()
    for path in sorted(glob.glob(os.path.join(directory, "metrics.*.csv"))):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            extra.update(c for c in reader.fieldnames or () if c not in COLUMNS)
            rows.extend(reader)
    rows.sort(key=_row_key)
    with open(out_path, "w", newline="") as f:
        writer = csv.DictWriter(f, [*COLUMNS, *sorted(extra)], restval="")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def read_events(path: str) -> list[dict]:
    """Events of one timeline file; tolerates a file cut short (a process killed mid-write)."""
    with open(path) as f:
        text = f.read()
    try:
        events = json.loads(text)
        return events if isinstance(events, list) else []
    except json.JSONDecodeError:
        pass
    events = []
    for line in text.splitlines():  # the writer puts one event per line
        line = line.strip().rstrip(",")
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return events


def merge_timeline(directory: str, out_path: str) -> int:
    """Write ``out_path`` from the directory's ``timeline.*.json``; returns the number of events."""
    events = []
    for path in sorted(glob.glob(os.path.join(directory, "timeline.*.json"))):
        events.extend(e for e in read_events(path) if isinstance(e, dict))
    events.sort(key=lambda e: (e.get("ph") != "M", e.get("ts", 0)))  # metadata first, then by time
    with open(out_path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return len(events)
