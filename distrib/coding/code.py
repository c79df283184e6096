"""GradientCode: encode per-partition gradients on workers, decode their sum from any n − s.

Worker ``w`` computes one gradient per partition in ``code.partitions(w)`` and sends
``code.encode(w, grads)``; whoever aggregates calls ``code.decode({w: coded, ...})`` as soon as
any n − s workers have answered and gets the sum of all n partition gradients. Decoding
coefficients are solved in float64 and cached per set of workers; the sum is accumulated in
float64 and returned in the gradients' dtype.
"""

import functools
import operator
import warnings
from collections.abc import Mapping

import numpy as np
import torch

from distrib.coding import construction
from distrib.errors import DistribError

SCHEMES = ("cyclic", "fractional")
FP32_EPS = 2.0 ** -24


class GradientCode:
    """A gradient code for ``n`` workers tolerating ``s`` stragglers (Tandon et al., 2017).

    ``scheme="fractional"`` needs (s+1) | n and decodes by adding one worker per group (exact);
    ``scheme="cyclic"`` works for any 0 <= s < n. ``B`` is the n×n encoding matrix (float64):
    worker w sends ``Σ_j B[w, j] · g_j``. Every rank constructs the same code deterministically.

    ``amplification`` is the worst factor, over straggler sets, by which decoding magnifies
    rounding errors compared with adding the n gradients directly (1.0 for fractional). Cyclic
    codes grow with n and s (about 6 at n=8, s=3; 1e3 at n=20, s=6), as all real cyclic
    gradient codes do; a RuntimeWarning says when float32 gradients lose more than ~1e-4.
    """

    def __init__(self, n, s, scheme="cyclic", *, cache_size=1024):
        n = _as_int(n, "n")
        s = _as_int(s, "s")
        if n < 1:
            raise ValueError(f"a gradient code needs n >= 1 workers, got n={n}")
        if not 0 <= s < n:
            raise ValueError(
                f"stragglers s must satisfy 0 <= s < n, got n={n}, s={s} "
                f"(each worker holds s+1 of the n partitions)")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown gradient-coding scheme {scheme!r}; use one of {SCHEMES}")
        if scheme == "fractional" and n % (s + 1):
            raise ValueError(
                f"fractional repetition needs (s+1) | n, but s+1={s + 1} does not divide n={n}; "
                f"use scheme='cyclic'")
        self.n, self.s, self.scheme = n, s, scheme
        if scheme == "fractional":
            self._partitions = [
                tuple(range(w // (s + 1) * (s + 1), (w // (s + 1) + 1) * (s + 1)))
                for w in range(n)]
            B = construction.fractional_matrix(n, s)
            self.amplification = 1.0
        else:
            self._partitions = [tuple((w + k) % n for k in range(s + 1)) for w in range(n)]
            B = construction.cyclic_matrix(n, s)
            self.amplification = construction.check_span(B, n, s) / n
            if self.amplification * FP32_EPS > 1e-4:
                warnings.warn(
                    f"cyclic gradient code n={n}, s={s} is ill-conditioned: decoding can magnify "
                    f"rounding {self.amplification:.2g}x, i.e. float32 gradients may come back "
                    f"with relative error up to ~{self.amplification * FP32_EPS:.1g}; use "
                    f"scheme='fractional', fewer workers per code, or float64 gradients",
                    RuntimeWarning, stacklevel=2)
        B.flags.writeable = False
        self._B = B
        # Encoding weights in the order of partitions(w): python floats, ready for add_(alpha=).
        self._weights = [tuple(float(B[w, p]) for p in self._partitions[w]) for w in range(n)]
        self._solve = functools.lru_cache(maxsize=cache_size)(self._solve_uncached)

    def __repr__(self):
        return f"GradientCode(n={self.n}, s={self.s}, scheme={self.scheme!r})"

    @property
    def B(self):
        """The n×n encoding matrix as a float64 tensor (a copy)."""
        return torch.from_numpy(self._B.copy())

    def partitions(self, worker):
        """The s+1 data partitions ``worker`` computes on, in the order ``encode`` expects."""
        return list(self._partitions[self._worker(worker)])

    def holders(self, partition):
        """The s+1 workers that hold ``partition``."""
        p = _as_int(partition, "partition")
        if not 0 <= p < self.n:
            raise ValueError(f"partition {p} out of range 0..{self.n - 1}")
        return [w for w in range(self.n) if p in self._partitions[w]]

    def encode(self, worker, grads):
        """Combine ``worker``'s partition gradients (ordered as ``partitions(worker)``)."""
        w = self._worker(worker)
        if isinstance(grads, torch.Tensor) or not isinstance(grads, (list, tuple)):
            raise TypeError(f"encode expects a list or tuple of {self.s + 1} tensors, "
                            f"got {type(grads).__name__}")
        if len(grads) != self.s + 1:
            raise ValueError(f"worker {w} holds {self.s + 1} partitions {self.partitions(w)}, "
                             f"but encode got {len(grads)} gradients")
        _check_tensors(grads, "partition gradients")
        dtype = grads[0].dtype
        # Half precisions accumulate in fp32; fp32/fp64 in their own dtype (s+1 terms only).
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        weights = self._weights[w]
        with torch.no_grad():
            out = torch.mul(grads[0].to(acc), weights[0])
            for g, c in zip(grads[1:], weights[1:]):
                out.add_(g, alpha=c)
            return out.to(dtype)

    def decoding_vector(self, workers):
        """Coefficients a (float64) with aᵀ·B_S = 1ᵀ for the workers S, in the order given.

        A set or frozenset is taken in sorted order. Needs at least n − s distinct workers.
        """
        ws = self._worker_set(workers, "decoding_vector")
        order = sorted(ws) if isinstance(workers, (set, frozenset)) else ws
        coeff = dict(zip(sorted(ws), self._solve(frozenset(ws))))
        return torch.tensor([coeff[w] for w in order], dtype=torch.float64)

    def decode(self, coded):
        """The sum of all n partition gradients from ``{worker: coded tensor}`` (>= n − s)."""
        if not isinstance(coded, Mapping):
            raise TypeError(f"decode expects a mapping {{worker: tensor}}, "
                            f"got {type(coded).__name__}")
        ws = self._worker_set(list(coded), "decode")
        tensors = [coded[w] for w in coded]
        _check_tensors(tensors, "coded gradients")
        first = tensors[0]
        with torch.no_grad():
            out = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
            for w, a in zip(sorted(ws), self._solve(frozenset(ws))):
                if a != 0.0:  # fractional decoding uses one worker per group
                    out.add_(coded[w], alpha=float(a))
            return out.to(first.dtype)

    def _solve_uncached(self, workers):
        """Decoding coefficients for the sorted workers of a frozenset (read-only array)."""
        ws = sorted(workers)
        if self.scheme == "fractional":
            a = np.zeros(len(ws))
            seen = set()
            for k, w in enumerate(ws):
                group = w // (self.s + 1)
                if group not in seen:
                    seen.add(group)
                    a[k] = 1.0
        else:
            a = construction.solve_decoding(self._B[ws])
            if a is None:  # excluded by check_span; kept so a bad B can never decode silently
                raise DistribError(f"{self!r} cannot decode from workers {ws}")
        a.flags.writeable = False
        return a

    def _worker(self, worker):
        w = _as_int(worker, "worker")
        if not 0 <= w < self.n:
            raise ValueError(f"unknown worker {w}: this code has workers 0..{self.n - 1}")
        return w

    def _worker_set(self, workers, op):
        if isinstance(workers, (str, bytes)) or not hasattr(workers, "__iter__"):
            raise TypeError(f"{op} expects a collection of worker ids, "
                            f"got {type(workers).__name__}")
        ws = [self._worker(w) for w in workers]
        if len(set(ws)) != len(ws):
            raise ValueError(f"{op}: duplicate workers in {ws}")
        need = self.n - self.s
        if len(ws) < need:
            missing = sorted(set(range(self.n)) - set(ws))
            raise ValueError(
                f"{op} needs at least n - s = {need} of the {self.n} workers (s={self.s}); "
                f"got {len(ws)}: {sorted(ws)} (missing {missing})")
        return ws


def _as_int(value, name):
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _check_tensors(tensors, what):
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be torch tensors, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{what} must be floating point, got {t.dtype}")
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape:
            raise ValueError(f"{what} have mismatched shapes: {tuple(first.shape)} "
                             f"and {tuple(t.shape)}")
        if t.dtype != first.dtype:
            raise TypeError(f"{what} have mismatched dtypes: {first.dtype} and {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{what} are on different devices: {first.device} and {t.device}")
