"""The test cluster: K "hosts" on this machine, each a network namespace with its own address.

``distrib cluster up --name NAME --hosts K [--bandwidth RATE]`` builds, for host ``i``:

- a network namespace ``dtb-NAME-i`` with ``lo`` up;
- a veth pair: ``eth0`` inside the namespace (the host's address, ``/24`` of the cluster's
  subnet) and ``dtv-NAME-i`` outside, enslaved to the bridge ``dtbr-NAME`` that joins all hosts;
- with ``--bandwidth``, a token-bucket filter (``tc ... tbf``) on both ends of the pair, so the
  host sends at most RATE (egress of ``eth0``) and receives at most RATE (egress of the bridge
  side), like a full-duplex NIC of that speed.

The root namespace gets no address on the bridge: the hosts reach each other and nothing else.
What was made is recorded in ``/run/distrib/clusters/NAME.json`` (written before anything is
created, removed last), which ``status``, ``exec``, ``down`` and ``distrib launch --cluster`` read.
``down`` also finds what a crashed ``up`` left, by the names above, and stops processes still
running inside the hosts.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from launcher.errors import LaunchError

STATE_DIR = "/run/distrib/clusters"
NETNS_DIR = "/run/netns"  # where `ip netns` keeps its namespaces
MAX_HOSTS = 99  # two digits keep "dtv-NAME-i" within Linux's 15-character interface names
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_]{0,7}")
IFACE = "eth0"  # the host's interface, inside its namespace
# Default subnets to pick from, in order: the first /24 that touches nothing on this machine.
POOLS = ("10.213.0.0/16", "172.29.0.0/16", "192.168.213.0/24")
# tc's rate units (see tc(8)): "bit" means bits per second, "bps" BYTES per second.
_UNITS = {"": 1, "bit": 1, "bps": 8}
for _p, _m in (("k", 1e3), ("m", 1e6), ("g", 1e9), ("t", 1e12),
               ("ki", 2 ** 10), ("mi", 2 ** 20), ("gi", 2 ** 30), ("ti", 2 ** 40)):
    _UNITS[_p + "bit"] = _m
    _UNITS[_p + "bps"] = 8 * _m
MIN_RATE = 8_000  # bits per second: below 1 kB/s a TCP handshake barely completes
TBF_LATENCY = "100ms"  # how long a packet may wait in the bucket's queue before it is dropped


class ClusterError(LaunchError):
    """A test-cluster request that cannot be done (printed without a traceback, exit status 2)."""


@dataclass(frozen=True)
class ClusterHost:
    """One host: its index, namespace, IPv4 address, interface inside it and the bridge-side veth."""

    index: int
    netns: str
    addr: str
    iface: str
    veth: str


@dataclass(frozen=True)
class Cluster:
    """A cluster as recorded by ``up``: ``bandwidth`` is the RATE text (None: unlimited)."""

    name: str
    subnet: str
    bridge: str
    hosts: list[ClusterHost]
    bandwidth: str | None = None
    bandwidth_bps: float | None = None  # bits per second
    created: float = 0.0

    def host(self, index: int) -> ClusterHost:
        if not 0 <= index < len(self.hosts):
            raise ClusterError(f"cluster {self.name!r} has hosts 0..{len(self.hosts) - 1}, not {index}")
        return self.hosts[index]


# ---------------------------------------------------------------- checks and parsing

def check_name(name: str) -> str:
    """``name`` if it is a valid cluster name (it becomes part of interface names)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ClusterError(
            f"invalid cluster name {name!r}: use 1 to 8 characters among lowercase letters, digits "
            "and '_', starting with a letter or digit (interface names are limited to 15 characters)")
    return name


