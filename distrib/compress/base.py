"""The compressor interface every compressor in ``distrib.compress`` implements.

A compressor turns a tensor into a :class:`Payload` (``compress``), back into a tensor
(``decompress``), and knows how to run the *compressed collective* over a communicator
(``reduce``). Subclasses write only ``_compress`` and ``_decompress`` on flat tensors; this base
class checks the input, restores shape and dtype, keeps per-key state, counts bytes and time, and
provides the default ``reduce``:

- ``linear`` compressors (sum of payloads = payload of the sum): every payload tensor is
  all-reduced (summed), then decompressed once and divided by the group size;
- the others: payloads are all-gathered (packed in one byte buffer, one collective) and each
  rank's payload is decompressed and added in rank order.

Either way every rank gets bitwise the same result. PowerSGD and CountSketch override ``reduce``
with their own rounds of communication.

The communicator protocol ``reduce`` needs is small: ``comm.size``, ``comm.rank``,
``comm.allreduce(t, op="sum") -> new tensor`` (same bits on every rank) and
``comm.allgather(t) -> [tensor per rank]``. :class:`LocalComm` is the job of one.

Accounting: ``c.last_stats`` (the last ``compress``/``decompress``/``reduce`` call) and
``c.stats`` (running totals since construction or :meth:`Compressor.reset_stats`) are dicts with
``calls``, ``raw_bytes`` (bytes of the uncompressed input), ``wire_bytes`` (bytes of the payloads
this rank contributes to the collectives; the transport multiplies them by its own fan-out),
``compress_s`` (seconds compressing and decompressing) and ``comm_s`` (seconds inside ``comm``
calls).
"""
from __future__ import annotations

import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import CollectiveMismatch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_KEY = "_default"
STAT_FIELDS = ("calls", "raw_bytes", "wire_bytes", "compress_s", "comm_s")


@dataclass
class Payload:
    """What ``compress`` returns.

    ``tensors`` cross the wire (they may share memory with the compressed tensor, as
    NoCompression's does: do not modify it while the payload is in use); ``shape``, ``dtype``
    and ``ctx`` (compressor-specific) stay local: every rank compresses a tensor of the same
    shape under the same key, so the receiver rebuilds a peer's payload from its own context.
    """

    tensors: list
    shape: torch.Size
    dtype: torch.dtype
    ctx: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Bytes this payload puts on the wire (tensor bodies, headers excluded)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def replace(self, tensors) -> "Payload":
        """The same local context around other tensors (a peer's, or the summed ones)."""
        return Payload(list(tensors), self.shape, self.dtype, self.ctx)


class LocalComm:
    """The communicator protocol for a job of one: collectives are copies."""

    rank, size = 0, 1

    def allreduce(self, t, op="sum"):
        return t.detach().clone()

    def allgather(self, t):
        return [t.detach().clone()]


