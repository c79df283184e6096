"""Where processes run.

A host is just a command prefix around the worker's command line: nothing for this machine,
``ip netns exec NS`` for a test-cluster host, ``ssh HOST`` for another machine. Also parses the
``-H host1:slots,host2:slots`` list and hostfiles (lines ``host slots=N``, ``#`` comments).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import socket
from dataclasses import dataclass

from launcher.errors import LaunchError

SSH = ("ssh", "-o", "BatchMode=yes")


@dataclass(frozen=True)
class Host:
    """One place to run processes.

    ``kind`` is ``"local"`` (this machine), ``"netns"`` (a network namespace of this machine,
    entered with ``ip netns exec``) or ``"ssh"`` (another machine). ``addr`` is the address the
    other hosts reach this one at, when known. ``slots`` caps the workers placed on it.
    """

    name: str
    kind: str = "local"
    slots: int | None = None
    netns: str | None = None
    addr: str | None = None

    def command(self, argv: list[str], job_env: dict[str, str], cwd: str) -> tuple[list[str], bool]:
        """The command that runs ``argv`` here with ``job_env`` set, working in ``cwd``.

        Returns ``(command, inherit)``: when ``inherit`` is true the caller passes ``job_env`` in
        the spawned process's environment (it reaches ``argv`` through the prefix); for ssh the
        variables travel inside the remote command itself and ``inherit`` is false.
        """
        if self.kind == "local":
            return list(argv), True
        if self.kind == "netns":
            return ["ip", "netns", "exec", self.netns, *argv], True
        if self.kind == "ssh":
            return ssh_command(self.name, argv, job_env, cwd), False
        raise ValueError(f"unknown host kind {self.kind!r}")


LOCAL = Host("localhost")


def ssh_command(host: str, argv: list[str], job_env: dict[str, str], cwd: str) -> list[str]:
    """``ssh HOST 'cd CWD && exec env K=V... ARGV'``, every piece shell-quoted.

    ssh joins its arguments into one string run by the remote shell, so the remote command is
    built as one properly quoted string. As with mpiexec, the remote host needs the same Python
    and script paths (a shared or identical file system) and password-less ssh (BatchMode).
    """
    assigns = [f"{k}={shlex.quote(v)}" for k, v in sorted(job_env.items())]
    remote = " ".join(["cd", shlex.quote(cwd), "&&", "exec", "env", *assigns, shlex.join(argv)])
    return [*SSH, host, remote]


def parse_host_list(text: str) -> list[Host]:
    """Parse ``-H host1:slots,host2:slots`` (a host without ``:slots`` has one slot)."""
    hosts = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise LaunchError(f"-H {text!r}: empty host name in the list")
        name, sep, slots = item.rpartition(":")
        if not sep:
            name, slots = item, "1"
        hosts.append(_host(name, _slots(slots, f"-H {text!r}: host {name!r}")))
    return _unique(hosts, "-H")


def parse_hostfile(path: str) -> list[Host]:
    """Parse a hostfile: one ``host [slots=N]`` per line; ``#`` starts a comment."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise LaunchError(f"cannot read hostfile {path!r}: {e.strerror}") from None
    hosts = []
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"hostfile {path}, line {number}"
        slots = 1
        for word in words[1:]:
            key, sep, value = word.partition("=")
            if key != "slots" or not sep:
                raise LaunchError(f"{where}: expected 'HOST slots=N', got {line.strip()!r}")
            slots = _slots(value, where)
        hosts.append(_host(words[0], slots))
    if not hosts:
        raise LaunchError(f"hostfile {path!r} lists no host")
    return _unique(hosts, f"hostfile {path}")


def _slots(text: str, where: str) -> int:
    try:
        slots = int(text)
    except ValueError:
        slots = 0
    if slots < 1:
        raise LaunchError(f"{where}: slots must be a positive integer, got {text!r}")
    return slots


def _host(name: str, slots: int) -> Host:
    if not name or any(c.isspace() for c in name):
        raise LaunchError(f"invalid host name {name!r}")
    if is_local(name):
        return Host(name, "local", slots)
    return Host(name, "ssh", slots, addr=name.rpartition("@")[2])


def _unique(hosts: list[Host], where: str) -> list[Host]:
    seen = set()
    for h in hosts:
        if h.name in seen:
            raise LaunchError(f"{where}: host {h.name!r} is listed twice")
        seen.add(h.name)
    return hosts


def is_local(name: str) -> bool:
    """Whether ``name`` (optionally ``user@name``) is this machine.

    True for localhost, loopback addresses, this machine's host names, and any name that resolves
    to an address one can bind a socket to here (that is, an address of one of our interfaces).
    """
    if "@" in name:
        return False  # an explicit ssh user means the caller wants ssh
    if name in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return False
    for family, _, _, _, sockaddr in infos:
        addr = sockaddr[0]
        if ipaddress.ip_address(addr.split("%")[0]).is_loopback:
            return True
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, 0))
                return True
            except OSError:
                pass
    return False


def master_address(hosts: list[Host]) -> str:
    """The address every host reaches the first one (where worker 0 runs) at."""
    first = hosts[0]
    if first.kind != "local":
        return first.addr or first.name
    remote = next((h for h in hosts if h.kind != "local"), None)
    if remote is None:
        return "127.0.0.1"
    # The local address of the route toward a remote host is one that host can reach us at.
    # A UDP "connect" sends nothing; it only picks the route.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((remote.addr or remote.name, 9))
            return s.getsockname()[0]
    except OSError:
        return socket.getfqdn()


def local_cpu_count() -> int:
    """CPUs this process may use (the affinity mask, not just the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
