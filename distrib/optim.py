"""DistributedOptimizer: average gradients over all workers, overlapping with the backward pass.

How a step flows (topology "ring")::

    backward:  grad of p ready --hook--> p's unit complete? --> launch units in fixed order
                                                                  | (queue)
    comm thread:                      fused bucket -> all-reduce (mean) -------+
                                      big tensor   -> compressor.reduce       --+--> results
    step():    launch what is left (missing grads count as zero) -> wait -> write .grad -> inner step

- *Units* are fixed at construction, identically on every rank: parameters in reverse order
  (roughly the order backward produces them), small ones fused into buckets of ``bucket_mb``,
  and with a compressor every tensor of ``min_compress_numel`` elements or more on its own.
- Units are launched strictly in that order, so all ranks run the same collectives in the same
  sequence even when hooks fire in another order or a parameter gets no gradient on some rank
  (it then counts as zero there: no deadlock).
- A fused bucket carries one extra element per parameter (1 when this rank has a gradient):
  a parameter that no rank touched keeps ``grad=None``, as with torch DDP.
- ``backward_passes_per_step=k``: gradients accumulate locally over k backward passes (summed,
  as with DDP's ``no_sync``) and are communicated on the k-th.
"""
from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time

import torch

from . import context
from .errors import DistribError

_STOP = object()


class _Unit:
    """A group of parameters reduced together: a fused bucket, or one compressed tensor."""

    def __init__(self, index, params, names, compressed):
        self.index, self.params, self.names, self.compressed = index, params, names, compressed
        self.pending = len(params)
        self.launched = False
        self.result = None
        self.done = threading.Event()


