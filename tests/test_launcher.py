"""``distrib launch`` end to end: real worker processes started through the real command.

Worker scripts are tiny files written into tmp_path that do not import torch, so every launch
takes well under a second of CPU.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

ENV_KEYS = ["DISTRIB_RANK", "DISTRIB_SIZE", "DISTRIB_LOCAL_RANK", "DISTRIB_LOCAL_SIZE", "DISTRIB_TRANSPORT",
            "DISTRIB_ROLE", "DISTRIB_NUM_SERVERS", "DISTRIB_NODE_RANK", "DISTRIB_NNODES", "DISTRIB_RESTART_COUNT",
            "DISTRIB_TIMEOUT", "DISTRIB_CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
            "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "PYTHONUNBUFFERED"]

DUMP_ENV = f"""
import json, os, sys
print(json.dumps({{k: os.environ.get(k) for k in {ENV_KEYS!r}}} | {{"argv": sys.argv[1:]}}))
"""


def distrib(*args, cwd, timeout=60, env=None):
    """Run ``distrib ARGS`` (as ``python -m launcher.cli``) and return the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "launcher.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def by_rank(stdout):
    """{rank label: [lines]} from rank-prefixed output."""
    out = {}
    for line in stdout.splitlines():
        assert line.startswith("["), f"line without a rank prefix: {line!r}"
        label, _, text = line[1:].partition("] ")
        out.setdefault(label, []).append(text)
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # zombies are dead
    except FileNotFoundError:
        return False


def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


