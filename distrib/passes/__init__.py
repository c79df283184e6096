"""Model passes: magnitude pruning, quantization-aware training, knowledge distillation and
``torch.compile``. Each is usable alone (see its module); :func:`apply_passes` switches them
from a config's ``[passes]`` table::

    [passes.prune]            # amount: target sparsity; every: refresh the masks every N steps
    amount = 0.5
    every = 100
    [passes.qat]
    bits = 8
    [passes.distill]          # teacher: a weights file for the student's architecture,
    teacher = "teacher.pt"    # or "package.module:function" returning the teacher
    temperature = 4.0
    alpha = 0.9
    [passes.compile]
    mode = "default"

A sub-table switches its pass on unless it says ``enabled = false``. Apply the passes before
building the optimizer (pruning renames ``weight`` to ``weight_orig``). The training loop then
uses what the passes attach to the model::

    model = apply_passes(model, cfg)
    opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    for x, y in data:
        out = model(x)
        loss = model.distiller.loss(out, x, y) if hasattr(model, "distiller") else ce(out, y)
        opt.zero_grad(); loss.backward(); opt.step()
        if hasattr(model, "pruner"):
            model.pruner.step()
"""
from __future__ import annotations

from .compile import CompileError, compile_model, uncompile
from .distill import Distiller, distill_loss, load_teacher, soft_loss
from .prune import Pruner, make_permanent, prune_model, sparsity
from .qat import FakeQuant, fake_quantize, prepare_qat

# Values for the keys a [passes.*] table leaves out.
DEFAULTS = {
    "prune": {"amount": 0.5, "every": None},
    "qat": {"bits": 8},
    "distill": {"temperature": 4.0, "alpha": 0.9},
    "compile": {"mode": "default"},
}


def apply_passes(model, passes_cfg=None):
    """Apply the passes ``passes_cfg`` switches on (a ``[passes]`` table, or a whole config
    with one) to ``model`` and return it. Order: the distillation teacher is copied from the
    untouched model first, then QAT, pruning, and compilation last. Attaches
    ``model.distiller`` (:class:`Distiller`) and ``model.pruner`` (:class:`Pruner`) when
    those passes are on."""
    from ..config import ConfigError, validate

    cfg = passes_cfg or {}
    if not isinstance(cfg, dict):
        raise TypeError(f"passes_cfg must be a dict (a [passes] table or a config), "
                        f"got {type(cfg).__name__}")
    if "passes" in cfg:
        cfg = cfg["passes"]
    cfg = validate({"passes": cfg}, source="passes").get("passes", {})
    on = {name: {**DEFAULTS[name], **table} for name, table in cfg.items()
          if table.get("enabled", True)}

    if "distill" in on:
        d = on["distill"]
        if "teacher" not in d:
            raise ConfigError("passes: [passes.distill] needs a teacher (a weights file for the "
                              "student's architecture, or 'package.module:function')")
        teacher = load_teacher(d["teacher"], student=model)
        model.distiller = Distiller(teacher, d["temperature"], d["alpha"])
    if "qat" in on:
        model = prepare_qat(model, on["qat"]["bits"])
    if "prune" in on:
        model.pruner = Pruner(model, on["prune"]["amount"], on["prune"]["every"])
    if "compile" in on:
        model = compile_model(model, on["compile"]["mode"])
    return model


__all__ = ["apply_passes", "DEFAULTS", "Pruner", "prune_model", "make_permanent", "sparsity",
           "prepare_qat", "fake_quantize", "FakeQuant", "distill_loss", "soft_loss", "Distiller",
           "load_teacher", "compile_model", "uncompile", "CompileError"]
