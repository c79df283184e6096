"""Spawn the processes of one attempt, watch them, stop them all when one fails.

Each process gets its own session (process group), so stopping it also stops whatever it
started, and a Ctrl-C in the terminal reaches only the launcher, which then stops everyone in
order: SIGTERM, a grace period, SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from launcher.errors import LaunchError
from launcher.output import Output, new_tail
from launcher.plan import ProcSpec

POLL_S = 0.05
DRAIN_S = 2.0  # how long to wait for a finished process's last output lines


class Interrupted(KeyboardInterrupt):
    """The launcher itself got SIGINT or SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Failure:
    """The process whose exit made the attempt fail."""

    label: str  # output label: "3", "s0"
    role: str  # "worker", "server", or "mpiexec" when the rank is unknown
    returncode: int  # negative: killed by that signal
    tail: list[str] = field(default_factory=list)

    @property
    def who(self) -> str:
        if self.role == "worker":
            return f"rank {self.label}"
        if self.role == "server":
            return f"server {self.label.lstrip('s')}"
        return self.label  # e.g. mpiexec, when it did not say which rank failed

    @property
    def how(self) -> str:
        if self.returncode < 0:
            return f"killed by signal {signal_name(-self.returncode)}"
        return f"exit code {self.returncode}"

    @property
    def exit_status(self) -> int:
        """The launcher's own exit status for this failure: the code, or 128 + signal."""
        rc = self.returncode
        return 128 - rc if rc < 0 else (rc if 0 < rc < 256 else 1)


@dataclass
class Outcome:
    """How one attempt ended."""

    failure: Failure | None = None
    interrupted: Interrupted | None = None
    stopped: int = 0  # processes the launcher had to stop

    @property
    def ok(self) -> bool:
        return self.failure is None and self.interrupted is None

    @property
    def exit_status(self) -> int:
        if self.interrupted is not None:
            return 128 + self.interrupted.signum
        return self.failure.exit_status if self.failure else 0


def signal_name(signum: int) -> str:
    try:
        return f"{signal.Signals(signum).name} ({signum})"
    except ValueError:
        return str(signum)


def summary(outcome: Outcome) -> str:
    """The text printed after a failed attempt: who failed, how, and its last stderr lines."""
    f = outcome.failure
    if f is None:
        if outcome.interrupted is not None:
            return f"distrib: interrupted by {outcome.interrupted}; stopped every process"
        return "distrib: all workers finished"
    lines = [f"distrib: {f.who} failed: {f.how}"
             + (f"; stopped {outcome.stopped} other processes" if outcome.stopped else "")]
    if f.tail:
        lines.append(f"distrib: last {len(f.tail)} lines of {f.who}'s stderr:")
        lines += ["    " + t for t in f.tail]
    else:
        lines.append(f"distrib: {f.who} wrote nothing on stderr")
    return "\n".join(lines)


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()
PR_SET_PDEATHSIG = 1


def spawn(cmd: list[str], cwd: str, env: dict | None) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own, its output piped, stdin closed.

    On Linux the child is also killed when the launcher dies, even by SIGKILL (a test harness's
    timeout, the OOM killer), so no worker outlives its launcher waiting on dead peers.
    """
    preexec = None
    if _PRCTL is not None:
        launcher_pid = os.getpid()

        def preexec():
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
                os._exit(1)

    return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec)


class _Proc:
    """A running process and its output threads."""

    def __init__(self, spec: ProcSpec, popen: subprocess.Popen, threads, tail):
        self.spec, self.popen, self.threads, self.tail = spec, popen, threads, tail

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.popen.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def drain(self, deadline: float) -> None:
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))


class Supervisor:
    """Runs one attempt of a job: every spec at once, until all workers end or one fails.

    When every worker exits 0 the servers are stopped (their exit is not a failure). The first
    worker or server that exits non-zero or by a signal fails the attempt; the others are then
    stopped with SIGTERM and, after ``grace`` seconds, SIGKILL.
    """

    def __init__(self, specs: list[ProcSpec], cwd: str, output: Output | None = None, grace: float = 5.0):
        self.specs, self.cwd, self.grace = specs, cwd, grace
        self.output = output or Output()
        self.procs: list[_Proc] = []

    def run(self) -> Outcome:
        with _signals_raise_interrupted():
            try:
                self._start_all()
                return self._watch()
            except Interrupted as e:
                return Outcome(interrupted=e, stopped=self._stop(self.procs))
            finally:
                self._stop(self.procs)
                deadline = time.monotonic() + DRAIN_S
                for p in self.procs:
                    p.drain(deadline)

    def _start_all(self) -> None:
        started = []
        try:
            for spec in self.specs:
                cmd, inherit = spec.host.command(spec.argv, spec.env, self.cwd)
                env = {**os.environ, **spec.env} if inherit else None
                try:
                    started.append((spec, spawn(cmd, self.cwd, env)))
                except OSError as e:
                    raise LaunchError(f"cannot start {spec.label} ({cmd[0]}): {e.strerror}") from None
        finally:
            # Output threads start once every process is forked (fewer threads while forking).
            for spec, popen in started:
                tail = new_tail()
                threads = [
                    self.output.pump(popen.stdout, "stdout", spec.label),
                    self.output.pump(popen.stderr, "stderr", spec.label, tail),
                ]
                self.procs.append(_Proc(spec, popen, threads, tail))

    def _watch(self) -> Outcome:
        workers = [p for p in self.procs if p.spec.role == "worker"]
        while True:
            failed = [p for p in self.procs if p.popen.poll() not in (None, 0)]
            # Workers first: once every worker is done, a server dying (it may notice the workers
            # leaving before we do) is not a failure of the job.
            failed.sort(key=lambda p: p.spec.role != "worker")
            if failed and (failed[0].spec.role == "worker" or not all(p.popen.returncode == 0 for p in workers)):
                p = failed[0]
                p.drain(time.monotonic() + DRAIN_S)  # its traceback may still be in the pipe
                failure = Failure(p.spec.label, p.spec.role, p.popen.returncode, list(p.tail))
                return Outcome(failure, stopped=self._stop(self.procs))
            if all(p.popen.returncode == 0 for p in workers):
                self._stop(self.procs)  # the servers
                return Outcome()
            time.sleep(POLL_S)

    def _stop(self, procs: list[_Proc]) -> int:
        """SIGTERM every live process, SIGKILL those alive after the grace period; count them."""
        alive = [p for p in procs if p.alive]
        try:
            for p in alive:
                p.signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            while any(p.alive for p in alive) and time.monotonic() < deadline:
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: no more grace
        for p in alive:
            if p.alive:
                p.signal(signal.SIGKILL)
        for p in alive:
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return len(alive)


class _signals_raise_interrupted:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (main thread only)."""

    def __enter__(self):
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.saved[signum] = signal.signal(signum, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise Interrupted(signum)

    def __exit__(self, *exc):
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)
