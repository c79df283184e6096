"""Ring all-reduce (reduce-scatter + all-gather) and ring all-gather.

The flat tensor is cut into ``n`` segments, one per rank, and each segment into ``m`` chunks of
at most ``DISTRIB_CHUNK_BYTES``. A chunk is forwarded as soon as it is reduced, so large tensors
stream through the ring instead of moving segment by segment::

    reduce-scatter, step s: rank i sends segment (i - s), receives segment (i - s - 1) from the
                            left, adds its own part, passes it on; after n - 1 steps rank i
                            owns the full sum of segment (i + 1).
    all-gather,     step s: rank i sends segment (i + 1 - s), receives (i - s) and passes it on.

Each segment is reduced in one fixed order and then copied everywhere, so every rank ends with
the same bits. No buffer handed to the transport is written afterwards: reductions produce
fresh tensors, and received chunks are forwarded as they are (zero copy).
"""
from __future__ import annotations

import math
import os

import torch

from ..errors import WireError
from .ops import combine, finish

CHUNK_BYTES = int(os.environ.get("DISTRIB_CHUNK_BYTES", str(1 << 20)))


def split_sizes(numel: int, parts: int) -> list:
    """Sizes of ``parts`` near-equal pieces of ``numel`` (the larger ones first)."""
    q, r = divmod(numel, parts)
    return [q + 1] * r + [q] * (parts - r)


def _pieces(flat: torch.Tensor, n: int, itemsize: int):
    """segments[k][j]: chunk j of segment k, as views of ``flat``."""
    seg_sizes = split_sizes(flat.numel(), n)
    m = max(1, math.ceil(seg_sizes[0] * itemsize / CHUNK_BYTES))
    segments, offset = [], 0
    for size in seg_sizes:
        seg = flat[offset:offset + size]
        offset += size
        bounds = split_sizes(size, m)
        chunks, o = [], 0
        for b in bounds:
            chunks.append(seg[o:o + b])
            o += b
        segments.append(chunks)
    return segments, m


def _expect(msg, like: torch.Tensor, rank: int, src: int):
    x = msg.tensors[0] if len(msg.tensors) == 1 else None
    if x is None or x.numel() != like.numel() or x.dtype != like.dtype:
        raise WireError(f"rank {rank}: chunk from rank {src} does not match the collective's "
                        f"layout ({None if x is None else (x.dtype, x.numel())} vs "
                        f"{(like.dtype, like.numel())})")
    return x.reshape(-1)


def allreduce(c, flat: torch.Tensor, op: str, out=None) -> torch.Tensor:
    """The reduced tensor, written into ``out`` (a fresh tensor when None; may be ``flat``:
    each input chunk sent as-is has reached the right neighbour before the all-gather phase
    writes that chunk, so in place is safe)."""
    n, i = c.size, c.rank
    right, left = (i + 1) % n, (i - 1) % n
    flat = flat.contiguous()
    segments, m = _pieces(flat, n, flat.element_size())

    # Reduce-scatter. Our own segment i goes out first, straight from the input: every chunk
    # of it has reached the right neighbour before this call can return (see module notes).
    for chunk in segments[i]:
        c.send(right, [chunk])
    owned = [None] * m
    for s in range(n - 1):
        k = (i - s - 1) % n
        last = s == n - 2
        for j in range(m):
            x = _expect(c.recv(left), segments[k][j], i, left)
            r = combine(op, x, segments[k][j])
            if last:
                owned[j] = finish(op, r, n)
            else:
                c.send(right, [r])

    # All-gather: our finished segment (i + 1) goes round the ring.
    if out is None:
        out = torch.empty_like(flat)
    out_segments, _ = _pieces(out, n, out.element_size())
    mine = (i + 1) % n
    for j, chunk in enumerate(owned):
        out_segments[mine][j].copy_(chunk)
        c.send(right, [chunk])
    for s in range(n - 1):
        k = (i - s) % n
        for j in range(m):
            x = _expect(c.recv(left), out_segments[k][j], i, left)
            out_segments[k][j].copy_(x)
            if s < n - 2:
                c.send(right, [x])
    return out


def allgather(c, t: torch.Tensor) -> list:
    n, i = c.size, c.rank
    right, left = (i + 1) % n, (i - 1) % n
    mine = t.contiguous().clone()  # the transport may still be reading it after we return
    out = [None] * n
    out[i] = mine
    c.send(right, [mine], {"o": i})
    for s in range(n - 1):
        origin = (i - s - 1) % n
        msg = c.recv(left)
        if msg.meta.get("o") != origin or len(msg.tensors) != 1:
            raise WireError(f"rank {i}: all-gather expected rank {origin}'s tensor from rank "
                            f"{left}, got {msg.meta.get('o')!r}")
        x = msg.tensors[0]
        if s < n - 2:
            c.send(right, [x], {"o": origin})
        out[origin] = x.clone()
    return out
