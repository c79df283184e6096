"""Which server holds which part of which parameter: size-balanced key ranges.

The parameters, in the workers' rank-independent order, are laid end to end (in bytes) and the
line is cut into ``S`` equal ranges, one per server. A tensor that straddles a cut is split
there, at a row boundary (its first dimension), so every piece keeps a matrix shape (which
matrix compressors such as PowerSGD need). Workers and servers compute the same layout from
the same list of ``(name, shape, dtype)``; servers only ever see the units of their own shard.

On each server the pieces are grouped into *units*, the things that travel and are compressed
together:

- with a compressor, every piece of at least ``min_compress_numel`` elements is a unit of its
  own (compressed under the key ``name`` or ``name[rows a:b]``);
- everything else is fused into one flat, uncompressed unit per dtype (small tensors are not
  worth compressing, and one message frame beats hundreds).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import msgpack
import torch

from ..transport.wire import DTYPES, dtype_name


@dataclass
class Piece:
    """Rows ``[row0, row0 + shape[0])`` of parameter ``index``: flat elements ``[start, stop)``."""

    index: int
    name: str
    start: int
    stop: int
    shape: tuple  # the piece's own shape: (rows, *shape[1:]); () for a 0-d tensor
    row0: int = 0

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass
class Unit:
    """What one message slot carries: one compressed piece, or several fused pieces of a dtype."""

    key: str
    dtype: torch.dtype
    compressed: bool
    pieces: list = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.pieces)

    @property
    def shape(self) -> tuple:
        """The shape the unit is compressed in: the piece's for a compressed unit, else flat."""
        return tuple(self.pieces[0].shape) if self.compressed else (self.numel,)

    def describe(self) -> list:
        """A short msgpack-able description: all a server knows of the unit (see :class:`Slot`)."""
        return [self.key, dtype_name(self.dtype), list(self.shape), self.compressed]


@dataclass
class Slot:
    """A server's view of a unit: key, dtype, shape and whether it travels compressed."""

    key: str
    dtype: torch.dtype
    shape: tuple
    compressed: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def parse(cls, desc) -> "Slot":
        key, dtype, shape, compressed = desc
        return cls(key, DTYPES[dtype], tuple(shape), bool(compressed))


def split_ranges(specs, num_servers: int):
    """Pieces of every server: ``specs`` is ``[(name, shape, dtype), ...]`` in key order.

    Row ``r`` of a tensor goes to the server whose byte range holds the row's first byte, so
    each server gets a contiguous run of rows of at most one or two split tensors.
    """
    if num_servers < 1:
        raise ValueError(f"a layout needs at least one server, got {num_servers}")
    sizes = [math.prod(shape) * _itemsize(dtype) for _, shape, dtype in specs]
    total = sum(sizes)
    cuts = [k * total // num_servers for k in range(num_servers + 1)]
    shards = [[] for _ in range(num_servers)]
    offset = 0  # byte offset of the current tensor on the line
    for index, ((name, shape, _), nbytes) in enumerate(zip(specs, sizes)):
        shape = tuple(shape)
        if nbytes == 0:
            continue  # empty tensors carry nothing; workers give them empty gradients
        rows = shape[0] if shape else 1
        row_bytes = nbytes // rows
        row_numel = math.prod(shape[1:]) if shape else 1
        first = [min(rows, max(0, -(-(cut - offset) // row_bytes))) for cut in cuts]
        first[-1] = rows
        for server in range(num_servers):
            a, b = first[server], first[server + 1]
            if b > a:
                piece_shape = (b - a, *shape[1:]) if shape else ()
                shards[server].append(Piece(index, name, a * row_numel, b * row_numel,
                                            piece_shape, a))
        offset += nbytes
    return shards


def _itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()


def make_units(pieces, specs, compress: bool, min_compress_numel: int):
    """Group one server's pieces into units (see the module docstring)."""
    units, fused = [], {}
    for p in pieces:
        name, shape, dtype = specs[p.index]
        if compress and p.numel >= min_compress_numel:
            whole = p.numel == math.prod(shape)
            key = name if whole else f"{name}[{p.row0}:{p.row0 + p.shape[0]}]"
            units.append(Unit(key, dtype, True, [p]))
            continue
        if dtype not in fused:
            fused[dtype] = Unit(f"fused.{dtype_name(dtype)}", dtype, False)
            units.append(fused[dtype])
        fused[dtype].pieces.append(p)
    return units


class Layout:
    """The full layout: ``units[server]`` for every server, built identically everywhere.

    ``specs`` is ``[(name, shape, dtype), ...]`` in the workers' parameter order.
    ``signature`` is a checksum of everything that must agree between workers.
    """

    def __init__(self, specs, num_servers: int, compress: bool = False,
                 min_compress_numel: int = 1024, extra=None):
        self.specs = [(str(n), tuple(int(d) for d in s), dt) for n, s, dt in specs]
        self.num_servers = num_servers
        self.numel = [math.prod(s) for _, s, _ in self.specs]
        self.pieces = split_ranges(self.specs, num_servers)
        self.units = [make_units(p, self.specs, compress, min_compress_numel)
                      for p in self.pieces]
        described = [[n, list(s), dtype_name(dt)] for n, s, dt in self.specs]
        blob = msgpack.packb([described, num_servers, bool(compress), int(min_compress_numel),
                              extra], use_bin_type=True)
        self.signature = zlib.crc32(blob)

    def shard_bytes(self):
        """Bytes held by each server (for balance checks and stats)."""
        return [sum(u.numel * _itemsize(u.dtype) for u in us) for us in self.units]
