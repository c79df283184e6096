"""Helpers for the compressor tests.

- :func:`run_ranks` runs ``fn(comm)`` for ``size`` simulated ranks, one thread each, over
  :class:`ThreadComm`: an in-process implementation of the communicator protocol that
  ``Compressor.reduce`` needs (``rank``, ``size``, ``allreduce`` summing in rank order so every
  rank gets the same bits, ``allgather``). Every wait has a deadline.
- :func:`ddp_worker` is one rank of a torch DDP job (gloo) with a ``ddp_hook``; see
  ``tests/test_compress_ddp.py``.
"""
from __future__ import annotations

import threading

import torch


class _Group:
    def __init__(self, size, timeout, log):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots = [None] * size
        self.log = log  # (op, rank, bytes) of every contribution


class ThreadComm:
    """One rank's view of a :class:`_Group` of threads."""

    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size

    def _exchange(self, op, t):
        g = self.group
        g.slots[self.rank] = t.detach().clone()
        g.log.append((op, self.rank, t.numel() * t.element_size()))
        g.barrier.wait()
        got = list(g.slots)
        g.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return got

    def allreduce(self, t, op="sum"):
        assert op == "sum", op
        got = self._exchange("allreduce", t)
        for x in got:
            if x.shape != t.shape or x.dtype != t.dtype:
                raise RuntimeError(f"allreduce mismatch: {x.shape}/{x.dtype} vs "
                                   f"{t.shape}/{t.dtype}")
        out = got[0].clone()
        for x in got[1:]:
            out += x
        return out

    def allgather(self, t):
        return [x.clone() for x in self._exchange("allgather", t)]


def run_ranks(size, fn, timeout=60.0, log=None):
    """``[fn(comm) for each rank]`` run concurrently; re-raises the first failure. ``log``, a
    list, receives ``(op, rank, bytes)`` for every collective contribution."""
    group = _Group(size, timeout, [] if log is None else log)
    results, errors = [None] * size, [None] * size

    def body(r):
        try:
            results[r] = fn(ThreadComm(group, r))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[r] = e
            group.barrier.abort()  # release the others at once

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout + 5)
        if th.is_alive():
            raise TimeoutError("a simulated rank did not finish")
    first = next((e for e in errors if e is not None and
                  not isinstance(e, threading.BrokenBarrierError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


# -- one rank of a DDP job -------------------------------------------------------------------
def ddp_worker(rank, size, rdv, compressor_spec, steps, out_path):
    """Train a small MLP for ``steps`` steps under DDP with ``ddp_hook`` of the compressor
    described by the JSON ``compressor_spec`` (``{"name": ..., **kwargs}``); saves the final
    parameters and the losses to ``out_path``."""
    import datetime
    import json

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import distrib.compress as dc

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model = DDP(net, bucket_cap_mb=0.001)  # small buckets: two per step
    spec = json.loads(compressor_spec)
    if spec:
        model.register_comm_hook(None, dc.ddp_hook(dc.get(spec.pop("name"), **spec),
                                                   min_numel=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    w_true = torch.randn(12, 3, generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 12, generator=gen)
        y = x @ w_true
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.save({"params": flat, "losses": losses}, out_path)
    dist.destroy_process_group()

