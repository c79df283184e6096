"""QSGD: stochastic quantization to ``levels`` levels per bucket (Alistarh et al., NeurIPS 2017).

Each bucket ``v`` of ``bucket_size`` elements is sent as its norm ``‖v‖`` (float32) and, per
element, a signed level ``l ∈ {-s..s}`` with ``E[l] = s·v_i/‖v‖`` (unbiased), packed in
``ceil(log2(2s+1))`` bits (levels=7 → 4 bits, levels=127 → 8 bits). The variance per bucket is at
most ``min(d/s², √d/s)·‖v‖²``.

Stochastic rounding is ``round(x + u)`` with ``u`` uniform in [-1/2, 1/2): 16 random bits per
element, taken from one 64-bit draw of a seeded PCG64 generator (numpy's; twice as fast as
torch's Mersenne twister here) per four elements, so the probability of rounding up is
``frac(x)`` to within 2⁻¹⁶ (the bias is below 2⁻¹⁶ of a level).

A bucket whose norm is positive but below 2⁻¹⁰⁰ is sent with the norm 2⁻¹⁰⁰ (and quantized on
that grid, so it stays unbiased): ``s·2¹⁶/‖v‖`` would overflow float32 below about 2⁻¹⁰⁵.

Speed (one core, 25M floats): the work runs in cache-sized chunks of whole buckets, each pass
over a chunk a single in-place torch op into scratch buffers kept between calls (fresh large
buffers would cost page faults), and packed codes are written straight into the payload.
The generator's state is part of ``state_dict()``; in ``reduce`` it is seeded per rank
(``seed`` + rank), so ranks dither independently.
"""
from __future__ import annotations

import numpy as np
import torch

from . import bitpack
from .base import Compressor, stable_seed

