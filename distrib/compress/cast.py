"""FP16 / BF16: cast to a 16-bit float for the wire (half the bytes of float32), and back.

Both are linear (payloads are summed by the all-reduce, in 16-bit). float16 keeps more mantissa
but overflows past 65504; bfloat16 has float32's range with an 8-bit mantissa.
"""
from __future__ import annotations

import torch

from .base import Compressor


class _Cast(Compressor):
    linear = True
    wire_dtype = None

    def _compress(self, flat, key, payload):
        return [flat.to(self.wire_dtype)]

    def _decompress(self, payload):
        return payload.tensors[0].to(torch.float32)


class FP16(_Cast):
    """float16 on the wire."""

    name = "fp16"
    wire_dtype = torch.float16


class BF16(_Cast):
    """bfloat16 on the wire."""

    name = "bf16"
    wire_dtype = torch.bfloat16
