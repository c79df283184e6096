"""Activation memory of one stage: the bytes kept alive between a micro-batch's forward and its
backward, measured rather than estimated.

Two things hold activations: tensors autograd saves for the backward (seen through
``torch.autograd.graph.saved_tensors_hooks``; each is wrapped in a small object whose lifetime is
the saved tensor's) and the stage's own stash (a micro-batch's input and output, kept until its
backward). Bytes are counted per storage, so views of one buffer count once, and parameters are
not activations. What ``torch.utils.checkpoint`` recomputes during a backward is transient and not
counted (the checkpoint's own hooks take over inside it): the meter shows what a schedule keeps.
"""
from __future__ import annotations

import torch


class _Saved:
    """A saved tensor, counted while autograd keeps this wrapper."""

    __slots__ = ("tensor", "meter", "__weakref__")

    def __init__(self, meter, tensor):
        self.meter, self.tensor = meter, tensor
        meter.add(tensor)

    def __del__(self):
        self.meter.remove(self.tensor)


class ActivationMeter:
    """Current and peak activation bytes of a stage (``peak`` restarts with ``begin``)."""

    def __init__(self, parameters=()):
        self._skip = {p.untyped_storage().data_ptr() for p in parameters}
        self._skip_step = set()
        self._refs = {}       # storage pointer -> [refcount, nbytes]
        self.current = 0
        self.peak = 0

    def begin(self, exclude=()) -> None:
        """Start a step: reset the peak; ``exclude``'s storages (the caller's own batch, which a
        stage's micro-batches view) are not activations of this stage."""
        self._skip_step = {t.untyped_storage().data_ptr() for t in exclude}
        self.peak = self.current

    def add(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        key = s.data_ptr()
        if key in self._skip or key in self._skip_step or key == 0:
            return
        ref = self._refs.get(key)
        if ref is None:
            self._refs[key] = [1, s.nbytes()]
            self.current += s.nbytes()
            self.peak = max(self.peak, self.current)
        else:
            ref[0] += 1

    def remove(self, t: torch.Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        ref = self._refs.get(key)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            del self._refs[key]
            self.current -= ref[1]

    def hold(self, tensors) -> None:
        for t in tensors:
            self.add(t)

    def release(self, tensors) -> None:
        for t in tensors:
            self.remove(t)

    def saving(self):
        """Context manager: count what autograd saves while it is active."""
        return torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(self, t),
                                                        lambda s: s.tensor)