# ---- environment and output -------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["zmq", "mpi"])
@pytest.mark.parametrize("n", [1, 3])
def test_worker_environment(tmp_path, transport, n):
    s = script(tmp_path, "env.py", DUMP_ENV)
    r = distrib("launch", "-n", n, "--transport", transport, "--timeout", "12.5", s, "a b", "-n", "7", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = by_rank(r.stdout)
    assert sorted(lines) == [str(i) for i in range(n)]
    envs = {int(k): json.loads(v[0]) for k, v in lines.items()}
    ports = set()
    for rank, env in envs.items():
        assert env["argv"] == ["a b", "-n", "7"]
        assert env["DISTRIB_RANK"] == env["RANK"] == env["DISTRIB_LOCAL_RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["DISTRIB_SIZE"] == env["WORLD_SIZE"] == env["DISTRIB_LOCAL_SIZE"] == env["LOCAL_WORLD_SIZE"] == str(n)
        assert env["DISTRIB_TRANSPORT"] == transport and env["DISTRIB_ROLE"] == "worker"
        assert env["DISTRIB_NUM_SERVERS"] == "0" and env["DISTRIB_RESTART_COUNT"] == "0"
        assert env["DISTRIB_NODE_RANK"] == "0" and env["DISTRIB_NNODES"] == "1"
        assert env["DISTRIB_TIMEOUT"] == "12.5" and env["DISTRIB_CONFIG"] is None
        assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
        assert int(env["OMP_NUM_THREADS"]) >= 1 and env["PYTHONUNBUFFERED"] == "1"
        ports.add(env["MASTER_PORT"])
    assert len(ports) == 1


@pytest.mark.timeout(60)
def test_output_prefixes_and_streams(tmp_path):
    s = script(tmp_path, "talk.py", """
        import os, sys
        r = os.environ["DISTRIB_RANK"]
        print(f"hello from {r}\\nsecond line {r}")
        print(f"err {r}", file=sys.stderr)
        sys.stdout.write(f"no newline {r}")
    """)
    r = distrib("launch", "-n", 2, s, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = by_rank(r.stdout)
    for rank in "01":
        assert out[rank] == [f"hello from {rank}", f"second line {rank}", f"no newline {rank}"]
        assert f"[{rank}] err {rank}" in r.stderr.splitlines()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["zmq", "mpi"])
def test_exit_code_of_failed_rank(tmp_path, transport):
    s = script(tmp_path, "exit.py", """
        import os, sys
        sys.exit(3 if os.environ["DISTRIB_RANK"] == "0" else 0)
    """)
    r = distrib("launch", "-n", 2, "--transport", transport, s, cwd=tmp_path)
    assert r.returncode == 3
    assert "rank 0 failed: exit code 3" in r.stderr


# ---- failures ---------------------------------------------------------------------------------

CRASH = """
import os, sys, time
rank = int(os.environ["DISTRIB_RANK"])
print("pid", os.getpid(), flush=True)
if rank == 1:
    time.sleep(0.5)
    raise ValueError("boom in rank one")
time.sleep(120)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["zmq", "mpi"])
def test_crash_stops_the_others(tmp_path, transport):
    s = script(tmp_path, "crash.py", CRASH)
    start = time.monotonic()
    r = distrib("launch", "-n", 3, "--transport", transport, s, cwd=tmp_path, timeout=100)
    elapsed = time.monotonic() - start
    assert r.returncode == 1, r.stderr
    assert "rank 1 failed: exit code 1" in r.stderr
    summary = r.stderr[r.stderr.index("distrib: rank 1 failed"):]
    assert "ValueError: boom in rank one" in summary and "Traceback" in summary
    assert "mpi_worker" not in summary  # the shim's frames are not shown
    assert elapsed < 60  # the sleeping ranks were stopped, not waited for (they sleep 120 s)
    pids = [int(line.split()[-1]) for lines in by_rank(r.stdout).values() for line in lines]
    assert len(pids) == 3
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["zmq", "mpi"])
def test_signal_is_named(tmp_path, transport):
    s = script(tmp_path, "kill.py", """
        import os, signal, time
        if os.environ["DISTRIB_RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    """)
    r = distrib("launch", "-n", 2, "--transport", transport, s, cwd=tmp_path)
    assert r.returncode == 128 + signal.SIGKILL
    assert "rank 1 failed: killed by signal SIGKILL" in r.stderr


@pytest.mark.timeout(60)
def test_interrupt_stops_everything(tmp_path):
    s = script(tmp_path, "sleep.py", """
        import os, time
        print("pid", os.getpid(), flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "launch", "-n", "2", str(s)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [int(proc.stdout.readline().split()[-1]) for _ in range(2)]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not any(alive(p) for p in pids)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["zmq", "mpi"])
def test_workers_die_with_a_killed_launcher(tmp_path, transport):
    s = script(tmp_path, "sleep.py", """
        import os, time
        print("pid", os.getpid(), flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "launch", "-n", "2", "--transport", transport,
                             str(s)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [int(proc.stdout.readline().split()[-1]) for _ in range(2)]
    proc.kill()  # SIGKILL: the launcher cannot clean up
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


# ---- usage errors -----------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_usage_errors(tmp_path):
    ok = script(tmp_path, "ok.py", "print('hi')\n")
    port = busy_port()
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=two\n")
    cases = [
        (["-n", 2, tmp_path / "missing.py"], "script not found"),
        (["-n", 0, ok], "at least 1"),
        (["-n", -1, ok], "at least 1"),
        (["-n", 2, "--transport", "tcp", ok], "invalid choice"),
        (["-n", 2, "--master", f"127.0.0.1:{port.getsockname()[1]}", ok], "already in use"),
        (["-n", 2, "--master", "nowhere", ok], "HOST:PORT"),
        (["-n", 3, "-H", "localhost:2", ok], "only 2 slots"),
        (["-n", 2, "-H", "localhost:zero", ok], "slots must be a positive integer"),
        (["-n", 2, "--hostfile", hostfile, ok], "slots must be a positive integer"),
        (["-n", 2, "--nnodes", 2, ok], "--master"),
        ([ok], "-n"),
    ]
    try:
        for args, message in cases:
            r = distrib("launch", *args, cwd=tmp_path)
            assert r.returncode == 2, (args, r.stderr)
            assert message in r.stderr, (args, r.stderr)
            assert "Traceback" not in r.stderr and r.stdout == ""
    finally:
        port.close()


def test_help_documents_every_option(tmp_path):
    r = distrib("--help", cwd=tmp_path)
    assert r.returncode == 0 and "launch" in r.stdout and "report" in r.stdout
    r = distrib("launch", "--help", cwd=tmp_path)
    for option in ("-n", "--transport", "--config", "--servers", "--timeout", "--max-restarts", "--metrics",
                   "--timeline", "--nnodes", "--node-rank", "--master", "-H", "--hostfile", "--cluster", "--grace"):
        assert option in r.stdout
    assert "DISTRIB_RANK" in r.stdout


# ---- restarts, servers, several nodes ---------------------------------------------------------

FLAKY = """
import os, sys
attempt = int(os.environ["DISTRIB_RESTART_COUNT"])
print("attempt", attempt, os.environ["MASTER_PORT"])
if attempt == 0 and os.environ["DISTRIB_RANK"] == "1":
    sys.exit("first attempt fails")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["zmq", "mpi"])
def test_max_restarts(tmp_path, transport):
    s = script(tmp_path, "flaky.py", FLAKY)
    r = distrib("launch", "-n", 2, "--transport", transport, "--max-restarts", 1, s, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "rank 1 failed" in r.stderr and "first attempt fails" in r.stderr
    assert "restarting the job (restart 1 of 1)" in r.stderr
    out = by_rank(r.stdout)
    assert out["0"][-1].startswith("attempt 1") and out["1"][-1].startswith("attempt 1")
    ports = {line.split()[2] for lines in out.values() for line in lines}
    assert len(ports) == 2  # a fresh master port per attempt
    r = distrib("launch", "-n", 2, "--transport", transport, s, cwd=tmp_path)
    assert r.returncode == 1 and "restarting" not in r.stderr


SERVER = """
import os, sys, time
print("server", os.environ["DISTRIB_RANK"], os.environ["DISTRIB_ROLE"], os.environ["DISTRIB_SIZE"],
      os.environ["DISTRIB_NUM_SERVERS"], flush=True)
if os.environ.get("SERVER_FAILS"):
    sys.exit("server gives up")
time.sleep(120)  # until the launcher stops it
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["zmq", "mpi"])
def test_servers_stopped_after_workers(tmp_path, transport):
    (tmp_path / "fake_server.py").write_text(SERVER)
    s = script(tmp_path, "w.py", """
        import os, time
        time.sleep(0.5)
        print("worker", os.environ["DISTRIB_RANK"], os.environ["DISTRIB_NUM_SERVERS"])
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    start = time.monotonic()
    r = distrib("launch", "-n", 2, "--servers", 2, "--server-module", "fake_server", "--transport", transport, s,
                cwd=tmp_path, env=env, timeout=100)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - start < 60  # servers were stopped, not waited for
    out = by_rank(r.stdout)
    assert out["s0"] == ["server 0 server 2 2"] and out["s1"] == ["server 1 server 2 2"]
    assert out["0"] == ["worker 0 2"] and out["1"] == ["worker 1 2"]
    env["SERVER_FAILS"] = "1"
    r = distrib("launch", "-n", 1, "--servers", 1, "--server-module", "fake_server", "--transport", transport, s,
                cwd=tmp_path, env=env)
    assert r.returncode == 1 and "server 0 failed: exit code 1" in r.stderr and "server gives up" in r.stderr


@pytest.mark.timeout(120)
def test_two_nodes_on_one_machine(tmp_path):
    s = script(tmp_path, "env.py", DUMP_ENV)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = ["launch", "-n", 2, "--nnodes", 2, "--master", f"127.0.0.1:{port}"]
    procs = [subprocess.Popen([sys.executable, "-m", "launcher.cli", *map(str, common), "--node-rank", str(i), str(s)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    envs = {}
    for node, (stdout, _) in enumerate(outs):
        for label, lines in by_rank(stdout).items():
            env = json.loads(lines[0])
            envs[int(label)] = env
            assert env["DISTRIB_NODE_RANK"] == str(node) and env["DISTRIB_NNODES"] == "2"
    assert sorted(envs) == [0, 1, 2, 3]
    for rank, env in envs.items():
        assert env["DISTRIB_RANK"] == str(rank) and env["DISTRIB_SIZE"] == "4"
        assert env["DISTRIB_LOCAL_RANK"] == str(rank % 2) and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["MASTER_PORT"] == str(port)


@pytest.mark.timeout(60)
def test_host_list_of_local_hosts(tmp_path):
    s = script(tmp_path, "env.py", DUMP_ENV)
    r = distrib("launch", "-n", 3, "-H", "localhost:1,127.0.0.1:2", s, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    envs = {int(k): json.loads(v[0]) for k, v in by_rank(r.stdout).items()}
    assert [envs[i]["DISTRIB_NODE_RANK"] for i in range(3)] == ["0", "1", "1"]
    assert [envs[i]["DISTRIB_LOCAL_RANK"] for i in range(3)] == ["0", "0", "1"]
    assert all(e["DISTRIB_NNODES"] == "2" and e["MASTER_ADDR"] == "127.0.0.1" for e in envs.values())


@pytest.mark.timeout(120)
def test_config_launch_table(tmp_path):
    s = script(tmp_path, "env.py", DUMP_ENV)
    cfg = tmp_path / "run.toml"
    cfg.write_text('[launch]\nnproc = 2\ntimeout = 7.5\n')
    r = distrib("launch", "--config", cfg, s, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    envs = [json.loads(v[0]) for v in by_rank(r.stdout).values()]
    assert len(envs) == 2
    assert all(e["DISTRIB_CONFIG"] == str(cfg) and e["DISTRIB_TIMEOUT"] == "7.5" for e in envs)
    cfg.write_text('[launch]\nnproc = "two"\n')
    r = distrib("launch", "--config", cfg, s, cwd=tmp_path)
    assert r.returncode == 2 and "nproc" in r.stderr and "Traceback" not in r.stderr


# ---- the network-namespace test cluster (root and iproute2 only) ------------------------------

def _can_netns():
    import shutil
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


@pytest.fixture
def test_cluster():
    from launcher import cluster
    name = f"lt{os.getpid() % 100000}"
    cluster.down(name)
    cluster.up(name, 2)
    try:
        yield cluster.load(name)
    finally:
        cluster.down(name)


@pytest.mark.netns
@pytest.mark.skipif(not _can_netns(), reason="needs root and iproute2")
@pytest.mark.timeout(180)
def test_cluster_spreads_workers_over_hosts(tmp_path, test_cluster):
    s = script(tmp_path, "where.py", DUMP_ENV.replace(
        '| {"argv": sys.argv[1:]}', '| {"argv": sys.argv[1:], "netns": os.readlink("/proc/self/ns/net")}'))
    for transport in ("zmq", "mpi"):
        r = distrib("launch", "--cluster", test_cluster.name, "-n", 3, "--transport", transport, s, cwd=tmp_path,
                    timeout=150)
        assert r.returncode == 0, r.stderr
        envs = {int(k): json.loads(v[0]) for k, v in by_rank(r.stdout).items()}
        assert sorted(envs) == [0, 1, 2]
        assert [envs[i]["DISTRIB_NODE_RANK"] for i in range(3)] == ["0", "0", "1"]
        assert [envs[i]["DISTRIB_LOCAL_RANK"] for i in range(3)] == ["0", "1", "0"]
        assert envs[0]["netns"] == envs[1]["netns"] != envs[2]["netns"]
        assert all(e["MASTER_ADDR"] == test_cluster.hosts[0].addr and e["DISTRIB_TRANSPORT"] == transport
                   for e in envs.values())