def parse_rate(text: str) -> float:
    """A tc rate (``100mbit``, ``20Mbit``, ``1gbit``, ``500kbps``...) in bits per second."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS:
        raise ClusterError(f"invalid bandwidth {text!r}: expected a number and a tc unit such as "
                           "100mbit, 1gbit, 500kbit (bit: bits/s; bps: bytes/s, as in tc)")
    bps = float(m.group(1)) * _UNITS[m.group(2)]
    if bps < MIN_RATE:
        raise ClusterError(f"bandwidth {text!r} is too low: at least {MIN_RATE // 1000}kbit")
    return bps


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ClusterError(f"distrib cluster {what} needs root (network namespaces, bridges and tc do)")


def _require_ip() -> None:
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise ClusterError(f"'{tool}' (iproute2) not found: run .ci/install-system-deps "
                               "or apt-get install iproute2")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run an iproute2 command; failures become a ClusterError quoting it and its message."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"'{' '.join(argv)}' did not finish within 30 s") from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()
        raise ClusterError(f"'{' '.join(argv)}' failed: {msg}")
    return proc


# ---------------------------------------------------------------- recorded state

def _state_path(name: str) -> str:
    return os.path.join(STATE_DIR, f"{name}.json")


@contextlib.contextmanager
def _locked():
    """Serialise up/down (subnet choice, name checks) between concurrent callers."""
    os.makedirs(STATE_DIR, exist_ok=True)
    with open(os.path.join(STATE_DIR, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _save(cluster: Cluster) -> None:
    path = _state_path(cluster.name)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(cluster), f, indent=1)
    os.replace(tmp, path)


def _read(path: str) -> Cluster:
    with open(path) as f:
        d = json.load(f)
    hosts = [ClusterHost(**h) for h in d.pop("hosts")]
    return Cluster(hosts=hosts, **d)


def load(name: str) -> Cluster:
    """The recorded cluster NAME; ClusterError when there is none."""
    check_name(name)
    try:
        return _read(_state_path(name))
    except FileNotFoundError:
        raise ClusterError(f"no test cluster named {name!r} "
                           f"(make one with: distrib cluster up --name {name} --hosts K)") from None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ClusterError(f"the record of cluster {name!r} ({_state_path(name)}) is unreadable: {e}; "
                           f"run distrib cluster down --name {name}") from None


def names() -> dict[str, Cluster | None]:
    """Every cluster on this machine: recorded ones, and leftovers found by their interface or
    namespace names (mapped to None)."""
    found: dict[str, Cluster | None] = {}
    for ns in _listdir(NETNS_DIR):
        m = re.fullmatch(r"dtb-(.+)-\d+", ns)
        if m and NAME_RE.fullmatch(m.group(1)):
            found[m.group(1)] = None
    for link in _listdir("/sys/class/net"):
        m = re.fullmatch(r"dtbr-(.+)|dtv-(.+)-\d+", link)
        if m and NAME_RE.fullmatch(m.group(1) or m.group(2)):
            found[m.group(1) or m.group(2)] = None
    # Read the records after listing the resources: anything listed above was recorded first.
    for entry in _listdir(STATE_DIR):
        if entry.endswith(".json") and NAME_RE.fullmatch(entry[:-5]):
            try:
                found[entry[:-5]] = _read(os.path.join(STATE_DIR, entry))
            except (OSError, ValueError, TypeError, KeyError):
                found[entry[:-5]] = None
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


# ---------------------------------------------------------------- subnets

def _used_networks() -> list[ipaddress.IPv4Network]:
    """Networks this machine's root namespace uses (addresses and routes, the default excepted)
    and those of the other clusters."""
    used = []
    out = _run("ip", "-4", "-o", "addr", "show").stdout
    for cidr in re.findall(r"\sinet (\S+)", out):
        used.append(ipaddress.ip_interface(cidr).network)
    out = _run("ip", "-4", "route", "show", "table", "all", check=False).stdout
    for line in out.splitlines():
        words = line.split()
        dest = words[1] if words and words[0] in ("local", "broadcast", "unicast") and len(words) > 1 else \
            (words[0] if words else "")
        try:
            net = ipaddress.ip_network(dest, strict=False)
        except ValueError:
            continue  # "default", "unreachable", ...
        if net.prefixlen > 0:
            used.append(net)
    for cluster in names().values():
        if cluster is not None:
            used.append(ipaddress.ip_network(cluster.subnet))
    return used


def _pick_subnet(requested: str | None, hosts: int) -> ipaddress.IPv4Network:
    used = _used_networks()
    if requested is not None:
        try:
            net = ipaddress.ip_network(requested)
        except ValueError as e:
            raise ClusterError(f"invalid --subnet {requested!r}: {e} (expected e.g. 10.213.7.0/24)") from None
        if net.version != 4:
            raise ClusterError(f"--subnet {requested!r}: only IPv4 subnets are supported")
        if net.num_addresses - 2 < hosts:
            raise ClusterError(f"--subnet {requested} has room for {max(0, net.num_addresses - 2)} hosts, "
                               f"not {hosts}")
        clash = next((u for u in used if u.overlaps(net)), None)
        if clash is not None:
            raise ClusterError(f"--subnet {requested} overlaps {clash}, already used on this machine")
        return net
    for pool in POOLS:
        for net in ipaddress.ip_network(pool).subnets(new_prefix=24):
            if not any(u.overlaps(net) for u in used):
                return net
    raise ClusterError(f"no free /24 left in {', '.join(POOLS)}: choose one with --subnet")


# ---------------------------------------------------------------- up / down / status / exec

def up(name: str, hosts: int, bandwidth: str | None = None, subnet: str | None = None) -> Cluster:
    """Make cluster NAME of ``hosts`` hosts (see the module docstring); returns its record.

    On any failure, whatever was made is removed again before the error is raised.
    """
    check_name(name)
    if isinstance(hosts, bool) or not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
        raise ClusterError(f"--hosts must be an integer from 1 to {MAX_HOSTS}, got {hosts!r}")
    rate = parse_rate(bandwidth) if bandwidth is not None else None
    _require_root("up")
    _require_ip()
    with _locked():
        if os.path.exists(_state_path(name)):
            raise ClusterError(f"cluster {name!r} already exists (remove it with: distrib cluster down --name {name})")
        if name in names():
            raise ClusterError(f"leftovers of a cluster {name!r} exist: run distrib cluster down --name {name}")
        net = _pick_subnet(subnet, hosts)
        addrs = list(net.hosts())[:hosts]
        cluster = Cluster(
            name=name, subnet=str(net), bridge=f"dtbr-{name}",
            hosts=[ClusterHost(i, f"dtb-{name}-{i}", str(addrs[i]), IFACE, f"dtv-{name}-{i}")
                   for i in range(hosts)],
            bandwidth=bandwidth, bandwidth_bps=rate, created=time.time())
        _save(cluster)  # first, so that down() and concurrent up() see it whatever happens next
    try:
        _build(cluster, net.prefixlen)
    except BaseException:
        with contextlib.suppress(ClusterError):  # the first error is the one to report
            down(name)
        raise
    return cluster


def _build(c: Cluster, prefixlen: int) -> None:
    _run("ip", "link", "add", c.bridge, "type", "bridge", "forward_delay", "0")
    _run("ip", "link", "set", c.bridge, "up")
    for h in c.hosts:
        _run("ip", "netns", "add", h.netns)
        _run("ip", "-n", h.netns, "link", "set", "lo", "up")
        _run("ip", "link", "add", h.veth, "type", "veth", "peer", "name", h.iface, "netns", h.netns)
        _run("ip", "link", "set", h.veth, "master", c.bridge)
        _run("ip", "link", "set", h.veth, "up")
        _run("ip", "-n", h.netns, "addr", "add", f"{h.addr}/{prefixlen}", "dev", h.iface)
        _run("ip", "-n", h.netns, "link", "set", h.iface, "up")
        if c.bandwidth_bps is not None:
            tbf = _tbf(c.bandwidth_bps)
            _run("tc", "-n", h.netns, "qdisc", "replace", "dev", h.iface, "root", *tbf)  # sent
            _run("tc", "qdisc", "replace", "dev", h.veth, "root", *tbf)  # received
    _wait_links_up(c)  # links come up asynchronously


def _tbf(bps: float) -> list[str]:
    # The bucket holds 10 ms of traffic (what a 100 Hz timer tick may release at once) but at
    # least 16 KiB, more than one full frame: a frame larger than the bucket would be dropped.
    burst = max(16 * 1024, int(bps / 8 / 100))
    return ["tbf", "rate", f"{int(bps)}bit", "burst", str(burst), "latency", TBF_LATENCY]


def _wait_links_up(c: Cluster, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    pending = [h.veth for h in c.hosts] + [c.bridge]
    while pending:
        pending = [link for link in pending if not _oper_up(link)]
        if pending and time.monotonic() > deadline:
            raise ClusterError(f"interfaces {', '.join(pending)} did not come up within {timeout:.0f} s")
        if pending:
            time.sleep(0.02)


def _oper_up(link: str) -> bool:
    try:
        with open(f"/sys/class/net/{link}/operstate") as f:
            return f.read().strip() in ("up", "unknown")
    except OSError:
        return False


def down(name: str) -> bool:
    """Remove cluster NAME: processes inside its hosts are stopped, namespaces, links and the
    record removed. Idempotent; returns whether there was anything to remove."""
    check_name(name)
    _require_root("down")
    _require_ip()
    with _locked():
        try:
            recorded = load(name)
        except ClusterError:
            recorded = None
        spaces = {h.netns for h in recorded.hosts} if recorded else set()
        spaces |= {ns for ns in _listdir(NETNS_DIR) if re.fullmatch(rf"dtb-{name}-\d+", ns)}
        links = {h.veth for h in recorded.hosts} if recorded else set()
        links |= {x for x in _listdir("/sys/class/net") if re.fullmatch(rf"dtv-{name}-\d+", x)}
        links.add(f"dtbr-{name}")
        present = {ns for ns in spaces if os.path.exists(os.path.join(NETNS_DIR, ns))}
        found = bool(recorded or present or any(os.path.exists(f"/sys/class/net/{x}") for x in links))
        for ns in sorted(present):
            _stop_processes(ns)
        # Deleting one end of a veth pair deletes the other: the hosts lose their links even if
        # a process we could not stop keeps a namespace alive.
        for link in sorted(links):
            if os.path.exists(f"/sys/class/net/{link}"):
                _run("ip", "link", "del", link, check=False)
        for ns in sorted(present):
            _run("ip", "netns", "del", ns, check=False)
        left = [x for x in links if os.path.exists(f"/sys/class/net/{x}")]
        left += [ns for ns in present if os.path.exists(os.path.join(NETNS_DIR, ns))]
        if left:
            raise ClusterError(f"could not remove {', '.join(sorted(left))} of cluster {name!r}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_state_path(name))
    return found


def _stop_processes(netns: str, grace: float = 2.0) -> None:
    """SIGTERM the processes living in ``netns``, then SIGKILL those still there after ``grace``."""
    def pids():
        out = _run("ip", "netns", "pids", netns, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        todo = pids()
        for pid in todo:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while todo and time.monotonic() < deadline:
            time.sleep(0.05)
            todo = pids()
        if not todo:
            return


def status(name: str) -> dict:
    """The record of cluster NAME plus what is actually there: ``ok`` when every host's
    namespace, the bridge and every link are up."""
    c = load(name)
    hosts = []
    for h in c.hosts:
        alive = os.path.exists(os.path.join(NETNS_DIR, h.netns)) and _oper_up(h.veth)
        hosts.append({**asdict(h), "up": alive})
    bridge_up = _oper_up(c.bridge)
    return {"name": c.name, "subnet": c.subnet, "bridge": c.bridge, "bridge_up": bridge_up,
            "bandwidth": c.bandwidth, "bandwidth_bps": c.bandwidth_bps, "created": c.created,
            "hosts": hosts, "ok": bridge_up and all(h["up"] for h in hosts)}


def exec_argv(name: str, host: int, argv: list[str], hostname: bool = False) -> list[str]:
    """The command line that runs ``argv`` in host ``host`` of cluster NAME (needs root).

    With ``hostname``, ``argv`` also gets the host's own host name (its namespace's name, in a
    new UTS namespace): all hosts share this machine's name otherwise, and Open MPI tells hosts
    apart by name.
    """
    if not argv:
        raise ClusterError("no command given to run on the cluster host")
    netns = load(name).host(host).netns
    if not hostname:
        return ["ip", "netns", "exec", netns, *argv]
    return ["ip", "netns", "exec", netns, "unshare", "--uts", "--",
            "sh", "-c", 'hostname "$0" && exec "$@"', netns, *argv]


def find_host(addr: str) -> tuple[Cluster, ClusterHost]:
    """The cluster host whose address or namespace name is ``addr``."""
    for c in names().values():
        for h in c.hosts if c else ():
            if addr in (h.addr, h.netns):
                return c, h
    raise ClusterError(f"no cluster host has the address or name {addr!r}")


def mpiexec_options(name: str, slots: list[int]) -> list[str]:
    """Options that make ``mpiexec``, run in host 0 with ``exec_argv(..., hostname=True)``,
    start ``slots[i]`` ranks on host ``i``: the hosts' addresses, and ``distrib cluster rsh``
    instead of ssh to start Open MPI's daemon on the other hosts."""
    c = load(name)
    if len(slots) > len(c.hosts):
        raise ClusterError(f"cluster {name!r} has {len(c.hosts)} hosts, not {len(slots)}")
    agent = f"{sys.executable} -m launcher.cli cluster rsh"
    hosts = ",".join(f"{h.addr}:{n}" for h, n in zip(c.hosts, slots) if n > 0)
    return ["--prtemca", "plm_ssh_agent", agent, "--host", hosts]