class DistributedOptimizer(torch.optim.Optimizer):
    """Wraps any ``torch.optim.Optimizer`` so that ``step()`` applies the mean gradient over
    all workers (compressed when ``compressor`` is given).

    Options: ``backward_passes_per_step`` (default 1), ``bucket_mb`` (fusion bucket size,
    default 4), ``min_compress_numel`` (smaller tensors go uncompressed in fused buckets,
    default 1024), ``overlap`` (communicate during backward, default True). ``topology="ps"``
    sends gradients through the parameter servers (``mode``, ``staleness``, ``stragglers``).
    """

    def __init__(self, optimizer, model=None, compressor=None, topology="ring",
                 backward_passes_per_step=1, bucket_mb=4.0, min_compress_numel=1024,
                 overlap=True, **options):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, "
                            f"got {type(optimizer).__name__}")
        if topology not in ("ring", "ps"):
            raise ValueError(f"topology must be 'ring' or 'ps', not {topology!r}")
        if int(backward_passes_per_step) < 1:
            raise ValueError("backward_passes_per_step must be at least 1")
        if bucket_mb <= 0:
            raise ValueError("bucket_mb must be positive")
        # Optimizer.__init__ sets up the hook tables LR schedulers and profilers expect; the
        # parameter groups and state are then shared with the wrapped optimizer.
        # (Called explicitly, not through super(): the decorator's classes also derive from
        # the wrapped optimizer's class, whose __init__ must not run again.)
        torch.optim.Optimizer.__init__(self, optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.compressor = compressor
        self.topology = topology
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.loss_scalers = []
        self._skip_sync = False
        self._stats = {"steps": 0, "bytes_sent": 0, "raw_bytes": 0, "payload_bytes": 0,
                       "compress_s": 0.0, "comm_s": 0.0, "step_s": 0.0}
        self._names = _param_names(optimizer, model)
        self._params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        context.init()
        self._ps = None
        if topology == "ps":
            from .ps.worker import PSWorker
            self._ps = PSWorker(optimizer, [(self._names[p], p) for p in self._params],
                                compressor=compressor, min_compress_numel=min_compress_numel,
                                **options)
            return
        if options:
            raise TypeError(f"unknown DistributedOptimizer options: {sorted(options)}")
        self._comm = context.communicator("optimizer")
        self._units = self._make_units(bucket_mb, min_compress_numel)
        self._unit_of = {p: u for u in self._units for p in u.params}
        self._passes = {p: 0 for p in self._params}
        self._next_launch = 0
        self._queue = queue.Queue()
        self._error = None
        self._thread = None
        self._hooks = []
        self._overlap = overlap and self._comm.size > 1
        if self._overlap:
            for p in self._params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    # -- construction ------------------------------------------------------------------------
    def _make_units(self, bucket_mb, min_compress_numel):
        cap = int(bucket_mb * 2 ** 20)
        units, bucket, size, key = [], [], 0, None
        for p in reversed(self._params):
            compresses = getattr(self.compressor, "compresses", lambda shape: True)
            if self.compressor is not None and p.numel() >= min_compress_numel \
                    and compresses(p.shape):
                units.append(_Unit(len(units), [p], [self._names[p]], True))
                continue
            k = (p.dtype, p.device)
            nbytes = p.numel() * p.element_size()
            if bucket and (k != key or size + nbytes > cap):
                units.append(_Unit(len(units), bucket, [self._names[q] for q in bucket], False))
                bucket, size = [], 0
            bucket.append(p)
            size += nbytes
            key = k
        if bucket:
            units.append(_Unit(len(units), bucket, [self._names[q] for q in bucket], False))
        return units

    # -- the backward pass -------------------------------------------------------------------
    def _on_grad(self, p):
        self._passes[p] += 1
        if self._passes[p] > self.backward_passes_per_step:
            raise DistribError(
                f"gradient of {self._names[p]} computed {self._passes[p]} times before step(); "
                f"set backward_passes_per_step={self._passes[p]} to accumulate gradients, or "
                f"call step() (or zero_grad()) between backward passes")
        if self._passes[p] < self.backward_passes_per_step:
            return
        unit = self._unit_of[p]
        unit.pending -= 1
        # Launch every unit that is complete, in order; later ones wait for earlier ones.
        while self._next_launch < len(self._units) and self._units[self._next_launch].pending <= 0:
            self._launch(self._units[self._next_launch])

    def _launch(self, unit):
        self._next_launch += 1
        unit.launched = True
        if unit.compressed:
            p = unit.params[0]
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            work = g.detach().clone()
        else:
            # A fused bucket: gradients then one presence flag per parameter, in a buffer
            # kept across steps (a fresh one would page-fault in on every step).
            first = unit.params[0]
            size = sum(q.numel() for q in unit.params) + len(unit.params)
            if getattr(unit, "buf", None) is None:
                unit.buf = torch.empty(size, dtype=first.dtype, device=first.device)
            work, o = unit.buf, 0
            for q in unit.params:
                m = q.numel()
                if q.grad is None:
                    work[o:o + m].zero_()
                else:
                    work[o:o + m].copy_(q.grad.detach().reshape(-1))
                o += m
            work[o:] = torch.tensor([q.grad is not None for q in unit.params], dtype=work.dtype)
        if not self._overlap:
            unit.result = self._reduce(unit, work)
            unit.done.set()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._comm_loop, name="distrib-optimizer",
                                            daemon=True)
            self._thread.start()
        self._queue.put((unit, work))

    def _comm_loop(self):
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            unit, work = item
            try:
                if self._error is None:
                    unit.result = self._reduce(unit, work)
            except BaseException as e:  # reported by synchronize() in the main thread
                self._error = e
            finally:
                unit.done.set()

    def _reduce(self, unit, work):
        from . import api
        t0 = time.perf_counter()
        host = api._to_host(work)
        self._stats["raw_bytes"] += host.numel() * host.element_size()
        if unit.compressed:
            out = self.compressor.reduce(host, self._comm, key=unit.names[0], op="mean")
            st = getattr(self.compressor, "last_stats", None) or {}
            self._stats["payload_bytes"] += st.get("wire_bytes", host.numel() * host.element_size())
            self._stats["compress_s"] += st.get("compress_s", 0.0)
        else:
            # The mean is taken once per segment on its owner; a flag's mean is 0 exactly
            # when no rank had that gradient.
            out = self._comm.allreduce(host, "mean", out=host)
            self._stats["payload_bytes"] += host.numel() * host.element_size()
        self._stats["comm_s"] += time.perf_counter() - t0
        return api._back(out, work)

    # -- step --------------------------------------------------------------------------------
    def synchronize(self):
        """Finish averaging the gradients: after this every ``.grad`` holds the mean over workers."""
        if self._ps is not None:
            self._ps.synchronize()  # sync: mean gradient into .grad; async/ssp: fresh parameters
            return
        if self._comm.size == 1:
            # A job of one averages nothing, but a compressor still shapes the update (as with
            # Horovod): the compressed tensors go through it, the rest stay as they are.
            if self.compressor is not None:
                with torch.no_grad():
                    for unit in self._units:
                        p = unit.params[0]
                        if unit.compressed and p.grad is not None:
                            p.grad.copy_(self._reduce(unit, p.grad.detach()).view_as(p))
            return
        while self._next_launch < len(self._units):
            self._launch(self._units[self._next_launch])
        deadline = time.monotonic() + self._comm.timeout + 30
        for unit in self._units:
            while not unit.done.wait(0.5):
                if time.monotonic() > deadline or (self._thread and not self._thread.is_alive()):
                    raise DistribError("the optimizer's communication thread stopped responding")
        if self._error is not None:
            err, self._error = self._error, None
            self._reset()
            raise err
        with torch.no_grad():
            for unit in self._units:
                out = unit.result
                if unit.compressed:
                    p = unit.params[0]
                    p.grad = out.view_as(p).to(p.dtype) if p.grad is None else p.grad.copy_(out.view_as(p))
                    continue
                k = len(unit.params)
                flags, o = out[-k:], 0
                for p, f in zip(unit.params, flags.tolist()):
                    m = p.numel()
                    if f == 0:
                        p.grad = None  # no rank produced a gradient for it
                    elif p.grad is None:
                        p.grad = out[o:o + m].view_as(p).clone()
                    else:
                        p.grad.copy_(out[o:o + m].view_as(p))
                    o += m
        self._reset()

    def _reset(self):
        for unit in self._units:
            unit.pending = len(unit.params)
            unit.launched = False
            unit.result = None
            unit.done.clear()
        self._next_launch = 0
        for p in self._passes:
            self._passes[p] = 0

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Within this block ``step()`` does not synchronize (call ``synchronize()`` yourself
        first, as a loss scaler does to inspect the averaged gradients)."""
        self._skip_sync = True
        try:
            yield
        finally:
            self._skip_sync = False

    def step(self, closure=None):
        t0 = time.perf_counter()
        sent0 = context.bytes_sent()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._ps is not None:
            # Runs the wrapped optimizer itself: async/ssp step before pushing, and a gradient-
            # coded straggler applies the steps it missed.
            self._ps.step(synchronize=not self._skip_sync)
        else:
            if not self._skip_sync:
                self.synchronize()
            self.optimizer.step()
        self._stats["steps"] += 1
        self._stats["bytes_sent"] += context.bytes_sent() - sent0
        self._stats["step_s"] += time.perf_counter() - t0
        try:
            from . import metrics
            metrics.step_end()
        except ImportError:
            pass
        return loss

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def stats(self) -> dict:
        """Totals since construction: steps, bytes sent by this rank, gradient bytes before
        and after compression (``compression_ratio``), seconds in compression and in
        communication (the latter includes the former for compressed tensors)."""
        s = dict(self._stats)
        if self._ps is not None and hasattr(self._ps, "stats"):
            s.update(self._ps.stats())
        s["compression_ratio"] = s["raw_bytes"] / s["payload_bytes"] if s["payload_bytes"] else 1.0
        s["bytes_sent_per_step"] = s["bytes_sent"] / s["steps"] if s["steps"] else 0.0
        return s

    # -- state -------------------------------------------------------------------------------
    def state_dict(self):
        sd = {"optimizer": self.optimizer.state_dict()}
        if self.compressor is not None and hasattr(self.compressor, "state_dict"):
            sd["compressor"] = self.compressor.state_dict()
        if self._ps is not None and hasattr(self._ps, "state_dict"):
            sd["ps"] = self._ps.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        if "optimizer" not in state_dict:  # a plain optimizer's state dict
            self.optimizer.load_state_dict(state_dict)
            return
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if "compressor" in state_dict and self.compressor is not None:
            self.compressor.load_state_dict(state_dict["compressor"])
        if "ps" in state_dict and self._ps is not None:
            self._ps.load_state_dict(state_dict["ps"])

    def add_param_group(self, param_group):
        if not hasattr(self, "optimizer"):  # torch's Optimizer.__init__ filling in the groups
            return torch.optim.Optimizer.add_param_group(self, param_group)
        raise DistribError("add a parameter group to the optimizer before wrapping it: every "
                           "rank must agree on the fused buckets")

    def close(self):
        """Stop the communication thread and remove the gradient hooks."""
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
        if getattr(self, "_thread", None) is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
            self._thread = None
        if self._ps is not None and hasattr(self._ps, "close"):
            self._ps.close()

    def __repr__(self):
        return f"DistributedOptimizer({self.optimizer!r}, topology={self.topology!r})"


def _param_names(optimizer, model):
    names = {}
    if model is not None:
        for n, p in model.named_parameters():
            names.setdefault(p, n)
    i = 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p not in names:
                names[p] = f"param{i}"
            i += 1
    return names


def distributed(compressor=None, topology="ring", **options):
    """Decorator form of :class:`DistributedOptimizer`.

    On an optimizer class it returns a class whose instances are distributed::

        @distrib.distributed(compressor=distrib.compress.FP16())
        class MySGD(torch.optim.SGD): ...

    On a function that returns an optimizer it wraps the result.
    """
    def wrap(target):
        if isinstance(target, type) and issubclass(target, torch.optim.Optimizer):
            # Instances are DistributedOptimizers and also instances of ``target`` (for code
            # that checks isinstance); DistributedOptimizer's methods come first.
            def __init__(self, *args, model=None, **kwargs):
                DistributedOptimizer.__init__(self, target(*args, **kwargs), model=model,
                                              compressor=compressor, topology=topology, **options)
            return type(target.__name__, (DistributedOptimizer, target),
                        {"__init__": __init__, "__doc__": target.__doc__,
                         "__module__": target.__module__, "__qualname__": target.__qualname__})

        if callable(target):
            @functools.wraps(target)
            def make(*args, **kwargs):
                model = kwargs.pop("model", None) if "model" in kwargs and \
                    not _accepts(target, "model") else None
                opt = target(*args, **kwargs)
                if not isinstance(opt, torch.optim.Optimizer):
                    raise TypeError(f"{target.__name__} returned {type(opt).__name__}, "
                                    f"not a torch.optim.Optimizer")
                return DistributedOptimizer(opt, model=model, compressor=compressor,
                                            topology=topology, **options)
            return make
        raise TypeError("@distrib.distributed decorates an optimizer class or a function")

    return wrap


def _accepts(fn, name):
    import inspect
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
