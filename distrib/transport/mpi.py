"""MPI transport (mpi4py): buffer ``Isend``/``Recv`` of the same frames as ZeroMQ, no pickling.

A message is a header frame on tag ``_HEAD`` followed by one frame per tensor on tag ``_BODY``;
MPI's non-overtaking rule (same source, tag and communicator) keeps each message's frames in
order. Sends are non-blocking (``Isend``) and their buffers are kept alive until complete.
Receives poll with ``Iprobe`` so that every wait has a deadline and keeps answering pings.
"""
from __future__ import annotations

import time

from ..errors import WireError
from .base import Transport
from .wire import MAX_HEADER_BYTES, decode_header

_HEAD, _BODY = 7001, 7002


class MpiTransport(Transport):
    name = "mpi"

    def __init__(self, timeout: float | None = None, comm=None):
        from mpi4py import MPI  # imported here: MPI_Init happens on import
        self.MPI = MPI
        self.comm = (comm or MPI.COMM_WORLD).Dup()
        super().__init__(self.comm.Get_rank(), self.comm.Get_size(), timeout)
        self._inflight = []  # (request, buffers kept alive)
        _abort_job_on_uncaught_exception(self.comm)
        self.host_ids = self._gather_host_ids()

    def _gather_host_ids(self):
        """Every rank's host id, through a fixed-size byte Allgather (no pickling)."""
        from .zmq import host_id
        width = 256
        mine = bytearray(host_id().encode()[:width].ljust(width, b"\0"))
        everyone = bytearray(width * self.size)
        self.comm.Allgather([mine, self.MPI.BYTE], [everyone, self.MPI.BYTE])
        return [bytes(everyone[k * width:(k + 1) * width]).rstrip(b"\0").decode(errors="replace")
                for k in range(self.size)]

    def _send_frames(self, dst, frames):
        reqs = [self.comm.Isend([frames[0], self.MPI.BYTE], dst, _HEAD)]
        for f in frames[1:]:
            reqs.append(self.comm.Isend([f, self.MPI.BYTE], dst, _BODY))
        self._inflight.append((reqs, frames))
        if len(self._inflight) > 64:
            self._reap()

    def _reap(self):
        self._inflight = [(r, f) for r, f in self._inflight if not self.MPI.Request.Testall(r)]

    def _recv_frames(self, timeout):
        MPI = self.MPI
        st = MPI.Status()
        deadline = time.monotonic() + timeout
        pause = 0.0
        while not self.comm.Iprobe(MPI.ANY_SOURCE, _HEAD, st):
            self._reap()
            if time.monotonic() >= deadline:
                return None
            # Back off from a busy spin: other ranks may share this core.
            time.sleep(pause)
            pause = min(pause * 2 or 2e-5, 1e-3)
        src, n = st.Get_source(), st.Get_count(MPI.BYTE)
        if n > MAX_HEADER_BYTES:
            raise WireError(f"rank {self.rank}: header of {n} bytes from rank {src} is too large")
        head = bytearray(n)
        self.comm.Recv([head, MPI.BYTE], src, _HEAD)
        h = decode_header(head)
        frames = [bytes(head)]
        body_deadline = time.monotonic() + self.timeout
        for i, (_, _, nbytes) in enumerate(h["t"]):
            while not self.comm.Iprobe(src, _BODY, st):
                if time.monotonic() > body_deadline:
                    raise WireError(f"rank {self.rank}: rank {src} sent a header but not its "
                                    f"tensor {i} within {self.timeout:g}s")
                time.sleep(1e-5)
            got = st.Get_count(MPI.BYTE)
            if got != nbytes:
                raise WireError(f"rank {self.rank}: tensor {i} from rank {src} has {got} bytes, "
                                f"its header says {nbytes}")
            buf = bytearray(nbytes)
            self.comm.Recv([buf, MPI.BYTE], src, _BODY)
            frames.append(buf)
        return src, frames

    def _close(self, linger):
        deadline = time.monotonic() + linger
        while self._inflight and time.monotonic() < deadline:
            self._reap()
            time.sleep(1e-3)
        for reqs, _ in self._inflight:
            for r in reqs:
                try:
                    r.Cancel()
                except Exception:
                    pass
        self._inflight = []
        try:
            self.comm.Free()
        except Exception:
            pass


def _abort_job_on_uncaught_exception(comm):
    """An uncaught exception must end the whole MPI job at once: without this the dying rank
    blocks in MPI_Finalize and its peers wait for it until their deadlines."""
    import sys
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        sys.stderr.flush()
        sys.stdout.flush()
        comm.Abort(1)

    sys.excepthook = hook
