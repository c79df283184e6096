"""Knowledge distillation (Hinton, Vinyals & Dean, 2015).

``distill_loss(student_logits, teacher_logits, targets, temperature, alpha)`` is

    alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE(student, targets)

with the class dimension at 1 (as ``cross_entropy``) and the KL averaged over the other
positions (``batchmean`` for ``(N, C)`` logits). The T² keeps the soft term's gradients on the
same scale as the hard term's whatever the temperature. The teacher's logits are detached.

:class:`Distiller` holds a frozen teacher; ``load_teacher`` builds one from a config string.
"""
from __future__ import annotations

import copy
import importlib
import os

import torch
import torch.nn.functional as F
from torch import nn


def _check(temperature, alpha):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


def soft_loss(student_logits, teacher_logits, temperature: float = 4.0) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over samples."""
    _check(temperature, 0.0)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if student_logits.dim() < 2:
        raise ValueError("logits need a batch and a class dimension, (N, C, ...)")
    t = float(temperature)
    log_s = F.log_softmax(student_logits / t, dim=1)
    log_t = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=1)
    return kl.mean() * (t * t)


def distill_loss(student_logits, teacher_logits, targets=None, temperature: float = 4.0,
                 alpha: float = 0.9) -> torch.Tensor:
    """Hinton's distillation loss (see the module docstring); ``targets`` may be None only
    when ``alpha == 1``."""
    _check(temperature, alpha)
    loss = alpha * soft_loss(student_logits, teacher_logits, temperature)
    if alpha < 1:
        if targets is None:
            raise ValueError("targets are needed when alpha < 1 (the hard-label term)")
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits, targets)
    return loss


class Distiller:
    """A frozen teacher and the loss settings: ``loss(student_logits, inputs, targets)`` runs
    the teacher on ``inputs`` (no gradients, eval mode) and returns :func:`distill_loss`.

    It is a plain object, not an ``nn.Module``: attached to a student it does not add the
    teacher's parameters to the student's (or its optimizer's).
    """

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9):
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        _check(temperature, alpha)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha = float(temperature), float(alpha)

    @torch.no_grad()
    def teacher_logits(self, inputs):
        self.teacher.eval()
        return self.teacher(inputs)

    def loss(self, student_logits, inputs, targets=None):
        return distill_loss(student_logits, self.teacher_logits(inputs), targets,
                            self.temperature, self.alpha)


def load_teacher(spec: str, student: nn.Module | None = None) -> nn.Module:
    """The teacher a config names: a file of weights for the student's architecture (a
    ``state_dict`` saved with ``torch.save`` or a distrib checkpoint; loaded into a copy of
    ``student``), or ``"package.module:function"`` returning an ``nn.Module``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"teacher must be a file path or 'module:function', got {spec!r}")
    if os.path.exists(spec):
        if student is None:
            raise ValueError(f"teacher weights {spec!r} need the student model to copy the "
                             f"architecture from")
        from .. import checkpoint
        teacher = copy.deepcopy(student)
        teacher.load_state_dict(checkpoint.load_model_state(spec))
        return teacher
    if ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import teacher factory {spec!r}: {e}") from e
        teacher = fn()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher factory {spec!r} returned {type(teacher).__name__}, "
                            f"not an nn.Module")
        return teacher
    raise ValueError(f"teacher {spec!r} is neither an existing file nor 'module:function'")
