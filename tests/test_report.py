"""``distrib report``: plots loss and step time from metrics CSVs into an image."""

import subprocess
import sys

import pytest

from launcher.report import step_means

pytest.importorskip("matplotlib")


def write(path, rows):
    path.write_text("step,rank,loss,step_time_s,bytes_sent\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))


def test_step_means(tmp_path):
    f = tmp_path / "a.csv"
    write(f, [(0, 0, 4.0, 0.2, 10), (0, 1, 2.0, 0.4, 30), (1, 0, "", 0.1, 10), (1, 1, "", 0.3, 10)])
    series = step_means(str(f))
    assert series["loss"] == ([0], [3.0])  # steps without a loss are skipped
    assert series["step_time_s"][0] == [0, 1] and series["step_time_s"][1] == pytest.approx([0.3, 0.2])
    assert series["bytes_sent"] == ([0, 1], [20.0, 10.0])


def test_report_writes_png(tmp_path):
    a, b = tmp_path / "fp32.csv", tmp_path / "topk.csv"
    write(a, [(s, r, 1.0 / (s + 1), 0.1, 1000) for s in range(5) for r in range(2)])
    write(b, [(s, r, 1.2 / (s + 1), 0.05, 100) for s in range(5) for r in range(2)])
    out = tmp_path / "cmp.png"
    r = subprocess.run([sys.executable, "-m", "launcher.cli", "report", str(a), str(b), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_report_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    for args in ([str(tmp_path / "missing.csv")], [str(bad)]):
        r = subprocess.run([sys.executable, "-m", "launcher.cli", "report", *args, "-o", str(tmp_path / "o.png")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "error" in r.stderr and "Traceback" not in r.stderr
