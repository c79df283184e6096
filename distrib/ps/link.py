"""The channel between workers and parameter servers.

Workers are transport ranks ``0..W-1``, server ``k`` is rank ``W + k``; all of them share one
channel (``context.communicator("ps", ranks=range(W + S))``), so a group index is a transport
rank. Every message carries ``meta["op"]``:

========  ==============  =====================================================================
op        direction       content
========  ==============  =====================================================================
hello     worker → server  configuration, unit list, layout signature, step; worker 0 adds the
                           initial values of the server's units
welcome   server → worker  the initial values (worker 0's) once every worker said hello
step      worker → server  the push of step ``t``: gradients (sync) or parameter deltas
                           (async/ssp), compressed per unit; async/ssp: also asks for parameters
agg       server → worker  sync: the mean gradient of step ``t``, sent to every running worker
                           as soon as the step completes (a straggler finds it waiting)
params    server → worker  async/ssp: the parameters (or, compressed, their change since the
                           worker's last pull)
pull      worker → server  async/ssp: parameters only, no push
done      worker → server  the worker has finished; a server exits once all workers are done
========  ==============  =====================================================================

A server that fails aborts the channel with its reason: every worker's next wait raises
:class:`~distrib.errors.PeerFailed` carrying it.
"""
from __future__ import annotations

import time

from .. import context
from ..transport.base import PING_WINDOW


class Link:
    """Send and receive PS messages; every wait has a deadline and watches for aborts."""

    def __init__(self, workers: int, servers: int):
        self.workers, self.servers = workers, servers
        self.comm = context.communicator("ps", ranks=range(workers + servers))
        self.transport = self.comm.transport
        self.channel = self.comm.channel
        self.timeout = self.transport.timeout

    def server_rank(self, index: int) -> int:
        return self.workers + index

    def send(self, dst: int, op: str, meta=None, tensors=()) -> None:
        m = {"op": op}
        if meta:
            m.update(meta)
        self.comm.send(dst, list(tensors), m)

    def poll(self, sources, timeout: float):
        """The first message waiting from any rank of ``sources`` within ``timeout`` seconds,
        else ``None``. Raises :class:`PeerFailed` if a peer aborted the channel."""
        tr, ch = self.transport, self.channel
        deadline = time.monotonic() + timeout
        while True:
            for src in sources:
                if tr.pending(src, ch):
                    return tr.recv(src, ch, timeout=0)
            # Transport-internal on purpose: a plain recv() would, on its deadline, send a
            # timeout abort to the peer; here the caller decides who is at fault.
            tr._check_abort(ch, None)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            tr.poll_once(min(left, 0.05))

    def alive(self, rank: int) -> bool:
        """Whether ``rank`` answers a ping (its transport is being pumped) within a window."""
        return rank in self.transport.probe([rank], self.channel, PING_WINDOW)

    def abort(self, text: str) -> None:
        """Tell every worker and server that this process failed, and why."""
        self.comm.abort("error", text)
