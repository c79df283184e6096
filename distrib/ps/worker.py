"""Worker side of the parameter servers: what ``DistributedOptimizer(topology="ps")`` runs.

``synchronize()`` and ``step()`` per mode:

- ``sync``: ``synchronize()`` pushes this worker's gradients (compressed per unit) to every
  server and waits for the mean, which it writes into ``.grad``; ``step()`` runs the wrapped
  optimizer on it. A parameter without a gradient counts as zero (and gets a zero ``.grad``).
  With a gradient code, ``.grad`` must hold this worker's *coded* gradient (see
  :func:`distrib.ps.coded_backward`). A straggler finds the means of the steps the others made
  without it already waiting (its push is then not even sent): ``step()`` applies them all, one
  optimizer step each, and the worker rejoins the others at the current step (``global_step``).
- ``async`` / ``ssp``: ``step()`` runs the wrapped optimizer locally, pushes the change it made
  to the parameters and pulls the servers' parameters (see :mod:`distrib.ps.store`);
  ``synchronize()`` only pulls the latest parameters.

The handshake with the servers happens at the first ``step()`` (or ``synchronize()``), so a
checkpoint loaded after building the optimizer is what worker 0 sends as the initial values;
every worker then starts from worker 0's parameters, as after ``broadcast_parameters``.
"""
from __future__ import annotations

import atexit
import functools
import time
import weakref

import torch

from .. import context
from ..coding import GradientCode
from ..compress import Compressor, ErrorFeedback, Payload
from ..errors import CommTimeout, DistribError
from . import codec
from .layout import Layout
from .link import Link

MODES = ("sync", "async", "ssp")


