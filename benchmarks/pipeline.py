"""Pipeline benchmark: throughput, peak activation memory per stage and the bubble, for
chunks = 1, 2, 4, 8 under the GPipe and 1F1B schedules, all in one run.

    distrib launch -n 4 benchmarks/pipeline.py                 # 4 stages
    distrib launch -n 4 benchmarks/pipeline.py --chunks 1 4 16 --steps 20 --json out.json

The model is a stack of equal ``Linear + ReLU`` blocks split evenly, so the stages are balanced and
the ideal bubble is GPipe's ``(p - 1) / (m + p - 1)`` with m micro-batches and p stages. Measured:

- throughput: samples per second of ``train_step`` (mean over the timed steps, slowest stage);
- peak activation memory: bytes of activations a stage keeps between a micro-batch's forward
  and its backward (autograd's saved tensors plus the stage's stash, ``measure_memory=True``);
- bubble: ``1 - busy / wall`` per stage, where busy is the time spent computing forwards and
  backwards and wall the whole step; reported as the mean over stages next to the ideal.

Oversubscribed runs (more workers than cores) distort the timing: a stage that waits yields its
core to another, so busy time stretches and the bubble looks smaller than on dedicated cores.

Measured on a shared 2-core machine (other jobs running), ``-n 4 --width 1024 --batch 1024
--steps 5``: peak activations per stage (MiB) stay at 8/12/12/12 under GPipe for every m, while
1F1B with m = 8 keeps 4.0/4.5/3.0/1.5 (stage j holds min(m, p - j) micro-batches); the bubble,
GPipe, m = 1, 2, 4, 8: 0.665, 0.524, 0.384, 0.261 against the ideal 0.750, 0.600, 0.429, 0.273
(1F1B: 0.655, 0.498, 0.354, 0.311). Throughput stays flat (about 2300-2800 samples/s): four stages
on two cores leave no idle core for the pipeline to fill.
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import distrib
from distrib.pipeline import GPipe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"], choices=["gpipe", "1f1b"])
    p.add_argument("--checkpoint", default="never", choices=["always", "except_last", "never"])
    p.add_argument("--batch", type=int, default=256, help="samples per step (default 256)")
    p.add_argument("--width", type=int, default=512, help="features per layer (default 512)")
    p.add_argument("--blocks-per-stage", type=int, default=2, dest="blocks")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting (default 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", help="also write the results to this file (rank 0)")
    return p.parse_args(argv)


def build(width, blocks, stages):
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks * stages):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers), [2 * blocks] * stages


def run(args, schedule, chunks, stages):
    model, balance = build(args.width, args.blocks, stages)
    pipe = GPipe(model, balance, chunks, checkpoint=args.checkpoint, schedule=schedule,
                 measure_memory=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.width, generator=g)
    y = torch.randn(args.batch, args.width, generator=g)
    walls, busy, peak = [], [], 0
    for step in range(args.warmup + args.steps):
        distrib.barrier()  # every setting's steps start together on every stage
        pipe.train_step(x, y, F.mse_loss)
        pipe.zero_grad(set_to_none=True)
        if step >= args.warmup:
            walls.append(pipe.last_timing["wall_s"])
            busy.append(pipe.last_timing["busy_s"])
            peak = max(peak, pipe.peak_activation_bytes)
    mine = torch.tensor([statistics.mean(walls), statistics.mean(busy), peak, pipe.max_alive],
                        dtype=torch.float64)
    return torch.stack(distrib.allgather(mine)), len(pipe.last_sizes)


def main(argv=None):
    args = parse_args(argv)
    distrib.init()
    torch.set_num_threads(1)
    stages = distrib.size()
    results = []
    if distrib.rank() == 0:
        print(f"{stages} stages, batch {args.batch}, {2 * args.blocks} layers of width "
              f"{args.width} per stage, checkpoint={args.checkpoint}, {args.steps} timed steps")
        print(f"{'schedule':8} {'chunks':>6} {'samples/s':>10} {'step ms':>8} "
              f"{'peak act. MiB per stage':>28} {'alive':>9} {'bubble':>7} {'ideal':>6}")
    for schedule in args.schedules:
        for chunks in args.chunks:
            table, m = run(args, schedule, chunks, stages)
            wall = table[:, 0].max().item()
            bubble = (1 - table[:, 1] / table[:, 0]).mean().item()
            ideal = (stages - 1) / (m + stages - 1)
            row = {"schedule": schedule, "chunks": chunks, "microbatches": m,
                   "samples_per_s": args.batch / wall, "step_s": wall,
                   "peak_activation_bytes": [int(v) for v in table[:, 2].tolist()],
                   "max_alive": [int(v) for v in table[:, 3].tolist()],
                   "bubble": bubble, "bubble_per_stage": (1 - table[:, 1] / table[:, 0]).tolist(),
                   "ideal_bubble": ideal}
            results.append(row)
            if distrib.rank() == 0:
                mib = " ".join(f"{b / 2 ** 20:6.2f}" for b in row["peak_activation_bytes"])
                alive = ",".join(map(str, row["max_alive"]))
                print(f"{schedule:8} {chunks:6d} {row['samples_per_s']:10.0f} "
                      f"{1000 * wall:8.1f} {mib:>28} {alive:>9} {bubble:7.3f} {ideal:6.3f}",
                      flush=True)
    if args.json and distrib.rank() == 0:
        with open(args.json, "w") as f:
            json.dump({"stages": stages, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
