"""Compressor throughput and compression ratio on one big gradient, on one thread.

    python benchmarks/compressors.py [--rows 5000 --cols 5000] [--repeat 5] [--threads 1]

For every compressor: the best-of-``repeat`` time of ``compress`` and of ``decompress`` on a
float32 gradient (25M elements by default), the throughput of compress+decompress in GB/s of
float32 input, and the compression ratio (input bytes / ``payload.nbytes``). Throughput is given
twice: from wall-clock time, and from the CPU time of the process (on a shared machine the latter
is what one core does; they agree on an idle one).

Large fresh tensors (every ``decompress`` returns one) cost page faults; the benchmark sets
PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages for big CPU allocations, a
documented PyTorch knob, recommended for training processes too) unless ``--no-thp``.

PowerSGD is also timed as the collective it is (``reduce`` on a job of one: error feedback and warm start
included) next to torch's own ``powerSGD_hook`` on the same matrix, run on a 1-rank gloo group
with the same rank, error feedback and warm start.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch's CPU allocator

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distrib.compress import (BF16, FP16, QSGD, CountSketch, ErrorFeedback,  # noqa: E402
                              NoCompression, PowerSGD, TopK)


def best(fn, repeat, cpu=False):
    """Best wall-clock (or, with ``cpu``, process CPU) seconds of ``repeat`` calls."""
    clock = time.process_time if cpu else time.perf_counter
    fn()  # warm-up (allocations, caches, hashes)
    times = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def bench_codec(name, c, grad, repeat):
    state = {}

    def comp():
        state["p"] = c.compress(grad, key="g")

    def both():
        c.decompress(c.compress(grad, key="g"))

    tc = best(comp, repeat)
    td = best(lambda: c.decompress(state["p"]), repeat)
    tb = best(both, repeat)
    tcpu = best(both, repeat, cpu=True)
    nbytes = state["p"].nbytes
    raw = grad.numel() * 4
    return (name, tc, td, raw / tb / 1e9, raw / tcpu / 1e9, raw / nbytes)


class _Bucket:
    """What torch's powerSGD_hook reads of a DDP GradBucket: one 2-D gradient."""

    def __init__(self, grad):
        self._buf = grad.reshape(-1)
        self._shape = grad.shape

    def buffer(self):
        return self._buf

    def index(self):
        return 0

    def gradients(self):
        return [self._buf.view(self._shape)]

    def is_last(self):
        return True


def bench_powersgd(grad, rank, repeat):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ph

    ours = PowerSGD(rank)
    t_ours = best(lambda: ours.reduce(grad, key="g"), repeat)
    c_ours = best(lambda: ours.reduce(grad, key="g"), repeat, cpu=True)

    if not dist.is_initialized():
        rdv = tempfile.mktemp(prefix="distrib-bench-")
        dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
    state = ph.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                             start_powerSGD_iter=2, use_error_feedback=True, warm_start=True,
                             min_compression_rate=1)

    def theirs():
        # the hook works in place on the bucket: give it a fresh copy, as DDP would
        b = _Bucket(grad.clone())
        ph.powerSGD_hook(state, b).wait()

    theirs()
    theirs()  # iterations 0 and 1 are plain all-reduces (start_powerSGD_iter=2)
    t_theirs = best(theirs, repeat) - best(lambda: grad.clone(), repeat)
    c_theirs = best(theirs, repeat, cpu=True) - best(lambda: grad.clone(), repeat, cpu=True)
    return (t_ours, c_ours), (t_theirs, c_theirs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--cols", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--powersgd-rank", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="compressor names to run (default: all)")
    ap.add_argument("--no-thp", action="store_true",
                    help="leave THP_MEM_ALLOC_ENABLE unset (plain page-sized allocations)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    grad = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    n = grad.numel()
    compressors = {
        "none": NoCompression(),
        "fp16": FP16(),
        "bf16": BF16(),
        "qsgd-4bit": QSGD(7),
        "qsgd-8bit": QSGD(127),
        "topk-1%": TopK(0.01),
        "topk-0.1%": TopK(0.001),
        "ef-topk-1%": ErrorFeedback(TopK(0.01)),
        f"powersgd-r{args.powersgd_rank}": PowerSGD(args.powersgd_rank),
        "countsketch": CountSketch(rows=5, cols=n // 50, k=n // 100),
    }
    print(f"gradient {args.rows}x{args.cols} float32 ({n * 4 / 1e6:.0f} MB), "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'compressor':<16}{'compress ms':>13}{'decompress ms':>15}"
          f"{'GB/s wall':>11}{'GB/s cpu':>10}{'ratio':>9}")
    for name, c in compressors.items():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        name, tc, td, gbs, gbs_cpu, ratio = bench_codec(name, c, grad, args.repeat)
        print(f"{name:<16}{tc * 1e3:>13.1f}{td * 1e3:>15.1f}{gbs:>11.2f}{gbs_cpu:>10.2f}"
              f"{ratio:>9.1f}", flush=True)
    if not args.only or any(o.startswith("powersgd") for o in args.only):
        r = args.powersgd_rank
        ours, theirs = bench_powersgd(grad, r, args.repeat)
        print(f"\nPowerSGD rank {r}, one step with error feedback and warm start (job of one):")
        print(f"{'':<30}{'wall ms':>9}{'cpu ms':>9}")
        print(f"{'distrib PowerSGD.reduce':<30}{ours[0] * 1e3:>9.1f}{ours[1] * 1e3:>9.1f}")
        print(f"{'torch powerSGD_hook':<30}{theirs[0] * 1e3:>9.1f}{theirs[1] * 1e3:>9.1f}")
        print(f"ours / torch: {ours[0] / theirs[0]:.2f} (wall), {ours[1] / theirs[1]:.2f} (cpu)")


if __name__ == "__main__":
    main()
