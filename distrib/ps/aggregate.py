"""Server side of ``mode="sync"``: average the workers' gradients, step by step.

Step ``t`` completes when ``n − s`` workers have pushed it (``s = 0``: all of them, summed in
rank order; with a gradient code, the first ``n − s`` to arrive, decoded to the exact sum of the
``n`` partition gradients). The mean (sum / n), compressed with the server's own error feedback
when pulls are compressed, is then sent to *every* worker still running, whether it pushed or
not: the same bytes for all, so their parameters stay identical.

A straggler's push that arrives after its step completed is dropped. The straggler already has
that step's mean (and any later ones) waiting in its queue: it applies them all, one optimizer
step each, and rejoins the others at the current step without a round trip.
"""
from __future__ import annotations

import torch

from ..compress import Payload
from ..errors import DistribError
from . import codec


class Aggregator:
    """Synchronous (optionally gradient-coded) gradient averaging for one server's units."""

    def __init__(self, server, slots, workers: int, code=None, decoder=None, pull=None,
                 first_step: int = 0):
        self.server, self.slots, self.n = server, slots, workers
        self.code = code
        self.need = workers - (code.s if code is not None else 0)
        self.decoder = decoder      # rebuilds pushed payloads (None: pushes are raw)
        self.pull = pull            # compresses the mean for the pull (None: sent raw)
        self.t = first_step         # the step being collected
        self.contrib = {}           # worker -> [tensor per slot] for step self.t
        self.done = set()
        self.late = 0

    # -- messages --------------------------------------------------------------------------------
    def on_step(self, w: int, msg) -> None:
        t = msg.meta.get("t")
        if not isinstance(t, int) or t > self.t:
            raise DistribError(f"worker {w} pushed step {t!r} while this server collects step "
                               f"{self.t}: the workers disagree on the step count")
        if t < self.t:
            self.late += 1  # its step went on without it; it has the mean already
            return
        if w in self.contrib:
            raise DistribError(f"worker {w} pushed step {t} twice")
        parts = codec.unpack(msg.tensors, msg.meta, self.slots, f"worker {w}")
        self.contrib[w] = [self._open(p) for p in parts]
        if len(self.contrib) >= self.need:
            self._complete()

    def on_done(self, w: int, done: set) -> None:
        self.done = done
        self.check_progress()

    def held(self):
        """Workers waiting for the current step's mean (nothing is expected from them)."""
        return set(self.contrib)

    def check_progress(self) -> None:
        """Fail if the current step can no longer complete because workers have left."""
        if not self.contrib:
            return
        could = len(self.contrib) + sum(1 for w in range(self.n)
                                        if w not in self.contrib and w not in self.done)
        if could < self.need:
            gone = sorted(w for w in self.done if w not in self.contrib)
            raise DistribError(
                f"step {self.t} needs pushes from {self.need} of {self.n} workers but worker(s) "
                f"{gone} finished without pushing it (did every worker run the same number of "
                f"steps?)")

    # -- internals -------------------------------------------------------------------------------
    def _open(self, part):
        if isinstance(part, Payload):
            return self.decoder.decompress(part).reshape(-1)
        return part.reshape(-1)

    def _complete(self) -> None:
        ws = sorted(self.contrib)
        out = []
        for i, slot in enumerate(self.slots):
            if self.code is not None:
                total = self.code.decode({w: self.contrib[w][i] for w in ws})
            else:
                acc = torch.float64 if slot.dtype == torch.float64 else torch.float32
                total = torch.zeros(slot.numel, dtype=acc)
                for w in ws:
                    total += self.contrib[w][i]
            mean = (total / self.n).to(slot.dtype)
            if self.pull is not None and slot.compressed:
                out.append(self.pull.compress(mean.reshape(slot.shape), key=slot.key))
            else:
                out.append(mean)
        tensors, meta = codec.pack(out)
        meta["t"] = self.t
        for w in range(self.n):
            if w not in self.done:
                self.server.link.send(w, "agg", meta, tensors)
        self.t += 1
        self.contrib = {}

    def stats(self) -> dict:
        return {"late_pushes": self.late, "step": self.t}
