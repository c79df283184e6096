"""Compressors as torch DistributedDataParallel communication hooks.

::

    model = DistributedDataParallel(net)
    model.register_comm_hook(None, distrib.compress.ddp_hook(PowerSGD(rank=4)))

The hook reduces every gradient of a DDP bucket of ``min_numel`` elements or more with
``compressor.reduce`` (so the same code runs as under ``distrib.allreduce``), and the smaller
ones, and those the compressor would send as they are (``compressor.compresses(shape)`` is
false, e.g. biases under PowerSGD), together in one uncompressed all-reduce.
:class:`TorchComm` adapts a ``torch.distributed`` process group to the communicator protocol
``reduce`` expects. The hook's ``state`` argument is
the process group (``None``: the default group); the collectives wait as long as that group's
timeout (set it with ``init_process_group(timeout=...)``).
"""
from __future__ import annotations

import torch

_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


class TorchComm:
    """The ``reduce`` communicator protocol over a ``torch.distributed`` process group."""

    def __init__(self, group=None):
        import torch.distributed as dist
        if not dist.is_initialized():
            raise RuntimeError("TorchComm needs torch.distributed.init_process_group() first")
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def allreduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op not in _OPS and op != "mean":
            raise ValueError(f"allreduce op must be sum, mean, min or max, not {op!r}")
        x = t.detach().clone(memory_format=torch.contiguous_format)
        self._dist.all_reduce(x, op=getattr(self._dist.ReduceOp, _OPS.get(op, "SUM")),
                              group=self.group)
        return x / self.size if op == "mean" else x

    def allgather(self, t: torch.Tensor) -> list:
        """Every rank's tensor; shapes may differ (they are exchanged first)."""
        t = t.detach().contiguous()
        if t.dim() > 8:
            raise ValueError("TorchComm.allgather handles tensors of up to 8 dimensions")
        head = torch.zeros(9, dtype=torch.int64)
        head[0] = t.dim()
        head[1:1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        heads = [torch.empty_like(head) for _ in range(self.size)]
        self._dist.all_gather(heads, head, group=self.group)
        shapes = [tuple(h[1:1 + int(h[0])].tolist()) for h in heads]
        numels = [int(torch.tensor(s, dtype=torch.int64).prod()) for s in shapes]
        width = max(numels)
        buf = torch.zeros(width, dtype=t.dtype)
        buf[:t.numel()] = t.reshape(-1)
        bufs = [torch.empty(width, dtype=t.dtype) for _ in range(self.size)]
        self._dist.all_gather(bufs, buf, group=self.group)
        return [b[:n].view(s) for b, n, s in zip(bufs, numels, shapes)]


def ddp_hook(compressor, min_numel: int = 1024):
    """A DDP comm hook (``hook(state, bucket) -> Future``) averaging gradients with
    ``compressor``; gradients under ``min_numel`` elements go uncompressed, fused."""
    from .base import Compressor
    if not isinstance(compressor, Compressor):
        raise TypeError(f"ddp_hook takes a distrib.compress compressor, "
                        f"got {type(compressor).__name__}")
    comms = {}
    keys = {}  # parameter -> key, numbered in first-seen order (the same on every rank)

    def hook(state, bucket):
        comm = comms.get(id(state))
        if comm is None:
            comm = comms[id(state)] = TorchComm(state)
        buf = bucket.buffer()
        out = torch.empty_like(buf)
        small = []
        offset = 0
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            o = _offset(g, buf, offset)
            n = g.numel()
            offset = o + n
            if n < min_numel or not compressor.compresses(g.shape):
                small.append((o, g))
                continue
            key = keys.setdefault(id(p), f"ddp.param{len(keys)}")
            out[o:o + n] = compressor.reduce(g, comm, key=key, op="mean").reshape(-1)
        if small:
            flat = torch.cat([g.reshape(-1) for _, g in small])
            flat = comm.allreduce(flat, "sum") / comm.size
            i = 0
            for o, g in small:
                out[o:o + g.numel()] = flat[i:i + g.numel()]
                i += g.numel()
        fut = torch.futures.Future()
        fut.set_result(out)
        return fut

    return hook


def _offset(g, buf, running):
    """Where gradient ``g`` sits in the bucket buffer (it is normally a view into it)."""
    if g.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr():
        return (g.data_ptr() - buf.data_ptr()) // buf.element_size()
    return running
