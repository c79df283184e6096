"""QSGD: stochastic quantization to ``levels`` levels per bucket (Alistarh et al., NeurIPS 2017).

Each bucket ``v`` of ``bucket_size`` elements is sent as its norm ``‖v‖`` (float32) and, per
element, a signed level ``l ∈ {-s..s}`` with ``E[l] = s·v_i/‖v‖`` (unbiased), packed in
``ceil(log2(2s+1))`` bits (levels=7 → 4 bits, levels=127 → 8 bits). The variance per bucket is at
most ``min(d/s², √d/s)·‖v‖²``.

Stochastic rounding is ``round(x + u)`` with ``u`` uniform in [-1/2, 1/2): 16 random bits per
element, taken from one 64-bit draw of a seeded PCG64 generator (numpy's; twice as fast as
torch's Mersenne twister here) per four elements, so the probability of rounding up is
``frac(x)`` to within 2⁻¹⁶ (the bias is below 2⁻¹⁶ of a level).

Norms are float32 sums of squares: a bucket whose entries are all below about 1e-23 (their
squares underflow) has norm 0 and is sent as zeros.

Speed (one core, 25M floats): the work runs in cache-sized chunks of whole buckets, each pass
over a chunk a single in-place torch op into scratch buffers kept between calls (fresh large
buffers would cost page faults), and each chunk's codes are packed straight into the payload
(4-bit packing pairs codes within a chunk: ``CHUNK`` is part of the wire format).
The generator's state is part of ``state_dict()``; in ``reduce`` it is seeded per rank
(``seed`` + rank), so ranks dither independently.
"""
from __future__ import annotations

import numpy as np
import torch

from . import bitpack
from .base import Compressor, stable_seed

SHRINK = 1 - 2.0 ** -16  # see _quantize
CHUNK = 1 << 18  # elements per pass (about the L2 cache); every rank must use the same
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
        norms = torch.empty(-(-n // d), dtype=torch.float32)
        packed = torch.empty(bitpack.packed_nbytes(_ceil8(n), self.bits), dtype=torch.uint8)
        step = self._step()
        w = self._buf("w", min(step, _ceil8(n)), torch.float32)
        scale = self._buf("scale", min(step, n) // d + 1, torch.float32)
        for lo in range(0, n, step):
            v = flat[lo:lo + step]
            if v.dtype != torch.float32:  # other float dtypes are widened chunk by chunk
                v = self._buf("v", v.numel(), torch.float32).copy_(v)
            self._quantize(v, norms[lo // d:-(-(lo + v.numel()) // d)],
                           self._bytes(packed, lo, lo + v.numel()), w, scale)
        return [packed, norms]

    def _quantize(self, v, norms, out, w, scale):
        """Writes the bucket norms of the chunk ``v`` (whole buckets, but for the last chunk)
        into ``norms`` and its packed codes into ``out``; ``w`` and ``scale`` are scratch.

        level = round(v·s/‖v‖ + u), u uniform in [-1/2, 1/2) (16 bits); in units of 2⁻¹⁶:
          w = r16 + v·(2¹⁶·s/‖v‖)     (r16: random int16; |w| < 2²³: float32 keeps it whole)
          y = w + 2³⁹ + 2¹⁶·o         stays in [2³⁹, 2⁴⁰), where float32 steps are 2¹⁶: the
                                      addition rounds, and the low mantissa bits then hold
                                      level + o, read through an int32 view.
        SHRINK keeps |v·s/‖v‖| a hair below s, so rounding never leaves [-s, s]. The offset o
        is s + 1, so the codes level + s + 1 fit in bits_for(2s + 1) bits (0 is never used);
        for 8 bits it is 256, so the low byte of level + 256 is the level as an int8, which
        the decoder reads as it is."""
        s, d, m = self.levels, self.bucket_size, v.numel()
        w, scale = w[:_ceil8(m)], scale[:norms.numel()]
        _bucket_norms(v, d, norms)  # also brings the chunk into cache for the addcmul
        # s·2¹⁶/‖v‖, and 0 for zero buckets (their levels are then 0)
        torch.reciprocal(norms, out=scale).mul_(65536.0 * s * SHRINK).nan_to_num_(posinf=0.0)
        w.copy_(self._dither(w.numel()))  # int16 -> float32
        _bucket_op("addcmul_", w[:m], scale, d, v)
        if m < w.numel():
            w[m:] = 0  # padding to whole bytes decodes to level 0
        w.add_(MAGIC + 65536.0 * (256 if self.bits == 8 else s + 1))
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
        n, d, step = payload.numel, self.bucket_size, self._step()
        out = torch.empty(n, dtype=torch.float32)
        k = payload.tensors[1] / (self.levels * SHRINK)
        for lo in range(0, n, step):
            x = self._levels(payload, lo, out[lo:lo + step])
            _bucket_op("mul_", x, k[lo // d:], d)
        return out

    def _accumulate(self, acc, payload, alpha=1.0):
        n, d, step = payload.numel, self.bucket_size, self._step()
        k = (payload.tensors[1] * (alpha / (self.levels * SHRINK))).to(acc.dtype)
        for lo in range(0, n, step):
            a = acc[lo:lo + step]
            x = self._levels(payload, lo, self._buf("lv", a.numel(), acc.dtype))
            _bucket_op("addcmul_", a, k[lo // d:], d, x)

    def _levels(self, payload, lo, out):
        """The signed levels of elements lo.. (as many as ``out`` holds), written into ``out``."""
        hi = lo + out.numel()
        src = self._bytes(payload.tensors[0], lo, hi)
        if self.bits == 8:  # the bytes are the levels (see _quantize)
            return out.copy_(src.view(torch.int8)[:hi - lo])
        codes = self._buf("codes", _ceil8(hi - lo), torch.uint8)
        bitpack.unpack(src, self.bits, codes.numel(), out=codes).sub_(self.levels + 1)
        # codes - (s + 1) wrapped around in uint8: as int8 it is the level, in -s..s.
        return out.copy_(codes.view(torch.int8)[:hi - lo])

    # -- chunks and scratch buffers ---------------------------------------------------------------
    def _step(self):
        """Elements per chunk: whole buckets and whole bytes, about CHUNK of them."""
        return max(1, CHUNK // (8 * self.bucket_size)) * 8 * self.bucket_size

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
    torch.linalg.vector_norm(v[:full * d].view(full, d), dim=1, out=out[:full])
    if full * d < v.numel():
        out[full] = torch.linalg.vector_norm(v[full * d:])


def _bucket_op(op, dst, k, d, *src):
    """``dst_b.op(*src_b, k_b)`` (an in-place tensor method) for each bucket b of ``d``
    elements of ``dst`` (the last may be shorter) and its factor ``k_b``: whole buckets at once
    through (buckets, d) views, so it is one op (two with a short last bucket)."""
    n = dst.numel()
    full = n // d
    if full:
        getattr(dst[:full * d].view(full, d), op)(*(t[:full * d].view(full, d) for t in src),
                                                  k[:full].unsqueeze(1))
    if full * d < n:
        getattr(dst[full * d:], op)(*(t[full * d:n] for t in src), k[full])


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
