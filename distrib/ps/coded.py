"""Training-loop helpers for gradient-coded sync PS (``stragglers=s``).

Each worker computes one loss per partition the code gives it; :func:`coded_backward` runs one
backward pass of ``Σ_j B[w, p_j] · loss_j``, which leaves exactly ``code.encode(w, grads)`` in
``.grad`` (the code is linear), without materialising the per-partition gradients.

A worker whose push came too late catches up inside ``opt.step()`` (it applies the steps it
missed) and must then compute on the *current* step's data, skipping the batches of the steps
it missed: :func:`coded_batches` yields the batch of the optimizer's global step, so the loop
needs no bookkeeping of its own.
"""
from __future__ import annotations

import torch

from ..coding import CodedSampler, GradientCode
from ..errors import DistribError


def coded_backward(code: GradientCode, losses, worker: int | None = None) -> None:
    """Backward of this worker's coded loss: adds ``code.encode(worker, [∇loss_j])`` to ``.grad``.

    ``losses`` are the ``s+1`` losses of ``code.partitions(worker)`` in that order (``worker``
    defaults to ``distrib.rank()``). Call ``optimizer.zero_grad()`` first.
    """
    if not isinstance(code, GradientCode):
        raise TypeError(f"code must be a distrib.coding.GradientCode, got {type(code).__name__}")
    if worker is None:
        from .. import context
        worker = context.rank()
    parts = code.partitions(worker)
    losses = list(losses)
    if len(losses) != len(parts):
        raise ValueError(f"worker {worker} holds partitions {parts}: coded_backward needs "
                         f"{len(parts)} losses, got {len(losses)}")
    B = code.B
    total = sum(float(B[worker, p]) * loss for p, loss in zip(parts, losses))
    torch.autograd.backward(total)


def coded_batches(optimizer, sampler: CodedSampler):
    """Yield ``sampler``'s per-step index lists (one list per partition) for the steps this
    worker has to compute in the sampler's epoch, following the optimizer's global step.

    Global step ``g`` belongs to epoch ``g // len(sampler)`` (epochs are counted from 0 and all
    have ``len(sampler)`` steps); call ``sampler.set_epoch(e)`` before each epoch as usual. The
    loop body must call ``optimizer.step()`` once per batch.
    """
    ps = _ps_worker(optimizer)
    if not isinstance(sampler, CodedSampler):
        raise TypeError(f"sampler must be a distrib.coding.CodedSampler, "
                        f"got {type(sampler).__name__}")
    steps = list(sampler)
    first = sampler.epoch * len(steps)
    while True:
        k = ps.global_step - first
        if k < 0:
            raise DistribError(f"the optimizer is at global step {ps.global_step}, before epoch "
                               f"{sampler.epoch} (which starts at step {first}): call "
                               f"sampler.set_epoch() with the epoch of the optimizer's step")
        if k >= len(steps):
            return
        before = ps.global_step
        yield steps[k]
        if ps.global_step == before:
            raise DistribError("coded_batches: the loop body must call optimizer.step() once "
                               "per batch")


def _ps_worker(optimizer):
    from .worker import PSWorker
    if isinstance(optimizer, PSWorker):
        return optimizer
    ps = getattr(optimizer, "_ps", None)
    if not isinstance(ps, PSWorker):
        raise TypeError("coded_batches needs a DistributedOptimizer(topology='ps', "
                        "stragglers=...)")
    return ps
