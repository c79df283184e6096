"""Pack small unsigned codes (one per uint8) into the fewest bits, and back.

``pack(codes, bits)`` stores ``len(codes)`` codes of ``bits`` bits each in exactly
``len(codes) * bits / 8`` bytes (``len(codes)`` must be a multiple of 8). Everything is
vectorised on 64-bit views: the 8 codes of a group sit in the 8 bytes of one int64 lane, and a
few shift/mask/or steps squeeze them together (little-endian byte order, as on x86 and ARM).
Both directions take an optional ``out`` tensor, so that a caller working through a big tensor
in cache-sized chunks writes each chunk straight into place.
"""
from __future__ import annotations

import sys

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
    written into ``out`` (``packed_nbytes`` uint8) when given."""
    _check(codes, bits)
    if out is None:
        out = torch.empty(packed_nbytes(codes.numel(), bits), dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.shape != (packed_nbytes(codes.numel(), bits),):
        raise ValueError(f"pack needs out: {packed_nbytes(codes.numel(), bits)} uint8")
    if bits == 8:
        return out.copy_(codes)
    x = codes.view(torch.int64)
    if bits == 4:
        # Byte 2j of x | x >> 4 is code 2j | code 2j+1 << 4; the int16 -> uint8 cast keeps it.
        y = x >> 4
        y |= x
        return out.copy_(y.view(torch.int16))
    # Merge neighbours: 8 one-byte lanes -> 4 two-byte lanes -> 2 four-byte lanes -> 1 lane.
    x = (x & _M8) | ((x >> 8) & _M8) << bits
    x = (x & _M16) | ((x >> 16) & _M16) << (2 * bits)
    x = (x & _M32) | (x >> 32) << (4 * bits)
    if bits == 1:
        return out.copy_(x)
    if bits == 2:
        return out.view(torch.int16).copy_(x).view(torch.uint8)
    return out.view(-1, bits).copy_(x.view(torch.uint8).view(-1, 8)[:, :bits]).view(-1)


def unpack(packed: torch.Tensor, bits: int, n: int,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`: ``n`` uint8 codes (``n`` a multiple of 8), written into ``out``
    (``n`` uint8) when given."""
    if n % 8 or packed.numel() != packed_nbytes(n, bits) or packed.dtype != torch.uint8:
        raise ValueError(f"cannot unpack {packed.numel()} bytes into {n} codes of {bits} bits")
    if out is None:
        out = torch.empty(n, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.shape != (n,):
        raise ValueError(f"unpack needs out: {n} uint8")
    if bits == 8:
        return out.copy_(packed)
    if bits == 4:
        # int16 lane j holds byte j in its low half; z | z << 4 puts its high nibble in the high
        # byte, and the mask leaves one code per byte.
        z = out.view(torch.int16)
        z.copy_(packed)
        z |= z << 4
        z &= 0x0F0F
        return out
    if bits == 1:
        x = packed.to(torch.int64)
    elif bits == 2:
        x = packed.view(torch.int16).to(torch.int64)
    else:
        wide = torch.zeros(n // 8, 8, dtype=torch.uint8)
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


def _check(codes, bits):
    if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() % 8:
        raise ValueError("pack takes a 1-D uint8 tensor whose length is a multiple of 8")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