class PSWorker:
    """This worker's end of the parameter servers, for ``optimizer``'s ``named_params``.

    Options: ``mode`` ("sync", "async", "ssp"), ``staleness`` (ssp's bound k), ``stragglers``
    (sync only: s, or a :class:`~distrib.coding.GradientCode` over all workers),
    ``compress_pull`` (default: True when a compressor is given), ``min_compress_numel``
    (smaller pieces travel uncompressed, fused; default 1024).
    """

    def __init__(self, optimizer, named_params, compressor=None, mode="sync", staleness=None,
                 stragglers=0, compress_pull=None, min_compress_numel=1024):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if mode == "ssp":
            if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
                raise ValueError(f"mode='ssp' needs staleness=k, an integer >= 0, "
                                 f"got {staleness!r}")
        elif staleness is not None:
            raise ValueError(f"staleness applies to mode='ssp', not mode={mode!r}")
        if compressor is not None and not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a distrib.compress compressor, "
                            f"got {type(compressor).__name__}")
        if isinstance(min_compress_numel, bool) or not isinstance(min_compress_numel, int) \
                or min_compress_numel < 0:
            raise ValueError(f"min_compress_numel must be an integer >= 0, "
                             f"got {min_compress_numel!r}")
        context.init()
        self.rank, self.size = context.rank(), context.size()
        servers = context.num_servers() if context.role() == "worker" else 0
        if servers < 1:
            raise DistribError("topology='ps' needs parameter servers: start the job with "
                               "distrib launch -n N --servers S script.py")
        self.code = self._make_code(stragglers, mode)
        self.optimizer, self.mode, self.staleness = optimizer, mode, staleness
        self.compressor = compressor
        self.params = []
        for name, p in named_params:
            if not p.is_contiguous():
                raise DistribError(f"parameter {name} is not contiguous; the parameter servers "
                                   f"write into parameters in place")
            self.params.append(p)
        desc = codec.describe(compressor) if compressor is not None else None
        self.compress_pull = (compressor is not None) if compress_pull is None \
            else bool(compress_pull) and compressor is not None
        self.config = {"mode": mode, "staleness": staleness, "compressor": desc,
                       "compress_pull": self.compress_pull,
                       "stragglers": None if self.code is None else
                       [self.code.n, self.code.s, self.code.scheme]}
        specs = [(name, tuple(p.shape), p.dtype) for name, p in named_params]
        self.layout = Layout(specs, servers, compress=compressor is not None,
                             min_compress_numel=min_compress_numel, extra=self.config)
        self.link = Link(self.size, servers)
        # Decompressing needs only the innermost compressor (error feedback is the sender's).
        self.decoder = codec.rebuild(codec.innermost(desc)) if desc else None
        self.push = compressor
        if compressor is not None and compressor.has_error_feedback and \
                not isinstance(compressor, ErrorFeedback):
            # Its error feedback lives in its own reduce (PowerSGD): compress with a copy that
            # has it switched off, inside ErrorFeedback (CountSketch has no switch: none).
            self.push = codec.rebuild(desc, error_feedback=True)
        if self.push is not None:
            codec.bind(self.push, self.rank, self.size)
        self.global_step = 0      # steps applied (sync) / pushed (async, ssp)
        self._base = None         # async/ssp: per server and unit, the values last pulled
        self._pending = []        # sync: mean gradients fetched but not applied yet
        self._started = self._closed = False
        self._stats = {"push_raw_bytes": 0, "push_payload_bytes": 0, "pull_raw_bytes": 0,
                       "pull_payload_bytes": 0, "wait_s": 0.0, "late_steps": 0,
                       "catch_up_steps": 0}
        self._exit_hook = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._exit_hook)

    def _make_code(self, stragglers, mode):
        if isinstance(stragglers, GradientCode):
            code = stragglers
            if code.n != self.size:
                raise ValueError(f"the gradient code is for n={code.n} workers but the job has "
                                 f"{self.size}")
        elif isinstance(stragglers, bool) or not isinstance(stragglers, int) or stragglers < 0:
            raise ValueError(f"stragglers must be an integer >= 0 or a GradientCode, "
                             f"got {stragglers!r}")
        elif stragglers == 0:
            return None
        else:
            code = GradientCode(self.size, stragglers)
        if code.s == 0:
            return None
        if mode != "sync":
            raise ValueError(f"stragglers (gradient coding) needs mode='sync', not {mode!r}")
        return code

    # -- the step --------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """sync: fetch the mean gradient into ``.grad`` (once per step); async/ssp: pull the
        latest parameters."""
        if not self._started:
            self._handshake()
        if self.mode != "sync":
            self._send_all("pull", lambda k: ([], {}))
            self._receive_params()
            return
        if self._pending:
            return
        t = self.global_step
        ready = self._queued()
        if min(ready) == 0:  # otherwise the step went on without us: pushing is pointless
            self._send_all("step", lambda k: self._push(k, "grad"), {"t": t})
        else:
            self._stats["late_steps"] += 1
        means = [[self._receive_mean(k, t)] for k in range(self.layout.num_servers)]
        # Steps the others made meanwhile (a straggler's catch-up): take those every server sent.
        extra = min(self._queued())
        for k, got in enumerate(means):
            got += [self._receive_mean(k, t + 1 + i) for i in range(extra)]
        self._stats["catch_up_steps"] += extra
        self._pending = [[got[i] for got in means] for i in range(1 + extra)]
        self._write(self._pending[0], "grad")

    def _queued(self):
        """Messages already waiting from each server (after taking in what has arrived)."""
        tr, ch = self.link.transport, self.link.channel
        ranks = [self.link.server_rank(k) for k in range(self.layout.num_servers)]
        for _ in range(10000):
            before = sum(tr.pending(r, ch) for r in ranks)
            tr.poll_once(0.0)
            if sum(tr.pending(r, ch) for r in ranks) == before:
                break
        return [tr.pending(r, ch) for r in ranks]

    def step(self, synchronize: bool = True) -> None:
        """One training step (see the module docstring); runs the wrapped optimizer."""
        if self.mode != "sync":
            self._async_step()
            return
        if synchronize:
            self.synchronize()
        if not self._pending:  # synchronization skipped by the caller: a purely local step
            self.optimizer.step()
            return
        for i, mean in enumerate(self._pending):
            if i:
                self._write(mean, "grad")
            self.optimizer.step()
            self.global_step += 1
        self._pending = []

    def _async_step(self) -> None:
        if not self._started:
            self._handshake()
        self.optimizer.step()
        self.global_step += 1
        self._send_all("step", lambda k: self._push(k, "delta"), {"t": self.global_step})
        self._receive_params()

    # -- push ------------------------------------------------------------------------------------
    def _push(self, k, what):
        """(tensors, meta) of this worker's push to server ``k``: gradients or deltas."""
        parts = []
        for i, unit in enumerate(self.layout.units[k]):
            if what == "grad":
                value = self._gather(unit, "grad")
            else:
                value = (self._gather(unit, "data").to(self._base[k][i].dtype)
                         - self._base[k][i]).to(unit.dtype)
            raw = value.numel() * value.element_size()
            self._stats["push_raw_bytes"] += raw
            if unit.compressed:
                payload = self.push.compress(value.reshape(unit.shape), key=unit.key)
                self._stats["push_payload_bytes"] += payload.nbytes
                parts.append(payload)
            else:
                self._stats["push_payload_bytes"] += raw
                parts.append(value)
        return codec.pack(parts)

    def _send_all(self, op, build, meta=None):
        for k in range(self.layout.num_servers):
            tensors, m = build(k)
            m.update(meta or {})
            self.link.send(self.link.server_rank(k), op, m, tensors)

    # -- pull ------------------------------------------------------------------------------------
    def _receive_mean(self, k, t):
        """Server ``k``'s mean gradient of step ``t`` (a flat tensor per unit)."""
        msg = self._wait(k, "agg", f"the mean gradient of step {t}")
        if msg.meta.get("t") != t:
            raise DistribError(f"parameter server {k} sent the mean of step "
                               f"{msg.meta.get('t')!r} where this worker expected step {t}")
        return self._open(k, msg.tensors, msg.meta)

    def _receive_params(self):
        for k in range(self.layout.num_servers):
            msg = self._wait(k, "params", "fresh parameters")
            parts = msg.meta.get("parts")
            if not isinstance(parts, list) or len(parts) != 1:
                raise DistribError(f"parameter server {k} sent a malformed parameter reply")
            values = self._open(k, msg.tensors, parts[0])
            base = self._base[k]
            for i, v in enumerate(values):
                if msg.meta.get("diff"):
                    base[i].add_(v.to(base[i].dtype))
                else:
                    base[i].copy_(v)
            self._write_server(k, base, "data")

    def _open(self, k, tensors, part):
        """Per unit of server ``k``: a flat tensor, decompressed when it came compressed."""
        out = []
        for unit, value in zip(self.layout.units[k],
                               codec.unpack(tensors, part, self.layout.units[k],
                                            f"parameter server {k}")):
            if isinstance(value, Payload):
                self._stats["pull_payload_bytes"] += value.nbytes
                value = self.decoder.decompress(value)
            else:
                self._stats["pull_payload_bytes"] += value.numel() * value.element_size()
            self._stats["pull_raw_bytes"] += unit.numel * value.element_size()
            out.append(value.reshape(-1))
        return out

    def _wait(self, k, op, what):
        """Server ``k``'s next message, which must be ``op``; CommTimeout naming the server if
        it stays silent (a live server that holds the answer gets a second timeout: it is
        waiting for another worker and will itself report that worker if it is gone)."""
        rank = self.link.server_rank(k)
        start = time.monotonic()
        deadline, extended = start + self.link.timeout, False
        try:
            while True:
                msg = self.link.poll([rank], max(0.0, deadline - time.monotonic()))
                if msg is not None:
                    break
                alive = self.link.alive(rank)
                if alive and not extended:
                    deadline, extended = time.monotonic() + self.link.timeout, True
                    continue
                why = ("it answers pings but held the answer (it waits for other workers)"
                       if alive else "it does not answer pings: it has stopped or is unreachable")
                raise CommTimeout(f"rank {self.rank}: parameter server {k} (rank {rank}) did not "
                                  f"send {what} within {time.monotonic() - start:.0f}s; {why}",
                                  missing=[rank], op=f"ps {op}")
        finally:
            self._stats["wait_s"] += time.monotonic() - start
        if msg.meta.get("op") != op:
            raise DistribError(f"parameter server {k} sent {msg.meta.get('op')!r} where this "
                               f"worker expected {op!r}")
        return msg

    # -- handshake and shutdown ------------------------------------------------------------------
    def _handshake(self):
        for k in range(self.layout.num_servers):
            units = self.layout.units[k]
            values = [self._gather(u, "data") for u in units] if self.rank == 0 else []
            self.link.send(self.link.server_rank(k), "hello",
                           {"sig": self.layout.signature, "config": self.config,
                            "units": [u.describe() for u in units], "t": self.global_step},
                           values)
        self._started = True
        base = []
        for k in range(self.layout.num_servers):
            msg = self._wait(k, "welcome", "the handshake answer (welcome)")
            units = self.layout.units[k]
            if len(msg.tensors) != len(units):
                raise DistribError(f"parameter server {k} sent {len(msg.tensors)} initial "
                                   f"values for {len(units)} units")
            values = [t.reshape(-1) for t in msg.tensors]
            self._write_server(k, values, "data")
            base.append([v.to(_acc(v.dtype), copy=True) for v in values])
        if self.mode != "sync":
            self._base = base

    def close(self) -> None:
        """Tell the servers this worker is done (idempotent; also runs at process exit)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._exit_hook)
        if not context.is_initialized() or self.link.transport.closed:
            return  # the job is already shut down: the servers will notice the silence
        for k in range(self.layout.num_servers):
            self.link.send(self.link.server_rank(k), "done", {"t": self.global_step})

    # -- moving values between parameters and units ----------------------------------------------
    def _gather(self, unit, what):
        """A fresh flat CPU copy of the unit's values: parameters' ``data`` or ``grad``."""
        parts = []
        for piece in unit.pieces:
            p = self.params[piece.index]
            src = p.detach() if what == "data" else p.grad
            if src is None:  # no gradient on this worker: it counts as zero
                parts.append(torch.zeros(piece.numel, dtype=unit.dtype))
            else:
                parts.append(src.reshape(-1)[piece.start:piece.stop])
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out.to("cpu", copy=True)

    def _write(self, per_server, what):
        for k, values in enumerate(per_server):
            self._write_server(k, values, what)

    @torch.no_grad()
    def _write_server(self, k, values, what):
        for unit, value in zip(self.layout.units[k], values):
            o = 0
            for piece in unit.pieces:
                p = self.params[piece.index]
                if what == "grad":
                    if p.grad is None or not p.grad.is_contiguous():
                        p.grad = torch.zeros_like(p)
                    dst = p.grad
                else:
                    dst = p.data
                dst.view(-1)[piece.start:piece.stop].copy_(value[o:o + piece.numel])
                o += piece.numel

    # -- bookkeeping -----------------------------------------------------------------------------
    def stats(self) -> dict:
        s = dict(self._stats)
        s["raw_bytes"] = s["push_raw_bytes"] + s["pull_raw_bytes"]
        s["payload_bytes"] = s["push_payload_bytes"] + s["pull_payload_bytes"]
        for d in ("push", "pull"):
            pay = s[f"{d}_payload_bytes"]
            s[f"{d}_compression_ratio"] = s[f"{d}_raw_bytes"] / pay if pay else 1.0
        s["global_step"] = self.global_step
        s["mode"] = self.mode
        return s

    def state_dict(self) -> dict:
        sd = {"global_step": self.global_step, "mode": self.mode}
        if self.push is not self.compressor:
            sd["push_compressor"] = self.push.state_dict()
        return sd

    def load_state_dict(self, state: dict) -> None:
        step = int(state.get("global_step", 0))
        if self._started and step != self.global_step:
            raise DistribError("load the optimizer's state before its first step: the parameter "
                               "servers have already started at step "
                               f"{self.global_step}")
        self.global_step = step
        if "push_compressor" in state and self.push is not self.compressor:
            self.push.load_state_dict(state["push_compressor"])


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _close_at_exit(ref):
    worker = ref()
    if worker is not None:
        try:
            worker.close()
        except Exception:  # never mask how the process is exiting
            pass
