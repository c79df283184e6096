"""Process context: the job is read from distrib's, torchrun's, MPI's and Slurm's variables."""
import subprocess
import sys

import pytest

from distrib import context
from distrib.errors import DistribError

CLEAR = ["DISTRIB_RANK", "DISTRIB_SIZE", "DISTRIB_ROLE", "DISTRIB_NUM_SERVERS", "DISTRIB_TRANSPORT",
         "DISTRIB_MASTER_ADDR", "DISTRIB_MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
         "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
         "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMIX_RANK",
         "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_NODELIST", "SLURM_JOB_ID"]


@pytest.fixture
def env(monkeypatch):
    for k in CLEAR:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_no_environment_is_a_job_of_one(env):
    job = context.detect_job()
    assert (job["rank"], job["size"], job["world_size"]) == (0, 1, 1)


def test_distrib_launch_variables(env):
    for k, v in dict(DISTRIB_RANK="2", DISTRIB_SIZE="4", DISTRIB_LOCAL_RANK="0",
                     DISTRIB_LOCAL_SIZE="2", DISTRIB_NUM_SERVERS="1", MASTER_ADDR="10.1.2.3",
                     MASTER_PORT="4000").items():
        env.setenv(k, v)
    job = context.detect_job()
    assert (job["rank"], job["size"], job["local_size"], job["world_size"]) == (2, 4, 2, 5)
    # MASTER_PORT belongs to torch.distributed's store: distrib takes the next port
    assert (job["master_addr"], job["master_port"]) == ("10.1.2.3", 4001)


def test_server_role_rank_is_after_the_workers(env):
    for k, v in dict(DISTRIB_RANK="1", DISTRIB_SIZE="3", DISTRIB_ROLE="server",
                     DISTRIB_NUM_SERVERS="2").items():
        env.setenv(k, v)
    job = context.detect_job()
    assert job["world_rank"] == 4 and job["size"] == 3


def test_torchrun_variables(env):
    for k, v in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT="29400").items():
        env.setenv(k, v)
    job = context.detect_job()
    assert (job["rank"], job["size"], job["local_rank"], job["master_port"]) == (1, 2, 1, 29401)


def test_open_mpi_variables_default_to_the_mpi_transport(env):
    for k, v in dict(OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_SIZE="4",
                     OMPI_COMM_WORLD_LOCAL_RANK="1").items():
        env.setenv(k, v)
    job = context.detect_job()
    assert (job["rank"], job["size"], job["transport"]) == (3, 4, "mpi")


def test_slurm_variables(env):
    for k, v in dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1",
                     SLURM_STEP_NODELIST="gpu[07-09,12],cpu1", SLURM_JOB_ID="1234").items():
        env.setenv(k, v)
    job = context.detect_job()
    assert (job["rank"], job["size"], job["master_addr"]) == (5, 8, "gpu07")
    assert context._first_slurm_host("nodeA") == "nodeA"


def test_bad_variables_are_clear_errors(env):
    env.setenv("DISTRIB_RANK", "x")
    with pytest.raises(DistribError, match="DISTRIB_RANK"):
        context.detect_job()
    env.setenv("DISTRIB_RANK", "5")
    env.setenv("DISTRIB_SIZE", "2")
    with pytest.raises(DistribError, match="inconsistent"):
        context.detect_job()


def test_plain_python_script_runs_as_a_job_of_one(tmp_path):
    script = tmp_path / "one.py"
    script.write_text("import torch, distrib\n"
                      "distrib.init()\n"
                      "t = torch.arange(4.)\n"
                      "assert distrib.rank() == 0 and distrib.size() == 1 and distrib.local_rank() == 0\n"
                      "assert torch.equal(distrib.allreduce(t, op='mean'), t)\n"
                      "assert [x.tolist() for x in distrib.allgather(t)] == [t.tolist()]\n"
                      "assert torch.equal(distrib.broadcast(t), t)\n"
                      "distrib.barrier(); distrib.shutdown(); print('one ok')\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in CLEAR}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0 and "one ok" in out.stdout, out.stderr
