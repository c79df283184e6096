"""QSGD: stochastic quantization to ``levels`` levels per bucket (Alistarh et al., NeurIPS 2017).

Each bucket ``v`` of ``bucket_size`` elements is sent as its norm ``‖v‖`` (float32) and, per
element, a signed level ``l ∈ {-s..s}`` with ``E[l] = s·v_i/‖v‖`` (unbiased), packed in
``ceil(log2(2s+1))`` bits (levels=7 → 4 bits, levels=127 → 8 bits). The variance per bucket is at
most ``min(d/s², √d/s)·‖v‖²``.

Stochastic rounding is ``round(x + u)`` with ``u`` uniform in [-1/2, 1/2): 16 random bits per
element, taken from one 64-bit draw of a seeded PCG64 generator (numpy's; twice as fast as
torch's Mersenne twister here) per four elements, so the probability of rounding up is
``frac(x)`` to within 2⁻¹⁶ (the bias is below 2⁻¹⁶ of a level).
Scratch buffers the size of the largest tensor seen are kept between calls (fresh ones would
cost page faults on every call). The generator's state is part of
``state_dict()``; in ``reduce`` it is seeded per rank (``seed`` + rank), so ranks dither
independently.
"""
from __future__ import annotations

import numpy as np
import torch

from . import bitpack
from .base import Compressor, stable_seed

