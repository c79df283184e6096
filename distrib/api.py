"""The module-level collectives: ``distrib.allreduce`` & co. over all workers.

Torch tensors in, new torch tensors out; inputs are not modified. CUDA tensors are staged
through pinned host memory and the result is returned on the input's device.
"""
from __future__ import annotations

import torch

from . import context


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
    host.copy_(t, non_blocking=True)
    if t.device.type == "cuda":
        torch.cuda.current_stream(t.device).synchronize()
    return host


def _back(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return result if like.device.type == "cpu" else result.to(like.device, non_blocking=False)


def allreduce(t: torch.Tensor, op: str = "sum", compressor=None, key: str | None = None):
    """Reduce ``t`` over all workers with ``op`` (sum, mean, min, max); same bits on every rank.

    With a ``compressor`` the tensor travels compressed (sum and mean only); ``key`` names the
    tensor for compressors that keep state per tensor (error feedback, PowerSGD's Q).
    """
    host = _to_host(t)
    comm = context.world()
    if compressor is None:
        return _back(comm.allreduce(host, op), t)
    from .compress import NoCompression
    if isinstance(compressor, NoCompression) and op in ("min", "max"):
        return _back(comm.allreduce(host, op), t)  # nothing to compress: the plain all-reduce
    if op not in ("sum", "mean"):
        raise ValueError(f"a compressed all-reduce supports op='sum' or 'mean', not {op!r}")
    if key is None:  # stateful compressors keep state per key: one per shape and dtype
        key = f"allreduce:{tuple(host.shape)}:{host.dtype}"
    return _back(compressor.reduce(host, comm, key=key, op=op), t)


def allgather(t: torch.Tensor) -> list:
    """Every worker's ``t`` in rank order (shapes may differ between ranks)."""
    return [_back(x, t) for x in context.world().allgather(_to_host(t))]


def broadcast(t: torch.Tensor, root: int = 0) -> torch.Tensor:
    """``root``'s ``t`` on every worker, as a new tensor."""
    return _back(context.world().broadcast(_to_host(t), root), t)


def barrier() -> None:
    """Returns once every worker has called it."""
    context.world().barrier()


def broadcast_parameters(module_or_state_dict, root: int = 0) -> None:
    """Overwrite, in place, every tensor of a module (parameters and buffers) or state dict with
    ``root``'s values. Tensors of one dtype are fused into one broadcast."""
    if isinstance(module_or_state_dict, torch.nn.Module):
        tensors = list(module_or_state_dict.state_dict(keep_vars=True).values())
    elif isinstance(module_or_state_dict, dict):
        tensors = [v for v in module_or_state_dict.values() if isinstance(v, torch.Tensor)]
    else:
        raise TypeError("broadcast_parameters takes an nn.Module or a state dict")
    comm = context.world()
    if comm.size == 1:
        return
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    # Every rank walks the same dtypes in the same (first seen) order.
    for dtype, group in by_dtype.items():
        flat = torch.cat([_to_host(t.detach()).reshape(-1) for t in group]) if group else None
        flat = comm.broadcast(flat, root)
        o = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[o:o + n].view(t.shape))
                o += n
