"""examples/pipeline_train.py: the MLP split over 4 pipeline stages reaches the accuracy of the
same model trained unpartitioned in one process (same seeds, so the same trajectory up to
rounding)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pipeline_train.py"


def _run(args, timeout=150):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DISTRIB_") and k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _accuracy(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.findall(r"test_accuracy=([0-9.]+)", proc.stdout)
    assert len(found) == 1, proc.stdout  # the last stage of replica 0 only
    return float(found[0])


@pytest.mark.timeout(300)
def test_four_stages_match_the_unpartitioned_model():
    steps = ["--steps", "150"]
    ref = _accuracy(_run([str(EXAMPLE), "--reference", *steps]))
    proc = _run(["-m", "launcher.cli", "launch", "-n", "4", str(EXAMPLE), *steps])
    assert "1 replica(s) x 4 stages" in proc.stdout
    acc = _accuracy(proc)
    assert ref > 0.9
    assert abs(acc - ref) <= 0.01, (acc, ref)
