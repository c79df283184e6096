"""Train an MLP on the shipped UCI digits with its layers split over pipeline stages.

    distrib launch -n 4 examples/pipeline_train.py                  # 4 stages, GPipe schedule
    distrib launch -n 4 examples/pipeline_train.py --schedule 1f1b
    distrib launch -n 8 examples/pipeline_train.py                  # 2 replicas x 4 stages
    python examples/pipeline_train.py --reference                   # the unpartitioned model

Every rank builds the same model and draws the same minibatch indices (same seeds); stage 0
feeds the images, the last stage the labels. With more workers than stages, replica ``r`` takes
every ``replicas``-th sample of the minibatch and the stages average their gradients over the
replicas, so every run follows the same trajectory as ``--reference`` up to rounding and ends at
the same accuracy. The last stage prints the loss now and then and ``test_accuracy=...`` at the end.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for `digits` next to this file

import digits  # noqa: E402

import distrib  # noqa: E402
from distrib.pipeline import GPipe, balance_by_params  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, default=4, help="pipeline stages (default 4)")
    p.add_argument("--chunks", type=int, default=4, help="micro-batches per minibatch (default 4)")
    p.add_argument("--schedule", choices=("gpipe", "1f1b"), default="gpipe")
    p.add_argument("--checkpoint", choices=("always", "except_last", "never"),
                   default="except_last")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64, dest="batch_size",
                   help="minibatch, over all replicas (default 64)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100, dest="log_every")
    p.add_argument("--reference", action="store_true",
                   help="train the unpartitioned model in this one process instead")
    return p.parse_args(argv)


def build_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def main(argv=None):
    args = parse_args(argv)
    x_train, y_train, x_test, y_test = digits.load()
    model = build_model(args.seed)
    sampler = torch.Generator().manual_seed(args.seed + 1)

    if args.reference:
        pipe, params, last, replicas, replica = None, model.parameters(), True, 1, 0
        print(f"reference: 1 process, {sum(p.numel() for p in model.parameters())} parameters")
    else:
        distrib.init()
        balance = balance_by_params(model, args.stages)
        pipe = GPipe(model, balance, args.chunks, checkpoint=args.checkpoint,
                     schedule=args.schedule)
        params, last = pipe.stage.parameters(), pipe.is_last
        replicas, replica = pipe.replicas, pipe.replica
        if distrib.rank() == 0:
            print(f"{distrib.size()} worker(s): {replicas} replica(s) x {pipe.num_stages} stages, "
                  f"balance {balance}, chunks {args.chunks}, schedule {args.schedule}")
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(y_train), (args.batch_size,), generator=sampler)
        idx = idx[replica::replicas]  # this replica's share of the minibatch
        x, y = x_train[idx], y_train[idx]
        if pipe is None:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        else:
            loss = pipe.train_step(x, y, F.cross_entropy)
        opt.step()
        opt.zero_grad()
        if last and replica == 0 and (step % args.log_every == 0 or step == args.steps):
            print(f"step {step:5d}  loss {float(loss.detach()):.4f}", flush=True)

    with torch.no_grad():
        logits = model(x_test) if pipe is None else pipe(x_test)
    if last and replica == 0:
        accuracy = (logits.argmax(1) == y_test).double().mean().item()
        print(f"{time.perf_counter() - start:.1f}s  test_accuracy={accuracy:.4f}", flush=True)


if __name__ == "__main__":
    main()
