"""The wires between neighbouring stages: plans, activations and their gradients.

Stage ``j`` only ever receives activations from ``j - 1`` and gradients from ``j + 1``, and each
stage sends them in the order of its schedule, so FIFO delivery per (peer, channel) is enough to
pair them up; the micro-batch number travels in ``meta`` and is checked anyway, as a guard
against ranks that run different steps.

Messages (``meta["t"]``):

- ``plan``: ``{"op": "train"|"infer", "step": k, "sizes": [...]}``, sent down the pipeline
  before the first activation of a step, so every stage agrees on the micro-batch count and sizes;
- ``act``: micro-batch ``mb``'s output tensors, with ``tuple`` (tensor or tuple of tensors) and
  ``grad`` (which of them carry a gradient back; only floating tensors in the graph do);
- ``grad``: the gradients of those tensors, ``has`` telling which ones exist (an unused input
  has none).
"""
from __future__ import annotations

import torch

from ..errors import CollectiveMismatch, DistribError, PeerFailed
from .microbatch import flatten, unflatten


class Link:
    """Point-to-point traffic of one stage over the pipeline's Communicator."""

    def __init__(self, comm, stage: int, device=None, timeout: float | None = None):
        self.comm, self.stage, self.timeout = comm, stage, timeout
        self.device = torch.device("cpu") if device is None else torch.device(device)

    def _recv(self, src: int, kind: str, what: str, mb=None):
        try:
            msg = self.comm.recv(src, timeout=self.timeout,
                                 what=f"pipeline stage {self.stage}: {what} from stage {src}")
        except PeerFailed as exc:
            exc.channel = self.comm.channel  # GPipe need not announce it on this channel again
            raise
        if msg.meta.get("t") != kind or (mb is not None and msg.meta.get("mb") != mb):
            raise DistribError(f"pipeline stage {self.stage} expected {what} from stage {src} "
                               f"but got {msg.meta.get('t')!r} of micro-batch "
                               f"{msg.meta.get('mb')!r}: the stages are out of step")
        return msg

    def _arrive(self, t: torch.Tensor) -> torch.Tensor:
        # Received tensors view read-only buffers: copy them (to the stage's device).
        return t.clone() if self.device.type == "cpu" else t.to(self.device)

    # -- plans -------------------------------------------------------------------------------
    def send_plan(self, op: str, step: int, sizes) -> None:
        self.comm.send(self.stage + 1, [], {"t": "plan", "op": op, "step": step,
                                            "sizes": list(sizes)})

    def recv_plan(self, op: str, step: int) -> list:
        meta = self._recv(self.stage - 1, "plan", "the step's plan").meta
        if meta.get("op") != op or meta.get("step") != step:
            raise CollectiveMismatch(
                f"pipeline stage {self.stage} runs {op} step {step} but stage {self.stage - 1} "
                f"runs {meta.get('op')} step {meta.get('step')}: every rank must call train_step "
                f"and inference in the same order")
        sizes = meta.get("sizes")
        if not (isinstance(sizes, list) and sizes and all(type(s) is int and s > 0
                                                          for s in sizes)):
            raise DistribError(f"pipeline stage {self.stage}: bad micro-batch sizes {sizes!r}")
        return sizes

    # -- activations -------------------------------------------------------------------------
    def send_activation(self, mb: int, value) -> list:
        """Send micro-batch ``mb``'s output downstream; returns which tensors expect a gradient."""
        tensors, is_tuple = flatten(value, f"stage {self.stage}'s output")
        grad = [t.requires_grad for t in tensors]
        self.comm.send(self.stage + 1, [t.detach().cpu() for t in tensors],
                       {"t": "act", "mb": mb, "tuple": is_tuple, "grad": grad})
        return grad

    def recv_activation(self, mb: int, requires_grad: bool):
        """Micro-batch ``mb``'s input from upstream: ``(value, grad flags)``; with
        ``requires_grad`` the flagged tensors are fresh leaves that will collect gradients."""
        msg = self._recv(self.stage - 1, "act", f"activation of micro-batch {mb}", mb)
        grad = list(msg.meta.get("grad", []))
        if len(grad) != len(msg.tensors):
            raise DistribError(f"pipeline stage {self.stage}: activation message of micro-batch "
                               f"{mb} lists {len(grad)} gradient flags for {len(msg.tensors)} "
                               f"tensors")
        tensors = []
        for t, g in zip(msg.tensors, grad):
            t = self._arrive(t)
            if requires_grad and g and t.is_floating_point():
                t.requires_grad_(True)
            tensors.append(t)
        return unflatten(tensors, bool(msg.meta.get("tuple"))), grad

    # -- gradients ---------------------------------------------------------------------------
    def send_grads(self, mb: int, grads) -> None:
        """Send the gradients of micro-batch ``mb``'s input upstream (``None`` where none)."""
        self.comm.send(self.stage - 1, [g.detach().cpu() for g in grads if g is not None],
                       {"t": "grad", "mb": mb, "has": [g is not None for g in grads]})

    def recv_grads(self, mb: int, count: int) -> list:
        """The gradients of micro-batch ``mb``'s ``count`` output tensors (``None`` where none)."""
        msg = self._recv(self.stage + 1, "grad", f"gradient of micro-batch {mb}", mb)
        has = list(msg.meta.get("has", []))
        if len(has) != count or sum(map(bool, has)) != len(msg.tensors):
            raise DistribError(f"pipeline stage {self.stage}: gradient message of micro-batch "
                               f"{mb} does not match its {count} output tensor(s)")
        it = iter(msg.tensors)
        return [self._arrive(next(it)) if h else None for h in has]
