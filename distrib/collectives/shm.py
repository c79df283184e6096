"""Shared-memory all-reduce for groups whose ranks all run on one host.

Over loopback TCP every byte is copied through the kernel at every ring step; through shared
memory each rank copies its input once, reduces its own slice reading every rank's input in
place, and copies the result out once. Only two small messages per peer cross the transport
(they carry the collective's signature, so mismatches are still caught)::

    rank i:  input -> my buffer (all but   "ready" -> every peer (with my buffer's name)
             slice i, which only I read)
             wait "ready" from all       slice i = in_0[i] (op) in_1[i] (op) ... -> my buffer
             "done" -> every peer        wait "done" from all
             out[k] = buffer_k[k] for every k

Each segment is reduced by one rank in rank order and copied everywhere: the same bits on every
rank. Two buffers per rank are used alternately (by sequence number), so a rank never writes the
buffer its peers may still be reading: before it can reuse one, every peer has finished the call
that used it (they have sent "done" for the call in between). A new buffer's file is unlinked
as soon as every peer has mapped it, so nothing is left in /dev/shm if a process dies
(``distrib.init`` turns SIGTERM into a clean exit, so a stopped job unlinks its buffers too).
"""
from __future__ import annotations

import mmap
import os
import re
import uuid

import torch

from ..errors import WireError
from .ring import split_sizes

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
_NAME = re.compile(r"^distrib-[0-9a-f]{1,32}-[0-9a-f]{32}$")
# ``distrib launch`` gives each job an id and removes /dev/shm/distrib-<id>-* when it ends.
_JOB = os.environ.get("DISTRIB_JOB_ID", "") if re.fullmatch(r"[0-9a-f]{1,32}",
                                                            os.environ.get("DISTRIB_JOB_ID", "")) \
    else uuid.uuid4().hex[:16]


class _Segment:
    def __init__(self, name: str, size: int, create: bool):
        self.name, self.size = name, size
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size < size:
                raise WireError(f"shared buffer {name} is smaller than announced")
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
        self.linked = create

    def unlink(self):
        if self.linked:
            self.linked = False
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass


class Arena:
    """This rank's two shared buffers and the peers' buffers it has mapped."""

    def __init__(self):
        self.mine = [None, None]
        self.retired = []  # buffers of failed calls, unlinked after the next good one
        self.peers = {}  # (peer, parity) -> _Segment

    def own(self, parity: int, nbytes: int) -> _Segment:
        seg = self.mine[parity]
        if seg is None or seg.size < nbytes:
            size = max(nbytes, 2 * seg.size if seg else 0, 1 << 16)
            size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
            if seg is not None:
                seg.unlink()
            seg = self.mine[parity] = _Segment(f"distrib-{_JOB}-{uuid.uuid4().hex}", size,
                                                   create=True)
        return seg

    def peer(self, peer: int, parity: int, name, size, nbytes: int) -> _Segment:
        if not (isinstance(name, str) and _NAME.match(name)) or type(size) is not int \
                or not nbytes <= size < 2 ** 40:
            raise WireError(f"bad shared-buffer announcement from rank {peer}: {name!r} {size!r}")
        seg = self.peers.get((peer, parity))
        if seg is None or seg.name != name:
            seg = self.peers[(peer, parity)] = _Segment(name, size, create=False)
        return seg

    def retire(self):
        self.retired += [seg for seg in self.mine if seg is not None]
        self.mine = [None, None]

    def drop_retired(self):
        for seg in self.retired:
            seg.unlink()
        self.retired = []

    def close(self):
        self.retire()
        self.drop_retired()
        self.peers.clear()


def _combine_into(op, a, b, out):
    if op in ("sum", "mean"):
        torch.add(a, b, out=out)
    elif op == "min":
        torch.minimum(a, b, out=out)
    else:
        torch.maximum(a, b, out=out)


def _finish_into(op, acc, n):
    if op == "mean":
        if acc.is_floating_point():
            acc.div_(n)
        else:
            acc.copy_(torch.div(acc, n, rounding_mode="floor"))


def _reduce_into(op, acc, x):
    if op in ("sum", "mean"):
        acc.add_(x)
    elif op == "min":
        torch.minimum(acc, x, out=acc)
    else:
        torch.maximum(acc, x, out=acc)


def allreduce(c, arena: Arena, flat: torch.Tensor, op: str, out=None) -> torch.Tensor:
    """The reduced tensor, written into ``out`` (a fresh tensor when None; may be ``flat``)."""
    try:
        result = _allreduce(c, arena, flat, op, c.seq % 2, out)
    except BaseException:
        # A failed call skips the final "done" exchange that makes alternating buffers safe:
        # a slow peer may still be reading ours. Retire both; the next call makes new ones.
        # They stay linked for now (a peer may be opening the one just announced) and are
        # unlinked after the next call that succeeds, or at shutdown.
        arena.retire()
        raise
    arena.drop_retired()
    return result


def _allreduce(c, arena, flat, op, parity, out):
    n, i = c.size, c.rank
    numel, dtype = flat.numel(), flat.dtype
    nbytes = numel * flat.element_size()
    sizes = split_sizes(numel, n)
    starts = [sum(sizes[:k]) for k in range(n)]
    lo, hi = starts[i], starts[i] + sizes[i]
    seg = arena.own(parity, nbytes)
    fresh = seg.linked
    mine = seg.bytes[:nbytes].view(dtype)
    # Peers read every slice of my input but my own, which only I reduce: skip copying it.
    # Its place in the buffer then receives my slice's result.
    mine[:lo].copy_(flat[:lo])
    mine[hi:].copy_(flat[hi:])
    for j in range(n):
        if j != i:
            c.send(j, [], {"shm": seg.name, "size": seg.size})
    views = [None] * n
    views[i] = mine
    for j in range(n):
        if j != i:
            m = c.recv(j)
            views[j] = arena.peer(j, parity, m.meta.get("shm"), m.meta.get("size"),
                                  nbytes).bytes[:nbytes].view(dtype)
    if hi > lo:
        terms = [flat[lo:hi] if k == i else views[k][lo:hi] for k in range(n)]
        acc = mine[lo:hi]  # holds no term (see above), so it can take the result directly
        _combine_into(op, terms[0], terms[1], acc)
        for k in range(2, n):
            _reduce_into(op, acc, terms[k])
        _finish_into(op, acc, n)
    for j in range(n):
        if j != i:
            c.send(j, [], {"done": 1})
    for j in range(n):
        if j != i:
            c.recv(j)
    if fresh:
        seg.unlink()  # every peer has mapped it by now
    if out is None:
        out = torch.empty_like(flat)
    for k in range(n):
        out[starts[k]:starts[k] + sizes[k]].copy_(views[k][starts[k]:starts[k] + sizes[k]])
    return out
