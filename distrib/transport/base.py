"""Point-to-point transport interface shared by the ZeroMQ and MPI back ends.

A transport moves :class:`~distrib.transport.wire.Message` objects between ranks. It is
single-threaded by design: there is no background thread; whoever waits in :meth:`recv` pumps
incoming messages. Everything that arrives is sorted into a queue per (sender, channel), so
messages of different channels or peers never block each other.

While a rank waits it also answers two control messages:

- ``ping``  -> ``pong`` with ``state`` (the collective this rank is in now). A rank whose deadline
  passes pings its group; ranks that do not answer, or are not in the same collective yet, are
  the ones named as missing in :class:`~distrib.errors.CommTimeout`.
- ``abort`` -> recorded; a rank waiting on that channel raises the error the aborting rank
  reported (mismatch, timeout, or a failure in user code), so no rank is left hanging.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

from ..errors import CollectiveMismatch, CommTimeout, PeerFailed, WireError
from .wire import Message, decode, encode

DEFAULT_TIMEOUT = 300.0
# How long a timed-out rank waits for pongs before it names the missing ranks.
PING_WINDOW = 2.0


class Transport:
    """Base class: queueing, deadlines and control messages on top of two primitives.

    Subclasses implement ``_send_frames(dst, frames)`` (non-blocking: queue and return) and
    ``_recv_frames(timeout) -> (src, frames) | None`` (one whole message from any peer).
    """

    name = "base"

    def __init__(self, rank: int, size: int, timeout: float | None = None):
        self.rank = rank
        self.size = size
        self.timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        self.bytes_sent = 0
        self.messages_sent = 0
        # The collective this rank is in, answered to pings: {"c": channel, "q": seq, "sig": ...}.
        self.state = None
        self._queues = defaultdict(deque)      # (src, channel) -> deque[Message]
        self._aborts = {}                      # channel -> Message (the first abort seen)
        self._pongs = {}                       # src -> state
        self._send_lock = threading.Lock()     # frames of one message stay together
        self._cv = threading.Condition()       # guards the queues; one thread pumps at a time
        self._pumping = False
        self.closed = False
        # Set once this job is known to be failing (an abort sent or received, an uncaught
        # exception): close() then does not wait for sends to peers that may be gone.
        self.failed = False

    # -- to implement ------------------------------------------------------------------------
    def _send_frames(self, dst: int, frames: list) -> None:
        raise NotImplementedError

    def _recv_frames(self, timeout: float):
        raise NotImplementedError

    def _close(self, linger: float) -> None:
        raise NotImplementedError

    # -- public ------------------------------------------------------------------------------
    def send(self, dst: int, msg: Message) -> None:
        """Queue ``msg`` for ``dst`` and return at once.

        The message's tensors are sent without copies where possible: do not modify them
        afterwards (every collective in distrib hands over fresh or read-only tensors).
        """
        if not 0 <= dst < self.size or dst == self.rank:
            raise ValueError(f"rank {self.rank}: cannot send to rank {dst} (size {self.size})")
        msg.sender = self.rank
        frames = encode(msg)
        with self._send_lock:
            self._send_frames(dst, frames)
            self.bytes_sent += msg.nbytes + len(frames[0])
            self.messages_sent += 1

    def recv(self, src: int, channel: int = 0, seq: int | None = None, timeout: float | None = None,
             what: str = "a message", group=None) -> Message:
        """The next message from ``src`` on ``channel`` (with sequence number ``seq`` if given).

        Messages with an older ``seq`` are stale leftovers of a failed collective and are dropped.
        On the deadline the ranks of ``group`` (default: ``[src]``) are pinged, and
        :class:`CommTimeout` names those that are not in this collective.

        Several threads may wait at once (say the optimizer's and the main thread, on different
        channels): one of them pumps the socket, the others sleep until it sorts a message in.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            with self._cv:
                msg = self._take(src, channel, seq)
                if msg is not None:
                    return msg
                self._check_abort(channel, seq)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if self._pumping:
                    self._cv.wait(min(left, 0.1))
                    continue
                self._pumping = True
            self._pump_unlocked(min(left, 0.05))
        raise self._timeout_error(src, channel, seq, timeout, what, group)

    def abort(self, ranks, channel: int, seq: int, kind: str, text: str, missing=()) -> None:
        """Tell ``ranks`` that the operation (channel, seq) failed here, so they stop waiting."""
        meta = {"type": kind, "text": text, "missing": list(missing)}
        self.failed = True
        for r in ranks:
            if r != self.rank:
                try:
                    self.send(r, Message(kind="abort", channel=channel, seq=seq, meta=meta))
                except Exception:  # a dead peer must not hide the original error
                    pass

    def poll_once(self, timeout: float = 0.0) -> None:
        """Receive and sort one message if one arrives within ``timeout`` (or another thread
        is already pumping, wait for it)."""
        with self._cv:
            if self._pumping:
                self._cv.wait(timeout)
                return
            self._pumping = True
        self._pump_unlocked(timeout)

    def pending(self, src: int, channel: int) -> int:
        return len(self._queues[(src, channel)])

    def close(self, linger: float | None = None) -> None:
        """Close, first letting queued sends go out for up to ``linger`` seconds (10 s, or
        0.5 s once the job is failing and peers may be gone)."""
        if not self.closed:
            self.closed = True
            if linger is None:
                linger = 0.5 if self.failed else 10.0
            self._close(linger)

    # -- internals ---------------------------------------------------------------------------
    def _take(self, src, channel, seq):
        q = self._queues.get((src, channel))
        while q:
            if seq is None or q[0].seq == seq:
                return q.popleft()
            if q[0].seq < seq:
                q.popleft()  # stale: from a collective that failed earlier
                continue
            # A later collective's message is at the head: ours cannot be behind it (per-peer
            # FIFO), so look further only for equal seq numbers (never happens in order).
            for i, m in enumerate(q):
                if m.seq == seq:
                    del q[i]
                    return m
            return None
        return None

    def _pump_unlocked(self, timeout: float) -> None:
        """Receive one message (the caller has set ``_pumping``) and sort it in."""
        try:
            got = self._recv_frames(timeout)
        except BaseException:
            with self._cv:
                self._pumping = False
                self._cv.notify_all()
            raise
        try:
            if got is not None:
                self._dispatch(*got)
        finally:
            with self._cv:
                self._pumping = False
                self._cv.notify_all()

    def _dispatch(self, src, frames) -> None:
        try:
            msg = decode(frames)
        except WireError as e:
            raise WireError(f"rank {self.rank}: bad message from rank {src}: {e}") from None
        if src is not None and msg.sender != src:
            raise WireError(f"rank {self.rank}: message claims sender {msg.sender} "
                            f"but came from rank {src}")
        if not 0 <= msg.sender < self.size:
            raise WireError(f"rank {self.rank}: message from unknown rank {msg.sender}")
        if msg.kind == "ping":
            self.send(msg.sender, Message(kind="pong", channel=msg.channel, seq=msg.seq,
                                          meta={"state": self.state}))
            return
        with self._cv:
            if msg.kind == "data":
                self._queues[(msg.sender, msg.channel)].append(msg)
            elif msg.kind == "pong":
                self._pongs[msg.sender] = msg.meta.get("state")
            elif msg.kind == "abort":
                self._aborts.setdefault(msg.channel, msg)
                self.failed = True

    def _check_abort(self, channel, seq):
        a = self._aborts.get(channel)
        if a is not None and a.meta.get("type") == "error":
            # A peer failed outright: every later wait on this channel fails the same way.
            raise PeerFailed(f"rank {a.sender} failed: {a.meta.get('text', '')}")
        if a is None or (seq is not None and a.seq < seq):
            if a is not None:
                del self._aborts[channel]  # an abort of an older operation: already handled
            return
        if seq is not None and a.seq > seq:
            return
        del self._aborts[channel]
        kind, text = a.meta.get("type"), a.meta.get("text", "")
        if kind == "mismatch":
            raise CollectiveMismatch(text)
        if kind == "timeout":
            raise CommTimeout(text, missing=a.meta.get("missing", ()))
        raise PeerFailed(f"rank {a.sender} failed: {text}")

    def _timeout_error(self, src, channel, seq, timeout, what, group):
        group = [r for r in (group if group is not None else [src]) if r != self.rank]
        states = self.probe(group, channel)
        missing, elsewhere = [], []
        for r in group:
            st = states.get(r, "no answer")
            if st == "no answer":
                missing.append(r)
            elif not st or st.get("c") != channel or (seq is not None and st.get("q", -1) < seq):
                missing.append(r)
            elif seq is not None and st.get("sig") != (self.state or {}).get("sig"):
                elsewhere.append((r, st.get("sig")))
        if elsewhere:
            mine = (self.state or {}).get("sig")
            text = (f"rank {self.rank} is in {mine} but rank(s) "
                    + ", ".join(f"{r} in {s}" for r, s in elsewhere))
            self.abort(group, channel, seq or 0, "mismatch", text)
            return CollectiveMismatch(text)
        if not missing:
            missing = [src]
        detail = ", ".join(f"rank {r} ({'no answer' if states.get(r, 'no answer') == 'no answer' else 'not in it yet'})"
                           for r in missing)
        text = (f"rank {self.rank}: {what} timed out after {timeout:g}s; did not arrive: {detail}"
                f" (waiting for a message from rank {src})")
        err = CommTimeout(text, missing=missing, op=what)
        self.abort(group, channel, seq or 0, "timeout", text, missing)
        return err

    def probe(self, ranks, channel=0, window: float = PING_WINDOW) -> dict:
        """Ping ``ranks`` and return {rank: state} for those that answer within ``window``."""
        self._pongs = {}
        for r in ranks:
            try:
                self.send(r, Message(kind="ping", channel=channel))
            except Exception:
                pass
        deadline = time.monotonic() + window
        while time.monotonic() < deadline and len(self._pongs) < len(ranks):
            self.poll_once(min(0.05, max(0.0, deadline - time.monotonic())))
        return dict(self._pongs)
