"""The process context: who am I in which job, and the transport that connects us.

``init()`` reads the job from the environment, in this order:

- ``distrib launch``: ``DISTRIB_RANK``, ``DISTRIB_SIZE``, ``DISTRIB_ROLE``, ``DISTRIB_NUM_SERVERS``...
- torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``;
- Open MPI / MPICH / PMIx under ``mpiexec`` (then the MPI transport is the default);
- Slurm: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, the step's first node as master;
- none of them: a job of one, where every collective is a copy.

The ZeroMQ rendezvous uses ``DISTRIB_MASTER_ADDR``/``DISTRIB_MASTER_PORT`` when set, else
``MASTER_ADDR`` and ``MASTER_PORT + 1`` (``MASTER_PORT`` itself belongs to torch.distributed's
store, so a script may use both libraries at once).
"""
from __future__ import annotations

import atexit
import os
import re
import zlib

from .errors import DistribError
from .transport.base import DEFAULT_TIMEOUT, Transport

_ctx = None


class _SelfTransport(Transport):
    """The transport of a job of one: there is nobody to talk to."""

    name = "self"

    def __init__(self, timeout):
        super().__init__(0, 1, timeout)

    def _send_frames(self, dst, frames):
        raise DistribError("a job of one has no peers to send to")

    def _recv_frames(self, timeout):
        raise DistribError("a job of one has no peers to receive from")

    def _close(self, linger):
        pass


class _Context:
    def __init__(self, job, transport):
        from .collectives.communicator import Communicator
        self.job = job
        self.transport = transport
        self.comms = {}
        self.world = Communicator(transport, ranks=range(job["size"]), channel=0) \
            if job["role"] == "worker" else None


def _int_env(name, default=None):
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise DistribError(f"environment variable {name}={v!r} is not an integer") from None


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``node[03-05,9],gpu1``."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise DistribError(f"cannot parse SLURM node list {nodelist!r}")
    if not m.group(3):
        return m.group(1)
    return m.group(1) + m.group(3).split(",")[0].split("-")[0]