SHRINK = 1 - 2.0 ** -16  # see _compress
CHUNK = 1 << 18  # elements quantized per pass (about the L2 cache)


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
            self._gen = np.random.PCG64(stable_seed("qsgd", self.seed, self._rank))
        return self._gen

    def _bind(self, comm):
        if self._gen is None:
            self._rank = comm.rank

    def _compress(self, flat, key, payload):
        s, d = self.levels, self.bucket_size
        n = flat.numel()
        n8 = -(-n // 8) * 8  # codes are packed 8 at a time
        v = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
        norms = torch.empty(-(-n // d), dtype=torch.float32)
        # level = round(v·s/‖v‖ + u) with u uniform in [-1/2, 1/2) (16 bits); in units of 2⁻¹⁶:
        #   w = r16 + v·(2¹⁶·s/‖v‖)     (r16: random int16; |w| < 2²³: float32 keeps it whole)
        #   y = w + 2³⁹ + 2¹⁶·(s + 1)   stays in [2³⁹, 2⁴⁰), where float32 steps are 2¹⁶: the
        #                               addition rounds, and the low mantissa bits then hold
        #                               level + s + 1, read through an int32 view.
        # SHRINK keeps |v·s/‖v‖| a hair below s, so rounding never leaves [-s, s]. The codes
        # level + s + 1 fit in bits_for(2s + 1) bits (0 is never used).
        packed = torch.empty(n8 * self.bits // 8, dtype=torch.uint8)
        # Chunks of whole buckets (and whole bytes) keep the passes below in cache.
        step = max(1, CHUNK // (8 * d)) * 8 * d
        w = self._workspace("w", min(step, n8), torch.float32)
        for lo in range(0, n8, step):
            hi = min(lo + step, n8)
            m, real = hi - lo, max(0, min(hi, n) - lo)
            vc = v[lo:lo + real]
            nc = norms[lo // d:-(-(lo + real) // d)]
            whole = real // d
            if whole:
                torch.linalg.vector_norm(vc[:whole * d].view(whole, d), dim=1, out=nc[:whole])
            if whole * d < real:
                nc[whole] = torch.linalg.vector_norm(vc[whole * d:])
            scale = torch.where(nc > 0, (65536.0 * s * SHRINK) / nc, torch.zeros_like(nc))
            r = self._generator().random_raw(-(-m // 4)).view(np.int16)
            x = w[:m]
            x.copy_(torch.from_numpy(r[:m]))
            x[real:] = 0  # padding decodes to level 0
            _per_bucket(x[:real], vc, scale, d, lambda dst, src, k: dst.addcmul_(src, k))
            x.add_(2.0 ** 39 + 65536.0 * (s + 1))
            codes = x.view(torch.int32).to(torch.uint8)  # level + s + 1, in 1..2s+1
            packed[lo * self.bits // 8:hi * self.bits // 8] = bitpack.pack(codes, self.bits)
        return [packed, norms]

    def _workspace(self, name, n, dtype):
        """A scratch buffer kept between calls: fresh large allocations cost page faults."""
        buf = self._ws.get(name)
        if buf is None or buf.numel() < n:
            buf = self._ws[name] = torch.empty(n, dtype=dtype)
        return buf[:n]

    def _levels(self, payload, dtype):
        """Each element's signed level (code − s − 1), as ``dtype``."""
        n = payload.numel
        codes = bitpack.unpack(payload.tensors[0], self.bits, -(-n // 8) * 8)[:n]
        return codes.to(dtype).sub_(self.levels + 1)

    def _decompress(self, payload):
        s, d, n = self.levels, self.bucket_size, payload.numel
        packed, norms = payload.tensors
        k = norms / (s * SHRINK)
        out = torch.empty(n, dtype=torch.float32)
        step = max(1, CHUNK // (8 * d)) * 8 * d  # as in _compress: cache-sized passes
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            m = -(-(hi - lo) // 8) * 8
            codes = bitpack.unpack(packed[lo * self.bits // 8:(lo + m) * self.bits // 8],
                                   self.bits, m)
            x = out[lo:hi]
            x.copy_(codes[:hi - lo])
            _per_bucket(x, None, k[lo // d:], d, lambda dst, _, k: dst.sub_(s + 1).mul_(k))
        return out

    def _accumulate(self, acc, payload, alpha=1.0):
        lv = self._levels(payload, acc.dtype)
        k = (payload.tensors[1] * (alpha / (self.levels * SHRINK))).to(acc.dtype)
        _per_bucket(acc, lv, k, self.bucket_size, lambda dst, src, k: dst.addcmul_(src, k))

    def _extra_state(self):
        return {"rank": self._rank,
                "generator": None if self._gen is None else _pcg_state(self._gen)}

    def _load_extra_state(self, extra):
        self._rank = extra.get("rank", 0)
        g = extra.get("generator")
        self._gen = None
        if g is not None:
            self._gen = np.random.PCG64()
            _set_pcg_state(self._gen, g)

    def __repr__(self):
        return f"QSGD(levels={self.levels}, bucket_size={self.bucket_size})"


def _per_bucket(dst, src, k, d, op):
    """``op(dst_b, src_b, k_b)`` on every bucket b of ``d`` elements of ``dst`` (the last may be
    shorter), whole buckets at once through (buckets, d) views; ``k`` has one value per bucket."""
    n = dst.numel()
    full = n // d
    if full:
        op(dst[:full * d].view(full, d), None if src is None else src[:full * d].view(full, d),
           k[:full, None])
    if full * d < n:
        op(dst[full * d:], None if src is None else src[full * d:], k[full])


_U64 = (1 << 64) - 1


def _pcg_state(bg) -> torch.Tensor:
    """A PCG64 state as an int64 tensor (128-bit state and increment as 64-bit halves)."""
    st = bg.state
    words = [st["state"]["state"] & _U64, st["state"]["state"] >> 64,
             st["state"]["inc"] & _U64, st["state"]["inc"] >> 64,
             st["has_uint32"], st["uinteger"]]
    return torch.tensor([w - (1 << 64) if w >> 63 else w for w in words], dtype=torch.int64)


def _set_pcg_state(bg, t: torch.Tensor) -> None:
    w = [x & _U64 for x in t.tolist()]
    bg.state = {"bit_generator": "PCG64",
                "state": {"state": w[0] | w[1] << 64, "inc": w[2] | w[3] << 64},
                "has_uint32": w[4], "uinteger": w[5]}
