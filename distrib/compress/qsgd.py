"""QSGD: stochastic quantization to ``levels`` levels per bucket (Alistarh et al., NeurIPS 2017).

Each bucket ``v`` of ``bucket_size`` elements is sent as its norm ``‖v‖`` (float32) and, per
element, a signed level ``l ∈ {-s..s}`` with ``E[l] = s·v_i/‖v‖`` (unbiased), packed in
``ceil(log2(2s+1))`` bits (levels=7 → 4 bits, levels=127 → 8 bits). The variance per bucket is at
most ``min(d/s², √d/s)·‖v‖²``.

Stochastic rounding is ``round(x + u)`` with ``u`` uniform in [-1/2, 1/2): 16 random bits per
element, taken from one 64-bit draw of a seeded ``torch.Generator`` per four elements (so the
probability of rounding up is ``frac(x)`` to within 2⁻¹⁶; the bias is below 2⁻¹⁶ of a level).
Scratch buffers the size of the largest tensor seen are kept between calls (fresh ones would
cost page faults on every call). The generator's state is part of
``state_dict()``; in ``reduce`` it is seeded per rank (``seed`` + rank), so ranks dither
independently.
"""
from __future__ import annotations

import torch

from . import bitpack
from .base import Compressor, stable_seed

SHRINK = 1 - 2.0 ** -16  # see _compress


class QSGD(Compressor):
    """Unbiased stochastic quantizer; see the module docstring."""

    name = "qsgd"

    def __init__(self, levels: int = 7, bucket_size: int = 512, seed: int = 0):
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= 127:
            raise ValueError(f"QSGD levels must be an integer in 1..127, got {levels!r}")
        if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1:
            raise ValueError(f"QSGD bucket_size must be a positive integer, got {bucket_size!r}")
        self.levels = levels
        self.bucket_size = bucket_size
        self.seed = int(seed)
        self.bits = bitpack.bits_for(2 * levels + 1)
        self._gen = None
        self._rank = 0
        self._ws = {}

    # The dither stream: created on first use, seeded by (seed, rank).
    def _generator(self):
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(stable_seed("qsgd", self.seed, self._rank))
        return self._gen

    def _bind(self, comm):
        if self._gen is None:
            self._rank = comm.rank

    def _compress(self, flat, key, payload):
        s, d = self.levels, self.bucket_size
        n = flat.numel()
        n8 = -(-n // 8) * 8  # codes are packed 8 at a time
        v = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
        full = n // d
        norms = torch.empty(-(-n // d), dtype=torch.float32)
        if full:
            torch.linalg.vector_norm(v[:full * d].view(full, d), dim=1, out=norms[:full])
        if full * d < n:
            norms[full] = torch.linalg.vector_norm(v[full * d:])
        # level = round(v·s/‖v‖ + u) with u uniform in [-1/2, 1/2) (16 bits); in units of 2⁻¹⁶:
        #   w = r16 + v·(2¹⁶·s/‖v‖)     (r16: random int16; |w| < 2²³: float32 keeps it whole)
        #   y = w + 2³⁹ + 2¹⁶·(s + 1)   stays in [2³⁹, 2⁴⁰), where float32 steps are 2¹⁶: the
        #                               addition rounds, and the low mantissa bits then hold
        #                               level + s + 1, read through an int32 view.
        # SHRINK keeps |v·s/‖v‖| a hair below s, so rounding never leaves [-s, s].
        scale = torch.where(norms > 0, (65536.0 * s * SHRINK) / norms, torch.zeros_like(norms))
        rnd = self._workspace("rnd", -(-n8 // 4), torch.int64)
        rnd.random_(-2 ** 63, None, generator=self._generator())
        w = self._workspace("w", n8, torch.float32)
        w.copy_(rnd.view(torch.int16)[:n8])
        w[n:] = 0  # padding decodes to level 0
        _per_bucket(w[:n], v, scale, d, lambda dst, src, k: dst.addcmul_(src, k))
        w.add_(2.0 ** 39 + 65536.0 * (s + 1))
        codes = w.view(torch.int32).to(torch.uint8)
        codes -= 1
        return [bitpack.pack(codes, self.bits), norms]

    def _workspace(self, name, n, dtype):
        """A scratch buffer kept between calls: fresh large allocations cost page faults."""
        buf = self._ws.get(name)
        if buf is None or buf.numel() < n:
            buf = self._ws[name] = torch.empty(n, dtype=dtype)
        return buf[:n]

    def _levels(self, payload, dtype):
        """Each element's signed level (code − s), as ``dtype``."""
        n = payload.numel
        codes = bitpack.unpack(payload.tensors[0], self.bits, -(-n // 8) * 8)[:n]
        return codes.to(dtype).sub_(self.levels)

    def _decompress(self, payload):
        out = self._levels(payload, torch.float32)
        k = payload.tensors[1] / (self.levels * SHRINK)
        _per_bucket(out, None, k, self.bucket_size, lambda dst, _, k: dst.mul_(k))
        return out

    def _accumulate(self, acc, payload, alpha=1.0):
        lv = self._levels(payload, acc.dtype)
        k = (payload.tensors[1] * (alpha / (self.levels * SHRINK))).to(acc.dtype)
        _per_bucket(acc, lv, k, self.bucket_size, lambda dst, src, k: dst.addcmul_(src, k))

    def _extra_state(self):
        return {"rank": self._rank,
                "generator": None if self._gen is None else self._gen.get_state()}

    def _load_extra_state(self, extra):
        self._rank = extra.get("rank", 0)
        g = extra.get("generator")
        self._gen = None
        if g is not None:
            self._gen = torch.Generator()
            self._gen.set_state(g)

    def __repr__(self):
        return f"QSGD(levels={self.levels}, bucket_size={self.bucket_size})"


def _per_bucket(dst, src, k, d, op):
    """``op(dst_b, src_b, k_b)`` on every bucket b of ``d`` elements (the last may be shorter),
    with whole buckets done at once through a (buckets, d) view."""
    n = dst.numel()
    full = n // d
    if full:
        op(dst[:full * d].view(full, d), None if src is None else src[:full * d].view(full, d),
           k[:full, None])
    if full * d < n:
        op(dst[full * d:], None if src is None else src[full * d:], k[full])
