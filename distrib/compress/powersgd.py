"""PowerSGD: rank-r gradient compression by one power iteration (Vogels et al., NeurIPS 2019).

A tensor is viewed as a matrix ``M`` of shape ``(shape[0], numel / shape[0])``. ``reduce`` runs,
on every rank, with ``Q`` shared by all ranks::

    M ← g + e                     (error feedback, per rank)
    P ← all-reduce(M Q);  P̂ ← orthonormal(P)
    Q ← all-reduce(Mᵀ P̂)          (sum; kept, divided by the size, for the next step)
    out ← P̂ Qᵀ / size;  e ← M − out

Both all-reduces are exact sums of linear maps of ``M`` (``Q`` resp. ``P̂`` is the same on every
rank), so every rank gets the same ``P̂`` and the same result, bitwise. ``Q`` starts as a Gaussian
matrix drawn from a seed derived from the key (identical on all ranks) and is warm-started from
the previous step (``warm_start=True``) or redrawn each step. Tensors of fewer than two
dimensions, and tensors where the factors would not be smaller than the tensor (``rank ≥
min(n, m)`` among them), are all-reduced uncompressed: the exact mean.

``compress``/``decompress`` alone give the single-process rank-r approximation (``P̂`` and
``Q = Mᵀ P̂``, with the same warm start, no error feedback).
"""
from __future__ import annotations

import time

import torch

from .base import Compressor, LocalComm, _check_op, _key, compute_dtype, stable_seed


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``p``'s (thin QR; deterministic for a given input)."""
    return torch.linalg.qr(p, mode="reduced").Q


class PowerSGD(Compressor):
    """Rank-``rank`` PowerSGD with error feedback; see the module docstring."""

    name = "powersgd"

    def __init__(self, rank: int = 1, warm_start: bool = True, error_feedback: bool = True,
                 seed: int = 0):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"PowerSGD rank must be a positive integer, got {rank!r}")
        self.rank = rank
        self.warm_start = bool(warm_start)
        self.error_feedback = bool(error_feedback)
        self.seed = int(seed)

    @property
    def has_error_feedback(self):
        return self.error_feedback

    def matrix_shape(self, shape):
        """``(n, m)`` if a tensor of ``shape`` is compressed, else ``None`` (sent as it is)."""
        if len(shape) < 2:
            return None
        n = shape[0]
        m = 1
        for s in shape[1:]:
            m *= s
        if n == 0 or m == 0 or (n + m) * self.rank >= n * m:
            return None
        return n, m

    def compresses(self, shape):
        return self.matrix_shape(tuple(shape)) is not None

    def _q(self, st, key, m, dtype):
        """This step's Q: warm-started, or drawn from a seed every rank derives alike."""
        if self.warm_start and "q" in st:
            return st["q"]
        step = 0 if self.warm_start else st.get("step", 0)
        g = torch.Generator().manual_seed(stable_seed("powersgd", self.seed, key, step))
        return torch.randn(m, self.rank, generator=g, dtype=torch.float64).to(dtype)

    # -- single process -------------------------------------------------------------------------
    def _compress(self, flat, key, payload):
        nm = self.matrix_shape(payload.shape)
        if nm is None:
            return [flat]
        st = self.state(key, payload.shape)
        M = flat.view(nm).to(compute_dtype(flat.dtype))
        p = orthonormalize(M @ self._q(st, key, nm[1], M.dtype))
        q = M.t() @ p
        self._remember(st, q)
        return [p, q]

    def _decompress(self, payload):
        if len(payload.tensors) == 1:
            return payload.tensors[0].clone()
        p, q = payload.tensors
        return (p @ q.t()).view(-1)

    def _remember(self, st, q_mean):
        if self.warm_start:
            st["q"] = q_mean
        st["step"] = st.get("step", 0) + 1

    # -- the collective -------------------------------------------------------------------------
    def reduce(self, t, comm=None, key=None, op="mean"):
        comm = LocalComm() if comm is None else comm
        _check_op(op)
        self._check_tensor(t)
        key = _key(key)
        cdtype = compute_dtype(t.dtype)
        nm = self.matrix_shape(t.shape)
        with self._op() as stats:
            stats["raw_bytes"] += t.numel() * t.element_size()
            if nm is None:
                stats["wire_bytes"] += t.numel() * t.element_size()
                out = self._comm(comm.allreduce, t.detach(), "sum").to(cdtype)
                if op == "mean":
                    out /= comm.size
                return out.to(t.dtype)
            t0 = _now()
            st = self.state(key, t.shape)
            M = t.detach().reshape(nm).to(cdtype)
            if self.error_feedback and "e" in st:
                M = st["e"] + M  # M = g + e (e itself is kept for an overflowed step)
            P = M @ self._q(st, key, nm[1], cdtype)
            stats["compress_s"] += _now() - t0
            P = self._comm(comm.allreduce, P, "sum")
            t0 = _now()
            P = orthonormalize(P)
            Q = M.t() @ P
            stats["compress_s"] += _now() - t0
            Q = self._comm(comm.allreduce, Q, "sum")
            stats["wire_bytes"] += (P.numel() + Q.numel()) * P.element_size()
            t0 = _now()
            Q /= comm.size  # then P Qᵀ is the mean
            out = P @ Q.t()
            # An overflowed step (inf/nan from loss scaling, the same on every rank after the
            # all-reduces) must not poison the error buffer or the warm-start Q.
            if bool(torch.isfinite(Q).all()):
                if self.error_feedback:
                    # M is ours unless it is a view of t (no feedback yet, same dtype): copy.
                    st["e"] = (M if M.data_ptr() != t.data_ptr() else M.clone()).sub_(out)
                self._remember(st, Q)
            if op == "sum":
                out *= comm.size
            stats["compress_s"] += _now() - t0
        return out.view(t.shape).to(t.dtype)

    def __repr__(self):
        return (f"PowerSGD(rank={self.rank}, warm_start={self.warm_start}, "
                f"error_feedback={self.error_feedback})")


_now = time.perf_counter