def detect_job() -> dict:
    """The job this process belongs to, from the environment (see the module docstring)."""
    e = os.environ
    job = {"role": "worker", "num_servers": 0, "transport": e.get("DISTRIB_TRANSPORT") or None,
           "master_addr": None, "master_port": None}
    if "DISTRIB_RANK" in e:
        job.update(rank=_int_env("DISTRIB_RANK"), size=_int_env("DISTRIB_SIZE", 1),
                   local_rank=_int_env("DISTRIB_LOCAL_RANK", 0),
                   local_size=_int_env("DISTRIB_LOCAL_SIZE", 1),
                   role=e.get("DISTRIB_ROLE", "worker"),
                   num_servers=_int_env("DISTRIB_NUM_SERVERS", 0))
    elif "RANK" in e and "WORLD_SIZE" in e:
        job.update(rank=_int_env("RANK"), size=_int_env("WORLD_SIZE"),
                   local_rank=_int_env("LOCAL_RANK", 0),
                   local_size=_int_env("LOCAL_WORLD_SIZE", 1))
    elif any(k in e for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")):
        rank = _int_env("OMPI_COMM_WORLD_RANK", _int_env("PMI_RANK", _int_env("PMIX_RANK")))
        size = _int_env("OMPI_COMM_WORLD_SIZE", _int_env("PMI_SIZE", None))
        if size is None:
            from mpi4py import MPI
            size = MPI.COMM_WORLD.Get_size()
        job.update(rank=rank, size=size,
                   local_rank=_int_env("OMPI_COMM_WORLD_LOCAL_RANK", 0),
                   local_size=_int_env("OMPI_COMM_WORLD_LOCAL_SIZE", 1))
        job["transport"] = job["transport"] or ("zmq" if "MASTER_ADDR" in e else "mpi")
    elif "SLURM_PROCID" in e and _int_env("SLURM_NTASKS", 1) > 1:
        job.update(rank=_int_env("SLURM_PROCID"), size=_int_env("SLURM_NTASKS"),
                   local_rank=_int_env("SLURM_LOCALID", 0),
                   local_size=_int_env("SLURM_NTASKS_PER_NODE", 1) if
                   (e.get("SLURM_NTASKS_PER_NODE") or "").isdigit() else 1)
        if "MASTER_ADDR" not in e and "DISTRIB_MASTER_ADDR" not in e:
            job["master_addr"] = _first_slurm_host(e.get("SLURM_STEP_NODELIST")
                                                   or e.get("SLURM_JOB_NODELIST", "localhost"))
            job["master_port"] = 20000 + _int_env("SLURM_JOB_ID", 0) % 20000
    else:
        job.update(rank=0, size=1, local_rank=0, local_size=1)
    job["master_addr"] = e.get("DISTRIB_MASTER_ADDR") or e.get("MASTER_ADDR") or job["master_addr"] \
        or "127.0.0.1"
    port = _int_env("DISTRIB_MASTER_PORT")
    if port is None and "MASTER_PORT" in e:
        port = _int_env("MASTER_PORT") + 1
    job["master_port"] = port or job["master_port"] or 29501
    if job["role"] not in ("worker", "server"):
        raise DistribError(f"DISTRIB_ROLE must be worker or server, not {job['role']!r}")
    if job["size"] < 1 or not 0 <= job["rank"] < (job["size"] if job["role"] == "worker"
                                                  else max(job["num_servers"], 1)):
        raise DistribError(f"inconsistent job: rank {job['rank']} of size {job['size']} "
                           f"({job['role']})")
    job["world_rank"] = job["rank"] if job["role"] == "worker" else job["size"] + job["rank"]
    job["world_size"] = job["size"] + job["num_servers"]
    return job


def init(transport: str | None = None, timeout: float | None = None):
    """Join the job described by the environment (idempotent). Returns nothing."""
    global _ctx
    if _ctx is not None:
        return
    job = detect_job()
    if timeout is None:
        t = os.environ.get("DISTRIB_TIMEOUT")
        timeout = float(t) if t else DEFAULT_TIMEOUT
    name = transport or job["transport"] or "zmq"
    if name not in ("zmq", "mpi"):
        raise ValueError(f"unknown transport {name!r}; choose 'zmq' or 'mpi'")
    job["transport"] = name
    if job["world_size"] == 1:
        tr = _SelfTransport(timeout)
    elif name == "mpi":
        from .transport.mpi import MpiTransport
        tr = MpiTransport(timeout=timeout)
        if tr.size != job["world_size"] or tr.rank != job["world_rank"]:
            raise DistribError(f"MPI says rank {tr.rank} of {tr.size}, the environment says "
                               f"{job['world_rank']} of {job['world_size']}")
    else:
        from .transport.zmq import ZmqTransport
        tr = ZmqTransport(job["world_rank"], job["world_size"], job["master_addr"],
                          job["master_port"], timeout=timeout)
    _ctx = _Context(job, tr)
    _tune_malloc()
    _exit_cleanly_on_sigterm()
    _mark_failed_on_uncaught_exception(tr)


def _tune_malloc():
    """Keep large freed blocks in the heap instead of returning them to the OS.

    Collectives return new tensors; with glibc's defaults every tensor over 32 MiB is a fresh
    mmap whose pages fault in (and are zeroed) on first touch, which cost a third of a 64 MiB
    all-reduce's time here (benchmarks/allreduce.py: 0.84 -> 1.18 GB/s at n=2). This is the
    same trade PyTorch's CPU performance guide makes with jemalloc/tcmalloc: freed memory up to
    1 GiB stays with the process. ``DISTRIB_TUNE_MALLOC=0`` leaves the allocator alone.
    """
    if os.environ.get("DISTRIB_TUNE_MALLOC", "1") == "0":
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _mark_failed_on_uncaught_exception(tr):
    """A process dying of an exception should not wait 10 s to flush sends to dead peers."""
    import sys
    previous = sys.excepthook

    def hook(kind, value, tb):
        tr.failed = True
        previous(kind, value, tb)

    sys.excepthook = hook


def _exit_cleanly_on_sigterm():
    """Make SIGTERM (how ``distrib launch`` stops a job) raise SystemExit instead of killing the
    process outright, so shutdown runs: pending sends flush and shared buffers are unlinked.
    A handler the user installed is left alone."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def stop(signum, frame):
            if _ctx is not None:
                _ctx.transport.failed = True  # being stopped: peers may be gone already
            raise SystemExit(128 + signum)
        signal.signal(signal.SIGTERM, stop)


def _require():
    if _ctx is None:
        init()
    return _ctx


def is_initialized() -> bool:
    return _ctx is not None


def shutdown() -> None:
    """Leave the job: flush pending sends and close the transport (idempotent)."""
    global _ctx
    if _ctx is None:
        return
    ctx, _ctx = _ctx, None
    for comm in [ctx.world, *ctx.comms.values()]:
        if comm is not None:
            comm.close()
    ctx.transport.close()


atexit.register(shutdown)


def rank() -> int:
    return _require().job["rank"]


def size() -> int:
    """Number of workers (parameter servers are not counted)."""
    return _require().job["size"]


def local_rank() -> int:
    return _require().job["local_rank"]


def local_size() -> int:
    return _require().job["local_size"]


def role() -> str:
    return _require().job["role"]


def num_servers() -> int:
    return _require().job["num_servers"]


def transport():
    return _require().transport


def world():
    """The Communicator over all workers (channel 0), used by ``distrib.allreduce`` & co."""
    ctx = _require()
    if ctx.world is None:
        raise DistribError("parameter servers do not take part in the workers' collectives")
    return ctx.world


def communicator(name: str, ranks=None):
    """A Communicator over ``ranks`` (transport ranks; default: all workers) on its own channel.

    The channel is derived from ``name``, so every rank that asks for the same name gets the
    same channel whatever order the groups are created in. Separate channels keep, for example,
    the optimizer's background all-reduces apart from the user's own collectives.
    """
    ctx = _require()
    ranks = tuple(range(ctx.job["size"]) if ranks is None else ranks)
    key = (name, ranks)
    if key not in ctx.comms:
        from .collectives.communicator import Communicator
        channel = 1 + zlib.crc32(f"{name}|{ranks}".encode()) % (2 ** 30)
        ctx.comms[key] = Communicator(ctx.transport, ranks=ranks, channel=channel)
    return ctx.comms[key]


def bytes_sent() -> int:
    """Bytes this process has put on the wire so far (headers included)."""
    return 0 if _ctx is None else _ctx.transport.bytes_sent
