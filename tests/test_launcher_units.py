"""Launcher pieces that need no process: host lists, placement, ssh commands, mpiexec parsing."""

import os
import shlex
import socket

import pytest

from launcher import plan
from launcher.errors import LaunchError
from launcher.hosts import LOCAL, Host, is_local, parse_host_list, parse_hostfile, ssh_command
from launcher.mpi_worker import job_env
from launcher.mpirun import EXITED, SIGNALED, split_tags
from launcher.ports import check_port_free, free_port, parse_master
from launcher.supervisor import Failure, Outcome, summary


# ---- host lists -------------------------------------------------------------------------------

def test_host_list_slots_and_locality():
    hosts = parse_host_list("localhost:2,127.0.0.1,node-that-does-not-exist.invalid:4")
    assert [(h.name, h.slots, h.kind) for h in hosts] == [
        ("localhost", 2, "local"), ("127.0.0.1", 1, "local"),
        ("node-that-does-not-exist.invalid", 4, "ssh")]


@pytest.mark.parametrize("text", ["a:0", "a:-1", "a:x", "a:2,,b:1", "a:1,a:2", ":3"])
def test_host_list_rejects_bad_syntax(text):
    with pytest.raises(LaunchError):
        parse_host_list(text)


def test_hostfile(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# the nodes\nlocalhost slots=2   # this one\n\nfar.invalid slots=3\nother.invalid\n")
    hosts = parse_hostfile(str(f))
    assert [(h.name, h.slots, h.kind) for h in hosts] == [
        ("localhost", 2, "local"), ("far.invalid", 3, "ssh"), ("other.invalid", 1, "ssh")]


@pytest.mark.parametrize("text", ["a slots=0\n", "a slots=two\n", "a cpus=2\n", "a slots\n", "# nothing\n"])
def test_hostfile_rejects_bad_lines(tmp_path, text):
    f = tmp_path / "hosts"
    f.write_text(text)
    with pytest.raises(LaunchError, match="hostfile"):
        parse_hostfile(str(f))


def test_hostfile_missing(tmp_path):
    with pytest.raises(LaunchError, match="cannot read hostfile"):
        parse_hostfile(str(tmp_path / "nope"))


def test_is_local():
    assert is_local("localhost") and is_local("127.0.0.1") and is_local("127.0.0.2")
    assert is_local(socket.gethostname())
    assert not is_local("host.invalid")
    assert not is_local("user@localhost")  # an explicit ssh user asks for ssh


# ---- commands per host kind -------------------------------------------------------------------

def test_ssh_command_quotes_everything():
    env = {"DISTRIB_RANK": "3", "WEIRD": "a b'c"}
    argv = ["/usr/bin/python3", "/home/me/my script.py", "--name", "x;rm -rf /"]
    cmd = ssh_command("user@node1", argv, env, "/home/me/work dir")
    assert cmd[:4] == ["ssh", "-o", "BatchMode=yes", "user@node1"] and len(cmd) == 5
    # The remote shell sees exactly this token list.
    assert shlex.split(cmd[4]) == ["cd", "/home/me/work dir", "&&", "exec", "env",
                                   "DISTRIB_RANK=3", "WEIRD=a b'c", *argv]


def test_host_prefixes():
    argv, env = ["python", "t.py"], {"A": "1"}
    assert LOCAL.command(argv, env, "/w") == (argv, True)
    assert Host("c:0", "netns", netns="ns0").command(argv, env, "/w") == (
        ["ip", "netns", "exec", "ns0", "python", "t.py"], True)
    cmd, inherit = Host("far", "ssh").command(argv, env, "/w")
    assert cmd[0] == "ssh" and not inherit and "A=1" in cmd[-1]


# ---- placement and environment ----------------------------------------------------------------

def test_slots_layout_fills_in_order():
    hosts = [Host("a", slots=2), Host("b", slots=3), Host("c", slots=4)]
    lay = plan.slots_layout(4, hosts)
    assert [(n.host.name, n.workers, n.node_rank) for n in lay.nodes] == [("a", 2, 0), ("b", 2, 1)]
    assert lay.world_size == 4 and lay.nnodes == 2
    with pytest.raises(LaunchError, match="only 9 slots"):
        plan.slots_layout(10, hosts)


def test_block_layout_and_master_address():
    hosts = [Host(f"c:{i}", "netns", netns=f"ns{i}", addr=f"10.9.0.{i + 1}") for i in range(3)]
    lay = plan.block_layout(7, hosts, servers=1)
    assert [n.workers for n in lay.nodes] == [3, 2, 2]
    assert [n.servers for n in lay.nodes] == [1, 0, 0]
    assert lay.master_addr == "10.9.0.1"
    assert [n.workers for n in plan.block_layout(2, hosts).nodes] == [1, 1]  # unused hosts left out


def test_build_specs_multinode_ranks():
    lay = plan.multinode_layout(2, nnodes=3, node_rank=1, master_addr="node0", servers=2)
    specs = plan.build_specs(lay, ["py", "t.py"], ["py", "-m", "srv"], 29500, {"DISTRIB_TRANSPORT": "zmq"})
    assert [s.label for s in specs] == ["2", "3"]  # no servers off node 0
    env = specs[1].env
    assert env["DISTRIB_RANK"] == env["RANK"] == "3" and env["DISTRIB_SIZE"] == env["WORLD_SIZE"] == "6"
    assert env["DISTRIB_LOCAL_RANK"] == "1" and env["DISTRIB_LOCAL_SIZE"] == "2"
    assert env["DISTRIB_NODE_RANK"] == "1" and env["DISTRIB_NNODES"] == "3"
    assert env["MASTER_ADDR"] == "node0" and env["MASTER_PORT"] == "29500"
    assert env["DISTRIB_NUM_SERVERS"] == "2" and env["DISTRIB_ROLE"] == "worker"
    with pytest.raises(LaunchError):
        plan.multinode_layout(2, nnodes=2, node_rank=2, master_addr="x")


def test_build_specs_servers():
    specs = plan.build_specs(plan.local_layout(2, servers=2), ["py", "t.py"], ["py", "-m", "srv"], 1, {})
    assert [s.label for s in specs] == ["0", "1", "s0", "s1"]
    s1 = specs[3]
    assert s1.role == "server" and s1.argv == ["py", "-m", "srv"]
    assert s1.env["DISTRIB_ROLE"] == "server" and s1.env["DISTRIB_RANK"] == "1"
    assert s1.env["DISTRIB_SIZE"] == "2" and "RANK" not in s1.env


# ---- the mpiexec shim and mpiexec's output ----------------------------------------------------

def _ompi(monkeypatch, rank, size, local_rank, local_size, servers=None):
    for k, v in {"OMPI_COMM_WORLD_RANK": rank, "OMPI_COMM_WORLD_SIZE": size,
                 "OMPI_COMM_WORLD_LOCAL_RANK": local_rank, "OMPI_COMM_WORLD_LOCAL_SIZE": local_size}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("DISTRIB_MPI_SLOTS", raising=False)
    if servers is None:
        monkeypatch.delenv("DISTRIB_NUM_SERVERS", raising=False)
    else:
        monkeypatch.setenv("DISTRIB_NUM_SERVERS", str(servers))


def test_mpi_shim_env(monkeypatch):
    _ompi(monkeypatch, 2, 4, 0, 4)  # Open MPI 5 may permute local ranks on one node
    env = job_env(server=False)
    assert env["DISTRIB_RANK"] == env["RANK"] == "2" and env["DISTRIB_SIZE"] == "4"
    assert env["DISTRIB_LOCAL_RANK"] == "2" and env["DISTRIB_TRANSPORT"] == "mpi"
    _ompi(monkeypatch, 4, 5, 1, 5, servers=2)  # MPMD: 3 workers then 2 servers
    env = job_env(server=True)
    assert env["DISTRIB_ROLE"] == "server" and env["DISTRIB_RANK"] == "1" and env["DISTRIB_SIZE"] == "3"
    assert "RANK" not in env
    _ompi(monkeypatch, 5, 8, 1, 4)  # two nodes of 4
    env = job_env(server=False)
    assert env["DISTRIB_NODE_RANK"] == "1" and env["DISTRIB_NNODES"] == "2" and env["LOCAL_RANK"] == "1"


def test_mpi_shim_env_from_launcher_slots(monkeypatch):
    # 3 workers and 2 servers on hosts of 2 and 3 ranks: workers 0 1 | worker 2, servers 0 1.
    def env(world_rank, server):
        _ompi(monkeypatch, world_rank, 5, 0, 99, servers=2)
        monkeypatch.setenv("DISTRIB_MPI_SLOTS", "2,3")
        e = job_env(server)
        return [e[k] for k in ("DISTRIB_RANK", "DISTRIB_NODE_RANK", "DISTRIB_LOCAL_RANK", "DISTRIB_LOCAL_SIZE",
                               "DISTRIB_NNODES")]
    assert env(1, False) == ["1", "0", "1", "2", "2"]
    assert env(2, False) == ["2", "1", "0", "1", "2"]
    assert env(4, True) == ["1", "1", "1", "2", "2"]


def test_mpi_shim_refuses_outside_mpiexec(monkeypatch):
    for k in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit, match="mpiexec"):
        job_env(server=False)


