"""Rendezvous ports: pick a free one, or check that a given one is free before spawning."""

from __future__ import annotations

import errno
import socket

from launcher.errors import LaunchError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(port: int, what: str = "master port") -> None:
    """Raise :class:`LaunchError` if ``port`` is out of range or already in use on this machine.

    Binds the wildcard address, which fails if anything listens on the port on any address.
    SO_REUSEADDR keeps a port whose old connections linger in TIME_WAIT usable, as ZeroMQ does.
    """
    if not 1 <= port <= 65535:
        raise LaunchError(f"{what} must be in 1..65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise LaunchError(f"{what} {port} is already in use; pick another master port "
                                  "or leave it out to get a free one") from None
            raise LaunchError(f"cannot use {what} {port}: {e.strerror}") from None


def parse_master(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` accepted) and validate the port."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise LaunchError(f"--master must be HOST:PORT, got {text!r}")
    if not 1 <= int(port) <= 65535:
        raise LaunchError(f"--master port must be in 1..65535, got {port}")
    return host, int(port)
