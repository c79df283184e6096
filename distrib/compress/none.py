"""NoCompression: the tensor as it is (any dtype), all-reduced. The baseline."""
from __future__ import annotations

import torch

from .base import Compressor, LocalComm, _check_op


class NoCompression(Compressor):
    """Sends the raw tensor; ``reduce`` is a plain all-reduce."""

    name = "none"
    linear = True
    float_only = False

    def compresses(self, shape):
        return False

    def _compress(self, flat, key, payload):
        return [flat]

    def _decompress(self, payload):
        return payload.tensors[0].clone()

    def reduce(self, t, comm=None, key=None, op="mean"):
        comm = LocalComm() if comm is None else comm
        _check_op(op)
        self._check_tensor(t)
        with self._op() as st:
            st["raw_bytes"] += t.numel() * t.element_size()
            st["wire_bytes"] += t.numel() * t.element_size()
            out = self._comm(comm.allreduce, t.detach(), "sum")
        if op == "sum":
            return out
        if t.dtype.is_floating_point or t.dtype.is_complex:
            return out / comm.size
        # Integer means round toward minus infinity, exactly as distrib.allreduce does.
        return torch.div(out, comm.size, rounding_mode="floor")
