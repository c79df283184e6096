"""Checkpoints that resume bitwise: model, optimizer (with its compressor), loss scalers, RNGs.

``save(path, model, optimizer, **extra)`` is a collective: every worker calls it at the same
point. Rank 0 writes ``path``; every rank ``r > 0`` writes ``f"{path}.rank{r}"`` holding only what
differs from rank 0 (its RNG states, error-feedback residuals, a pipeline stage's own
parameters...). What is shared is found by comparing a digest of each part over all ranks, so a
data-parallel job stores its model and momentum once while per-rank state is never lost.

A save is all or nothing: every rank writes a temporary file, the ranks agree that all writes
succeeded, then each renames its file into place (``os.replace``) and a barrier makes the
checkpoint complete on every rank before ``save`` returns. All files carry the same save id, so
``load`` notices shards left over from another save. ``path`` must be on storage every rank can
read (``load`` reads it on all ranks).

Loading (``load(path, model, optimizer)``, also collective) restores the model, the optimizer's
state (a DistributedOptimizer's includes its compressor's), the loss scalers registered in
``optimizer.loss_scalers`` (or given as ``loss_scaler=``) and the torch/numpy/``random`` RNG
states, and returns the ``extra`` keyword arguments given to ``save``. If one rank cannot load,
every rank raises.
"""
from __future__ import annotations

import hashlib
import os
import random
import tempfile
import warnings

import numpy as np
import torch

from . import api, context
from .errors import DistribError

FORMAT = "distrib-checkpoint"
VERSION = 1


class CheckpointError(DistribError):
    """A checkpoint is missing, incomplete, from another job shape, or failed to save/load."""


def shard_path(path, rank: int) -> str:
    """The file rank ``rank`` writes: ``path`` itself for rank 0."""
    path = os.fspath(path)
    return path if rank == 0 else f"{path}.rank{rank}"


# -- save ----------------------------------------------------------------------------------------
def save(path, model=None, optimizer=None, **extra) -> None:
    """Write a checkpoint of ``model``, ``optimizer`` (and its compressor and loss scalers), the
    RNG states and ``extra`` (tensors, numbers, strings and containers of them); see the module
    docstring. Every worker must call it (not only rank 0, as with ``torch.save``)."""
    path = os.fspath(path)
    rank, size = context.rank(), context.size()
    items = _items(model, optimizer, extra)
    save_id = _agree_save_id()
    shared = _shared_items(items) if size > 1 else set(items)
    record = {"format": FORMAT, "version": VERSION, "save_id": save_id, "rank": rank,
              "world_size": size, "order": list(items), "rng": _rng_state(),
              "items": {k: v for k, v in items.items() if rank == 0 or k not in shared}}
    final = shard_path(path, rank)
    tmp = None
    try:
        tmp = _write_temp(final, record)
        error = None
    except Exception as e:  # reported after the others know, so nobody commits half a checkpoint
        error = e
    try:
        _agree(error, f"could not write {final}", path)
    except CheckpointError:
        if tmp is not None:  # this rank wrote its part, another did not: commit nothing
            _remove(tmp)
        raise
    try:
        os.replace(tmp, final)
        error = None
    except OSError as e:
        _remove(tmp)
        error = e
    # Agreeing again is also the barrier: the checkpoint is complete when save returns.
    _agree(error, f"could not move its part into place at {final}", path)


def _agree(error, what, path):
    """Raise on every rank if ``error`` happened on any of them."""
    failed = _failed_ranks(error is not None)
    if error is not None:
        raise CheckpointError(f"rank {context.rank()} {what}: {error}") from error
    if failed:
        raise CheckpointError(f"checkpoint {path} not saved: rank(s) {failed} failed (see their "
                              f"errors)")


