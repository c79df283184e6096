"""Gradient coding: straggler-tolerant gradient aggregation (Tandon et al., ICML 2017).

The data is cut into n partitions and worker w computes on the s+1 partitions
``code.partitions(w)``; every partition is held by s+1 workers. Each worker sends one coded
gradient, and the sum of all n partition gradients is recovered exactly from ANY n − s workers,
so the s slowest can be ignored.

A training step, worker side::

    code = distrib.coding.GradientCode(n, s, scheme="cyclic")     # same on every rank
    sampler = distrib.coding.CodedSampler(len(dataset), code, worker=rank, batch_size=32)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for step_indices in sampler:                  # s+1 index lists, one per partition
            grads = []
            for idx in step_indices:                  # order of code.partitions(rank)
                model.zero_grad()
                x, y = dataset[idx]                   # or collate [dataset[i] for i in idx]
                loss_fn(model(x), y).backward()
                grads.append(flat_grad(model))        # one gradient per partition
            push(code.encode(rank, grads))            # one tensor, the size of one gradient

and aggregator side (a parameter server, or every rank after a straggler-tolerant gather)::

    coded = first_arrivals(n - s)                     # {worker: coded tensor}
    total = code.decode(coded)                        # Σ of the n partition gradients
    mean = total / n                                  # with mean losses per partition

Partition sizes differ by at most one sample; with mean losses the decoded mean equals the
full-batch mean up to that imbalance (use summed losses and divide by the batch size when it
must be exact).

``scheme="fractional"`` (needs (s+1) | n) decodes by adding one worker per group; ``"cyclic"``
works for any 0 <= s < n with real coefficients from a structured MDS construction (see
``distrib.coding.construction``).
"""

from distrib.coding.code import GradientCode
from distrib.coding.sampler import CodedSampler

__all__ = ["GradientCode", "CodedSampler"]