def test_split_tags():
    assert split_tags(b"[1,0]<stdout>: hi\n") == [(0, "stdout", b"hi\n")]
    assert split_tags(b"[1,2]<stderr>:   File x\n") == [(2, "stderr", b"  File x\n")]
    # A rank's last output without a newline runs into the next tag.
    assert split_tags(b"[1,0]<stdout>: a[1,1]<stdout>: b\n") == [(0, "stdout", b"a"), (1, "stdout", b"b\n")]
    assert split_tags(b"plain mpiexec text\n") == [(None, None, b"plain mpiexec text\n")]


def test_mpiexec_failure_messages():
    box = ("prterun detected that one or more processes exited with non-zero status,\n"
           "thus causing the job to be terminated. The first process to do so was:\n\n"
           "   Process name: [prterun-vm-4911@1,3]\n   Exit code:    7\n")
    m = EXITED.search(box)
    assert (m.group(1), m.group(2)) == ("3", "7")
    sig = "prterun noticed that process rank 2 with PID 5002 on node vm exited on\nsignal 9 (Killed)."
    m = SIGNALED.search(sig)
    assert (m.group(1), m.group(2)) == ("2", "9")


# ---- summary, ports ---------------------------------------------------------------------------

def test_failure_summary():
    f = Failure("1", "worker", 1, ["Traceback (most recent call last):", "ValueError: boom"])
    text = summary(Outcome(f, stopped=2))
    assert "rank 1 failed: exit code 1" in text and "ValueError: boom" in text and "stopped 2" in text
    g = Failure("s0", "server", -9)
    assert g.how == "killed by signal SIGKILL (9)" and g.who == "server 0" and g.exit_status == 137


def test_ports():
    assert parse_master("node0:29500") == ("node0", 29500)
    assert parse_master("[::1]:80") == ("::1", 80)
    for bad in ("node0", "node0:", ":80", "h:99999", "h:x"):
        with pytest.raises(LaunchError):
            parse_master(bad)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(LaunchError, match="already in use"):
            check_port_free(s.getsockname()[1])
    check_port_free(free_port())


def test_launcher_imports_no_torch():
    # The launcher must start fast: nothing of it pulls torch in (only --config does).
    import subprocess
    import sys
    code = "import launcher.cli, launcher.launch, launcher.supervisor, launcher.mpirun, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False", out.stderr
