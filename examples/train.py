"""Train an MLP classifier (64 -> hidden -> 10) on the shipped UCI handwritten digits with distrib.

    distrib launch -n 4 examples/train.py                       # 4 workers, uncompressed
    distrib launch -n 4 examples/train.py --config configs/qsgd.toml --stats
    python examples/train.py                                    # a job of one

Every rank builds the same model, takes a rank-strided shard of the training set and trains on
its own minibatches; DistributedOptimizer averages the gradients (compressed when the config or
``--compressor`` names a compressor). Rank 0 prints the loss averaged over ranks every
``eval_every`` steps and ends with a line ``test_accuracy=...`` on the held-out 20%.

Settings come from, in increasing priority: the defaults below, the config file (``--config``, or
``DISTRIB_CONFIG`` set by ``distrib launch --config``), and the command-line options. Every table
of the config is used: ``[train]``, ``[optimizer]`` and ``[compressor]`` for the optimizer,
``[passes]`` through :func:`distrib.passes.apply_passes`, ``[amp]`` as bfloat16 autocast with
:class:`distrib.amp.LossScaler` (``[launch]`` is the launcher's).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for `digits` next to this file

import digits  # noqa: E402

import distrib  # noqa: E402
from distrib import config as dconfig  # noqa: E402
from distrib import metrics  # noqa: E402

# The same values as configs/default.toml's [train] table (tests/test_example.py checks).
DEFAULTS = {
    "steps": 300,
    "lr": 0.1,
    "batch_size": 32,  # per worker
    "seed": 0,
    "momentum": 0.9,
    "eval_every": 50,
    "hidden": 64,
}

# What `--compressor NAME` uses when the config has no [compressor] table for NAME; only needed
# where the constructor has no usable default (top-k without error feedback trains poorly).
COMPRESSOR_DEFAULTS = {"topk": {"ratio": 0.01, "error_feedback": True}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="TOML run configuration (default: $DISTRIB_CONFIG, if set)")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULTS['steps']})")
    p.add_argument("--lr", type=float,
                   help=f"peak learning rate, cosine-decayed to 0 (default {DEFAULTS['lr']})")
    p.add_argument("--batch-size", type=int, dest="batch_size",
                   help=f"minibatch per worker (default {DEFAULTS['batch_size']})")
    p.add_argument("--seed", type=int, help=f"model and sampling seed (default {DEFAULTS['seed']})")
    p.add_argument("--compressor", choices=dconfig.COMPRESSORS,
                   help="gradient compressor, overriding the config's [compressor] name "
                        "(top-k: 1%% with error feedback unless the config says otherwise)")
    p.add_argument("--stats", action="store_true",
                   help="print the optimizer's communication statistics at the end")
    return p.parse_args(argv)


def settings(args):
    """Merge defaults, config file and command line; returns ``(train, cfg)``."""
    path = args.config or os.environ.get("DISTRIB_CONFIG")
    cfg = dconfig.load(path) if path else {}
    if args.compressor is not None:
        comp = cfg.get("compressor", {})
        if comp.get("name", "none") != args.compressor:
            # The config's constructor arguments belong to its own compressor: keep only the
            # generic keys (error feedback, size threshold) and use the new one's defaults.
            comp = {**COMPRESSOR_DEFAULTS.get(args.compressor, {}),
                    **{k: v for k, v in comp.items() if k in ("error_feedback", "min_numel")}}
        cfg = dconfig.validate({**cfg, "compressor": {**comp, "name": args.compressor}},
                               source="--compressor")
    train = dict(DEFAULTS, **cfg.get("train", {}))
    for key in ("steps", "lr", "batch_size", "seed"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    dconfig.validate({"train": train}, source="command line")
    return train, cfg


class Batches:
    """Endless minibatches of one shard: a fresh seeded permutation each epoch."""

    def __init__(self, x, y, batch_size, seed):
        if len(y) < batch_size:
            raise ValueError(f"shard of {len(y)} samples is smaller than batch size {batch_size}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = None, len(y)

    def next(self):
        if self.pos + self.batch_size > len(self.y):
            self.order, self.pos = torch.randperm(len(self.y), generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.x[idx], self.y[idx]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def main(argv=None):
    args = parse_args(argv)
    train, cfg = settings(args)
    torch.set_num_threads(1)  # several workers share few cores; more threads only contend

    distrib.init()
    rank, size = distrib.rank(), distrib.size()
    x_train, y_train, x_test, y_test = digits.load()
    x, y = digits.shard(x_train, y_train, rank, size)
    batches = Batches(x, y, train["batch_size"], seed=train["seed"] * 1000 + rank)

    torch.manual_seed(train["seed"])
    model = torch.nn.Sequential(
        torch.nn.Linear(64, train["hidden"]), torch.nn.ReLU(), torch.nn.Linear(train["hidden"], 10))
    distrib.broadcast_parameters(model, root=0)
    if "passes" in cfg:  # pruning, QAT, distillation, torch.compile: before the optimizer
        model = distrib.passes.apply_passes(model, cfg)
    sgd = torch.optim.SGD(model.parameters(), lr=train["lr"], momentum=train["momentum"])
    # Cosine decay to 0: the last steps are small, so the final accuracy does not jitter.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=train["steps"])
    opt = distrib.DistributedOptimizer(sgd, model=model, compressor=dconfig.build_compressor(cfg),
                                       **dconfig.optimizer_options(cfg))
    # [amp]: bfloat16 autocast (what a CPU has) with the rank-agreed loss scaler.
    scaler = distrib.amp.LossScaler(**cfg["amp"]) if "amp" in cfg else None
    mixed = scaler is not None and scaler.is_enabled()
    distiller, pruner = getattr(model, "distiller", None), getattr(model, "pruner", None)

    if rank == 0:
        comp = cfg.get("compressor", {}).get("name", "none")
        extras = sorted(cfg.get("passes", {})) + (["amp"] if mixed else [])
        print(f"digits: {len(y_train)} train / {len(y_test)} test samples, {size} worker(s), "
              f"compressor={comp}, steps={train['steps']}, batch={train['batch_size']}/worker"
              + (f", with {'+'.join(extras)}" if extras else ""), flush=True)
    start = time.perf_counter()
    for step in range(1, train["steps"] + 1):
        xb, yb = batches.next()
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            out = model(xb)
        out = out.float()
        if distiller is not None:
            loss = distiller.loss(out, xb, yb)
        else:
            loss = torch.nn.functional.cross_entropy(out, yb)
        metrics.record(loss=loss.detach())  # before step(), which closes the step's metrics row
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        schedule.step()
        if pruner is not None:
            pruner.step()
        if train["eval_every"] and (step % train["eval_every"] == 0 or step == train["steps"]):
            mean_loss = distrib.allreduce(loss.detach().reshape(1), op="mean").item()
            if rank == 0:
                print(f"step {step:5d}  loss {mean_loss:.4f}  "
                      f"test accuracy {accuracy(model, x_test, y_test):.3f}", flush=True)
    elapsed = time.perf_counter() - start
    test_accuracy = accuracy(model, x_test, y_test)

    if args.stats:  # every rank: bytes sent and time differ per rank
        print(f"rank {rank} stats: " + " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in opt.stats().items()), flush=True)
    if rank == 0:
        print(f"train_time_s={elapsed:.2f}", flush=True)
        print(f"test_accuracy={test_accuracy:.4f}", flush=True)
    distrib.shutdown()
    return {"model": model, "optimizer": opt, "test_accuracy": test_accuracy}


if __name__ == "__main__":
    main()
