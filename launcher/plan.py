"""Which process runs where, with which environment.

A :class:`Layout` says how many workers each node (host) of this launch runs and where they sit
in the whole job; :func:`build_specs` turns it into one :class:`ProcSpec` per process with the
environment of the launcher contract (DISTRIB_* and torchrun's variables).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from launcher.errors import LaunchError
from launcher.hosts import LOCAL, Host, local_cpu_count, master_address


@dataclass
class Node:
    """One host of this launch and the processes placed on it."""

    host: Host
    workers: int
    node_rank: int
    servers: int = 0


@dataclass
class Layout:
    """Where this launch's processes go and where they sit in the whole job.

    ``rank_offset`` is the global rank of this launch's first worker (non-zero on the other
    nodes of a ``--nnodes`` job), ``world_size`` counts the workers of the whole job.
    """

    nodes: list[Node]
    world_size: int
    nnodes: int
    num_servers: int
    master_addr: str
    rank_offset: int = 0


@dataclass
class ProcSpec:
    """One process to start: its output label (``"3"``, ``"s0"``), role, rank, host, argv, env."""

    label: str
    role: str
    rank: int
    host: Host
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def local_layout(n: int, servers: int = 0) -> Layout:
    """N workers (and the servers) on this machine."""
    return Layout([Node(LOCAL, n, 0, servers)], n, 1, servers, "127.0.0.1")


def multinode_layout(n: int, nnodes: int, node_rank: int, master_addr: str, servers: int = 0) -> Layout:
    """This machine is node ``node_rank`` of ``nnodes``, each running ``n`` workers.

    Global ranks are ``node_rank * n + local rank``; the servers run on node 0.
    """
    if nnodes < 1:
        raise LaunchError(f"--nnodes must be at least 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank must be in [0, {nnodes - 1}], got {node_rank}")
    here = servers if node_rank == 0 else 0
    return Layout([Node(LOCAL, n, node_rank, here)], n * nnodes, nnodes, servers, master_addr, node_rank * n)


def slots_layout(n: int, hosts: list[Host], servers: int = 0) -> Layout:
    """Fill the hosts in order, each up to its slots (``-H`` / ``--hostfile``)."""
    total = sum(h.slots for h in hosts)
    if n > total:
        names = ", ".join(f"{h.name}:{h.slots}" for h in hosts)
        raise LaunchError(f"{n} workers requested but the hosts have only {total} slots ({names})")
    counts, left = [], n
    for h in hosts:
        counts.append(min(h.slots, left))
        left -= counts[-1]
    return _spread(hosts, counts, servers)


def block_layout(n: int, hosts: list[Host], servers: int = 0) -> Layout:
    """Even contiguous blocks of ranks over the hosts (``--cluster``): 5 over 2 is 3 + 2."""
    if not hosts:
        raise LaunchError("the cluster has no host")
    base, extra = divmod(n, len(hosts))
    return _spread(hosts, [base + (i < extra) for i in range(len(hosts))], servers)


def _spread(hosts: list[Host], counts: list[int], servers: int) -> Layout:
    used = [(h, c) for h, c in zip(hosts, counts) if c > 0]
    nodes = [Node(h, c, i, servers if i == 0 else 0) for i, (h, c) in enumerate(used)]
    return Layout(nodes, sum(counts), len(nodes), servers, master_address([h for h, _ in used]))


def build_specs(
    layout: Layout,
    worker_argv: list[str],
    server_argv: list[str],
    master_port: int,
    common_env: dict[str, str],
) -> list[ProcSpec]:
    """One spec per worker and server of this launch, with the launcher contract's environment.

    ``common_env`` holds what every process gets (DISTRIB_TRANSPORT, DISTRIB_TIMEOUT, ...).
    """
    specs = []
    rank = layout.rank_offset
    for node in layout.nodes:
        shared = {
            **common_env,
            "DISTRIB_NUM_SERVERS": str(layout.num_servers),
            "DISTRIB_NODE_RANK": str(node.node_rank),
            "DISTRIB_NNODES": str(layout.nnodes),
            "DISTRIB_SIZE": str(layout.world_size),
            "MASTER_ADDR": layout.master_addr,
            "MASTER_PORT": str(master_port),
            "PYTHONUNBUFFERED": "1",
        }
        if "OMP_NUM_THREADS" not in os.environ:
            # Without this every worker starts one thread per core and they all fight.
            per_proc = local_cpu_count() // (node.workers + node.servers)
            shared["OMP_NUM_THREADS"] = str(max(1, per_proc))
        for local in range(node.workers):
            env = {
                **shared,
                "DISTRIB_ROLE": "worker",
                "DISTRIB_RANK": str(rank),
                "DISTRIB_LOCAL_RANK": str(local),
                "DISTRIB_LOCAL_SIZE": str(node.workers),
                "RANK": str(rank),
                "WORLD_SIZE": str(layout.world_size),
                "LOCAL_RANK": str(local),
                "LOCAL_WORLD_SIZE": str(node.workers),
                "GROUP_RANK": str(node.node_rank),
            }
            specs.append(ProcSpec(str(rank), "worker", rank, node.host, list(worker_argv), env))
            rank += 1
        for index in range(node.servers):
            env = {
                **shared,
                "DISTRIB_ROLE": "server",
                "DISTRIB_RANK": str(index),
                "DISTRIB_LOCAL_RANK": str(index),
                "DISTRIB_LOCAL_SIZE": str(node.servers),
            }
            specs.append(ProcSpec(f"s{index}", "server", index, node.host, list(server_argv), env))
    return specs