SHRINK = 1 - 2.0 ** -16  # see _quantize
TINY = 2.0 ** -100  # smallest norm sent; see the module docstring
CHUNK = 1 << 18  # elements per pass (about the L2 cache)
MAGIC = 2.0 ** 39  # see _quantize


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

    # -- compress -------------------------------------------------------------------------------
    def _compress(self, flat, key, payload):
        n, d = flat.numel(), self.bucket_size
        v = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
        norms = torch.empty(-(-n // d), dtype=torch.float32)
        packed = torch.empty(bitpack.packed_nbytes(_ceil8(n), self.bits), dtype=torch.uint8)
        for lo, hi in self._chunks(n):
            self._quantize(v[lo:hi], norms[lo // d:-(-hi // d)], self._bytes(packed, lo, hi))
        # Positive norms below TINY were quantized on the TINY grid: send that norm.
        norms.masked_fill_((norms > 0) & (norms < TINY), TINY)
        return [packed, norms]

    def _quantize(self, v, norms, out):
        """Writes the bucket norms of the chunk ``v`` (whole buckets, but for the last chunk)
        into ``norms`` and its packed codes (level + s + 1) into ``out``.

        level = round(v·s/‖v‖ + u), u uniform in [-1/2, 1/2) (16 bits); in units of 2⁻¹⁶:
          w = r16 + v·(2¹⁶·s/‖v‖)     (r16: random int16; |w| < 2²³: float32 keeps it whole)
          y = w + 2³⁹ + 2¹⁶·(s + 1)   stays in [2³⁹, 2⁴⁰), where float32 steps are 2¹⁶: the
                                      addition rounds, and the low mantissa bits then hold
                                      level + s + 1, read through an int32 view.
        SHRINK keeps |v·s/‖v‖| a hair below s, so rounding never leaves [-s, s]. The codes
        level + s + 1 fit in bits_for(2s + 1) bits (0 is never used)."""
        s, d, m = self.levels, self.bucket_size, v.numel()
        _bucket_norms(v, d, out=norms)  # also brings the chunk into cache for the addcmul
        scale = self._buf("scale", norms.numel(), torch.float32)
        # 1/max(‖v‖, TINY) stays finite; zero buckets keep the norm 0 (their levels are 0).
        torch.clamp_min(norms, TINY, out=scale).reciprocal_().mul_(65536.0 * s * SHRINK)
        w = self._buf("w", _ceil8(m), torch.float32)
        w.copy_(self._dither(w.numel()))  # int16 -> float32
        _per_bucket(w[:m], v, scale, d, lambda dst, src, k: dst.addcmul_(src, k))
        w[m:] = 0  # padding to whole bytes decodes to level 0
        w.add_(MAGIC + 65536.0 * (s + 1))
        codes = w.view(torch.int32)
        if self.bits == 8:  # one code per byte: the int32 -> uint8 cast is the packing
            out.copy_(codes)
        else:
            bitpack.pack(self._buf("codes", w.numel(), torch.uint8).copy_(codes), self.bits, out)

    def _dither(self, m):
        """``m`` random int16 (m a multiple of 8): 16 bits each of m/4 64-bit PCG64 draws."""
        return torch.from_numpy(self._generator().random_raw(m // 4)).view(torch.int16)

    # -- decompress -----------------------------------------------------------------------------
    def _decompress(self, payload):
        out = torch.empty(payload.numel, dtype=torch.float32)
        k = payload.tensors[1] / (self.levels * SHRINK)
        for lo, hi in self._chunks(payload.numel):
            x = out[lo:hi]
            x.copy_(self._levels(payload, lo, hi))
            _per_bucket(x, None, k[lo // self.bucket_size:], self.bucket_size,
                        lambda dst, _, k: dst.mul_(k))
        return out

    def _accumulate(self, acc, payload, alpha=1.0):
        d = self.bucket_size
        k = (payload.tensors[1] * (alpha / (self.levels * SHRINK))).to(acc.dtype)
        for lo, hi in self._chunks(payload.numel):
            lv = self._buf("lv", hi - lo, acc.dtype).copy_(self._levels(payload, lo, hi))
            _per_bucket(acc[lo:hi], lv, k[lo // d:], d, lambda dst, src, k: dst.addcmul_(src, k))

    def _levels(self, payload, lo, hi):
        """Elements lo..hi's signed levels, as int8 (a scratch buffer)."""
        m = _ceil8(hi - lo)
        src = self._bytes(payload.tensors[0], lo, hi)
        codes = self._buf("codes", m, torch.uint8)
        if self.bits == 8:
            torch.sub(src, self.levels + 1, out=codes)
        else:
            bitpack.unpack(src, self.bits, m, out=codes).sub_(self.levels + 1)
        # codes - (s + 1) wrapped around in uint8: as int8 it is the level, in -s..s.
        return codes.view(torch.int8)[:hi - lo]

    # -- chunks and scratch buffers ---------------------------------------------------------------
    def _chunks(self, n):
        """(lo, hi) spans of whole buckets and whole bytes, about CHUNK elements each."""
        step = max(1, CHUNK // (8 * self.bucket_size)) * 8 * self.bucket_size
        return [(lo, min(lo + step, n)) for lo in range(0, n, step)]

    def _bytes(self, packed, lo, hi):
        """The packed bytes of elements lo..hi (lo a multiple of 8)."""
        return packed[lo * self.bits // 8:_ceil8(hi) * self.bits // 8]

    def _buf(self, name, n, dtype):
        """A scratch buffer kept between calls (chunk-sized, so small)."""
        buf = self._ws.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._ws[name] = torch.empty(n, dtype=dtype)
        return buf[:n]

    # -- checkpoints ------------------------------------------------------------------------------
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


def _ceil8(n):
    return -(-n // 8) * 8


def _bucket_norms(v, d, out):
    """The norm of each bucket of ``d`` elements of ``v`` (the last may be shorter)."""
    full = v.numel() // d
    if full:
        torch.linalg.vector_norm(v[:full * d].view(full, d), dim=1, out=out[:full])
    if full * d < v.numel():
        out[full] = torch.linalg.vector_norm(v[full * d:])


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
