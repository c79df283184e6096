"""The one message format: a msgpack header frame followed by raw tensor frames.

    frame 0   msgpack map  {"v": 1, "k": kind, "c": channel, "q": seq, "s": sender,
                            "m": meta, "t": [[dtype, shape, nbytes], ...]}
    frame 1.. one frame per tensor: its raw bytes, C order, little endian (the host order)

Nothing here is ever unpickled. ``decode`` checks every header field (types, dtype allow-list,
``nbytes == prod(shape) * itemsize``, frame count, size limits) before it touches a buffer, and
raises :class:`~distrib.errors.WireError` on anything unexpected.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

import msgpack
import torch

from ..errors import WireError

VERSION = 1

# dtype name on the wire -> torch dtype. The allow-list: anything else is rejected.
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}

KINDS = ("data", "ping", "pong", "abort")

MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 4096
MAX_NDIM = 32
# Largest body one message may carry; large collectives are chunked well below this.
MAX_MESSAGE_BYTES = int(os.environ.get("DISTRIB_MAX_MESSAGE_BYTES", str(2 ** 31)))


@dataclass
class Message:
    """One point-to-point message: routing fields, a small ``meta`` map and tensors."""

    kind: str = "data"
    channel: int = 0
    seq: int = 0
    sender: int = -1
    meta: dict = field(default_factory=dict)
    tensors: list = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot be sent; supported: {sorted(DTYPES)}") from None


def _raw_bytes(t: torch.Tensor):
    """A buffer over the tensor's bytes, without a copy when it is already contiguous on CPU."""
    if t.device.type != "cpu":
        raise WireError("tensors must be on the CPU to be framed (stage CUDA tensors first)")
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return b""
    # numpy has no bfloat16: reinterpret every dtype as bytes, which is what the wire carries.
    flat = t.reshape(-1)
    return memoryview(flat.numpy() if t.dtype == torch.uint8 else flat.view(torch.uint8).numpy())


def encode(msg: Message) -> list:
    """Frames for ``msg``: the header first, then one buffer per tensor (zero-copy views)."""
    if msg.kind not in KINDS:
        raise WireError(f"unknown message kind {msg.kind!r}")
    specs, frames = [], []
    for t in msg.tensors:
        if not isinstance(t, torch.Tensor):
            raise WireError(f"message tensors must be torch.Tensor, got {type(t).__name__}")
        name = dtype_name(t.dtype)
        specs.append([name, list(t.shape), t.numel() * t.element_size()])
        frames.append(_raw_bytes(t))
    header = {"v": VERSION, "k": msg.kind, "c": msg.channel, "q": msg.seq, "s": msg.sender,
              "m": msg.meta, "t": specs}
    head = msgpack.packb(header, use_bin_type=True)
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    return [head] + frames


def _int(v, what, lo=None, hi=None):
    if type(v) is not int:
        raise WireError(f"header field {what} must be an int, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise WireError(f"header field {what}={v} out of range")
    return v


def decode_header(head) -> dict:
    """Parse and validate the header frame alone (no buffers are touched)."""
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        h = msgpack.unpackb(bytes(head), raw=False, strict_map_key=True,
                            max_bin_len=0, max_ext_len=0, max_array_len=MAX_TENSORS * 4,
                            max_map_len=1024, max_str_len=MAX_HEADER_BYTES)
    except Exception as e:  # msgpack raises several unrelated types
        raise WireError(f"malformed message header: {e}") from None
    if not isinstance(h, dict):
        raise WireError("message header is not a map")
    missing = {"v", "k", "c", "q", "s", "m", "t"} - set(h)
    if missing:
        raise WireError(f"message header lacks fields {sorted(missing)}")
    if h["v"] != VERSION:
        raise WireError(f"wire version {h['v']!r} is not {VERSION}")
    if h["k"] not in KINDS:
        raise WireError(f"unknown message kind {h['k']!r}")
    _int(h["c"], "channel", 0, 2 ** 31)
    _int(h["q"], "seq", 0)
    _int(h["s"], "sender", 0, 2 ** 31)
    if not isinstance(h["m"], dict):
        raise WireError("header field meta must be a map")
    specs = h["t"]
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise WireError("header field t must be a list of at most %d tensor specs" % MAX_TENSORS)
    total = 0
    for i, spec in enumerate(specs):
        if not (isinstance(spec, list) and len(spec) == 3):
            raise WireError(f"tensor spec {i} is not [dtype, shape, nbytes]")
        name, shape, nbytes = spec
        if name not in DTYPES:
            raise WireError(f"tensor {i}: dtype {name!r} is not allowed")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            raise WireError(f"tensor {i}: shape must be a list of at most {MAX_NDIM} ints")
        for d in shape:
            _int(d, f"t[{i}].shape", 0, MAX_MESSAGE_BYTES)
        _int(nbytes, f"t[{i}].nbytes", 0, MAX_MESSAGE_BYTES)
        if math.prod(shape) * ITEMSIZE[name] != nbytes:
            raise WireError(f"tensor {i}: nbytes {nbytes} != prod({shape}) x {ITEMSIZE[name]}")
        total += nbytes
    if total > MAX_MESSAGE_BYTES:
        raise WireError(f"message body of {total} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    return h


def decode(frames) -> Message:
    """Validate ``frames`` (header + buffers) and view the buffers as tensors, without copies.

    The returned tensors may share memory with read-only receive buffers: treat them as
    read-only (every collective in distrib writes its results into fresh tensors).
    """
    if not frames:
        raise WireError("empty message")
    h = decode_header(frames[0])
    specs = h["t"]
    if len(frames) != 1 + len(specs):
        raise WireError(f"message has {len(frames) - 1} buffers but its header lists {len(specs)}")
    tensors = []
    for i, ((name, shape, nbytes), buf) in enumerate(zip(specs, frames[1:])):
        n = memoryview(buf).nbytes
        if n != nbytes:
            raise WireError(f"tensor {i}: buffer of {n} bytes, header says {nbytes}")
        tensors.append(_view(buf, DTYPES[name], shape, nbytes))
    return Message(kind=h["k"], channel=h["c"], seq=h["q"], sender=h["s"], meta=h["m"],
                   tensors=tensors)


def _view(buf, dtype, shape, nbytes):
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    # torch.frombuffer warns on read-only buffers (zmq frames are); receive buffers are private
    # to this process and every collective writes results into fresh tensors, so a view is safe.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)
