"""distrib: distributed training for PyTorch that sends as few bytes as possible.

Quick start::

    import distrib, torch
    distrib.init()
    model = ...
    distrib.broadcast_parameters(model)
    opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)

Run with ``distrib launch -n 4 train.py``. See ``shared/DESIGN.md`` for the public contract.
"""
from .errors import CollectiveMismatch, CommTimeout, DistribError, PeerFailed, WireError

__version__ = "0.1.0"

# Everything else loads on first use, so ``import distrib`` does not import torch (the
# launcher imports distrib.config to validate a run's configuration before starting it).
_LAZY = {"DistributedOptimizer": ("optim", "DistributedOptimizer"),
         "distributed": ("optim", "distributed"),
         **{name: ("api", name) for name in ("allreduce", "allgather", "broadcast", "barrier",
                                             "broadcast_parameters")},
         **{name: ("context", name) for name in ("init", "shutdown", "rank", "size",
                                                 "local_rank", "local_size", "is_initialized")}}
_SUBMODULES = {"compress", "coding", "pipeline", "amp", "checkpoint", "passes", "ps", "metrics",
               "config", "optim", "transport", "collectives"}


def __getattr__(name):
    # Heavier parts load on first use, so ``import distrib`` stays cheap for the launcher.
    import importlib
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'distrib' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


__all__ = ["init", "shutdown", "rank", "size", "local_rank", "local_size", "is_initialized",
           "allreduce", "allgather", "broadcast", "barrier", "broadcast_parameters",
           "DistributedOptimizer", "distributed", "DistribError", "CommTimeout",
           "CollectiveMismatch", "WireError", "PeerFailed"]
