"""Dynamic loss scaling for mixed-precision training, agreed across ranks.

:class:`LossScaler` follows ``torch.amp.GradScaler`` step for step (the same torch kernels unscale
the gradients and update the scale), so a job of one produces GradScaler's exact scale sequence.
What it adds is agreement: the "found inf/nan" flag is all-reduced with ``op="max"`` before anyone
acts on it, so an overflow on one rank makes every rank skip the same step and keep the same scale.

With a :class:`distrib.DistributedOptimizer` it follows Horovod's pattern: finish the gradient
all-reduce (``optimizer.synchronize()``), unscale the averaged gradients, check and agree, then
run the optimizer's step inside ``optimizer.skip_synchronize()`` (or skip it)::

    scaler = distrib.amp.LossScaler()
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)            # optional: clip or inspect the true gradients here
        scaler.step(opt)
        scaler.update()

The scaler registers itself in ``optimizer.loss_scalers`` on first use, which is how
:func:`distrib.checkpoint.save` finds its state.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from collections import defaultdict

import torch

from . import api

_READY, _UNSCALED, _STEPPED = "ready", "unscaled", "stepped"


# Scalers built but not yet attached to an optimizer, oldest first: a resumed run builds its
# scaler before ``distrib.checkpoint.load`` and the scaler registers with the optimizer only at
# its first step, so ``load`` restores the saved states into these (see ``unattached()``).
_unattached = []


def unattached() -> list:
    """Live loss scalers not attached to any optimizer yet, in creation order."""
    _unattached[:] = [r for r in _unattached if r() is not None]
    return [r() for r in _unattached]


class LossScaler:
    """Multiply the loss by a scale, unscale the gradients, skip steps whose gradients overflow.

    The scale is multiplied by ``backoff_factor`` after a step with inf/nan gradients (on any
    rank) and by ``growth_factor`` after ``growth_interval`` clean steps in a row. With
    ``enabled=False`` it is a no-op: ``step`` just calls ``optimizer.step()``.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True):
        if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale)
                and init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor!r}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) \
                or growth_interval < 1:
            raise ValueError(f"growth_interval must be an integer >= 1, got {growth_interval!r}")
        self._enabled = bool(enabled)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        # Kept on the host: the overflow decision needs a host round trip (the all-reduce) anyway.
        self._scale = torch.full((), float(init_scale), dtype=torch.float32)
        self._growth_tracker = torch.zeros((), dtype=torch.int32)
        self._scale_on = {}  # device -> copy of the scale, refreshed after every update
        self._per_optimizer = defaultdict(lambda: {"stage": _READY, "found_inf": None})
        _unattached.append(weakref.ref(self))

    # -- the training-loop API ---------------------------------------------------------------
    def scale(self, outputs):
        """``outputs`` (a tensor, or a list/tuple/iterable of tensors) times the current scale."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, torch.Tensor):
            return outputs * self._scale_for(outputs.device)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        if hasattr(outputs, "__iter__"):
            return map(self.scale, outputs)
        raise TypeError(f"scale() takes a tensor or an iterable of tensors, "
                        f"not {type(outputs).__name__}")

    def unscale_(self, optimizer) -> None:
        """Divide the optimizer's gradients by the scale, in place, and find out (agreed over all
        ranks) whether any of them is inf/nan. For a DistributedOptimizer the gradient all-reduce
        is finished first, so these are the averaged gradients. At most once per step."""
        if not self._enabled:
            return
        self.attach(optimizer)
        state = self._per_optimizer[id(optimizer)]
        if state["stage"] == _UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the "
                               "last update()")
        if state["stage"] == _STEPPED:
            raise RuntimeError("unscale_() is being called after step(); call update() first")
        if hasattr(optimizer, "synchronize"):
            optimizer.synchronize()
        # GradScaler takes the reciprocal in float64 (float32 division may be imprecise).
        inv_scale = self._scale.double().reciprocal().float()
        local = torch.zeros(1, dtype=torch.float32)
        for device, grads_by_dtype in _grads_by_device_and_dtype(optimizer).items():
            found = torch.zeros((), dtype=torch.float32, device=device)
            inv = inv_scale.to(device)
            for grads in grads_by_dtype.values():
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
            local += found.cpu()
        # Ranks must agree before they diverge: one rank's overflow skips the step everywhere.
        state["found_inf"] = api.allreduce(local, op="max").reshape(())
        state["stage"] = _UNSCALED

    def step(self, optimizer, *args, **kwargs):
        """Unscale (unless :meth:`unscale_` already did), then run ``optimizer.step()`` unless
        some rank found inf/nan gradients. Returns what ``optimizer.step()`` returned, or None
        when the step was skipped."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("LossScaler.step() does not support closures")
        self.attach(optimizer)
        state = self._per_optimizer[id(optimizer)]
        if state["stage"] == _STEPPED:
            raise RuntimeError("step() has already been called since the last update()")
        if state["stage"] == _READY:
            self.unscale_(optimizer)
        result = None
        if state["found_inf"].item() == 0:
            # The gradients are already averaged: don't let the optimizer all-reduce them again.
            guard = optimizer.skip_synchronize() if hasattr(optimizer, "skip_synchronize") \
                else contextlib.nullcontext()
            with guard:
                result = optimizer.step(*args, **kwargs)
        state["stage"] = _STEPPED
        return result

    def update(self, new_scale=None) -> None:
        """End of the iteration: back off after an overflow, grow after ``growth_interval``
        clean steps (or set ``new_scale`` explicitly)."""
        if not self._enabled:
            return
        if new_scale is not None:
            if isinstance(new_scale, torch.Tensor):
                if new_scale.numel() != 1 or new_scale.requires_grad:
                    raise ValueError("new_scale must be a float or a one-element tensor without "
                                     "requires_grad")
                new_scale = new_scale.item()
            if not (math.isfinite(float(new_scale)) and float(new_scale) > 0):
                raise ValueError(f"new_scale must be a finite number > 0, got {new_scale!r}")
            self._scale.fill_(float(new_scale))
        else:
            found = [s["found_inf"] for s in self._per_optimizer.values()
                     if s["found_inf"] is not None]
            if not found:
                raise RuntimeError("update() found no inf checks for this iteration: call "
                                   "step(optimizer) (or unscale_) before update()")
            combined = torch.stack(found).sum()
            torch._amp_update_scale_(self._scale, self._growth_tracker, combined,
                                     self._growth_factor, self._backoff_factor,
                                     self._growth_interval)
        self._scale_on.clear()
        self._per_optimizer.clear()

    # -- inspection and state ----------------------------------------------------------------
    def get_scale(self) -> float:
        """The current scale as a Python float (1.0 when disabled)."""
        return float(self._scale.item()) if self._enabled else 1.0

    def is_enabled(self) -> bool:
        return self._enabled

    def found_inf(self, optimizer) -> bool:
        """Whether the current iteration overflowed on some rank (after unscale_/step)."""
        f = self._per_optimizer.get(id(optimizer), {}).get("found_inf")
        if f is None:
            raise RuntimeError("no inf check yet for this optimizer in this iteration")
        return bool(f.item())

    def state_dict(self) -> dict:
        """GradScaler's state dict layout, so either can load the other's state."""
        if not self._enabled:
            return {}
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": int(self._growth_tracker.item())}

    def load_state_dict(self, state: dict) -> None:
        if not self._enabled:
            raise RuntimeError("load_state_dict() on a disabled LossScaler")
        if not isinstance(state, dict) or "scale" not in state:
            raise ValueError("not a loss scaler state dict (expected a dict with a 'scale' key)")
        self._scale.fill_(float(state["scale"]))
        self._growth_factor = float(state.get("growth_factor", self._growth_factor))
        self._backoff_factor = float(state.get("backoff_factor", self._backoff_factor))
        self._growth_interval = int(state.get("growth_interval", self._growth_interval))
        self._growth_tracker.fill_(int(state.get("_growth_tracker", 0)))
        self._scale_on.clear()

    def attach(self, optimizer) -> "LossScaler":
        """Register in ``optimizer.loss_scalers`` (created on a plain torch optimizer), so that
        checkpoints of the optimizer carry this scaler. ``step``/``unscale_`` do it themselves;
        call it yourself before :func:`distrib.checkpoint.load` to restore a resumed scaler."""
        scalers = getattr(optimizer, "loss_scalers", None)
        if scalers is None:
            try:
                optimizer.loss_scalers = scalers = []
            except AttributeError:  # an object that takes no new attributes: nothing to record
                return self
        if not any(s is self for s in scalers):
            scalers.append(self)
        _unattached[:] = [r for r in _unattached if r() is not None and r() is not self]
        return self

    def _scale_for(self, device) -> torch.Tensor:
        if device.type == "cpu":
            return self._scale
        if device not in self._scale_on:
            self._scale_on[device] = self._scale.to(device)
        return self._scale_on[device]


def _grads_by_device_and_dtype(optimizer):
    """The optimizer's gradients grouped for the fused unscale kernel (as GradScaler does)."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        raise TypeError(f"{type(optimizer).__name__} has no param_groups; LossScaler needs a "
                        "torch.optim.Optimizer or a DistributedOptimizer")
    out = defaultdict(lambda: defaultdict(list))
    with torch.no_grad():
        for group in groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.dtype == torch.float16:
                    raise ValueError("the gradients are float16: unscaling them in place loses "
                                     "precision; keep float32 parameters (torch.autocast) as "
                                     "torch.amp.GradScaler requires")
                if g.is_sparse:
                    g = g._values()
                out[g.device][g.dtype].append(g)
    return out