# ---------------------------------------------------------------- command line

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``distrib cluster up|status|exec|down``; each sets ``func(args) -> exit status``."""
    p = subparsers.add_parser("cluster", help="network-namespace test cluster on this machine (root)",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cluster_command", metavar="{up,status,exec,down,rsh}")
    sub.required = True

    q = sub.add_parser("up", help="make the hosts")
    q.add_argument("--name", required=True)
    q.add_argument("--hosts", type=int, required=True, help=f"number of hosts (1 to {MAX_HOSTS})")
    q.add_argument("--bandwidth", metavar="RATE", help="per-host limit each way, a tc rate such as 100mbit")
    q.add_argument("--subnet", help="IPv4 subnet for the hosts (default: a free /24)")
    q.set_defaults(func=_cmd_up)

    q = sub.add_parser("status", help="show a cluster (all clusters without --name)")
    q.add_argument("--name")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_cmd_status)

    q = sub.add_parser("exec", help="run a command on one host: exec --name N --host I -- CMD...")
    q.add_argument("--name", required=True)
    q.add_argument("--host", type=int, required=True, help="host index, from 0")
    q.add_argument("--hostname", action="store_true",
                   help="give the command the host's own host name (dtb-NAME-I) in a new UTS namespace")
    # (dest "argv": "command" is taken by the `distrib` parser for the subcommand's name)
    q.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD", help="the command, after --")
    q.set_defaults(func=_cmd_exec)

    # Open MPI's launch agent (instead of ssh), called as `AGENT [OPTIONS] HOST COMMAND...`.
    q = sub.add_parser("rsh", help="run a shell command on the host with this address (mpiexec's agent)")
    q.add_argument("words", nargs=argparse.REMAINDER, metavar="HOST COMMAND...")
    q.set_defaults(func=_cmd_rsh)

    q = sub.add_parser("down", help="remove a cluster (no error when it does not exist)")
    q.add_argument("--name", required=True)
    q.set_defaults(func=_cmd_down)
    return p


def _cmd_up(args) -> int:
    c = up(args.name, args.hosts, args.bandwidth, args.subnet)
    limit = f", {c.bandwidth} each way" if c.bandwidth else ""
    print(f"cluster {c.name}: {len(c.hosts)} hosts on {c.subnet}{limit}")
    for h in c.hosts:
        print(f"  host {h.index}: {h.addr} (netns {h.netns})")
    return 0


def _cmd_status(args) -> int:
    if args.name is None:
        found = names()
        if args.json:
            print(json.dumps(sorted(found)))
            return 0
        for n, c in sorted(found.items()):
            print(f"{n}: {len(c.hosts)} hosts on {c.subnet}" if c else f"{n}: leftovers (run down)")
        return 0
    s = status(args.name)
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        limit = s["bandwidth"] or "unlimited"
        print(f"cluster {s['name']}: {len(s['hosts'])} hosts on {s['subnet']}, bandwidth {limit}, "
              f"{'ok' if s['ok'] else 'DEGRADED'}")
        for h in s["hosts"]:
            print(f"  host {h['index']}: {h['addr']} netns {h['netns']} {'up' if h['up'] else 'DOWN'}")
    return 0 if s["ok"] else 1


def _cmd_exec(args) -> int:
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    _require_root("exec")
    return _call(exec_argv(args.name, args.host, command, hostname=args.hostname))


def _cmd_rsh(args) -> int:
    words = list(args.words)
    while words and words[0].startswith("-"):  # ssh options such as -x: meaningless here
        words.pop(0)
    if len(words) < 2:
        raise ClusterError("usage: distrib cluster rsh HOST COMMAND...")
    _require_root("rsh")
    c, h = find_host(words[0])
    # ssh runs its arguments, joined by spaces, through the remote shell: do the same. Replace
    # this process, so that mpiexec's signals reach the command itself.
    argv = exec_argv(c.name, h.index, ["sh", "-c", " ".join(words[1:])], hostname=True)
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        raise ClusterError(f"cannot run {argv[0]}: {e.strerror}") from None


def _call(argv: list[str]) -> int:
    """Run ``argv``; its exit status (128 + N when killed by signal N)."""
    try:
        rc = subprocess.run(argv).returncode
    except OSError as e:
        raise ClusterError(f"cannot run {argv[0]}: {e.strerror}") from None
    return 128 - rc if rc < 0 else rc


def _cmd_down(args) -> int:
    print(f"cluster {args.name}: " + ("removed" if down(args.name) else "nothing to remove"))
    return 0
