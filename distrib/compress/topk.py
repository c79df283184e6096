"""Top-k sparsification: keep exactly ``ceil(ratio·n)`` entries of largest magnitude.

The payload is the int32 indices (int64 past 2³¹ elements) and the values in the tensor's own
dtype, so ``nbytes = k·(4 + itemsize)``. Not linear: payloads are all-gathered and each rank's
entries are scattered into one accumulator in rank order. Pair it with :class:`ErrorFeedback`
(the dropped mass is carried to the next step) for training.

Selection is exact but avoids a full ``torch.topk`` on big tensors (slow on CPU): a threshold
from a strided sample keeps a candidate set a little larger than k, found in one pass over the
tensor in cache-sized chunks (numpy's abs, comparison and flatnonzero, several times faster
than torch's on one thread), and a partition of the candidates picks the k; if the sample's
estimate was too high the full ``torch.topk`` runs.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import Compressor

CHUNK = 1 << 16  # elements per pass of the candidate scan (x, |x| and the mask stay in cache)


def topk_indices(x: torch.Tensor, k: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (int64, unordered) of ``k`` entries of largest magnitude of the 1-D ``x``;
    ``scratch`` (``x``'s size and dtype) saves allocating ``|x|`` if a full sort runs."""
    return topk(x, k, scratch)[0]


def topk(x: torch.Tensor, k: int, scratch: torch.Tensor | None = None):
    """``(indices, values)``: indices (int64, unordered) of ``k`` entries of largest magnitude
    of the 1-D ``x`` and a fresh tensor of those entries (``x[indices]``)."""
    x, n = x.detach(), x.numel()
    if k >= n:
        return torch.arange(n), x.clone()
    if k <= 0:
        return torch.empty(0, dtype=torch.int64), x[:0].clone()
    if n >= (1 << 17) and k <= n // 16 and x.dtype in _SCANNED:
        found = _by_threshold(x, k)
        if found is not None:
            return torch.from_numpy(found[0]), torch.from_numpy(found[1]).to(x.dtype)
    a = x.abs() if scratch is None else torch.abs(x, out=scratch)
    i = torch.topk(a, k, sorted=False).indices
    return i, x[i]


# numpy computes in the tensor's own dtype for these; half precision is widened chunk by chunk
_SCANNED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _by_threshold(x, k):
    """numpy (indices, values) of the k entries, chosen among the candidates above a sampled
    threshold; None if the sample misled (fewer than k candidates): the full sort runs."""
    thr = _sample_threshold(x, k)
    if thr is None:
        return None
    sparse = thr == 0  # most entries are 0: the candidates are the nonzero ones
    idx, vals = _at_least(x, _smallest_positive(x.dtype) if sparse else thr)
    c = idx.size
    if c >= k:
        # the k largest of the candidates: everything from the (c-k)-th smallest on
        keep = np.argpartition(np.abs(vals), c - k)[c - k:]
        return idx[keep], vals[keep]
    if sparse:
        # fewer than k nonzeros: all of them, and k - c zeros (the first k entries hold at
        # least that many)
        free = np.ones(k, dtype=bool)
        free[idx[idx < k]] = False
        zeros = np.flatnonzero(free)[:k - c]
        return np.concatenate([idx, zeros]), np.concatenate([vals, np.zeros(k - c, vals.dtype)])
    return None


def _sample_threshold(x, k):
    """A magnitude that about 1.1·k entries reach (from a strided sample of at least 2¹⁶, with
    >= 256 expected hits), or None if it is not finite."""
    n = x.numel()
    m = min(n, max(1 << 16, 256 * n // k))
    sample = x[::n // m].abs()
    hits = k * sample.numel() / n
    rank = min(sample.numel(), int(hits * 1.1 + 4 * math.sqrt(hits)) + 2)
    thr = torch.topk(sample, rank, sorted=False).values.min()
    return float(thr) if torch.isfinite(thr) else None


def _smallest_positive(dtype):
    """The smallest positive value in the dtype _at_least compares in: |x| >= it iff x != 0."""
    wide = np.float64 if dtype == torch.float64 else np.float32
    return float(np.finfo(wide).smallest_subnormal)


def _at_least(x, thr):
    """Indices (int64) and values (numpy, float32 for half precision) of the entries of ``x``
    with ``|x| >= thr``, in order, in one pass of cache-sized chunks."""
    n = x.numel()
    wide = x.dtype in (torch.float32, torch.float64)
    xs = x.numpy() if wide else None
    half = None if wide else torch.empty(min(n, CHUNK), dtype=torch.float32)
    dtype = xs.dtype if wide else np.float32
    mag = np.empty(min(n, CHUNK), dtype=dtype)
    mask = np.empty(min(n, CHUNK), dtype=bool)
    idx, vals = [], []
    for lo in range(0, n, CHUNK):
        hi = min(lo + CHUNK, n)
        c = xs[lo:hi] if wide else half[:hi - lo].copy_(x[lo:hi]).numpy()
        hit = np.flatnonzero(np.greater_equal(np.abs(c, out=mag[:hi - lo]), thr,
                                              out=mask[:hi - lo]))
        vals.append(c[hit])  # gathered while the chunk is in cache
        hit += lo
        idx.append(hit)
    return np.concatenate(idx), np.concatenate(vals)


class TopK(Compressor):
    """Exactly ``ceil(ratio·numel)`` largest-magnitude entries; see the module docstring."""

    name = "topk"

    def __init__(self, ratio: float):
        super().__init__()
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"TopK ratio must be a number in (0, 1], got {ratio!r}")
        self.ratio = float(ratio)

    def k(self, n: int) -> int:
        """Entries kept of a tensor of ``n`` elements."""
        return min(n, math.ceil(self.ratio * n))

    def _compress(self, flat, key, payload):
        n = flat.numel()
        idx, values = topk(flat, self.k(n))
        return [idx.to(torch.int32 if n < 2 ** 31 else torch.int64), values]

    def _decompress(self, payload):
        idx, values = payload.tensors
        out = _zeros(payload.numel, values.dtype)
        out[idx] = values
        return out

    def _accumulate(self, acc, payload, alpha=1.0):
        idx, values = payload.tensors
        acc.index_add_(0, idx, values.to(acc.dtype), alpha=alpha)

    def __repr__(self):
        return f"TopK(ratio={self.ratio})"


def _zeros(n, dtype):
    """A fresh zero tensor. (numpy's calloc-backed zeros would skip writing untouched pages,
    about 5 ms on 100 MB, but the result could not be resized like a torch tensor.)"""
    return torch.zeros(n, dtype=dtype)