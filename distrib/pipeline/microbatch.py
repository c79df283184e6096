"""Micro-batches: split a batch (a tensor or a tuple of tensors) along dimension 0 and join outputs.

Between stages a value is either one tensor or a tuple of tensors; ``flatten`` turns it into a
list plus a flag, ``unflatten`` back, so the link code only ever sees lists of tensors.
"""
from __future__ import annotations

import torch


def flatten(value, what: str = "a stage's input/output"):
    """``(tensors, is_tuple)`` for a tensor or a tuple/list of tensors."""
    if isinstance(value, torch.Tensor):
        return [value], False
    if isinstance(value, (tuple, list)) and value and all(isinstance(t, torch.Tensor)
                                                          for t in value):
        return list(value), True
    raise TypeError(f"{what} must be a tensor or a non-empty tuple of tensors, "
                    f"got {type(value).__name__}")


def unflatten(tensors, is_tuple: bool):
    return tuple(tensors) if is_tuple else tensors[0]


def batch_size(value, what: str = "the batch") -> int:
    """Length of dimension 0, which every tensor of the batch must share."""
    tensors, _ = flatten(value, what)
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    if None in sizes:
        raise ValueError(f"{what} has a 0-dimensional tensor; tensors need a batch dimension")
    if len(sizes) != 1:
        raise ValueError(f"the tensors of {what} have different batch sizes {sorted(sizes)}")
    return sizes.pop()


def split_sizes(n: int, chunks: int) -> list:
    """Sizes of the micro-batches of a batch of ``n``: ``min(chunks, n)`` of them, as even as can
    be (7 samples, 3 chunks: [3, 2, 2]; 2 samples, 4 chunks: [1, 1])."""
    if n < 1:
        raise ValueError("cannot split an empty batch into micro-batches")
    m = min(chunks, n)
    return [n // m + (1 if i < n % m else 0) for i in range(m)]


def split(value, sizes) -> list:
    """The micro-batches of ``value`` (same structure as ``value``), of the given ``sizes``."""
    tensors, is_tuple = flatten(value)
    parts = [torch.split(t, list(sizes)) for t in tensors]
    return [unflatten([p[i] for p in parts], is_tuple) for i in range(len(sizes))]


def join(outputs: list):
    """Concatenate micro-batch outputs back into one batch (tensor or tuple of tensors)."""
    flat = [flatten(o, "a stage's output") for o in outputs]
    is_tuple = flat[0][1]
    columns = zip(*(ts for ts, _ in flat))
    return unflatten([torch.cat(col) for col in columns], is_tuple)
