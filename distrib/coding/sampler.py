"""CodedSampler: the sample indices of the partitions a gradient code assigns to one worker.

Each epoch the dataset is shuffled with ``seed + epoch`` (the same permutation on every rank, as
torch's DistributedSampler does) and cut into ``code.n`` contiguous partitions whose sizes differ
by at most one. Iterating yields one training step at a time: a list of ``s+1`` index lists, one
per partition, in the order of ``code.partitions(worker)``.

With ``batch_size=None`` an epoch is one step over whole partitions (full-batch gradient coding,
as in the paper). With ``batch_size=b`` every partition is cut into the same number of chunks,
``ceil(smallest partition / b)``: chunk k is positions ``[k·b, (k+1)·b)`` and the last chunk takes
the rest of its partition, so no chunk is empty and every sample is used once per epoch. Step k
on all n partitions together is one global batch; the gradient code recovers its gradient.
"""

import itertools
import math

import torch
from torch.utils.data import Sampler

from distrib.coding.code import GradientCode, _as_int


class CodedSampler(Sampler):
    """Per-step index lists of worker ``worker``'s partitions under ``code``.

    ``len(sampler)`` is the number of steps per epoch; call ``set_epoch(e)`` before each epoch
    to reshuffle (identically on every rank).
    """

    def __init__(self, dataset_len, code, worker, batch_size=None, seed=0, shuffle=True):
        if not isinstance(code, GradientCode):
            raise TypeError(f"code must be a GradientCode, got {type(code).__name__}")
        dataset_len = _as_int(dataset_len, "dataset_len")
        if dataset_len < code.n:
            raise ValueError(f"dataset of {dataset_len} samples cannot fill {code.n} partitions "
                             f"(need at least one sample per partition)")
        if batch_size is not None:
            batch_size = _as_int(batch_size, "batch_size")
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.dataset_len = dataset_len
        self.code = code
        self.partitions = code.partitions(worker)  # validates worker
        self.worker = _as_int(worker, "worker")
        self.batch_size = batch_size
        self.seed = _as_int(seed, "seed")
        self.shuffle = bool(shuffle)
        self.epoch = 0
        base, extra = divmod(dataset_len, code.n)
        sizes = [base + (p < extra) for p in range(code.n)]
        self._bounds = [0, *itertools.accumulate(sizes)]
        self._steps = 1 if batch_size is None else math.ceil(base / batch_size)
        self._order = None  # (epoch, permutation) of the current epoch, built on first use

    def set_epoch(self, epoch):
        """Select the epoch whose shuffle the next iteration uses."""
        self.epoch = _as_int(epoch, "epoch")

    def partition_indices(self, partition):
        """All sample indices of ``partition`` (any of the n) in the current epoch."""
        p = _as_int(partition, "partition")
        if not 0 <= p < self.code.n:
            raise ValueError(f"partition {p} out of range 0..{self.code.n - 1}")
        return self._permutation()[self._bounds[p]:self._bounds[p + 1]].tolist()

    def __len__(self):
        return self._steps

    def __iter__(self):
        parts = [self.partition_indices(p) for p in self.partitions]
        b = self.batch_size
        for k in range(self._steps):
            if b is None:
                yield parts
            else:
                last = k == self._steps - 1
                yield [idx[k * b:] if last else idx[k * b:(k + 1) * b] for idx in parts]

    def _permutation(self):
        if self._order is None or self._order[0] != self.epoch:
            if self.shuffle:
                g = torch.Generator()
                g.manual_seed(self.seed + self.epoch)
                perm = torch.randperm(self.dataset_len, generator=g)
            else:
                perm = torch.arange(self.dataset_len)
            self._order = (self.epoch, perm)
        return self._order[1]

