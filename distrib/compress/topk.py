"""Top-k sparsification: keep exactly ``ceil(ratio·n)`` entries of largest magnitude.

The payload is the int32 indices (int64 past 2³¹ elements) and the values in the tensor's own
dtype, so ``nbytes = k·(4 + itemsize)``. Not linear: payloads are all-gathered and each rank's
entries are scattered into one accumulator in rank order. Pair it with :class:`ErrorFeedback`
(the dropped mass is carried to the next step) for training.

Selection is exact but avoids a full ``torch.topk`` on big tensors (slow on CPU): a threshold
from a strided sample keeps a candidate set a little larger than k, and ``torch.topk`` runs on
the candidates only; if the sample's estimate was too high the full ``torch.topk`` runs.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import Compressor


def topk_indices(x: torch.Tensor, k: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (int64, unordered) of ``k`` entries of largest magnitude of the 1-D ``x``;
    ``scratch`` (``x``'s size and dtype) saves allocating a buffer for ``|x|``."""
    n = x.numel()
    if k >= n:
        return torch.arange(n)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    a = x.abs() if scratch is None else torch.abs(x, out=scratch)
    if n < (1 << 17) or k > n // 16:
        return torch.topk(a, k, sorted=False).indices
    m = min(n, max(1 << 16, 256 * n // k))  # the sample then holds >= 256 expected hits
    sample = a[::n // m]
    hits = k * sample.numel() / n
    rank = min(sample.numel(), int(hits * 1.1 + 4 * math.sqrt(hits)) + 2)
    thr = torch.topk(sample, rank, sorted=False).values.min()
    if not torch.isfinite(thr):
        return torch.topk(a, k, sorted=False).indices
    # numpy's comparison and flatnonzero are several times faster than torch's on one thread
    # (measured for float32/float64; torch is faster for float16, numpy has no bfloat16)
    if a.dtype in (torch.float32, torch.float64):
        mask = np.greater_equal(a.numpy(), thr.item())
    else:
        mask = (a >= thr).numpy()
    cand = torch.from_numpy(np.flatnonzero(mask))
    if cand.numel() < k:
        return torch.topk(a, k, sorted=False).indices
    return cand[torch.topk(a[cand], k, sorted=False).indices]


class TopK(Compressor):
    """Exactly ``ceil(ratio·numel)`` largest-magnitude entries; see the module docstring."""

    name = "topk"

    def __init__(self, ratio: float):
        super().__init__()
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"TopK ratio must be a number in (0, 1], got {ratio!r}")
        self.ratio = float(ratio)
        self._ws = None

    def _scratch(self, n, dtype):
        """A buffer for |x|, kept between calls (a fresh one would cost page faults)."""
        if n < (1 << 17):
            return None
        if self._ws is None or self._ws.numel() < n or self._ws.dtype != dtype:
            self._ws = torch.empty(n, dtype=dtype)
        return self._ws[:n]

    def k(self, n: int) -> int:
        """Entries kept of a tensor of ``n`` elements."""
        return min(n, math.ceil(self.ratio * n))

    def _compress(self, flat, key, payload):
        n = flat.numel()
        idx = topk_indices(flat, self.k(n), self._scratch(n, flat.dtype))
        values = flat[idx]
        return [idx.to(torch.int32 if n < 2 ** 31 else torch.int64), values]

    def _decompress(self, payload):
        idx, values = payload.tensors
        out = torch.zeros(payload.numel, dtype=values.dtype)
        out[idx] = values
        return out

    def _accumulate(self, acc, payload, alpha=1.0):
        idx, values = payload.tensors
        acc.index_add_(0, idx, values.to(acc.dtype), alpha=alpha)

    def __repr__(self):
        return f"TopK(ratio={self.ratio})"
