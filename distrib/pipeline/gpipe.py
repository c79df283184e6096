"""GPipe: an ``nn.Sequential`` cut into stages, one stage per worker, fed micro-batches.

Every worker builds the same model and wraps it::

    pipe = distrib.pipeline.GPipe(model, balance=[2, 2, 1], chunks=4)   # 3 stages
    opt = torch.optim.SGD(pipe.stage.parameters(), lr=0.1)
    loss = pipe.train_step(x, y, F.cross_entropy)  # x needed on stage 0, y on the last
    opt.step(); opt.zero_grad()

Worker ``replica * stages + stage`` keeps the ``balance[stage]`` layers of its stage (from layer
``sum(balance[:stage])`` on) and drops the rest. ``train_step`` splits the batch into
micro-batches, runs the schedule's tasks in order (:mod:`.schedule`: GPipe or 1F1B), sending
activations down and their gradients up (:mod:`.link`), and leaves in each stage's ``.grad`` the gradient of ``loss_fn(model(x), y)``:
each micro-batch's loss is weighted by its share of the batch, so ``loss_fn`` must average over
samples (torch's losses do by default). Like ``loss.backward()``, gradients accumulate.

With more workers than stages the pipeline is replicated (:mod:`.replicas`): each replica trains
on its own batch and each stage's gradients are averaged over the replicas.

A stage that fails (an exception in its layers, its loss, a bad input) tells every rank of its
pipeline and of its replica group before re-raising, so they raise ``distrib.PeerFailed`` with
the error's text instead of waiting for messages that will never come.
"""
from __future__ import annotations

import contextlib
import time
from collections import OrderedDict

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..errors import DistribError, PeerFailed
from . import schedule as _schedule
from .link import Link
from .memory import ActivationMeter
from .microbatch import batch_size, flatten, join, split, split_sizes, unflatten
from .replicas import average_gradients

CHECKPOINT_MODES = ("always", "except_last", "never")


