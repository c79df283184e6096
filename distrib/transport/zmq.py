"""ZeroMQ transport: one ROUTER socket to receive, one DEALER socket per peer to send.

Each rank binds a ROUTER on an ephemeral TCP port (all interfaces, so it works across hosts) and,
for peers on the same host, on an IPC (Unix domain) socket too. Addresses are exchanged through
the rendezvous at the master address. Sends hand tensor buffers to ZeroMQ without copies
(``copy=False``); ZeroMQ's I/O thread writes them out while the caller goes on, which is what
lets the ring pipeline its chunks.
"""
from __future__ import annotations

import os
import socket
import tempfile
import uuid

import zmq

from ..errors import DistribError
from .base import Transport
from .rendezvous import local_address_towards, rendezvous
from .wire import MAX_MESSAGE_BYTES

# Below this size ZeroMQ copies anyway; zero-copy frames cost a callback each.
_ZERO_COPY_MIN = 64 * 1024


class ZmqTransport(Transport):
    name = "zmq"

    def __init__(self, rank: int, size: int, master_addr: str, master_port: int,
                 timeout: float | None = None, use_ipc: bool | None = None):
        super().__init__(rank, size, timeout)
        if use_ipc is None:
            use_ipc = os.environ.get("DISTRIB_ZMQ_IPC", "1") != "0"
        self.ctx = zmq.Context(io_threads=1)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.RCVHWM, 0)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + (1 << 20))
        self.router.setsockopt(zmq.RCVBUF, 4 << 20)
        port = self.router.bind_to_random_port("tcp://*")
        ipc = ""
        if use_ipc:
            path = os.path.join(tempfile.gettempdir(), f"distrib-{uuid.uuid4().hex[:12]}.sock")
            self.router.bind(f"ipc://{path}")
            ipc = path
        self._ipc_path = ipc
        me = {"rank": rank, "size": size, "host": local_address_towards(master_addr),
              "port": port, "ipc": ipc, "hostname": host_id()}
        try:
            self.table = rendezvous(self.ctx, me, size, master_addr, master_port, self.timeout)
        except BaseException:
            self._close(0)
            raise
        # Processes with the same host id can share memory (see collectives/shm.py).
        self.host_ids = [e["hostname"] for e in self.table]
        self.dealers = {}
        for peer, entry in enumerate(self.table):
            if peer == rank:
                continue
            d = self.ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.IDENTITY, b"%d" % rank)
            d.setsockopt(zmq.SNDHWM, 0)
            d.setsockopt(zmq.SNDBUF, 4 << 20)
            d.setsockopt(zmq.LINGER, -1)
            same_host = entry["hostname"] == me["hostname"] and entry["ipc"]
            d.connect(f"ipc://{entry['ipc']}" if same_host else f"tcp://{entry['host']}:{entry['port']}")
            self.dealers[peer] = d

    def _send_frames(self, dst, frames):
        big = [not isinstance(f, bytes) and memoryview(f).nbytes >= _ZERO_COPY_MIN for f in frames]
        sock = self.dealers[dst]
        last = len(frames) - 1
        for i, f in enumerate(frames):
            sock.send(f, zmq.SNDMORE if i < last else 0, copy=not big[i])

    def _recv_frames(self, timeout):
        if not self.router.poll(int(timeout * 1000)):
            return None
        parts = self.router.recv_multipart(copy=False)
        ident = parts[0].bytes
        try:
            src = int(ident)
        except ValueError:
            raise DistribError(f"rank {self.rank}: message from an unknown peer {ident!r:.40}") from None
        frames = [parts[1].bytes] + [p.buffer for p in parts[2:]]
        return src, frames

    def _close(self, linger):
        for d in getattr(self, "dealers", {}).values():
            d.setsockopt(zmq.LINGER, int(linger * 1000))
            d.close()
        self.router.close(0)
        self.ctx.term()
        if self._ipc_path if hasattr(self, "_ipc_path") else False:
            try:
                os.unlink(self._ipc_path)
            except OSError:
                pass


def host_id() -> str:
    """Identifies this host (and network namespace) among the job's processes."""
    return socket.gethostname() + _netns_tag()


def _netns_tag() -> str:
    """Processes in different network namespaces cannot share an IPC path's peer: tell them apart."""
    try:
        return "@" + str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return ""
