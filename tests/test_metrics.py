"""distrib.metrics (worker side) and the launcher's merge of the per-rank files."""

import csv
import json
import subprocess
import sys
import textwrap
import time

import pytest

from distrib import metrics
from launcher import merge


@pytest.fixture
def metrics_dir(tmp_path, monkeypatch):
    """Metrics on, as rank 2 of a launched job; a fresh recorder before and after."""
    monkeypatch.setenv("DISTRIB_METRICS_DIR", str(tmp_path))
    monkeypatch.setenv("DISTRIB_RANK", "2")
    monkeypatch.setenv("DISTRIB_ROLE", "worker")
    metrics._reset()
    yield tmp_path
    metrics._reset()


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_noop_without_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTRIB_METRICS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    metrics._reset()
    try:
        assert not metrics.enabled()
        with metrics.span("x"):
            pass
        metrics.instant("y")
        metrics.record(loss=1.0)
        metrics.step_end(extra=1)
        metrics.flush()
        assert list(tmp_path.iterdir()) == []
    finally:
        metrics._reset()


def test_rows_columns_and_flush_per_step(metrics_dir, monkeypatch):
    torch = pytest.importorskip("torch")
    sent = iter([150, 400, 400])  # the transport's counter at each step_end
    monkeypatch.setattr(metrics, "_bytes_sent", lambda: next(sent))
    assert metrics.enabled()
    time.sleep(0.02)
    metrics.record(loss=torch.tensor(0.5))
    metrics.step_end()
    path = metrics_dir / "metrics.2.csv"
    header, rows = read_csv(path)  # readable before exit: flushed at step_end
    assert header == ["step", "rank", "loss", "step_time_s", "bytes_sent"]
    assert rows == [{"step": "0", "rank": "2", "loss": "0.5", "step_time_s": rows[0]["step_time_s"],
                     "bytes_sent": "150"}]
    assert float(rows[0]["step_time_s"]) >= 0.02
    metrics.record(loss=0.25, zeta=1)
    metrics.step_end(alpha="a")  # new columns: the file is rewritten with the wider header
    metrics.step_end()  # nothing recorded: loss stays empty
    header, rows = read_csv(path)
    assert header == ["step", "rank", "loss", "step_time_s", "bytes_sent", "alpha", "zeta"]
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert [r["loss"] for r in rows] == ["0.5", "0.25", ""]
    assert [r["alpha"] for r in rows] == ["", "a", ""] and [r["zeta"] for r in rows] == ["", "1", ""]
    assert [r["bytes_sent"] for r in rows] == ["150", "250", "0"]


def test_timeline_events(metrics_dir):
    with metrics.span("allreduce", numel=10):
        time.sleep(0.01)
    with metrics.span("encode", cat="compress"):
        pass
    metrics.instant("overflow")
    metrics.step_end()
    events = json.loads((metrics_dir / "timeline.2.json").read_text())  # valid JSON after each flush
    spans = {e["name"]: e for e in events if e["ph"] == "X"}
    assert spans["allreduce"]["cat"] == "comm" and spans["allreduce"]["args"] == {"numel": 10}
    assert spans["allreduce"]["dur"] >= 10_000 and spans["allreduce"]["pid"] == 2
    assert spans["encode"]["cat"] == "compress"
    assert spans["step"]["args"] == {"step": 0}
    assert spans["step"]["ts"] <= spans["allreduce"]["ts"] < spans["encode"]["ts"]
    assert any(e["ph"] == "i" and e["name"] == "overflow" for e in events)
    assert any(e["ph"] == "M" and e["args"] == {"name": "rank 2"} for e in events)
    with metrics.span("later"):
        pass
    metrics.flush()
    events = json.loads((metrics_dir / "timeline.2.json").read_text())
    assert events[-1]["name"] == "later"