class GPipe(nn.Module):
    """Pipeline-parallel wrapper of an ``nn.Sequential`` (see the module docstring).

    Arguments: ``balance`` (layers per stage, ``sum(balance) == len(module)``), ``chunks``
    (micro-batches per batch, at most; a smaller batch gets one per sample), ``checkpoint``
    ("always", "except_last" or "never": recompute a micro-batch's activations during its backward
    instead of keeping them), ``schedule`` ("gpipe" or "1f1b"), ``compressor`` (for the
    gradient average between replicas), ``timeout`` (seconds to wait for a neighbour, default the
    transport's), ``measure_memory`` (count activation bytes: ``peak_activation_bytes``),
    ``name`` (the communicators' name: pipelines that run at the same time need different ones).

    After ``train_step``: ``last_order`` (the tasks this stage ran), ``max_alive`` (most
    micro-batches whose activations it held at once), ``last_sizes`` (the micro-batch sizes) and
    ``last_timing`` (``wall_s``, ``busy_s`` spent computing, ``reduce_s`` averaging replicas).
    """

    def __init__(self, module: nn.Sequential, balance, chunks: int,
                 checkpoint: str = "except_last", schedule: str = "gpipe", *, compressor=None,
                 timeout: float | None = None, measure_memory: bool = False,
                 name: str = "pipeline"):
        super().__init__()
        balance = _check_args(module, balance, chunks, checkpoint, schedule)
        from .. import context
        world, rank = context.size(), context.rank()
        p = len(balance)
        if world % p:
            raise ValueError(f"{world} worker(s) cannot hold {p} pipeline stages: the world size "
                             f"must be a multiple of the number of stages (len(balance))")
        self.num_stages, self.replicas = p, world // p
        self.replica, self.stage_index = divmod(rank, p)
        self.chunks, self.checkpoint, self.schedule = chunks, checkpoint, schedule
        self.compressor = compressor

        start = sum(balance[:self.stage_index])
        layers = list(module._modules.items())[start:start + balance[self.stage_index]]
        self.stage = nn.Sequential(OrderedDict(layers))
        first_param = next(self.stage.parameters(), None)
        device = first_param.device if first_param is not None else torch.device("cpu")

        ranks = [self.replica * p + s for s in range(p)]
        self._comm = context.communicator(name, ranks) if p > 1 else None
        self._link = Link(self._comm, self.stage_index, device, timeout) if p > 1 else None
        dp_ranks = [r * p + self.stage_index for r in range(self.replicas)]
        self._dp_comm = (context.communicator(f"{name}-dp-{self.stage_index}", dp_ranks)
                         if self.replicas > 1 else None)
        self._meter = ActivationMeter(self.stage.parameters()) if measure_memory else None
        self._step = 0
        self._failed = None
        self.last_order, self.last_sizes, self.last_timing = [], [], {}
        self.max_alive = 0
        self.peak_activation_bytes = None

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    # -- public ------------------------------------------------------------------------------
    def train_step(self, x, y, loss_fn):
        """Forward and backward of every micro-batch of ``(x, y)``; the full batch's loss on the
        last stage (averaged over replicas), ``None`` on the others."""
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(output, y) -> scalar tensor")
        return self._guarded(self._train_step, x, y, loss_fn)

    def forward(self, x):
        """Inference: the model's output for ``x`` on the last stage, ``None`` on the others."""
        return self._guarded(self._infer, x)

    # -- failure -----------------------------------------------------------------------------
    def _guarded(self, fn, *args):
        if self._failed is not None:
            raise DistribError(f"this pipeline stopped after an error: {self._failed!r}")
        try:
            return fn(*args)
        except BaseException as exc:
            if self._comm is None and self._dp_comm is None:
                raise  # a job of one: nobody to tell, nothing left in a bad state
            self._failed = exc  # the abort below ends this pipeline's channels for good
            text = str(exc) if isinstance(exc, PeerFailed) else f"stage {self.stage_index}: {exc!r}"
            # A peer's failure was already announced to its whole group: tell only the others.
            heard_on = getattr(exc, "channel", None) if isinstance(exc, PeerFailed) else None
            for comm in (self._comm, self._dp_comm):
                if comm is not None and comm.channel != heard_on:
                    comm.abort("error", text)
            raise

    # -- the step ----------------------------------------------------------------------------
    def _plan(self, op: str, x) -> list:
        """The micro-batch sizes: decided by the first stage, passed down the pipeline."""
        self._step += 1
        if self.is_first:
            if x is None:
                raise ValueError("x (the batch) is needed on the first pipeline stage")
            sizes = split_sizes(batch_size(x, "x"), self.chunks)
        else:
            sizes = self._link.recv_plan(op, self._step)
        if not self.is_last:
            self._link.send_plan(op, self._step, sizes)
        return sizes

    def _train_step(self, x, y, loss_fn):
        t_start = time.perf_counter()
        sizes = self.last_sizes = self._plan("train", x)
        step = _Step(sizes, loss_fn)
        if self.is_first:
            step.xs = split(x, sizes)
        if self.is_last:
            if y is None:
                raise ValueError("y (the targets) is needed on the last pipeline stage")
            if batch_size(y, "y") != sum(sizes):
                raise ValueError(f"y has {batch_size(y, 'y')} samples but the batch has "
                                 f"{sum(sizes)}")
            step.ys = split(y, sizes)
        if self._meter is not None:
            self._meter.begin(exclude=(flatten(x)[0] if self.is_first else [])
                              + (flatten(y)[0] if self.is_last else []))
        self.last_order, self.max_alive = [], 0
        for kind, i in _schedule.order(self.schedule, len(sizes), self.num_stages,
                                       self.stage_index):
            (self._forward_task if kind == "F" else self._backward_task)(step, i)
            self.last_order.append((kind, i))
            self.max_alive = max(self.max_alive, len(step.stash))
        if self._meter is not None:
            self.peak_activation_bytes = self._meter.peak
        t_reduce = time.perf_counter()
        if self._dp_comm is not None:
            with _heard_on(self._dp_comm):
                average_gradients(self.stage.named_parameters(), self._dp_comm, self.compressor)
                if self.is_last:
                    step.total = self._dp_comm.allreduce(step.total, "mean")
        end = time.perf_counter()
        self.last_timing = {"wall_s": end - t_start, "busy_s": step.busy,
                            "reduce_s": end - t_reduce}
        return step.total if self.is_last else None

    def _forward_task(self, step, i: int) -> None:
        """F(i): receive (or take) the input, run the stage, send the output or take the loss,
        and stash what the backward needs."""
        if self.is_first:
            inp, in_flags = step.xs[i], []
        else:
            inp, in_flags = self._link.recv_activation(i, requires_grad=True)
        start = time.perf_counter()
        with self._meter.saving() if self._meter is not None else contextlib.nullcontext():
            out = self._run(inp, self._checkpoints(i, len(step.sizes)))
            if self.is_last:
                loss = step.loss_fn(out, step.ys[i])
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError("loss_fn must return a scalar tensor")
                # loss_fn averages over the micro-batch: weight it by its share of the batch.
                loss = loss.reshape(()) * (step.sizes[i] / sum(step.sizes))
        if self.is_last:
            outs, out_flags = [loss], [loss.requires_grad]
            step.total = loss.detach() if step.total is None else step.total + loss.detach()
        else:
            outs, _ = flatten(out, f"stage {self.stage_index}'s output")
            out_flags = self._link.send_activation(i, out)
        inputs = flatten(inp)[0] if in_flags else []
        step.stash[i] = (inputs, in_flags, outs, out_flags)
        if self._meter is not None:
            self._meter.hold(inputs + outs)
        step.busy += time.perf_counter() - start

    def _backward_task(self, step, i: int) -> None:
        """B(i): receive the output gradients (the last stage starts from its loss), run the
        backward, send the input gradients upstream and drop the micro-batch's activations."""
        inputs, in_flags, outs, out_flags = step.stash.pop(i)
        if self.is_last:
            grads = [None]  # d loss / d loss = 1
        elif any(out_flags):
            grads = self._link.recv_grads(i, len(outs))
        else:
            grads = [None] * len(outs)  # nothing downstream depended on this stage's output
        start = time.perf_counter()
        pairs = [(o, g) for o, g, f in zip(outs, grads, out_flags)
                 if f and (g is not None or self.is_last)]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if any(in_flags):
            self._link.send_grads(i, [t.grad if f else None for t, f in zip(inputs, in_flags)])
        if self._meter is not None:
            self._meter.release(inputs + outs)
        step.busy += time.perf_counter() - start

    def _infer(self, x):
        sizes = self.last_sizes = self._plan("infer", x)
        xs = split(x, sizes) if self.is_first else None
        outputs = []
        with torch.no_grad():
            for i in range(len(sizes)):
                inp = xs[i] if self.is_first else self._link.recv_activation(i, False)[0]
                out = self._run(inp, False)
                if self.is_last:
                    outputs.append(out)
                else:
                    self._link.send_activation(i, out)
        return join(outputs) if self.is_last else None

    def _checkpoints(self, i: int, m: int) -> bool:
        return self.checkpoint == "always" or (self.checkpoint == "except_last" and i < m - 1)

    def _run(self, inp, checkpointed: bool):
        tensors, is_tuple = flatten(inp, f"stage {self.stage_index}'s input")

        def fn(*ts):
            return self.stage(unflatten(list(ts), is_tuple))

        if checkpointed and torch.is_grad_enabled():
            return _checkpoint(fn, *tensors, use_reentrant=False)
        return fn(*tensors)


