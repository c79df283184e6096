"""``distrib launch``: check the request, place the processes, run attempts, merge metrics.

Everything that can be checked is checked before a process starts (script, counts, config,
hosts, master port), so a mistake is one clear line and exit status 2, never a half-started job.
Each attempt runs under :class:`~launcher.supervisor.Supervisor` (zmq) or
:class:`~launcher.mpirun.MpiRun` (mpi); ``--max-restarts`` reruns the whole job after a failure.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import shutil
import sys
import tempfile
import uuid

from launcher import merge, plan
from launcher.errors import LaunchError
from launcher.hosts import Host, parse_host_list, parse_hostfile
from launcher.output import Output
from launcher.ports import check_port_free, free_port, parse_master
from launcher.supervisor import Supervisor, summary

def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def read_config(path: str) -> dict:
    """The ``[launch]`` table of a run configuration (the whole file is validated)."""
    if not os.path.isfile(path):
        raise LaunchError(f"config file not found: {path}")
    try:
        from distrib import config  # full schema check: a typo fails here, not in N workers
    except ImportError:
        config = None
    if config is not None:
        try:
            return config.load(path).get("launch", {})
        except config.ConfigError as e:
            raise LaunchError(str(e)) from None
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f).get("launch", {})
    except tomllib.TOMLDecodeError as e:
        raise LaunchError(f"{path}: not valid TOML: {e}") from None


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill options left out from the config's ``[launch]`` table, then the defaults; validate."""
    launch = read_config(args.config) if args.config else {}
    if args.nproc is None:
        args.nproc = launch.get("nproc")
    if args.nproc is None and (args.hosts or args.hostfile):
        args.nproc = sum(h.slots for h in _hosts(args))  # every slot
    if args.nproc is None:
        raise LaunchError("how many workers? give -n N (or nproc in the config's [launch] table)")
    if args.nproc < 1:
        raise LaunchError(f"-n must be at least 1, got {args.nproc}")
    args.transport = args.transport or launch.get("transport", "zmq")
    if args.transport not in ("zmq", "mpi"):
        raise LaunchError(f"--transport must be zmq or mpi, got {args.transport!r}")
    if args.servers is None:
        args.servers = launch.get("servers", 0)
    if args.servers < 0:
        raise LaunchError(f"--servers must be 0 or more, got {args.servers}")
    if args.timeout is None:
        args.timeout = launch.get("timeout")
    if args.timeout is not None and not args.timeout > 0:
        raise LaunchError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    if args.grace < 0:
        raise LaunchError(f"--grace must be 0 or more, got {args.grace}")
    if not os.path.isfile(args.script):
        raise LaunchError(f"script not found: {args.script}")
    for option, path in (("--metrics", args.metrics), ("--timeline", args.timeline)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise LaunchError(f"{option} {path}: its folder does not exist")
    return args


def _hosts(args) -> list[Host]:
    if args.hosts and args.hostfile:
        raise LaunchError("give -H or --hostfile, not both")
    return parse_host_list(args.hosts) if args.hosts else parse_hostfile(args.hostfile)


def _cluster_hosts(name: str) -> list[Host]:
    try:
        cluster = importlib.import_module("launcher.cluster")
    except ModuleNotFoundError as e:
        if e.name != "launcher.cluster":
            raise
        raise LaunchError("--cluster needs launcher.cluster, which is not installed") from None
    try:
        found = cluster.load(name)
    except LaunchError:
        raise
    except (OSError, ValueError, LookupError) as e:
        raise LaunchError(f"cluster {name!r}: {e}") from None
    if os.geteuid() != 0:
        raise LaunchError("--cluster runs processes in network namespaces, which needs root")
    return [Host(f"{name}:{i}", "netns", netns=h.netns, addr=h.addr) for i, h in enumerate(found.hosts)]


def layout(args) -> tuple[plan.Layout, int | None]:
    """Where the processes go, and the master port if one was given."""
    multi = args.nnodes > 1 or args.node_rank != 0
    chosen = [name for name, on in (("--nnodes/--node-rank", multi), ("-H/--hostfile", args.hosts or args.hostfile),
                                   ("--cluster", args.cluster)) if on]
    if len(chosen) > 1:
        raise LaunchError(f"{' and '.join(chosen)} cannot be combined")
    addr, port = parse_master(args.master) if args.master else (None, None)
    if args.master_port is not None:
        if port is not None and port != args.master_port:
            raise LaunchError("--master and --master-port give different ports")
        port = args.master_port
    if args.transport == "mpi" and multi:
        raise LaunchError("--transport mpi runs through one mpiexec: use -H/--hostfile (or --cluster) for "
                          "several hosts, not --nnodes")
    if multi:
        if addr is None or port is None:
            raise LaunchError("--nnodes needs --master HOST:PORT (the address of node 0, the same on every node)")
        return plan.multinode_layout(args.nproc, args.nnodes, args.node_rank, addr, args.servers), port
    if args.hosts or args.hostfile:
        lay = plan.slots_layout(args.nproc, _hosts(args), args.servers)
    elif args.cluster:
        lay = plan.block_layout(args.nproc, _cluster_hosts(args.cluster), args.servers)
    else:
        lay = plan.local_layout(args.nproc, args.servers)
    if addr is not None:
        lay.master_addr = addr
    return lay, port


def _binds_here(lay: plan.Layout) -> bool:
    """Whether worker 0 (which binds the master port) runs on this machine's network."""
    return lay.rank_offset == 0 and lay.nodes[0].host.kind == "local"


def _ports_to_check(port: int, transport: str) -> list[tuple[int, str]]:
    # distrib's zmq rendezvous listens on MASTER_PORT + 1 (MASTER_PORT is left to torch.distributed).
    ports = [(port, "master port")]
    if transport == "zmq":
        ports.append((port + 1, "zmq rendezvous port (master port + 1)"))
    return ports


def _free_master_port(transport: str) -> int:
    for _ in range(100):
        port = free_port()
        try:
            for p, what in _ports_to_check(port, transport)[1:]:
                check_port_free(p, what)
            return port
        except LaunchError:
            continue
    raise LaunchError("could not find a free master port")


def run(args: argparse.Namespace) -> int:
    """Run the job described by the parsed ``distrib launch`` options; returns the exit status."""
    args = resolve(args)
    lay, fixed_port = layout(args)
    if fixed_port is not None and _binds_here(lay):
        for p, what in _ports_to_check(fixed_port, args.transport):
            check_port_free(p, what)
    cwd = os.getcwd()
    script = os.path.abspath(args.script)
    metrics_dir = tempfile.mkdtemp(prefix="distrib-metrics-") if (args.metrics or args.timeline) else None
    # Names this job's shared-memory buffers, so whatever killed workers leave is removed below.
    job_id = uuid.uuid4().hex[:16]
    common = {"DISTRIB_TRANSPORT": args.transport, "DISTRIB_JOB_ID": job_id}
    if args.timeout is not None:
        common["DISTRIB_TIMEOUT"] = str(args.timeout)
    if args.config:
        common["DISTRIB_CONFIG"] = os.path.abspath(args.config)
    if metrics_dir:
        common["DISTRIB_METRICS_DIR"] = metrics_dir
    output = Output()
    attempt = 0
    try:
        while True:
            if metrics_dir:  # a restarted job starts its files afresh
                shutil.rmtree(metrics_dir, ignore_errors=True)
                os.makedirs(metrics_dir)
            port = fixed_port if fixed_port is not None else _free_master_port(args.transport)
            env = {**common, "DISTRIB_RESTART_COUNT": str(attempt)}
            outcome = _attempt(args, lay, script, port, env, cwd, output)
            if outcome.ok:
                return 0
            _say(summary(outcome))
            if outcome.interrupted is not None or attempt == args.max_restarts:
                return outcome.exit_status
            attempt += 1
            _say(f"distrib: restarting the job (restart {attempt} of {args.max_restarts})")
    finally:
        _remove_shared_buffers(job_id)
        if metrics_dir:
            _merge(args, lay, metrics_dir)


def _remove_shared_buffers(job_id: str) -> None:
    """Workers unlink their /dev/shm buffers themselves, except when killed in mid-collective."""
    for path in glob.glob(f"/dev/shm/distrib-{job_id}-*"):
        try:
            os.unlink(path)
        except OSError:
            pass


def _attempt(args, lay: plan.Layout, script: str, port: int, env: dict, cwd: str, output: Output):
    worker_argv = [sys.executable, script, *args.args]
    if args.transport == "mpi":
        from launcher.mpirun import run_mpi

        return run_mpi(lay, args.servers, [script, *args.args], args.server_module, port, env, cwd, output,
                       args.grace, cluster=args.cluster)
    server_argv = [sys.executable, "-m", args.server_module]
    specs = plan.build_specs(lay, worker_argv, server_argv, port, env)
    return Supervisor(specs, cwd, output, args.grace).run()


def _merge(args, lay: plan.Layout, metrics_dir: str) -> None:
    try:
        if args.metrics:
            rows = merge.merge_metrics(metrics_dir, args.metrics)
            _say(f"distrib: wrote {rows} metric rows to {args.metrics}")
        if args.timeline:
            events = merge.merge_timeline(metrics_dir, args.timeline)
            _say(f"distrib: wrote {events} timeline events to {args.timeline}")
        if any(n.host.kind == "ssh" for n in lay.nodes):
            _say("distrib: note: metrics of ranks on ssh hosts stay on those hosts (not merged)")
    except OSError as e:
        _say(f"distrib: could not write metrics: {e}")
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
