"""Gradient compressors (GRACE style: one short file each, one small interface in ``base``).

::

    c = distrib.compress.get("topk", ratio=0.01)      # or TopK(0.01)
    payload = c.compress(t, key="fc1.weight")         # payload.nbytes: bytes on the wire
    t2 = c.decompress(payload)                        # t's shape and dtype
    mean = c.reduce(t, comm, key="fc1.weight")        # the compressed collective

``distrib.allreduce(t, compressor=c)`` and ``DistributedOptimizer(..., compressor=c)`` call
``reduce``; :func:`ddp_hook` plugs a compressor into torch's DistributedDataParallel.
"""
from __future__ import annotations

import inspect

from .base import Compressor, LocalComm, Payload
from .cast import BF16, FP16
from .countsketch import CountSketch
from .ddp import TorchComm, ddp_hook
from .error_feedback import ErrorFeedback
from .none import NoCompression
from .powersgd import PowerSGD
from .qsgd import QSGD
from .topk import TopK

REGISTRY = {
    "none": NoCompression,
    "fp16": FP16,
    "bf16": BF16,
    "qsgd": QSGD,
    "topk": TopK,
    "powersgd": PowerSGD,
    "countsketch": CountSketch,
}


def get(name: str, **kwargs) -> Compressor:
    """Build a compressor by name with its constructor arguments, e.g.
    ``get("qsgd", levels=7, bucket_size=512)``."""
    cls = REGISTRY.get(name.lower() if isinstance(name, str) else name)
    if cls is None:
        raise ValueError(f"unknown compressor {name!r}; valid names: {', '.join(REGISTRY)}")
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"compressor {name!r} takes no argument {', '.join(unknown)}; "
                         f"its arguments: {', '.join(params) or 'none'}")
    return cls(**kwargs)


__all__ = ["Compressor", "Payload", "LocalComm", "TorchComm", "NoCompression", "FP16", "BF16",
           "QSGD", "TopK", "PowerSGD", "CountSketch", "ErrorFeedback", "get", "ddp_hook",
           "REGISTRY"]
