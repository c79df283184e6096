"""``torch.compile`` with a clean fallback.

``compile_model(model, mode)`` compiles the model's ``forward`` in place (its class, parameters,
hooks and state-dict keys stay as they are, unlike the ``_orig_mod.`` wrapper ``torch.compile``
returns). Compilation happens lazily, on the first call; if it fails (no C++ compiler, an
unsupported Python, a backend error) the model falls back to eager execution with one warning,
or, with ``fallback=False``, raises :class:`CompileError` saying why. Errors of the model itself
are not hidden: they are raised as the eager forward raises them.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import DistribError

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompileError(DistribError):
    """``torch.compile`` could not compile the model (and no fallback was allowed)."""


def _compile_errors():
    kinds = []
    try:
        from torch._dynamo.exc import TorchDynamoException
        kinds.append(TorchDynamoException)
    except ImportError:
        pass
    try:
        from torch._inductor.exc import InductorError
        kinds.append(InductorError)
    except ImportError:
        pass
    return tuple(kinds)


class _CompiledForward:
    """The compiled forward; on a compilation failure, the eager one (see the module doc)."""

    def __init__(self, eager, mode, fallback, **options):
        self.eager, self.fallback, self.error = eager, fallback, None
        self.compiled = torch.compile(eager, mode=None if mode == "default" else mode, **options)

    def __call__(self, *args, **kwargs):
        if self.error is None:
            try:
                return self.compiled(*args, **kwargs)
            except _compile_errors() as e:
                # An error of the model itself fails eagerly too, and is raised from here.
                out = self.eager(*args, **kwargs)
                if not self.fallback:
                    raise CompileError(f"torch.compile failed ({_describe(e)}); the eager model "
                                       f"works, so pass fallback=True to run it uncompiled") \
                        from e
                self.error = e
                warnings.warn(f"torch.compile failed, running the model eagerly: "
                              f"{_describe(e)}", RuntimeWarning, stacklevel=3)
                return out
        return self.eager(*args, **kwargs)


def _describe(e) -> str:
    """One line: the error, and the backend's own error inside it (where the reason is)."""
    inner = getattr(e, "inner_exception", None) or e.__cause__
    text = f"{type(e).__name__}"
    if inner is not None and inner is not e:
        e, text = inner, f"{text} from {type(inner).__name__}"
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{text}: {lines[0] if lines else 'no message'}"


def compile_model(model: nn.Module, mode: str = "default", fallback: bool = True,
                  **options) -> nn.Module:
    """Compile ``model.forward`` in place with ``torch.compile(mode=mode, **options)`` (for
    example ``backend="aot_eager"``); returns ``model``. See the module docstring."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_model takes an nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if is_compiled(model):
        return model
    eager = model.forward
    try:
        model.forward = _CompiledForward(eager, mode, fallback, **options)
    except Exception as e:  # torch.compile itself refused (e.g. an unsupported Python)
        if not fallback:
            raise CompileError(f"torch.compile is not available: {e}") from e
        warnings.warn(f"torch.compile is not available, running the model eagerly: {e}",
                      RuntimeWarning, stacklevel=2)
    return model


def is_compiled(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("forward"), _CompiledForward)


def compile_failed(model: nn.Module):
    """The exception that made ``model`` fall back to eager, or None."""
    fwd = model.__dict__.get("forward")
    return fwd.error if isinstance(fwd, _CompiledForward) else None


def uncompile(model: nn.Module) -> nn.Module:
    """Undo :func:`compile_model` (e.g. before ``copy.deepcopy`` or pickling the model)."""
    if is_compiled(model):
        del model.forward
    return model
