"""Parameter servers: ``distrib launch -n N --servers S`` and ``topology="ps"``.

::

    opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       model, topology="ps", mode="sync")   # or "async", "ssp"
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

The parameters are laid end to end and cut into S size-balanced key ranges, one per server;
large tensors are split between servers at row boundaries (:mod:`~distrib.ps.layout`).

Modes (all of them take any compressor for the push, and compress the pull too unless
``compress_pull=False``; ``opt.stats()`` counts both directions):

- ``mode="sync"``: each server sums the workers' gradients of its shard and every worker pulls
  the mean, then runs its own optimizer: the parameters follow ring all-reduce training. A
  compressed pull is the mean re-compressed by the server with its own error feedback.
- ``mode="async"``: the servers keep the parameters. A worker steps its optimizer locally,
  pushes the change and pulls the current parameters; the server applies each change (divided
  by N) when it arrives, and nobody waits for anybody (:mod:`~distrib.ps.store`).
- ``mode="ssp", staleness=k``: async, except that a worker's pull is held until the slowest
  worker is at most k steps behind it; ``k = 0`` is synchronous training.

Gradient coding (``mode="sync", stragglers=s``, Tandon et al. 2017): each worker computes on the
``s+1`` data partitions :class:`~distrib.coding.GradientCode` assigns it and pushes one coded
gradient; each server decodes the exact full gradient from the first ``N − s`` pushes and goes
on without the ``s`` slowest workers (their late pushes are dropped; they catch up by applying
the steps they missed and skip those steps' data)::

    code = distrib.coding.GradientCode(distrib.size(), s=1)
    opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                       topology="ps", stragglers=code)
    sampler = distrib.coding.CodedSampler(len(X), code, worker=distrib.rank(), batch_size=32)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for parts in distrib.ps.coded_batches(opt, sampler):  # s+1 index lists
            opt.zero_grad()
            losses = [loss_fn(model(X[idx]), Y[idx]) for idx in parts]
            distrib.ps.coded_backward(code, losses)           # .grad = coded gradient
            opt.step()                                        # .grad = exact mean gradient

Failures: a server that dies makes the workers' next wait raise
:class:`~distrib.errors.CommTimeout` naming it; a worker that disappears makes the servers
exit with an error naming it, and every other worker raises :class:`~distrib.errors.PeerFailed`
with that message. The servers exit cleanly when every worker has closed its optimizer (at
``opt.close()`` or process exit).
"""
from .coded import coded_backward, coded_batches
from .worker import PSWorker

__all__ = ["PSWorker", "coded_backward", "coded_batches"]
