"""Quantization-aware training: symmetric fake quantization of weights and activations.

``fake_quantize(x, bits)`` rounds ``x`` to the symmetric integer grid ``[-q, q]``
(``q = 2**(bits-1) - 1``, scale ``max|x| / q``, zero point 0) and back, with torch's
``fake_quantize_per_{tensor,channel}_affine``: the forward pass sees exactly
``dequantize(quantize(x))`` and the backward pass is the straight-through estimator (gradient 1
inside the range, 0 where a value was clipped).

``prepare_qat(model, bits)`` turns every Linear/Conv layer, in place, into its QAT version that
fake-quantizes its weight (per output channel by default) and its input activation (per tensor,
with a running maximum: :class:`FakeQuant`). The layers keep the *same* Parameter objects, so an
optimizer built before keeps working; the model trains in float and learns weights that survive
rounding to ``bits`` bits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _qmax(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer from 2 to 16, got {bits!r}")
    return 2 ** (bits - 1) - 1


def symmetric_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """The scale that maps ``amax`` onto the largest integer level (never 0)."""
    return (amax.detach().float() / _qmax(bits)).clamp_min(torch.finfo(torch.float32).tiny)


def fake_quantize(x: torch.Tensor, bits: int = 8, per_channel: bool = False, axis: int = 0,
                  amax: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` on the symmetric ``bits``-bit grid, straight-through gradient.

    The range is ``max|x|`` (per tensor, or per slice along ``axis``) unless ``amax`` is given.
    """
    q = _qmax(bits)
    xf = x if x.dtype == torch.float32 else x.float()  # the kernels compute in float32
    if per_channel:
        if x.dim() == 0:
            raise ValueError("per-channel fake quantization needs a tensor with dimensions")
        axis = axis % x.dim()
        if amax is None:
            dims = [d for d in range(x.dim()) if d != axis]
            amax = xf.detach().abs().amax(dim=dims) if dims else xf.detach().abs()
        scale = symmetric_scale(amax, bits)
        zero = torch.zeros(scale.shape, dtype=torch.int32, device=x.device)
        out = torch.fake_quantize_per_channel_affine(xf, scale, zero, axis, -q, q)
    else:
        if amax is None:
            amax = xf.detach().abs().max() if xf.numel() else torch.zeros(())
        scale = symmetric_scale(amax, bits).reshape(1).to(x.device)
        zero = torch.zeros(1, dtype=torch.int32, device=x.device)
        out = torch.fake_quantize_per_tensor_affine(xf, scale, zero, -q, q)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class FakeQuant(nn.Module):
    """Per-tensor symmetric fake quantization of activations.

    In training the range is a running maximum of ``|x|`` (exponential average with
    ``momentum``; the first batch sets it); in eval the stored range is used as is, as a
    deployed integer model would.
    """

    def __init__(self, bits: int = 8, momentum: float = 0.1):
        super().__init__()
        _qmax(bits)
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        self.bits, self.momentum = bits, momentum
        self.register_buffer("amax", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                cur = x.detach().abs().max().float() if x.numel() else torch.zeros(())
                cur = cur.to(self.amax.device)
                if bool(self.observed):
                    self.amax.lerp_(cur, self.momentum)
                else:
                    self.amax.copy_(cur)
                    self.observed.fill_(True)
        return fake_quantize(x, self.bits, amax=self.amax if bool(self.observed) else None)

    def extra_repr(self):
        return f"bits={self.bits}, momentum={self.momentum}"


class _QATMixin:
    """Shared by the QAT layers: fake-quantized weight and input."""

    def _setup_qat(self, bits, per_channel, activations):
        self.bits, self.per_channel = bits, per_channel
        self.input_quant = FakeQuant(bits) if activations else None

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: ``dequantize(quantize(weight))``."""
        return fake_quantize(self.weight, self.bits, per_channel=self.per_channel, axis=0)

    def _input(self, x):
        return self.input_quant(x) if self.input_quant is not None else x


class QATLinear(_QATMixin, nn.Linear):
    def forward(self, x):
        return F.linear(self._input(x), self.quantized_weight(), self.bias)


class QATConv1d(_QATMixin, nn.Conv1d):
    def forward(self, x):
        return self._conv_forward(self._input(x), self.quantized_weight(), self.bias)


class QATConv2d(_QATMixin, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self._input(x), self.quantized_weight(), self.bias)


class QATConv3d(_QATMixin, nn.Conv3d):
    def forward(self, x):
        return self._conv_forward(self._input(x), self.quantized_weight(), self.bias)


QAT_CLASSES = {nn.Linear: QATLinear, nn.Conv1d: QATConv1d, nn.Conv2d: QATConv2d,
               nn.Conv3d: QATConv3d}


def to_qat(module: nn.Module, bits: int = 8, per_channel: bool = True,
           activations: bool = True) -> nn.Module:
    """Turn one Linear/Conv layer into its QAT version, in place, and return it.

    The class is swapped on the object itself (as ``torch.nn.utils.parametrize`` does), so the
    parameters, buffers and hooks stay the very same objects.
    """
    cls = QAT_CLASSES.get(type(module))
    if cls is None:
        raise TypeError(f"no QAT version of {type(module).__name__}; supported: "
                        f"{', '.join(c.__name__ for c in QAT_CLASSES)}")
    module.__class__ = cls
    module._setup_qat(bits, per_channel, activations)
    if module.input_quant is not None:
        module.input_quant.to(module.weight.device)
    return module


def prepare_qat(model: nn.Module, bits: int = 8, per_channel: bool = True,
                activations: bool = True) -> nn.Module:
    """Make every Linear/Conv layer of ``model`` (the model itself included) a QAT layer, in
    place; returns ``model``. Layers already prepared are left as they are."""
    _qmax(bits)
    layers = [m for m in model.modules() if type(m) in QAT_CLASSES]
    if not layers and not any(isinstance(m, _QATMixin) for m in model.modules()):
        raise ValueError(f"no Linear/Conv layer to quantize in {type(model).__name__}")
    for m in layers:
        to_qat(m, bits, per_channel, activations)
    return model