def test_server_files(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTRIB_METRICS_DIR", str(tmp_path))
    monkeypatch.setenv("DISTRIB_ROLE", "server")
    monkeypatch.setenv("DISTRIB_RANK", "1")
    monkeypatch.setenv("DISTRIB_SIZE", "4")
    metrics._reset()
    try:
        with metrics.span("apply"):
            pass
        metrics.step_end()
    finally:
        metrics._reset()
    events = json.loads((tmp_path / "timeline.s1.json").read_text())
    assert {e["pid"] for e in events} == {5}  # its transport rank
    assert read_csv(tmp_path / "metrics.s1.csv")[1][0]["rank"] == "s1"


def test_merge(tmp_path):
    (tmp_path / "metrics.1.csv").write_text("step,rank,loss,step_time_s,bytes_sent,b\n0,1,2.0,0.1,5,x\n1,1,1.0,0.1,5,y\n")
    (tmp_path / "metrics.0.csv").write_text("step,rank,loss,step_time_s,bytes_sent\n0,0,3.0,0.1,5\n1,0,2.5,0.1,5\n")
    (tmp_path / "metrics.s0.csv").write_text("step,rank,loss,step_time_s,bytes_sent,a\n0,s0,,0.1,9,z\n")
    out = tmp_path / "all.csv"
    assert merge.merge_metrics(str(tmp_path), str(out)) == 5
    header, rows = read_csv(out)
    assert header == ["step", "rank", "loss", "step_time_s", "bytes_sent", "a", "b"]
    assert [(r["step"], r["rank"]) for r in rows] == [("0", "0"), ("0", "1"), ("0", "s0"), ("1", "0"), ("1", "1")]
    assert rows[1]["b"] == "x" and rows[0]["b"] == "" and rows[2]["a"] == "z"
    # A timeline cut short (its process was killed mid-write) still merges.
    (tmp_path / "timeline.0.json").write_text('[\n{"name":"a","ph":"X","ts":2,"dur":1,"pid":0,"tid":0},\n{"na')
    (tmp_path / "timeline.1.json").write_text('[\n{"name":"b","ph":"X","ts":1,"dur":1,"pid":1,"tid":0}\n]\n')
    trace = tmp_path / "all.json"
    assert merge.merge_timeline(str(tmp_path), str(trace)) == 2
    assert [e["name"] for e in json.loads(trace.read_text())["traceEvents"]] == ["b", "a"]


def test_columns_agree():
    assert merge.COLUMNS == metrics.COLUMNS


@pytest.mark.timeout(180)
def test_launch_merges_metrics_and_timeline(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import os
        from distrib import metrics
        rank = int(os.environ["DISTRIB_RANK"])
        for step in range(3):
            with metrics.span("allreduce", step=step):
                pass
            metrics.record(loss=10.0 * rank + step)
            metrics.step_end(lr=0.1)
    """))
    r = subprocess.run([sys.executable, "-m", "launcher.cli", "launch", "-n", "2", "--metrics", "m.csv",
                        "--timeline", "t.json", str(script)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=150)
    assert r.returncode == 0, r.stderr
    header, rows = read_csv(tmp_path / "m.csv")
    assert header == ["step", "rank", "loss", "step_time_s", "bytes_sent", "lr"]
    assert [(r["step"], r["rank"], r["loss"]) for r in rows] == [
        ("0", "0", "0.0"), ("0", "1", "10.0"), ("1", "0", "1.0"), ("1", "1", "11.0"), ("2", "0", "2.0"),
        ("2", "1", "12.0")]
    assert all(r["bytes_sent"] == "0" and float(r["step_time_s"]) >= 0 and r["lr"] == "0.1" for r in rows)
    trace = json.loads((tmp_path / "t.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"] == "allreduce"]
    assert sorted((e["pid"], e["args"]["step"]) for e in spans) == [(p, s) for p in (0, 1) for s in range(3)]
    assert not list(tmp_path.glob("metrics.*.csv"))  # per-rank files stayed in the launcher's temp dir
