"""A parameter server process: ``python -m distrib.ps.server``.

``distrib launch -n N --servers S`` starts S of them beside the N workers (``DISTRIB_ROLE=server``,
``DISTRIB_RANK`` = the server's index, transport rank N + index). A server never runs the user's
script; it serves the workers' ``DistributedOptimizer(topology="ps")``:

1. **Handshake.** Every worker sends ``hello`` with its configuration, the units of this server's
   shard and a checksum of the whole layout; worker 0 adds the initial values. The server
   checks that all workers agree and answers ``welcome`` (worker 0's values) to each.
2. **Serve** pushes and pulls with the engine of the mode: :class:`~distrib.ps.aggregate.Aggregator`
   (sync, gradient-coded or not) or :class:`~distrib.ps.store.ParamStore` (async, ssp).
3. **Exit 0** once every worker has sent ``done`` (at ``close()`` or process exit).

Failures are never silent and never hang: a worker that sends nothing for longer than the
timeout (``DISTRIB_TIMEOUT``, ``distrib launch --timeout``) while the server is not holding an
answer for it, a worker that breaks the protocol, or workers that disagree, make the server
abort the channel (every worker's wait raises :class:`~distrib.errors.PeerFailed` with the
reason) and exit 1 with a message naming the worker. Until the first ``hello`` arrives the
server just waits: the workers may not use the parameter servers at all (the launcher stops
the servers when the workers are done).
"""
from __future__ import annotations

import sys
import time

from .. import context
from ..coding import GradientCode
from ..errors import DistribError
from . import codec
from .aggregate import Aggregator
from .layout import Slot
from .link import Link
from .store import ParamStore

# How often the server looks for workers that went silent.
LIVENESS_EVERY_S = 0.5


class ServerError(DistribError):
    """This server cannot go on (a worker disappeared or broke the protocol)."""


