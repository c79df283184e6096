"""Reduce operators: element-wise, out of place, in the tensor's own dtype (as NCCL and gloo do)."""
import torch

OPS = ("sum", "mean", "min", "max")


def check_op(op: str) -> str:
    if op not in OPS:
        raise ValueError(f"unknown reduce op {op!r}; choose one of {OPS}")
    return op


def combine(op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A fresh tensor ``a (op) b``; ``mean`` sums here and divides once at the end."""
    if op in ("sum", "mean"):
        return torch.add(a, b)
    if op == "min":
        return torch.minimum(a, b)
    return torch.maximum(a, b)


def finish(op: str, t: torch.Tensor, n: int) -> torch.Tensor:
    """Apply the final step of ``op`` to a fully reduced tensor (the mean's division)."""
    if op != "mean" or n == 1:
        return t
    if t.is_floating_point():
        return t / n
    # Integer mean rounds toward minus infinity (Python's //), keeping the dtype.
    return torch.div(t, n, rounding_mode="floor")
