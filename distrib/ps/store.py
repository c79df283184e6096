"""Server side of ``mode="async"`` and ``mode="ssp"``: the server keeps the parameters.

Each worker runs its own optimizer step locally and pushes the change it made (a *delta*,
compressed like a gradient). The server adds ``delta / n`` to its parameters as soon as it
arrives, so n pushes move the parameters as far as one synchronous step of the mean would.
The worker's push of its ``c``-th step also asks for fresh parameters to compute step ``c + 1``:

- ``async`` answers at once: workers never wait for each other;
- ``ssp`` (stale synchronous parallel, Ho et al. 2013) with staleness ``k`` answers when every
  worker still running has pushed at least ``c − k`` steps, so no worker starts a step more than
  ``k`` steps ahead of the slowest. With ``k = 0`` all n requests of a round are answered
  together, after the last push: every worker gets the same parameters, which are those of
  synchronous training for optimizers whose update is linear in the gradient (SGD with momentum
  and weight decay).

Compressed pulls send, per worker, the change since what that worker last received (the server
keeps a copy of it): what one pull leaves out is part of the next, the error feedback of this
direction.
"""
from __future__ import annotations

import torch

from ..compress import Payload
from ..errors import DistribError
from . import codec


class ParamStore:
    """Parameters of one server's units, updated by the workers' deltas."""

    def __init__(self, server, slots, workers: int, initial, staleness=None, decoder=None,
                 pull=None, clocks=None):
        self.server, self.slots, self.n = server, slots, workers
        self.staleness = staleness   # None: async
        self.decoder = decoder
        self.pull = pull
        self.params = [t.reshape(-1).to(_acc(s.dtype)).clone() for t, s in zip(initial, slots)]
        self.clock = {w: (clocks or {}).get(w, 0) for w in range(workers)}
        self.requests = {}
        self.done = set()
        # What each worker holds, when pulls are compressed (it starts with the exact values).
        self.replica = {w: [p.clone() for p in self.params] for w in range(workers)} \
            if pull is not None else None
        self.applied = 0

    def on_step(self, w: int, msg) -> None:
        c = msg.meta.get("t")
        if c != self.clock[w] + 1:
            raise DistribError(f"worker {w} pushed its step {c!r} but its previous push was step "
                               f"{self.clock[w]}: pushes must come one step at a time")
        if w in self.requests:
            raise DistribError(f"worker {w} pushed step {c} before its last request was answered")
        parts = codec.unpack(msg.tensors, msg.meta, self.slots, f"worker {w}")
        for p, part in zip(self.params, parts):
            delta = self.decoder.decompress(part) if isinstance(part, Payload) else part
            p.add_(delta.reshape(-1).to(p.dtype), alpha=1.0 / self.n)
        self.applied += 1
        self.clock[w] = c
        self.requests[w] = c
        self.serve()

    def on_pull(self, w: int, msg) -> None:
        if w in self.requests:
            raise DistribError(f"worker {w} asked twice without waiting for the answer")
        self.requests[w] = self.clock[w]
        self.serve()

    def on_done(self, w: int, done: set) -> None:
        self.done = done
        self.requests.pop(w, None)
        self.serve()

    def held(self):
        return set(self.requests)

    def slowest(self) -> int | None:
        running = [c for w, c in self.clock.items() if w not in self.done]
        return min(running) if running else None

    def serve(self) -> None:
        slowest = self.slowest()
        for w, c in list(self.requests.items()):
            if self.staleness is not None and slowest is not None and slowest < c - self.staleness:
                continue  # too far ahead of the slowest worker: hold the answer
            self._reply(w)
            del self.requests[w]

    def _reply(self, w: int) -> None:
        if self.replica is None:
            # Copies: the transport sends without copying, and the parameters keep changing.
            out = [p.to(s.dtype, copy=True) for p, s in zip(self.params, self.slots)]
            self.server.link.send(w, "params", {"diff": False, "parts": [codec.pack(out)[1]]},
                                  out)
            return
        out, mine = [], self.replica[w]
        for p, r, s in zip(self.params, mine, self.slots):
            change = (p - r).to(s.dtype)
            if s.compressed:
                payload = self.pull.compress(change.reshape(s.shape), key=s.key)
                r.add_(self.pull.decompress(payload).reshape(-1).to(r.dtype))
                out.append(payload)
            else:
                r.add_(change.to(r.dtype))
                out.append(change)
        tensors, meta = codec.pack(out)
        self.server.link.send(w, "params", {"diff": True, "parts": [meta]}, tensors)

    def stats(self) -> dict:
        return {"updates": self.applied, "clocks": dict(self.clock)}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32