class _Step:
    """What one train_step carries between its tasks."""

    def __init__(self, sizes, loss_fn):
        self.sizes, self.loss_fn = sizes, loss_fn
        self.xs = self.ys = None  # micro-batches of x (first stage) and y (last stage)
        self.stash = {}           # micro-batch -> (inputs, their grad flags, outputs, flags)
        self.busy = 0.0           # seconds spent computing
        self.total = None         # the weighted sum of the micro-batch losses (last stage)


@contextlib.contextmanager
def _heard_on(comm):
    """Mark a PeerFailed raised inside with the channel it came in on."""
    try:
        yield
    except PeerFailed as exc:
        exc.channel = comm.channel
        raise


def _check_args(module, balance, chunks, checkpoint, schedule) -> list:
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"GPipe takes an nn.Sequential, not {type(module).__name__}")
    try:
        balance = list(balance)
    except TypeError:
        raise TypeError(f"balance must be a list of layer counts, not {balance!r}") from None
    if not balance or any(type(b) is not int or b < 1 for b in balance):
        raise ValueError(f"balance must be a non-empty list of positive ints, got {balance!r}")
    if sum(balance) != len(module):
        raise ValueError(f"sum(balance) = {sum(balance)} but the module has {len(module)} "
                         f"layers; balance {balance} must cover every layer exactly once")
    if type(chunks) is not int or chunks < 1:
        raise ValueError(f"chunks must be an int >= 1, got {chunks!r}")
    if checkpoint not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {checkpoint!r}")
    if schedule not in _schedule.SCHEDULES:
        raise ValueError(f"schedule must be one of {_schedule.SCHEDULES}, got {schedule!r}")
    return balance
