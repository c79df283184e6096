"""Compressed payloads between workers and servers.

A server never sees the workers' compressor objects, so the workers describe theirs in the
handshake (class name and constructor arguments, see :func:`describe`) and the server builds its
own copies (:func:`rebuild`): one to decompress pushes, one (wrapped in ``ErrorFeedback``) to
compress what it sends back. A payload's ``ctx`` (compressor-specific context such as QSGD's
bucket count) travels in the message header, converted to plain msgpack types.

:func:`pack` / :func:`unpack` put the payloads of several units in one message: the tensors end
to end, and in ``meta`` the tensor count and context of each unit.
"""
from __future__ import annotations

import inspect

import torch

from ..compress import REGISTRY, Compressor, ErrorFeedback, Payload
from ..errors import DistribError
from ..transport.wire import DTYPES, dtype_name

_CLASSES = {cls.__name__: cls for cls in REGISTRY.values()}
_CLASSES["ErrorFeedback"] = ErrorFeedback


def describe(compressor) -> dict:
    """``{"cls": name, "args": {...}}`` from which :func:`rebuild` makes an equal compressor."""
    if isinstance(compressor, ErrorFeedback):
        return {"cls": "ErrorFeedback", "inner": describe(compressor.inner)}
    cls = type(compressor)
    if _CLASSES.get(cls.__name__) is not cls:
        raise DistribError(
            f"the parameter servers cannot rebuild a {cls.__name__}: topology='ps' supports the "
            f"compressors of distrib.compress ({', '.join(sorted(_CLASSES))}), optionally "
            f"wrapped in ErrorFeedback")
    args = {}
    for name in inspect.signature(cls.__init__).parameters:
        if name == "self":
            continue
        if not hasattr(compressor, name):
            raise DistribError(f"cannot describe {compressor!r} for the parameter servers: "
                               f"it keeps no attribute {name!r}")
        value = getattr(compressor, name)
        if not isinstance(value, (bool, int, float, str, type(None))):
            raise DistribError(f"cannot describe {compressor!r} for the parameter servers: "
                               f"argument {name}={value!r} is not a plain number")
        args[name] = value
    return {"cls": cls.__name__, "args": args}


def rebuild(desc: dict, error_feedback: bool = False) -> Compressor:
    """A new compressor from :func:`describe`'s output; ``error_feedback=True`` wraps the
    innermost compressor in a fresh ``ErrorFeedback`` (turning off a compressor's own error
    feedback when it has a switch for it, as PowerSGD does)."""
    if not isinstance(desc, dict) or "cls" not in desc:
        raise DistribError(f"bad compressor description {desc!r}")
    if desc["cls"] == "ErrorFeedback":
        return rebuild(desc["inner"], error_feedback=True) if error_feedback else \
            ErrorFeedback(rebuild(desc["inner"]))
    cls = _CLASSES.get(desc["cls"])
    if cls is None:
        raise DistribError(f"unknown compressor class {desc['cls']!r}")
    args = dict(desc.get("args", {}))
    if error_feedback and "error_feedback" in args:
        args["error_feedback"] = False
    c = cls(**args)
    if error_feedback and not c.has_error_feedback:
        return ErrorFeedback(c)
    return c


def innermost(desc: dict) -> dict:
    """The description without its ``ErrorFeedback`` wrappers."""
    while desc.get("cls") == "ErrorFeedback":
        desc = desc["inner"]
    return desc


def bind(compressor, rank: int, size: int) -> None:
    """Give a compressor its rank, as a collective would (QSGD seeds its dither by rank)."""
    hook = getattr(compressor, "_bind", None)
    if hook is not None:
        hook(_Rank(rank, size))


class _Rank:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


# -- payload context <-> msgpack ---------------------------------------------------------------
def encode_ctx(value):
    """Plain msgpack types for a payload context (dtypes and sizes tagged)."""
    if isinstance(value, torch.dtype):
        return {"__dtype": dtype_name(value)}
    if isinstance(value, torch.Size):
        return {"__size": list(value)}
    if isinstance(value, dict):
        return {str(k): encode_ctx(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_ctx(v) for v in value]
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    raise DistribError(f"a compressor put a {type(value).__name__} in its payload context; "
                       f"the parameter server can only carry numbers, strings, shapes and dtypes")


def decode_ctx(value):
    if isinstance(value, dict):
        if set(value) == {"__dtype"}:
            if value["__dtype"] not in DTYPES:
                raise DistribError(f"unknown dtype {value['__dtype']!r} in a payload context")
            return DTYPES[value["__dtype"]]
        if set(value) == {"__size"}:
            return torch.Size(value["__size"])
        return {k: decode_ctx(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_ctx(v) for v in value]
    return value


# -- several units in one message ---------------------------------------------------------------
def pack(payloads):
    """``(tensors, meta)`` for a list of payloads (``None`` for a raw, uncompressed tensor:
    pass the tensor itself)."""
    tensors, counts, ctxs = [], [], []
    for p in payloads:
        if isinstance(p, Payload):
            tensors += p.tensors
            counts.append(len(p.tensors))
            ctxs.append(encode_ctx(p.ctx) if p.ctx else None)
        else:
            tensors.append(p)
            counts.append(-1)  # a raw tensor
            ctxs.append(None)
    return tensors, {"n": counts, "ctx": ctxs}


def unpack(tensors, meta, units, who: str):
    """The payloads (or raw tensors) of ``units`` from a message made by :func:`pack`."""
    counts, ctxs = meta.get("n"), meta.get("ctx")
    if not isinstance(counts, list) or not isinstance(ctxs, list) or \
            len(counts) != len(units) or len(ctxs) != len(units):
        raise DistribError(f"{who} sent {0 if not isinstance(counts, list) else len(counts)} "
                           f"units where {len(units)} were expected")
    if sum(abs(c) for c in counts) != len(tensors):
        raise DistribError(f"{who} sent {len(tensors)} tensors but its header lists "
                           f"{sum(abs(c) for c in counts)}")
    out, i = [], 0
    for unit, count, ctx in zip(units, counts, ctxs):
        if count == -1:
            t = tensors[i]
            if t.numel() != unit.numel:
                raise DistribError(f"{who} sent {t.numel()} elements for {unit.key}, "
                                   f"expected {unit.numel}")
            out.append(t)
            i += 1
            continue
        if not isinstance(count, int) or count < 0:
            raise DistribError(f"{who} sent a bad tensor count {count!r}")
        out.append(Payload(list(tensors[i:i + count]), torch.Size(unit.shape), unit.dtype,
                           decode_ctx(ctx) if ctx else {}))
        i += count
    return out
