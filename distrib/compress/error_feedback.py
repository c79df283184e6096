"""Error feedback (EF-SGD, Seide et al. 2014; Karimireddy et al. 2019) around any compressor.

Per key it keeps the residual ``e`` (float32, float64 for float64 tensors) and compresses
``p = g + e`` instead of ``g``, then sets ``e ← p − C(p)``. What was dropped is sent later, so
over T steps ``Σ C(p_t) = Σ g_t − e_T`` (the telescoping identity).

With the default ``reduce`` the residual is the local one (``p`` minus this rank's own
decompressed payload). Around a compressor with its own ``reduce`` the residual is ``p`` minus
the reduced mean, as torch's PowerSGD hook does. Compressors that already accumulate their error
(PowerSGD with ``error_feedback=True``, CountSketch) refuse a second layer.
"""
from __future__ import annotations

import torch

from .base import Compressor, compute_dtype


class ErrorFeedback(Compressor):
    """``ErrorFeedback(inner)``: compress ``g + e`` with ``inner``, keep ``e ← p − C(p)``."""

    name = "error_feedback"
    has_error_feedback = True

    def __init__(self, inner: Compressor):
        super().__init__()
        if not isinstance(inner, Compressor):
            raise TypeError(f"ErrorFeedback wraps a distrib.compress compressor, "
                            f"got {type(inner).__name__}")
        if getattr(inner, "error_feedback", None) is True:
            # PowerSGD's own feedback is the same e <- p - C(p); keep one copy of it, here.
            inner.error_feedback = False
        self.inner = inner
        self.linear = inner.linear

    def _residual(self, key, shape, dtype):
        st = self.state(key, shape)
        if "e" not in st:
            st["e"] = torch.zeros(shape, dtype=compute_dtype(dtype))
        return st

    def _compress(self, flat, key, payload):
        st = self._residual(key, payload.shape, payload.dtype)
        if not bool(torch.isfinite(flat).all()):
            # An overflowed gradient (loss scaling) is sent as it is, so the step is seen and
            # skipped; folding inf/nan into e would poison every later step.
            inner = self.inner.compress(st["e"] + flat.view(payload.shape), key)
            payload.ctx = inner.ctx
            payload.ctx["inner_shape"] = inner.shape
            payload.ctx["inner_dtype"] = inner.dtype
            return inner.tensors
        p = st["e"]
        p += flat.view(payload.shape)  # the residual buffer becomes p = g + e ...
        inner = self.inner.compress(p, key)
        if any(_shares_memory(t, p) for t in inner.tensors):
            inner.tensors = [t.clone() for t in inner.tensors]  # ... which changes below
        self.inner._accumulate(p.view(-1), inner, alpha=-1.0)  # ... and then e = p - C(p)
        payload.ctx = inner.ctx
        payload.ctx["inner_shape"] = inner.shape
        payload.ctx["inner_dtype"] = inner.dtype
        return inner.tensors

    def _inner_payload(self, payload):
        return payload.__class__(payload.tensors, payload.ctx["inner_shape"],
                                 payload.ctx["inner_dtype"], payload.ctx)

    def _decompress(self, payload):
        return self.inner.decompress(self._inner_payload(payload))

    def _accumulate(self, acc, payload, alpha=1.0):
        self.inner._accumulate(acc, self._inner_payload(payload), alpha)

    def compresses(self, shape):
        return self.inner.compresses(shape)

    def _bind(self, comm):
        self.inner._bind(comm)

    def reduce(self, t, comm=None, key=None, op="mean"):
        if self.inner.has_error_feedback:
            # CountSketch accumulates its error in sketch space already: feedback on top of
            # it would count the same residual twice.
            with self._op():
                out = self.inner.reduce(t, comm, key, op)
                for f in ("raw_bytes", "wire_bytes", "compress_s", "comm_s"):
                    self._cur[f] += self.inner.last_stats[f]
            return out
        if type(self.inner).reduce is Compressor.reduce:
            return super().reduce(t, comm, key, op)
        # The inner compressor runs its own collective: feed it p, keep p − mean.
        self._check_tensor(t)
        with self._op():
            k = key if key is not None else "_default"
            st = self._residual(k, t.shape, t.dtype)
            p = t.detach().to(st["e"].dtype) + st["e"]
            mean = self.inner.reduce(p, comm, key, op="mean")
            for f in ("raw_bytes", "wire_bytes", "compress_s", "comm_s"):
                self._cur[f] += self.inner.last_stats[f]
            if bool(torch.isfinite(mean).all()):  # an overflowed step leaves e alone
                st["e"] = p - mean
            size = 1 if comm is None else comm.size
            out = mean if op == "mean" else mean * size
        return out.to(t.dtype)

    def state_dict(self):
        sd = super().state_dict()
        sd["inner"] = self.inner.state_dict()
        return sd

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        if "inner" in sd:
            self.inner.load_state_dict(sd["inner"])

    def __repr__(self):
        return f"ErrorFeedback({self.inner!r})"


def _shares_memory(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