def _items(model, optimizer, extra):
    """The checkpoint's parts, by name, in a fixed order (every rank builds the same names)."""
    items = {}
    if model is not None:
        items["model"] = model.state_dict()
    if optimizer is not None:
        sd = optimizer.state_dict()
        # Each top-level part on its own, so the inner optimizer's state can be shared while the
        # compressor's (per-rank residuals) is not.
        if isinstance(sd, dict):
            items.update({f"optimizer/{k}": v for k, v in sd.items()})
        else:
            items["optimizer"] = sd
        scalers = getattr(optimizer, "loss_scalers", None) or []
        if scalers:
            items["loss_scalers"] = [s.state_dict() for s in scalers]
    items.update({f"extra/{k}": v for k, v in extra.items()})
    return items


def _agree_save_id() -> int:
    mine = torch.tensor([int.from_bytes(os.urandom(7), "little")], dtype=torch.int64)
    return int(api.broadcast(mine, root=0).item())


def _shared_items(items) -> set:
    """Names of the parts that are bitwise equal on every rank (stored by rank 0 only)."""
    names = list(items)
    digests = b"".join(_digest(n) + _digest(items[n]) for n in names)  # 64 bytes per part
    mine = torch.from_numpy(np.frombuffer(digests, dtype=np.int64).copy()).reshape(len(names), 8)
    everyone = api.allgather(mine)
    if any(t.shape != mine.shape for t in everyone):
        return set()  # ranks have different parts: keep everything per rank
    same = torch.stack([(t == everyone[0]).all(dim=1) for t in everyone]).all(dim=0)
    return {n for n, s in zip(names, same.tolist()) if s}


def _digest(obj) -> bytes:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.digest()


def _feed(h, obj):
    """Hash a nested state (dicts, sequences, tensors, arrays, scalars) structurally."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def _write_temp(final, record) -> str:
    directory = os.path.dirname(os.path.abspath(final))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(final) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is an ordinary file
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _remove(p):
    try:
        os.unlink(p)
    except OSError:
        pass


def _failed_ranks(failed: bool) -> list:
    flags = api.allgather(torch.tensor([1 if failed else 0], dtype=torch.int64))
    return [r for r, f in enumerate(flags) if f.item()]


# -- load ----------------------------------------------------------------------------------------
def load(path, model=None, optimizer=None, loss_scaler=None, strict: bool = True,
         weights_only: bool = True) -> dict:
    """Restore a checkpoint written by :func:`save` (by a job of the same size) into ``model``,
    ``optimizer``, the loss scalers in ``optimizer.loss_scalers`` plus ``loss_scaler`` (one or a
    list), and the RNG states. Returns the ``extra`` keyword arguments given to ``save``.

    Files are read with torch's safe loader (tensors, numbers, strings, containers); a checkpoint
    whose ``extra`` holds other objects needs ``weights_only=False``, for files you trust only.
    """
    path = os.fspath(path)
    rank = context.rank()
    error, state = None, None
    try:
        state = _read(path, rank, context.size(), weights_only)
        _apply(state, model, optimizer, loss_scaler, strict)
    except Exception as e:
        error = e
    failed = _failed_ranks(error is not None)
    if error is not None:
        if isinstance(error, CheckpointError):
            raise error
        raise CheckpointError(f"rank {rank} could not load checkpoint {path}: {error}") from error
    if failed:
        raise CheckpointError(f"checkpoint {path} not loaded: rank(s) {failed} failed (see their "
                              f"errors)")
    _set_rng_state(state["rng"])
    return state["extra"]


def _read(path, rank, size, weights_only):
    main = _read_file(path, weights_only)
    if main["rank"] != 0:
        raise CheckpointError(f"{path} is rank {main['rank']}'s shard; load the checkpoint by "
                              f"the path rank 0 wrote")
    if main["world_size"] != size:
        raise CheckpointError(f"checkpoint {path} was written by a job of {main['world_size']} "
                              f"worker(s); this job has {size}")
    if rank == 0:
        own = main
    else:
        shard = shard_path(path, rank)
        if not os.path.exists(shard):
            raise CheckpointError(f"checkpoint shard {shard} of rank {rank} is missing "
                                  f"(every rank r > 0 needs {path}.rank<r>)")
        own = _read_file(shard, weights_only)
        if own["save_id"] != main["save_id"] or own["rank"] != rank:
            raise CheckpointError(f"checkpoint shard {shard} does not belong to {path} (it is "
                                  f"from another save: an interrupted save or a stale file)")
    # This rank's parts: its own where it stored them, rank 0's where they were shared.
    missing = [n for n in own["order"] if n not in own["items"] and n not in main["items"]]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {missing} for rank {rank}")
    items = {n: own["items"][n] if n in own["items"] else main["items"][n] for n in own["order"]}
    extra = {n[len("extra/"):]: v for n, v in items.items() if n.startswith("extra/")}
    return {"items": items, "rng": own["rng"], "extra": extra}


def _read_file(path, weights_only):
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        # torch's safe loader (weights_only=True) refuses arbitrary objects with an
        # UnpicklingError: say how to load a trusted file. (Checkpoints are local files; nothing
        # from the wire is ever unpickled.)
        if type(e).__name__ == "UnpicklingError":
            raise CheckpointError(f"{path} holds objects torch's safe loader refuses (see below); "
                                  f"if you trust the file, load it with weights_only=False: {e}") from e
        raise CheckpointError(f"{path} is not a readable checkpoint: {e}") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a distrib checkpoint")
    if record.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {record.get('version')}; "
                              f"this distrib reads version {VERSION}")
    return record


def load_model_state(path) -> dict:
    """Just the model weights of a file, read locally (no collectives): rank 0's model of a
    distrib checkpoint, or a plain ``state_dict`` saved with ``torch.save`` (e.g. a teacher)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable state dict or checkpoint: {e}") from e
    if isinstance(data, dict) and data.get("format") == FORMAT:
        if "model" not in data.get("items", {}):
            raise CheckpointError(f"checkpoint {path} holds no model state")
        return data["items"]["model"]
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        return data
    raise CheckpointError(f"{path} is neither a distrib checkpoint nor a state dict of tensors")


