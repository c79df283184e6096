"""All-reduce bus bandwidth: distrib (zmq and mpi transports) next to gloo and Open MPI.

    python benchmarks/allreduce.py [--sizes 2,4,8] [--mib 64] [--iters 5]

For every world size n it runs two jobs through ``distrib launch``:

- ``--transport zmq``: distrib.allreduce, then torch.distributed gloo ``all_reduce``, same processes;
- ``--transport mpi``: distrib.allreduce over MPI, then mpi4py's native ``MPI_Allreduce``.

Bus bandwidth = algbw x 2(n-1)/n, where algbw = bytes / time (the NCCL-tests convention), from
the median of ``--iters`` timed calls after one warm-up. Ratios compare figures of the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _time(fn, iters, sync):
    fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(mib: int, iters: int, transport: str):
    import torch
    import distrib
    torch.set_num_threads(1)
    distrib.init(timeout=600)
    n, rank = distrib.size(), distrib.rank()
    x = torch.randn(mib * 2 ** 20 // 4)
    nbytes = x.numel() * 4
    factor = 2 * (n - 1) / n
    res = {"n": n, "transport": transport}
    t = _time(lambda: distrib.allreduce(x), iters, distrib.barrier)
    res["distrib"] = nbytes / t * factor / 1e9
    if transport == "zmq":
        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=n)
        y = x.clone()  # gloo reduces in place
        t = _time(lambda: dist.all_reduce(y), iters, dist.barrier)
        res["baseline"] = nbytes / t * factor / 1e9
        res["baseline_name"] = "gloo"
        dist.destroy_process_group()
    else:
        from mpi4py import MPI
        import numpy as np
        comm = MPI.COMM_WORLD
        send = x.numpy()
        recv = np.empty_like(send)
        t = _time(lambda: comm.Allreduce(send, recv, op=MPI.SUM), iters, comm.Barrier)
        res["baseline"] = nbytes / t * factor / 1e9
        res["baseline_name"] = "Open MPI"
    if rank == 0:
        print("RESULT " + json.dumps(res), flush=True)


def run(n, transport, mib, iters):
    cmd = [sys.executable, "-m", "launcher.cli", "launch", "-n", str(n), "--transport", transport,
           os.path.abspath(__file__), "--worker", "--mib", str(mib), "--iters", str(iters),
           "--transport", transport]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    for line in out.stdout.splitlines():
        if "RESULT " in line:
            return json.loads(line.split("RESULT ", 1)[1])
    raise SystemExit(f"{transport} n={n} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2,4,8")
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--transport", default="zmq")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.mib, a.iters, a.transport)
    print(f"{a.mib} MiB float32 all-reduce, bus bandwidth in GB/s (median of {a.iters})")
    print(f"{'n':>3} {'distrib-zmq':>12} {'gloo':>8} {'ratio':>6} {'distrib-mpi':>12} "
          f"{'Open MPI':>9} {'ratio':>6}")
    for n in map(int, a.sizes.split(",")):
        z = run(n, "zmq", a.mib, a.iters)
        m = run(n, "mpi", a.mib, a.iters)
        print(f"{n:>3} {z['distrib']:>12.2f} {z['baseline']:>8.2f} {z['distrib'] / z['baseline']:>6.2f} "
              f"{m['distrib']:>12.2f} {m['baseline']:>9.2f} {m['distrib'] / m['baseline']:>6.2f}",
              flush=True)


if __name__ == "__main__":
    main()
