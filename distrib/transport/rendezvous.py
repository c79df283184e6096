"""Rendezvous: every rank learns every other rank's address through the master.

Rank 0 binds ``MASTER_ADDR:MASTER_PORT``; every other rank connects, sends its own address
(``{"rank", "size", "host", "port", "ipc", "hostname"}``, msgpack) and waits for the full table.
Rank 0 answers once all ``size`` ranks have registered, or raises :class:`CommTimeout` naming
those that did not. Only msgpack maps of plain values cross the wire, and each is validated.
"""
from __future__ import annotations

import socket
import time

import msgpack
import zmq

from ..errors import CommTimeout, DistribError, WireError

_FIELDS = {"rank": int, "size": int, "host": str, "port": int, "ipc": str, "hostname": str}


def local_address_towards(master_addr: str) -> str:
    """The address of this host's interface that routes to ``master_addr`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_addr, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _check_entry(entry, size):
    if not isinstance(entry, dict) or set(entry) != set(_FIELDS):
        raise WireError(f"malformed rendezvous entry: {entry!r:.200}")
    for k, t in _FIELDS.items():
        if type(entry[k]) is not t:
            raise WireError(f"rendezvous field {k} must be {t.__name__}")
    if entry["size"] != size:
        raise DistribError(f"rank {entry['rank']} believes the job has {entry['size']} ranks, "
                           f"rank 0 believes {size}: the ranks were started inconsistently")
    if not 0 <= entry["rank"] < size:
        raise DistribError(f"rendezvous from rank {entry['rank']}, outside 0..{size - 1}")
    return entry


def _unpack(data):
    try:
        return msgpack.unpackb(data, raw=False, max_bin_len=0, max_ext_len=0,
                               max_str_len=4096, max_array_len=1 << 20, max_map_len=1 << 20)
    except Exception as e:
        raise WireError(f"malformed rendezvous message: {e}") from None


def rendezvous(ctx: zmq.Context, me: dict, size: int, master_addr: str, master_port: int,
               timeout: float) -> list:
    """Exchange ``me`` with every rank; returns the table (a list indexed by rank)."""
    deadline = time.monotonic() + timeout
    if me["rank"] == 0:
        return _serve(ctx, me, size, master_addr, master_port, deadline, timeout)
    return _join(ctx, me, size, master_addr, master_port, deadline, timeout)


def _serve(ctx, me, size, master_addr, master_port, deadline, timeout):
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.MAXMSGSIZE, 1 << 16)
    try:
        sock.bind(f"tcp://*:{master_port}")
    except zmq.ZMQError as e:
        sock.close(0)
        raise DistribError(f"rank 0 cannot listen on the master port {master_port} "
                           f"({e}); is another job using it? Choose another MASTER_PORT") from None
    try:
        table = {0: me}
        idents = {}
        while len(table) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(size)) - set(table))
                raise CommTimeout(f"rendezvous at {master_addr}:{master_port} timed out after "
                                  f"{timeout:g}s; ranks that did not join: {missing}",
                                  missing=missing, op="rendezvous")
            if not sock.poll(int(min(left, 1.0) * 1000)):
                continue
            frames = sock.recv_multipart()
            if len(frames) != 2:
                continue  # not one of ours (e.g. a port scanner); ignore it
            try:
                entry = _check_entry(_unpack(frames[1]), size)
            except WireError:
                continue
            if entry["rank"] in table:
                raise DistribError(f"two processes registered as rank {entry['rank']}")
            table[entry["rank"]] = entry
            idents[entry["rank"]] = frames[0]
        listing = [table[r] for r in range(size)]
        reply = msgpack.packb(listing, use_bin_type=True)
        for r, ident in idents.items():
            sock.send_multipart([ident, reply])
        return listing
    finally:
        sock.close()


def _join(ctx, me, size, master_addr, master_port, deadline, timeout):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 64 << 20)
    try:
        sock.connect(f"tcp://{master_addr}:{master_port}")
        sock.send(msgpack.packb(me, use_bin_type=True))
        left = deadline - time.monotonic()
        if not sock.poll(int(max(left, 0) * 1000)):
            raise CommTimeout(f"rank {me['rank']}: rendezvous with rank 0 at {master_addr}:"
                              f"{master_port} timed out after {timeout:g}s (rank 0 or another "
                              f"rank did not arrive)", missing=[0], op="rendezvous")
        listing = _unpack(sock.recv())
        if not isinstance(listing, list) or len(listing) != size:
            raise WireError("malformed rendezvous table")
        return [_check_entry(e, size) for e in listing]
    finally:
        sock.close()
