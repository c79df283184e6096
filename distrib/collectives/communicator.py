"""A communicator: a group of transport ranks that run collectives together.

Every collective call gets the next sequence number and a *signature* (op, dtype, shape...).
Each message carries both; a receiver compares the sender's signature with its own before it
touches the data, so ranks that call different collectives get :class:`CollectiveMismatch`
(and tell the rest of the group, who raise it too) instead of garbage or a hang.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch

from ..errors import CollectiveMismatch
from ..transport.wire import Message, dtype_name
from . import broadcast as _broadcast
from . import ring as _ring
from . import shm as _shm
from .ops import check_op, finish


class Communicator:
    """Collectives over ``ranks`` (transport ranks) on one channel.

    ``rank``/``size`` are this process's index in the group and the group's size. Tensors go in,
    new tensors come out; inputs are never modified. Calls are serialised by a lock, so a
    background thread (the optimizer's) and the main thread may share a communicator.
    """

    def __init__(self, transport, ranks=None, channel: int = 0, timeout: float | None = None):
        self.transport = transport
        self.ranks = list(range(transport.size)) if ranks is None else list(ranks)
        if transport.rank not in self.ranks:
            raise ValueError(f"rank {transport.rank} is not in the group {self.ranks}")
        self.rank = self.ranks.index(transport.rank)
        self.size = len(self.ranks)
        self.channel = channel
        self.timeout = transport.timeout if timeout is None else timeout
        self.seq = 0
        self._lock = threading.RLock()
        self._arena = None  # shared-memory buffers, when every rank is on this host

    def _same_host(self) -> bool:
        if self._arena is None:
            hosts = getattr(self.transport, "host_ids", None)
            use = (os.environ.get("DISTRIB_SHM", "1") != "0" and _shm.SHM_DIR is not None
                   and hosts is not None and len({hosts[r] for r in self.ranks}) == 1)
            self._arena = _shm.Arena() if use else False
        return bool(self._arena)

    # -- public collectives ------------------------------------------------------------------
    def allreduce(self, t: torch.Tensor, op: str = "sum", out: torch.Tensor | None = None):
        """Element-wise reduction over the group; every rank gets the same bits.

        The result is a new tensor, or ``out`` when given (contiguous, ``t``'s shape and dtype;
        it may be ``t`` itself for an in-place reduction).
        """
        check_op(op)
        sig = ["allreduce", op, dtype_name(t.dtype), list(t.shape)]
        flat = t.detach().reshape(-1)
        if out is not None:
            if out.shape != t.shape or out.dtype != t.dtype or not out.is_contiguous():
                raise ValueError("out must be contiguous with the input's shape and dtype")
            out_flat = out.view(-1)
        else:
            out_flat = None
        if self.size == 1:
            res = finish(op, flat.clone(), 1)
            return res.reshape(t.shape) if out is None else out.copy_(res.view(t.shape))
        with self._collective(sig) as c:
            if self._same_host():
                res = _shm.allreduce(c, self._arena, flat.contiguous(), op, out_flat)
            else:
                res = _ring.allreduce(c, flat.contiguous(), op, out_flat)
        return res.reshape(t.shape) if out is None else out

    def allgather(self, t: torch.Tensor) -> list:
        """Every rank's tensor, in rank order; shapes may differ between ranks, dtypes may not."""
        sig = ["allgather", dtype_name(t.dtype)]
        if self.size == 1:
            return [t.detach().clone()]
        with self._collective(sig) as c:
            return _ring.allgather(c, t.detach())

    def broadcast(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Root's tensor on every rank (``t`` on the others gives the expected shape and dtype)."""
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} outside 0..{self.size - 1}")
        sig = ["broadcast", root, dtype_name(t.dtype), list(t.shape)]
        if self.size == 1:
            return t.detach().clone()
        with self._collective(sig) as c:
            return _broadcast.chain(c, t.detach(), root)

    def barrier(self) -> None:
        """Returns once every rank of the group has entered the barrier."""
        if self.size == 1:
            return
        with self._collective(["barrier"]) as c:
            _ring.allreduce(c, torch.zeros(0), "sum")

    def close(self) -> None:
        """Release this communicator's shared-memory buffers."""
        if self._arena:
            self._arena.close()

    # -- point to point (pipeline stages, parameter servers) ---------------------------------
    def send(self, dst: int, tensors, meta=None, tag: int = 0) -> None:
        """Send ``tensors`` to group rank ``dst`` (do not modify them afterwards)."""
        self.transport.send(self.ranks[dst], Message(channel=self.channel, seq=tag,
                                                     meta=meta or {}, tensors=list(tensors)))

    def recv(self, src: int, tag: int | None = None, timeout: float | None = None,
             what: str = "a point-to-point message") -> Message:
        return self.transport.recv(self.ranks[src], self.channel, tag,
                                   self.timeout if timeout is None else timeout, what,
                                   group=[self.ranks[src]])

    def abort(self, kind: str, text: str) -> None:
        """Tell the whole group that this rank failed, so nobody waits for it."""
        self.transport.abort(self.ranks, self.channel, self.seq, kind, text)

    # -- internals ---------------------------------------------------------------------------
    @contextmanager
    def _collective(self, sig):
        with self._lock:
            self.seq += 1
            c = _Call(self, self.seq, sig)
            self.transport.state = {"c": self.channel, "q": self.seq, "sig": sig}
            try:
                yield c
            finally:
                self.transport.state = None


class _Call:
    """One collective in flight: sends and receives tagged with its sequence number and signature."""

    def __init__(self, comm: Communicator, seq: int, sig):
        self.comm, self.seq, self.sig = comm, seq, sig
        self.rank, self.size = comm.rank, comm.size
        self.what = f"{sig[0]} #{seq}"
        self._checked = set()

    def send(self, dst: int, tensors, meta=None):
        m = {"sig": self.sig}
        if meta:
            m.update(meta)
        c = self.comm
        c.transport.send(c.ranks[dst], Message(channel=c.channel, seq=self.seq, meta=m,
                                               tensors=list(tensors)))

    def recv(self, src: int) -> Message:
        c = self.comm
        msg = c.transport.recv(c.ranks[src], c.channel, self.seq, c.timeout, self.what,
                               group=c.ranks)
        if src not in self._checked:
            theirs = msg.meta.get("sig")
            if theirs != self.sig:
                text = (f"collective #{self.seq} mismatch: rank {self.rank} called "
                        f"{_fmt(self.sig)} but rank {src} called {_fmt(theirs)}")
                c.transport.abort(c.ranks, c.channel, self.seq, "mismatch", text)
                raise CollectiveMismatch(text)
            self._checked.add(src)
        return msg


def _fmt(sig):
    if not isinstance(sig, list) or not sig:
        return repr(sig)
    return f"{sig[0]}({', '.join(map(str, sig[1:]))})"


__all__ = ["Communicator"]
