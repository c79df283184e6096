"""Shim run by ``mpiexec``: turn Open MPI's variables into distrib's, then run the script.

``python -m launcher.mpi_worker SCRIPT ARGS...`` runs a worker; ``python -m launcher.mpi_worker
--server [--module MOD]`` a parameter server (MPMD: servers are the world ranks after the
``N = world size - DISTRIB_NUM_SERVERS`` workers). Deliberately tiny: it imports nothing of
distrib, so the script starts exactly as under the zmq launcher.

With ``DISTRIB_MPI_STATE_DIR`` set (by ``distrib launch``), a worker whose script finished
without error writes ``done.<rank>`` there and a server writes ``server.<index>.pid``: the
launcher stops the servers once every worker is done, as it does without MPI. A process whose
script raised or exited non-zero writes ``failed.<rank>`` (``failed.s<index>`` for a server) with
its exit code and the time, for when mpiexec does not say which rank failed first.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time
import traceback

USAGE = "usage: python -m launcher.mpi_worker (SCRIPT [ARGS...] | --server [--module MODULE])"


def _int_env(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def _node_of(world_rank: int, world_size: int) -> tuple[int, int, int, int]:
    """(node rank, number of nodes, first and past-the-last world rank on this node).

    ``DISTRIB_MPI_SLOTS`` (from ``distrib launch``: ranks per host, which mpiexec fills in order)
    says it exactly. Otherwise Open MPI's local size is used, assuming equal blocks; on one node
    all of the world is local (Open MPI 5 may number local ranks in any order, so they are not
    used).
    """
    text = os.environ.get("DISTRIB_MPI_SLOTS", "")
    slots = [int(x) for x in text.split(",") if x.isdigit()]
    if slots and sum(slots) == world_size and all(slots):
        start = 0
        for node, count in enumerate(slots):
            if world_rank < start + count:
                return node, len(slots), start, start + count
            start += count
    per_node = _int_env("OMPI_COMM_WORLD_LOCAL_SIZE") or world_size
    node = world_rank // per_node
    return node, -(-world_size // per_node), node * per_node, min(world_size, (node + 1) * per_node)


def job_env(server: bool) -> dict[str, str]:
    """The DISTRIB_* / torchrun variables of this MPI process."""
    world_rank = _int_env("OMPI_COMM_WORLD_RANK", "PMIX_RANK")
    world_size = _int_env("OMPI_COMM_WORLD_SIZE")
    if world_rank is None or world_size is None:
        sys.exit("launcher.mpi_worker: OMPI_COMM_WORLD_RANK/SIZE are not set; run it under mpiexec")
    servers = _int_env("DISTRIB_NUM_SERVERS") or 0
    workers = world_size - servers
    if workers < 1:
        sys.exit(f"launcher.mpi_worker: DISTRIB_NUM_SERVERS={servers} leaves no worker in a world of {world_size}")
    rank = world_rank - workers if server else world_rank
    if not 0 <= rank < (servers if server else workers):
        sys.exit(f"launcher.mpi_worker: world rank {world_rank} is not a {'server' if server else 'worker'} "
                 f"({workers} workers, then {servers} servers)")
    lo, hi = (workers, world_size) if server else (0, workers)  # world ranks of this role
    node_rank, nnodes, first, last = _node_of(world_rank, world_size)
    local_rank, local_size = world_rank - max(first, lo), min(last, hi) - max(first, lo)
    env = {
        "DISTRIB_TRANSPORT": "mpi",
        "DISTRIB_ROLE": "server" if server else "worker",
        "DISTRIB_RANK": str(rank),
        "DISTRIB_SIZE": str(workers),
        "DISTRIB_LOCAL_RANK": str(local_rank),
        "DISTRIB_LOCAL_SIZE": str(local_size),
        "DISTRIB_NUM_SERVERS": str(servers),
        "DISTRIB_NODE_RANK": str(node_rank),
        "DISTRIB_NNODES": str(nnodes),
    }
    if not server:
        env.update(RANK=str(rank), WORLD_SIZE=str(workers), LOCAL_RANK=str(local_rank),
                   LOCAL_WORLD_SIZE=str(local_size), GROUP_RANK=str(node_rank))
    return env


def _mark(name: str, text: str = "") -> None:
    state = os.environ.get("DISTRIB_MPI_STATE_DIR")
    if state:
        with open(os.path.join(state, name), "w") as f:
            f.write(text)


def _abort_if_mpi(code: int) -> None:
    """End the whole MPI job now: a failed rank exiting normally would block in MPI_Finalize,
    waiting for peers that may be stuck waiting for it (until their own deadlines)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        sys.stdout.flush()
        sys.stderr.flush()
        mpi.COMM_WORLD.Abort(code)


def _run(target: str, server: bool) -> None:
    """Run the script (or the server module) as ``__main__``; record how it ended."""
    label = ("s" if server else "") + os.environ["DISTRIB_RANK"]
    try:
        if server:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            code = e.code if isinstance(e.code, int) else 1
            _mark(f"failed.{label}", f"{code} {time.time()}")
            if code != 128 + signal.SIGTERM:  # SIGTERM: the launcher is stopping us already
                _abort_if_mpi(code)
            raise
    except Exception as e:
        # The traceback as `python SCRIPT` shows it: without this shim's and runpy's frames.
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != target:
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb or e.__traceback__)
        _mark(f"failed.{label}", f"1 {time.time()}")
        _abort_if_mpi(1)
        sys.exit(1)
    if not server:
        _mark(f"done.{label}")


def _die_with_parent() -> None:
    """Kill this process if its parent (Open MPI's daemon) goes: a killed mpiexec cannot stop
    the ranks itself, and a rank must not wait on its dead peers until some timeout."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="distrib-parent-watch", daemon=True).start()


def main(argv: list[str]) -> None:
    server = bool(argv) and argv[0] == "--server"
    if server:
        rest = argv[1:]
        module = "distrib.ps.server"
        if rest[:1] == ["--module"] and len(rest) == 2:
            module = rest[1]
        elif rest:
            sys.exit(USAGE)
    elif not argv or argv[0].startswith("-"):
        sys.exit(USAGE)
    os.environ.update(job_env(server))
    _die_with_parent()
    if server:
        _mark(f"server.{os.environ['DISTRIB_RANK']}.pid", str(os.getpid()))
        sys.argv = [module]
        _run(module, server=True)
        return
    script = os.path.abspath(argv[0])
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` would
    _run(script, server=False)


if __name__ == "__main__":
    main(sys.argv[1:])
