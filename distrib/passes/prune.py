"""Magnitude pruning, built on ``torch.nn.utils.prune``.

``prune_model(model, amount)`` zeroes the ``amount`` fraction of smallest-magnitude weights of
every Linear/Conv layer, either over all of them together (``scope="global"``, one threshold for
the whole model) or layer by layer (``scope="layer"``), with L1 unstructured pruning. torch's
reparametrisation keeps the dense ``weight_orig`` parameter (the same Parameter object, so an
optimizer built before pruning still holds it) and a ``weight_mask`` buffer; the forward pass
uses ``weight_orig * weight_mask``, so gradients of pruned entries are exactly zero.

:class:`Pruner` adds a schedule: every ``every`` steps it recomputes the masks from the current
magnitudes of the dense weights (a pruned weight may come back if it outgrows a kept one), always
at exactly ``amount`` sparsity. ``make_permanent(model)`` folds the masks into plain ``weight``
parameters (``prune.remove``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SCOPES = ("global", "layer")


def prunable(model: nn.Module, name: str = "weight") -> list:
    """``(module, name)`` for every Linear/Conv layer of ``model``, in module order."""
    return [(m, name) for m in model.modules() if isinstance(m, PRUNABLE)]


def _check(amount, scope):
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount <= 1:
        raise ValueError(f"amount must be a fraction in [0, 1], got {amount!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def prune_model(model: nn.Module, amount: float, scope: str = "global", parameters=None):
    """L1-unstructured pruning of ``amount`` (a fraction) of ``parameters`` (default: every
    Linear/Conv weight). On layers pruned before, the new masks are combined with the old ones
    (torch's semantics: ``amount`` of the remaining weights). Returns ``model``."""
    _check(amount, scope)
    params = list(parameters) if parameters is not None else prunable(model)
    if not params:
        raise ValueError(f"nothing to prune: {type(model).__name__} has no Linear/Conv layers")
    if scope == "global":
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for module, name in params:
            prune.l1_unstructured(module, name, amount=amount)
    return model


def is_pruned(module: nn.Module, name: str = "weight") -> bool:
    return hasattr(module, name + "_mask") and hasattr(module, name + "_orig")


def sparsity(model: nn.Module, parameters=None) -> float:
    """Fraction of zero entries in ``parameters`` (default: every Linear/Conv weight)."""
    params = list(parameters) if parameters is not None else prunable(model)
    zeros = total = 0
    for module, name in params:
        w = getattr(module, name)
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning mask into its weight (zeros stay), removing the reparametrisation."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model


class Pruner:
    """Prune ``model`` to ``amount`` sparsity now; ``step()`` once per optimizer step refreshes
    the masks every ``every`` steps (``every=None``: prune once)."""

    def __init__(self, model: nn.Module, amount: float, every: int | None = None,
                 scope: str = "global", parameters=None):
        _check(amount, scope)
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                                  or every < 1):
            raise ValueError(f"every must be a positive number of steps or None, got {every!r}")
        self.model, self.amount, self.every, self.scope = model, float(amount), every, scope
        self.params = list(parameters) if parameters is not None else prunable(model)
        self.steps = 0
        if all(is_pruned(m, n) for m, n in self.params):
            self.refresh()  # already reparametrised: just set the masks
        else:
            prune_model(model, amount, scope, self.params)

    def step(self) -> bool:
        """Count a training step; returns whether the masks were refreshed."""
        self.steps += 1
        if self.every is not None and self.steps % self.every == 0:
            self.refresh()
            return True
        return False

    @torch.no_grad()
    def refresh(self) -> None:
        """New masks at exactly ``amount`` sparsity from the magnitudes of the dense weights."""
        method = prune.L1Unstructured(self.amount)
        dense = [getattr(m, n + "_orig") for m, n in self.params]
        if self.scope == "global":
            flat = torch.cat([w.detach().reshape(-1) for w in dense])
            masks = method.compute_mask(flat, torch.ones_like(flat)).split(
                [w.numel() for w in dense])
        else:
            masks = [method.compute_mask(w.detach(), torch.ones_like(w)) for w in dense]
        for (module, name), w, mask in zip(self.params, dense, masks):
            getattr(module, name + "_mask").copy_(mask.view_as(w))
            setattr(module, name, w * getattr(module, name + "_mask"))

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
