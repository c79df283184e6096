"""Pipelined chain broadcast: root -> root+1 -> ... -> root-1, chunk by chunk.

Every rank forwards a chunk as soon as it has it, so a large tensor costs about one transfer
time plus (n - 2) chunk times, rather than (n - 1) whole transfers.
"""
from __future__ import annotations

import math

import torch

from ..errors import WireError
from .ring import CHUNK_BYTES, split_sizes


def chain(c, t: torch.Tensor, root: int) -> torch.Tensor:
    n, i = c.size, c.rank
    pos = (i - root) % n
    nxt, prv = (i + 1) % n, (i - 1) % n
    out = t.contiguous().clone() if pos == 0 else torch.empty_like(t, memory_format=torch.contiguous_format)
    flat = out.reshape(-1)
    m = max(1, math.ceil(flat.numel() * flat.element_size() / CHUNK_BYTES))
    sizes = split_sizes(flat.numel(), m)
    if pos == 0:
        send_from = flat.clone()  # ``out`` goes to the caller, who may write to it at once
        o = 0
        for s in sizes:
            c.send(nxt, [send_from[o:o + s]])
            o += s
        return out
    o = 0
    for s in sizes:
        msg = c.recv(prv)
        x = msg.tensors[0] if len(msg.tensors) == 1 else None
        if x is None or x.numel() != s:
            raise WireError(f"rank {i}: broadcast chunk from rank {prv} has the wrong size")
        flat[o:o + s].copy_(x.reshape(-1))
        if pos < n - 1:
            c.send(nxt, [x])
        o += s
    return out
