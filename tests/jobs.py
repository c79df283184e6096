"""Run small multi-process jobs through the real launcher, for the tests.

``run_job(tmp_path, n, body)`` writes ``body`` (Python source; ``distrib`` and ``torch`` are
imported and ``distrib.init()`` has been called, ``R``/``N`` hold rank and size) to a script and
runs ``python -m launcher.cli launch -n N --transport T script`` with a hard time limit.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSPORTS = ("zmq", "mpi")

PRELUDE = """\
import os, sys, time
import torch
import distrib
distrib.init(timeout=float(os.environ.get("TEST_COMM_TIMEOUT", "30")))
R, N = distrib.rank(), distrib.size()
torch.set_num_threads(1)
"""


def run_job(tmp_path, n, body, transport="zmq", args=(), timeout=90, comm_timeout=30,
            launch_args=(), env=None, prelude=True):
    script = tmp_path / f"job_{abs(hash(body)) % 10 ** 8}.py"
    script.write_text((PRELUDE if prelude else "") + textwrap.dedent(body))
    cmd = [sys.executable, "-m", "launcher.cli", "launch", "-n", str(n), "--transport", transport,
           *launch_args, str(script), *map(str, args)]
    full_env = dict(os.environ, TEST_COMM_TIMEOUT=str(comm_timeout), PYTHONPATH=ROOT)
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def assert_ok(proc):
    assert proc.returncode == 0, f"job failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def lines_of(stdout, rank):
    """Output lines of one rank, without the launcher's ``[rank] `` prefix."""
    prefix = f"[{rank}] "
    return [l[len(prefix):] for l in stdout.splitlines() if l.startswith(prefix)]