def stable_seed(*parts) -> int:
    """A seed every process derives identically (Python's ``hash`` of a str is per-process)."""
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def compute_dtype(dtype):
    """The dtype arithmetic runs in: float64 stays, the rest computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Compressor:
    """Base class: see the module docstring. ``linear`` says whether payloads may be summed
    (all-reduced) before decompressing. ``has_error_feedback`` is true for compressors that keep
    their own error accumulation (so :class:`ErrorFeedback` must not wrap them again)."""

    name = "?"
    linear = False
    has_error_feedback = False
    float_only = True

    def __init__(self):
        self._state: dict[str, dict] = {}
        self._depth = 0
        self._cur = None
        self.last_stats: dict = _zero_stats()
        self.stats: dict = _zero_stats()

    # -- what subclasses write ----------------------------------------------------------------
    def _compress(self, flat: torch.Tensor, key: str, payload: Payload) -> list:
        """Tensors to send for the contiguous 1-D ``flat``; may add to ``payload.ctx``."""
        raise NotImplementedError

    def _decompress(self, payload: Payload) -> torch.Tensor:
        """A flat tensor of ``payload.numel`` elements (any float dtype)."""
        raise NotImplementedError

    def _accumulate(self, acc: torch.Tensor, payload: Payload, alpha: float = 1.0) -> None:
        """``acc += alpha · decompress(payload)`` on a flat float accumulator (in place; sparse
        and quantized payloads do it without a dense temporary)."""
        acc.add_(self._decompress(payload).to(acc.dtype), alpha=alpha)

    # -- public API ---------------------------------------------------------------------------
    def compress(self, t: torch.Tensor, key: str | None = None) -> Payload:
        """Compress ``t`` (any shape, 0-d and empty included). ``key`` names the tensor for the
        per-key state (error-feedback residual, PowerSGD's Q...)."""
        self._check_tensor(t)
        with self._op() as st:
            t0 = time.perf_counter()
            payload = Payload([], t.shape, t.dtype)
            flat = t.detach().reshape(-1)
            payload.tensors = list(self._compress(flat, _key(key), payload))
            st["compress_s"] += time.perf_counter() - t0
            st["raw_bytes"] += t.numel() * t.element_size()
            st["wire_bytes"] += payload.nbytes
        return payload

    def decompress(self, payload: Payload) -> torch.Tensor:
        """A new tensor of the compressed tensor's shape and dtype."""
        if not isinstance(payload, Payload):
            raise TypeError(f"decompress takes a Payload, got {type(payload).__name__}")
        with self._op() as st:
            t0 = time.perf_counter()
            out = self._decompress(payload).reshape(payload.shape).to(payload.dtype)
            st["compress_s"] += time.perf_counter() - t0
        return out

    def reduce(self, t: torch.Tensor, comm=None, key: str | None = None, op: str = "mean"):
        """The compressed collective: every rank passes its ``t`` (same shape and key on all
        ranks) and gets the same tensor, the mean (or sum) of what the payloads carry."""
        comm = LocalComm() if comm is None else comm
        _check_op(op)
        self._check_tensor(t)
        self._bind(comm)
        with self._op():
            payload = self.compress(t, key)
            if self.linear:
                summed = [self._comm(comm.allreduce, x, "sum") for x in payload.tensors]
                out = self._timed(self._decompress, payload.replace(summed))
                out = out.to(compute_dtype(t.dtype))
            else:
                out = self._gather_sum(payload, comm)
            if op == "mean":
                out /= comm.size
        return out.reshape(t.shape).to(t.dtype)

    def _gather_sum(self, payload: Payload, comm) -> torch.Tensor:
        """All-gather every rank's payload (one byte buffer) and add their decompressions in
        rank order into a float accumulator."""
        blobs = self._comm(comm.allgather, pack_bytes(payload.tensors))
        acc = torch.zeros(payload.numel, dtype=compute_dtype(payload.dtype))
        t0 = time.perf_counter()
        for r, blob in enumerate(blobs):
            theirs = payload.replace(unpack_bytes(blob, payload.tensors, r))
            self._accumulate(acc, theirs)
        self._cur["compress_s"] += time.perf_counter() - t0
        return acc

    def compresses(self, shape) -> bool:
        """Whether a tensor of ``shape`` is really compressed; ``False`` means it travels as it
        is, so callers may fuse it with other uncompressed tensors instead."""
        return True

    def _bind(self, comm) -> None:
        """Called by ``reduce`` before compressing: per-rank set-up (e.g. seeding by rank)."""

    # -- per-key state and checkpoints ----------------------------------------------------------
    def state(self, key: str, shape) -> dict:
        """The state dict of ``key``, created empty on first use; one key is one tensor shape."""
        shape = list(shape)
        st = self._state.get(key)
        if st is None:
            st = self._state[key] = {"shape": shape}
        elif st["shape"] != shape:
            raise ValueError(f"{type(self).__name__}: key {key!r} was used for a tensor of shape "
                             f"{tuple(st['shape'])} and now for one of shape {tuple(shape)}; "
                             f"give each tensor its own key")
        return st

    def state_dict(self) -> dict:
        """Everything needed to resume bitwise: per-key state (copied) and extra state (RNG)."""
        return {"type": type(self).__name__,
                "state": {k: _copy(v) for k, v in self._state.items()},
                "extra": _copy(self._extra_state())}

    def load_state_dict(self, sd: dict) -> None:
        if not isinstance(sd, dict) or "state" not in sd:
            raise ValueError("not a compressor state dict (expected the output of state_dict())")
        if sd.get("type", type(self).__name__) != type(self).__name__:
            raise ValueError(f"state dict of a {sd['type']} given to a {type(self).__name__}")
        self._state = {k: _copy(v) for k, v in sd["state"].items()}
        self._load_extra_state(_copy(sd.get("extra", {})))

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    # -- accounting ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.stats = _zero_stats()

    @contextmanager
    def _op(self):
        # Nested calls (compress inside reduce) add to the outermost call's record.
        self._depth += 1
        if self._depth == 1:
            self._cur = _zero_stats()
            self._cur["calls"] = 1
        try:
            yield self._cur
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.last_stats = self._cur
                for k in STAT_FIELDS:
                    self.stats[k] += self._cur[k]

    def _comm(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._cur["comm_s"] += time.perf_counter() - t0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._cur["compress_s"] += time.perf_counter() - t0

    def _check_tensor(self, t):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{type(self).__name__} compresses torch tensors, "
                            f"got {type(t).__name__}")
        if self.float_only and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__} compresses floating-point tensors "
                            f"(float16, bfloat16, float32, float64), got {t.dtype}")
        if t.device.type != "cpu":
            raise ValueError(f"{type(self).__name__} works on CPU tensors, got one on {t.device}")

    def __repr__(self):
        return f"{type(self).__name__}()"


def pack_bytes(tensors) -> torch.Tensor:
    """Payload tensors as one flat uint8 tensor (one collective instead of several)."""
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def unpack_bytes(blob: torch.Tensor, like, rank=None) -> list:
    """Split a peer's :func:`pack_bytes` buffer back into tensors shaped as ``like`` (ours)."""
    sizes = [t.numel() * t.element_size() for t in like]
    if blob.dtype != torch.uint8 or blob.numel() != sum(sizes):
        who = f"rank {rank}" if rank is not None else "a peer"
        raise CollectiveMismatch(
            f"{who} sent a compressed payload of {blob.numel()} bytes where this rank expects "
            f"{sum(sizes)}: the ranks compressed tensors of different shapes under one key")
    out, o = [], 0
    for t, n in zip(like, sizes):
        seg = blob[o:o + n]
        if seg.storage_offset() % t.element_size():
            seg = seg.clone()  # a dtype view needs an aligned start
        out.append(seg.view(t.dtype).view(t.shape))
        o += n
    return out


def _key(key):
    if key is None:
        return DEFAULT_KEY
    if not isinstance(key, str):
        raise TypeError(f"key must be a str or None, got {type(key).__name__}")
    return key


def _check_op(op):
    if op not in ("mean", "sum"):
        raise ValueError(f"a compressed reduce supports op='mean' or 'sum', not {op!r}")


def _zero_stats():
    return {k: 0 if k in ("calls", "raw_bytes", "wire_bytes") else 0.0 for k in STAT_FIELDS}


def _copy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_copy(v) for v in x)
    return x
