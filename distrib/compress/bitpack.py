"""Pack small unsigned codes (one per uint8) into the fewest bits, and back.

``pack(codes, bits)`` stores ``len(codes)`` codes of ``bits`` bits each in exactly
``len(codes) * bits / 8`` bytes (``len(codes)`` must be a multiple of 8). Everything is
vectorised on 64-bit views (little-endian byte order, as on x86 and ARM):

- 4 bits (QSGD's default) is two nibble streams: byte j holds code j in its low nibble and code
  j + n/2 in its high one (n = ``len(codes)``), so each direction is a shift and a mask or an or
  over whole 64-bit words of the two contiguous halves;
- other widths keep the codes in order: the 8 codes of a group sit in the 8 bytes of one int64
  lane, and a few shift/mask/or steps squeeze them together.

Both directions take an optional ``out`` tensor, so that a caller working through a big tensor
in cache-sized chunks writes each chunk straight into place (the 4-bit layout is then per
chunk: both sides must use the same chunks).
"""
from __future__ import annotations

import sys

import numpy as np
import torch

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("distrib.compress.bitpack assumes a little-endian machine")

_M8 = 0x00FF00FF00FF00FF
_M16 = 0x0000FFFF0000FFFF
_M32 = 0x00000000FFFFFFFF


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take once packed (``n`` a multiple of 8)."""
    return n * bits // 8


def pack(codes: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``codes`` (uint8, values < 2**bits, length a multiple of 8) -> packed uint8 tensor,
    written into ``out`` (``packed_nbytes`` contiguous uint8) when given."""
    _check(codes, bits)
    codes = codes.contiguous()
    if out is None:
        out = torch.empty(packed_nbytes(codes.numel(), bits), dtype=torch.uint8)
    elif (out.dtype != torch.uint8 or out.shape != (packed_nbytes(codes.numel(), bits),)
          or not out.is_contiguous()):
        raise ValueError(f"pack needs out: {packed_nbytes(codes.numel(), bits)} contiguous uint8")
    if bits == 8:
        return out.copy_(codes)
    if bits == 4:
        # out = low half | high half << 4, word by word: codes < 16 never leave their byte.
        # (numpy: the same SIMD loops as torch's, at a third of the cost per call.)
        h = codes.numel() // 2
        (lo, _), (hi, _), (o, _) = _words(codes[:h]), _words(codes[h:]), _words(out)
        np.left_shift(hi, 4, out=o)
        np.bitwise_or(o, lo, out=o)
        return out
    x = _aligned(codes).view(torch.int64)
    # Merge neighbours: 8 one-byte lanes -> 4 two-byte lanes -> 2 four-byte lanes -> 1 lane.
    x = (x & _M8) | ((x >> 8) & _M8) << bits
    x = (x & _M16) | ((x >> 16) & _M16) << (2 * bits)
    x = (x & _M32) | (x >> 32) << (4 * bits)
    # each lane's low `bits` bytes are the packed group
    return out.copy_(x.view(torch.uint8).view(-1, 8)[:, :bits].reshape(-1))


def unpack(packed: torch.Tensor, bits: int, n: int,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`: ``n`` uint8 codes (``n`` a multiple of 8), written into ``out``
    (``n`` contiguous uint8) when given."""
    if n % 8 or packed.numel() != packed_nbytes(n, bits) or packed.dtype != torch.uint8:
        raise ValueError(f"cannot unpack {packed.numel()} bytes into {n} codes of {bits} bits")
    packed = packed.contiguous()
    if out is None:
        out = torch.empty(n, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.shape != (n,) or not out.is_contiguous():
        raise ValueError(f"unpack needs out: {n} contiguous uint8")
    if bits == 8:
        return out.copy_(packed)
    if bits == 4:
        # low half = packed & 0x0F.., high half = (packed >> 4) & 0x0F.., word by word
        (p, nibbles), (lo, _), (hi, _) = _words(packed), _words(out[:n // 2]), _words(out[n // 2:])
        np.bitwise_and(p, nibbles, out=lo)
        np.right_shift(p, 4, out=hi)
        np.bitwise_and(hi, nibbles, out=hi)
        return out
    wide = torch.zeros(n // 8, 8, dtype=torch.uint8)  # group j in the low bytes of lane j
    wide[:, :bits] = packed.view(-1, bits)
    x = wide.view(torch.int64).reshape(-1)
    mask = (1 << bits) - 1
    x = (x & ((1 << 4 * bits) - 1)) | (x >> (4 * bits)) << 32
    x = (x & (((1 << 2 * bits) - 1) * 0x0000000100000001)) | \
        ((x >> (2 * bits)) & (((1 << 2 * bits) - 1) * 0x0000000100000001)) << 16
    x = (x & (mask * 0x0001000100010001)) | ((x >> bits) & (mask * 0x0001000100010001)) << 8
    return out.copy_(x.view(torch.uint8))


def bits_for(values: int) -> int:
    """The fewest bits that distinguish ``values`` codes."""
    return max(1, (values - 1).bit_length())


def _words(t):
    """A numpy view of the contiguous uint8 tensor ``t`` as 64-bit words (as bytes if its
    length is not a multiple of 8), and the low-nibble mask for that view."""
    a = t.numpy()
    if a.size % 8:
        return a, np.uint8(0x0F)
    return a.view(np.uint64), np.uint64(0x0F0F0F0F0F0F0F0F)


def _aligned(t):
    """``t``, copied if its start is not 8-byte aligned (an int64 view needs that)."""
    return t if t.storage_offset() % 8 == 0 else t.clone()


def _check(codes, bits):
    if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() % 8:
        raise ValueError("pack takes a 1-D uint8 tensor whose length is a multiple of 8")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