def _apply(state, model, optimizer, loss_scaler, strict):
    items = state["items"]
    if model is not None:
        if "model" not in items:
            raise CheckpointError("the checkpoint holds no model state")
        model.load_state_dict(items["model"], strict=strict)
    if optimizer is not None:
        if "optimizer" in items:
            optimizer.load_state_dict(items["optimizer"])
        else:
            sd = {n[len("optimizer/"):]: v for n, v in items.items() if n.startswith("optimizer/")}
            if not sd:
                raise CheckpointError("the checkpoint holds no optimizer state")
            optimizer.load_state_dict(sd)
    scalers = list(getattr(optimizer, "loss_scalers", None) or []) if optimizer is not None else []
    extra_scalers = loss_scaler if isinstance(loss_scaler, (list, tuple)) else \
        ([] if loss_scaler is None else [loss_scaler])
    for s in extra_scalers:
        if optimizer is not None:
            s.attach(optimizer)
        if not any(s is t for t in scalers):
            scalers.append(s)
    saved = items.get("loss_scalers", [])
    if optimizer is not None and len(saved) > len(scalers):
        # A resumed run's scalers exist but attach to the optimizer only at their first step:
        # take the ones not attached anywhere yet, oldest first.
        from .amp import unattached
        waiting = unattached()
        if len(waiting) == len(saved) - len(scalers):
            for s in waiting:
                s.attach(optimizer)
                scalers.append(s)
    if len(scalers) > len(saved):
        raise CheckpointError(f"{len(scalers)} loss scaler(s) to restore but the checkpoint holds "
                              f"{len(saved)}")
    if len(saved) > len(scalers):
        warnings.warn(f"the checkpoint holds {len(saved)} loss scaler state(s) but only "
                      f"{len(scalers)} scaler(s) are known: pass loss_scaler= to load() (or call "
                      f"scaler.attach(optimizer) first) to resume their scale", stacklevel=3)
    for s, sd in zip(scalers, saved):
        s.load_state_dict(sd)


# -- RNG states ----------------------------------------------------------------------------------
def _rng_state() -> dict:
    """torch (CPU and CUDA), numpy's global and Python's ``random`` states, as tensors and
    plain values so that the safe loader reads them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(gauss)],
             "random": _to_lists(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_to_tuples(state["random"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
