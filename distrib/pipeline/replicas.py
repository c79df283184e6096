"""Hybrid pipeline + data parallelism: average one stage's gradients over the pipeline replicas.

With ``replicas x stages`` workers, rank ``replica * stages + stage`` holds stage ``stage`` of
replica ``replica``. Every replica runs its own pipeline on its own data; afterwards the copies of
a stage average their gradients over a communicator of just those ranks (a ring all-reduce),
compressed when a compressor is given. Replicas that train on equal-sized batches then hold the
gradient of the concatenated batch.
"""
from __future__ import annotations

import torch


def average_gradients(named_parameters, comm, compressor=None) -> None:
    """Replace each parameter's ``.grad`` by its mean over ``comm`` (in place).

    A missing gradient counts as zeros, so every replica reduces the same tensors. Without a
    compressor, gradients of one dtype are fused into a single all-reduce.
    """
    params = [(n, p) for n, p in named_parameters if p.requires_grad]
    if comm is None or comm.size == 1 or not params:
        return
    for _, p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if compressor is not None:
        for name, p in params:
            p.grad.copy_(compressor.reduce(p.grad.detach().cpu(), comm, key=name, op="mean"))
        return
    by_dtype = {}
    for _, p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        grads = by_dtype[dtype]
        flat = comm.allreduce(torch.cat([g.detach().cpu().reshape(-1) for g in grads]), "mean")
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
