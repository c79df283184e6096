"""Step time with a straggler: plain sync PS against gradient-coded sync PS (s = 1).

    python benchmarks/stragglers.py [--workers 4] [--steps 30] [--transport zmq] [--sleep-ms MS]
                                    [--json OUT]

Runs four jobs through ``distrib launch -n N --servers 1``, the same model and per-worker work in
each: plain sync PS and coded sync PS (``stragglers=1``), each without a straggler and with
the last worker delayed by ``--delay`` (default 2) times its own compute time every step. Each
step every worker computes the gradient of a small MLP on 4096 samples (coded: two partitions of
2048, the s+1 it holds), so the compute per worker is the same in both schemes (the coded global
batch is (s+1) times smaller: the price of the redundancy). With ``--sleep-ms`` the compute is
simulated by sleeping instead, which keeps workers that share few cores from slowing each other
down (on a 2-core machine a sleeping straggler otherwise frees a core for the others). The step
time is worker 0's mean wall time per step after the warm-up: the pace at which the model
advances.

Expected: plain sync slows to about (1 + delay) x its no-straggler time, the coded run stays
within 1.2 x of its no-straggler time (the straggler's pushes arrive late, are dropped, and it
catches up by applying the steps it missed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP = 5
SAMPLES = 4096  # per worker and step
ROUNDS = 4      # the data holds this many global batches; later steps go round again


def worker(scheme: str, delay: float, steps: int, sleep_s: float) -> None:
    """One worker of one job (run by the launcher)."""
    import torch

    import distrib
    from distrib.coding import CodedSampler, GradientCode

    distrib.init()
    torch.set_num_threads(1)
    rank, n = distrib.rank(), distrib.size()
    total = steps + WARMUP
    samples = 64 if sleep_s else SAMPLES
    torch.manual_seed(0)
    X = torch.randn(n * samples * ROUNDS, 64)
    Y = torch.sin(X[:, :8].sum(1, keepdim=True))
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    inner = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_of = lambda idx: torch.nn.functional.mse_loss(model(X[idx]), Y[idx])  # noqa: E731
    straggler = delay > 0 and rank == n - 1
    computes, ends = [], []

    def compute(fn):
        t0 = time.perf_counter()
        fn()
        if sleep_s:  # simulated compute: a fixed time that does not compete for the cores
            time.sleep(max(0.0, sleep_s - (time.perf_counter() - t0)))
        c = time.perf_counter() - t0
        computes.append(c)
        if straggler and len(computes) > WARMUP:
            time.sleep(delay * c)

    if scheme == "coded":
        code = GradientCode(n, 1)
        opt = distrib.DistributedOptimizer(inner, model, topology="ps", stragglers=code)
        sampler = CodedSampler(len(X), code, worker=rank, batch_size=samples // 2)
        epoch = 0
        while opt._ps.global_step < total:
            sampler.set_epoch(epoch)
            for parts in distrib.ps.coded_batches(opt, sampler):
                opt.zero_grad()
                compute(lambda: distrib.ps.coded_backward(code, [loss_of(i) for i in parts]))
                opt.step()
                ends.append(time.perf_counter())
                if opt._ps.global_step >= total:
                    break
            epoch += 1
    else:
        opt = distrib.DistributedOptimizer(inner, model, topology="ps")
        for t in range(total):
            lo = ((t % ROUNDS) * n + rank) * samples
            opt.zero_grad()
            compute(lambda: loss_of(slice(lo, lo + samples)).backward())
            opt.step()
            ends.append(time.perf_counter())
    stats = opt.stats()
    opt.close()
    if rank == 0:
        steady = ends[WARMUP:]
        step_s = (steady[-1] - steady[0]) / (len(steady) - 1)
        print("BENCH " + json.dumps({"step_s": step_s,
                                     "compute_s": sorted(computes)[len(computes) // 2],
                                     "wait_s": stats["wait_s"]}), flush=True)
    else:
        print("BENCH " + json.dumps({"late_steps": stats["late_steps"],
                                     "catch_up_steps": stats["catch_up_steps"]}), flush=True)


def run(scheme, delay, args) -> dict:
    cmd = [sys.executable, "-m", "launcher.cli", "launch", "-n", str(args.workers), "--servers",
           "1", "--transport", args.transport, os.path.abspath(__file__), "--worker", scheme,
           str(delay), str(args.steps), str(args.sleep_ms / 1e3)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        sys.exit(f"{scheme} (delay {delay}) failed:\n{proc.stdout}\n{proc.stderr}")
    out = {}
    for line in proc.stdout.splitlines():
        if "] BENCH " in line:
            rank = line[1:line.index("]")]
            out[rank] = json.loads(line.split("BENCH ", 1)[1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--delay", type=float, default=2.0,
                   help="the straggler's extra time, in multiples of its compute time")
    p.add_argument("--transport", default="zmq", choices=("zmq", "mpi"))
    p.add_argument("--sleep-ms", type=float, default=0.0,
                   help="simulate each step's compute by sleeping this long (on a tiny batch), so "
                        "that workers sharing few cores do not slow each other down")
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], float(args.worker[1]), int(args.worker[2]), float(args.worker[3]))
        return
    rows = []
    for scheme in ("plain", "coded"):
        for delay in (0.0, args.delay):
            res = run(scheme, delay, args)
            last = res.get(str(args.workers - 1), {})
            rows.append({"scheme": scheme, "delay": delay, **res["0"],
                         "straggler_late_steps": last.get("late_steps"),
                         "straggler_catch_up_steps": last.get("catch_up_steps")})
    base = {r["scheme"]: r["step_s"] for r in rows if r["delay"] == 0}
    what = f"simulated compute of {args.sleep_ms:g} ms" if args.sleep_ms else \
        f"real compute on {SAMPLES} samples"
    print(f"{args.workers} workers, 1 server, {args.transport}, {what}, {args.steps} steps after "
          f"{WARMUP} warm-up; straggler: worker {args.workers - 1} sleeps {args.delay:g}x its "
          f"compute time every step")
    print(f"{'scheme':<16}{'straggler':<12}{'compute ms':>11}{'step ms':>10}{'vs none':>9}"
          f"{'vs plain none':>15}")
    for r in rows:
        r["vs_none"] = r["step_s"] / base[r["scheme"]]
        r["vs_plain_none"] = r["step_s"] / base["plain"]
        name = "plain sync PS" if r["scheme"] == "plain" else "coded PS s=1"
        print(f"{name:<16}{'yes' if r['delay'] else 'no':<12}{r['compute_s'] * 1e3:>11.1f}"
              f"{r['step_s'] * 1e3:>10.1f}{r['vs_none']:>9.2f}{r['vs_plain_none']:>15.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
