"""Balance helpers: how many consecutive layers each stage gets.

A pipeline runs as fast as its slowest stage, so both helpers cut the layer sequence into
``partitions`` contiguous runs that minimise the largest per-stage cost (parameter count, or
measured forward + backward time), every stage getting at least one layer.
"""
from __future__ import annotations

import time

import torch
from torch import nn


def _check(module, partitions):
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"balance helpers take an nn.Sequential, not {type(module).__name__}")
    if type(partitions) is not int or not 1 <= partitions <= len(module):
        raise ValueError(f"partitions must be an int in 1..{len(module)} (one layer per stage "
                         f"at least), got {partitions!r}")


def partition(costs, partitions: int) -> list:
    """Sizes of ``partitions`` contiguous runs of ``costs`` minimising the largest run's sum.

    Ties go to the split whose runs are most even in cost, then the earliest. Dynamic
    programming over (layers, parts): O(n^2 k), nothing for sequences of a few hundred layers.
    """
    n = len(costs)
    if not 1 <= partitions <= n:
        raise ValueError(f"cannot cut {n} layers into {partitions} non-empty stages")
    prefix = [0.0]
    for c in costs:
        if c < 0:
            raise ValueError("layer costs must be non-negative")
        prefix.append(prefix[-1] + float(c))
    inf = (float("inf"), float("inf"))
    # best[k][i]: (max run sum, sum of squares) cutting the first i layers into k runs.
    best = [[inf] * (n + 1) for _ in range(partitions + 1)]
    cut = [[0] * (n + 1) for _ in range(partitions + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, partitions + 1):
        for i in range(k, n - (partitions - k) + 1):
            for j in range(k - 1, i):
                prev = best[k - 1][j]
                if prev == inf:
                    continue
                run = prefix[i] - prefix[j]
                cand = (max(prev[0], run), prev[1] + run * run)
                if cand < best[k][i]:
                    best[k][i], cut[k][i] = cand, j
    sizes, i = [], n
    for k in range(partitions, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def balance_by_params(module: nn.Sequential, partitions: int) -> list:
    """A balance giving every stage about the same number of parameters (layers without
    parameters go with their neighbours)."""
    _check(module, partitions)
    costs = [sum(p.numel() for p in layer.parameters()) for layer in module]
    return partition(costs, partitions)


def balance_by_time(module: nn.Sequential, sample, partitions: int, repeat: int = 3,
                    timeout: float = 10.0) -> list:
    """A balance from each layer's measured forward + backward time on ``sample`` (a batch, a
    tensor or a tuple of tensors, like the pipeline's input).

    Each layer runs ``repeat`` times (fewer if ``timeout`` seconds pass). Timings differ from
    process to process, so in a job of more than one worker the times of rank 0 are broadcast
    and every rank returns the same balance: every worker must then call this together.
    """
    _check(module, partitions)
    from .. import context
    from .microbatch import flatten, unflatten
    times = torch.zeros(len(module), dtype=torch.float64)
    deadline = time.monotonic() + timeout
    for _ in range(max(1, repeat)):
        x = sample
        for j, layer in enumerate(module):
            ts, is_tuple = flatten(x, f"the input of layer {j}")
            ts = [t.detach().requires_grad_(t.is_floating_point()) for t in ts]
            start = time.perf_counter()
            outs, _ = flatten(layer(unflatten(ts, is_tuple)), f"the output of layer {j}")
            # autograd.grad, not backward: time the backward without touching anyone's .grad.
            wrt = [t for t in ts if t.requires_grad] + [p for p in layer.parameters()
                                                        if p.requires_grad]
            grads = [(o, torch.ones_like(o)) for o in outs if o.requires_grad]
            if grads and wrt:
                outputs, grad_outputs = zip(*grads)
                torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True)
            times[j] += time.perf_counter() - start
            x = unflatten([o.detach() for o in outs], is_tuple)
        if time.monotonic() > deadline:
            break
    if context.size() > 1:
        times = context.world().broadcast(times, root=0)
    return partition(times.tolist(), partitions)