class Server:
    """One parameter server: the handshake, then the message loop of its engine."""

    def __init__(self, index: int, workers: int, servers: int):
        self.index, self.workers = index, workers
        self.link = Link(workers, servers)
        self.timeout = self.link.timeout
        self.rank = self.link.server_rank(index)
        self.done = set()
        self.engine = None
        self.config = None

    # -- main ------------------------------------------------------------------------------------
    def run(self) -> int:
        hellos = self._handshake()
        if hellos:
            self._start(hellos)
            self._loop()
        steps = ""
        if isinstance(self.engine, Aggregator):
            st = self.engine.stats()
            steps = f" after step {st['step']} ({st['late_pushes']} late pushes dropped)"
        print(f"parameter server {self.index}: all {self.workers} workers done{steps}; exiting",
              flush=True)
        return 0

    def fail(self, text: str):
        raise ServerError(f"parameter server {self.index} (rank {self.rank}): {text}")

    # -- handshake -------------------------------------------------------------------------------
    def _handshake(self) -> dict:
        hellos, first = {}, None
        while len(hellos) + len(self.done) < self.workers:
            msg = self.link.poll(range(self.workers), 0.25)
            now = time.monotonic()
            if msg is None:
                if first is not None and now - first > self.timeout:
                    late = [w for w in range(self.workers)
                            if w not in hellos and w not in self.done]
                    self.fail(f"worker(s) {late} did not reach their first step within "
                              f"{self.timeout:g}s of worker(s) {sorted(hellos)}; they have "
                              f"stopped, hang, or do not use topology='ps'")
                continue
            w, op = msg.sender, msg.meta.get("op")
            if op == "hello":
                hellos[w] = msg
                first = now if first is None else first
            elif op == "done":
                self.done.add(w)
            else:
                self.fail(f"worker {w} sent {op!r} before the handshake")
        return hellos

    def _start(self, hellos: dict) -> None:
        if 0 not in hellos:
            self.fail("worker 0 finished without sending its initial parameters")
        ref = hellos[0].meta
        for w, msg in sorted(hellos.items()):
            self._check_same(w, msg.meta, ref)
        try:
            slots = [Slot.parse(d) for d in ref["units"]]
        except (KeyError, ValueError, TypeError) as e:
            self.fail(f"worker 0 described its units badly: {e!r}")
        init = hellos[0].tensors
        if len(init) != len(slots) or any(t.numel() != s.numel or t.dtype != s.dtype
                                          for t, s in zip(init, slots)):
            self.fail("worker 0's initial values do not match its unit list")
        cfg = self.config = ref["config"]
        desc = cfg.get("compressor")
        decoder = codec.rebuild(codec.innermost(desc)) if desc else None
        if cfg["mode"] == "sync":
            n, s, scheme = cfg["stragglers"] or (self.workers, 0, "cyclic")
            code = GradientCode(n, s, scheme) if s else None
            pull = codec.rebuild(desc, error_feedback=True) if desc and cfg["compress_pull"] \
                else None
            if pull is not None:
                codec.bind(pull, self.link.workers + self.index, self.link.workers)
            self.engine = Aggregator(self, slots, self.workers, code, decoder, pull,
                                     first_step=ref["t"])
        else:
            pull = codec.rebuild(codec.innermost(desc)) if desc and cfg["compress_pull"] else None
            if pull is not None:
                codec.bind(pull, self.link.workers + self.index, self.link.workers)
            staleness = cfg["staleness"] if cfg["mode"] == "ssp" else None
            self.engine = ParamStore(self, slots, self.workers, init, staleness, decoder, pull,
                                     clocks={w: m.meta["t"] for w, m in hellos.items()})
        for w in sorted(hellos):
            self.link.send(w, "welcome", {}, init)
        for w in sorted(self.done):
            self.engine.on_done(w, self.done)

    def _check_same(self, w, meta, ref):
        for field in ("sig", "config", "units", "t"):
            if field not in meta:
                self.fail(f"worker {w}'s hello lacks {field!r}")
        if w == 0:
            return
        if meta["config"] != ref["config"]:
            diff = {k: (meta["config"].get(k), ref["config"].get(k)) for k in ref["config"]
                    if meta["config"].get(k) != ref["config"].get(k)}
            self.fail("workers disagree on the optimizer's parameter-server options: " + ", ".join(
                f"{k}={a!r} on worker {w} but {b!r} on worker 0" for k, (a, b) in diff.items()))
        if meta["sig"] != ref["sig"] or meta["units"] != ref["units"]:
            self.fail(f"worker {w}'s parameters (names, shapes, dtypes or order) differ from "
                      f"worker 0's: build the same model, with the same parameter order, on "
                      f"every worker")
        if ref["config"]["mode"] == "sync" and meta["t"] != ref["t"]:
            self.fail(f"worker {w} starts at step {meta['t']} but worker 0 at step {ref['t']}: "
                      f"in sync mode all workers resume from the same step")

    # -- serving ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        seen = {w: time.monotonic() for w in range(self.workers)}
        check = time.monotonic() + LIVENESS_EVERY_S
        while len(self.done) < self.workers:
            msg = self.link.poll(range(self.workers), 0.25)
            now = time.monotonic()
            if msg is not None:
                w, op = msg.sender, msg.meta.get("op")
                seen[w] = now
                if w in self.done:
                    self.fail(f"worker {w} sent {op!r} after it said it was done")
                try:
                    if op == "step":
                        self.engine.on_step(w, msg)
                    elif op == "pull" and isinstance(self.engine, ParamStore):
                        self.engine.on_pull(w, msg)
                    elif op == "done":
                        self.done.add(w)
                        self.engine.on_done(w, self.done)
                    else:
                        self.fail(f"worker {w} sent an unexpected {op!r} message")
                except ServerError:
                    raise
                except DistribError as e:
                    self.fail(str(e))
            if now >= check:
                check = now + LIVENESS_EVERY_S
                held = self.engine.held()
                for w in range(self.workers):
                    if w not in self.done and w not in held and now - seen[w] > self.timeout:
                        self.fail(f"worker {w} sent nothing for {now - seen[w]:.0f}s (timeout "
                                  f"{self.timeout:g}s); it has stopped or hangs")


def main() -> int:
    context.init()
    if context.role() != "server":
        print("distrib.ps.server: this process is not a parameter server (DISTRIB_ROLE=server); "
              "start servers with: distrib launch -n N --servers S script.py", file=sys.stderr)
        return 2
    server = Server(context.rank(), context.size(), context.num_servers())
    try:
        return server.run()
    except ServerError as e:
        server.link.abort(str(e))
        print(f"distrib.ps.server: {e}", file=sys.stderr, flush=True)
        # Let the workers raise the error first: the launcher then reports a worker whose
        # traceback shows where the training loop stopped, with this reason.
        time.sleep(min(1.0, server.timeout))
        return _failed()
    except DistribError as e:  # e.g. PeerFailed: another server failed first
        print(f"distrib.ps.server {server.index}: {e}", file=sys.stderr, flush=True)
        return _failed()


def _failed() -> int:
    """Exit status 1; under MPI, abort the job instead: a process that exits with an error
    would block in MPI_Finalize while the others wait for it."""
    tr = context.transport()
    if getattr(tr, "name", "") == "mpi":
        sys.stderr.flush()
        tr.comm.Abort(1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
