"""One training step of an ~8M-parameter MLP: DistributedOptimizer next to torch DDP (gloo).

    python benchmarks/step.py [--sizes 2,4] [--steps 10] [--batch 64]

Each world size runs one job through ``distrib launch``; in the same processes it times the step
(forward, backward, gradient averaging, SGD update) first under ``distrib.DistributedOptimizer``
and then under ``DistributedDataParallel`` with the gloo backend, and prints the median step
times and their ratio (distrib / DDP: below 1 is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model():
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),
                               torch.nn.Linear(2048, 2048), torch.nn.ReLU(),
                               torch.nn.Linear(2048, 1024), torch.nn.ReLU(),
                               torch.nn.Linear(1024, 10))


def timed_steps(model, opt, steps, batch, sync):
    import torch
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1024, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    times = []
    for i in range(steps + 2):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(steps, batch):
    import torch
    import torch.distributed as dist
    import distrib
    torch.set_num_threads(1)
    distrib.init(timeout=600)
    model = make_model()
    params = sum(p.numel() for p in model.parameters())
    opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model=model)
    t_distrib = timed_steps(model, opt, steps, batch, distrib.barrier)
    opt.close()
    dist.init_process_group("gloo", rank=distrib.rank(), world_size=distrib.size())
    ddp_model = torch.nn.parallel.DistributedDataParallel(make_model())
    ddp_opt = torch.optim.SGD(ddp_model.parameters(), lr=0.01)
    t_ddp = timed_steps(ddp_model, ddp_opt, steps, batch, dist.barrier)
    dist.destroy_process_group()
    if distrib.rank() == 0:
        print("RESULT " + json.dumps({"n": distrib.size(), "params": params,
                                      "distrib": t_distrib, "ddp": t_ddp}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2,4")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="samples per worker")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.steps, a.batch)
    print(f"{'n':>3} {'params':>9} {'distrib s/step':>15} {'DDP gloo s/step':>16} {'ratio':>6}")
    for n in map(int, a.sizes.split(",")):
        cmd = [sys.executable, "-m", "launcher.cli", "launch", "-n", str(n), os.path.abspath(__file__),
               "--worker", "--steps", str(a.steps), "--batch", str(a.batch)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        res = next((json.loads(l.split("RESULT ", 1)[1]) for l in out.stdout.splitlines()
                    if "RESULT " in l), None)
        if res is None:
            raise SystemExit(f"n={n} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        print(f"{n:>3} {res['params']:>9} {res['distrib']:>15.4f} {res['ddp']:>16.4f} "
              f"{res['distrib'] / res['ddp']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
