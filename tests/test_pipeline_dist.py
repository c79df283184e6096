"""distrib.pipeline across real processes: gradients equal to the unpartitioned model for both
schedules, every checkpoint mode, 2-4 stages, uneven batches and tuples between stages; hybrid
2 replicas x 2 stages against the model on the concatenated batch (plain and compressed); a stage
that raises stops every rank with its error instead of a hang; balance_by_time agrees on all ranks.

This file is also the worker: ``python tests/test_pipeline_dist.py grads P [P ...]`` (run under
``distrib launch``) checks its own stage against a local reference and exits non-zero on any
difference, so the tests only have to look at exit statuses and a few printed lines.
"""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
# Deadline of every wait in the workers: longer than any test's wait, so a pipeline that hangs
# until a timeout fails the test instead of passing on a CommTimeout.
WORKER_TIMEOUT = "200"


def _env():
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("DISTRIB_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                          "LOCAL_WORLD_SIZE", "MASTER_PORT")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    base.update(OMP_NUM_THREADS="1", DISTRIB_TIMEOUT=WORKER_TIMEOUT)
    return base


def launch(n, *args, timeout=150):
    """Run this file as a worker on ``n`` processes through ``distrib launch``."""
    return subprocess.run([sys.executable, "-m", "launcher.cli", "launch", "-n", str(n), str(HERE),
                           *map(str, args)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def spawn(n, *args, timeout=150):
    """Run ``n`` workers without the launcher (nobody stops the others when one fails), as
    [(returncode, stdout, stderr)] by rank."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    procs = []
    for r in range(n):
        env = dict(_env(), DISTRIB_RANK=str(r), DISTRIB_SIZE=str(n), DISTRIB_LOCAL_RANK=str(r),
                   DISTRIB_LOCAL_SIZE=str(n), DISTRIB_MASTER_ADDR="127.0.0.1",
                   DISTRIB_MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(HERE), *map(str, args)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *out) for p, out in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _compress_available():
    try:
        import distrib.compress  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.timeout(200)
@pytest.mark.parametrize("n", [2, 3])
def test_gradients_match_unpartitioned_model(n):
    proc = launch(n, "grads", n)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Each rank checked 2 models x 2 schedules x 3 checkpoint modes x 2 batches.
    assert len(re.findall(r"checked 24 steps", proc.stdout)) == n, proc.stdout


@pytest.mark.timeout(200)
def test_four_stages_and_hybrid_two_by_two():
    args = ["grads", 4, 2] + (["--compress"] if _compress_available() else [])
    proc = launch(4, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(re.findall(r"stages=4 replicas=1: checked 24 steps", proc.stdout)) == 4
    assert len(re.findall(r"stages=2 replicas=2: checked 24 steps", proc.stdout)) == 4
    if _compress_available():
        assert len(re.findall(r"compressed hybrid ok", proc.stdout)) == 4, proc.stdout


@pytest.mark.timeout(200)
def test_failing_stage_stops_every_rank_with_its_error():
    # 2 replicas x 2 stages; rank 1 (replica 0, stage 1) raises in its second micro-batch. Its
    # pipeline peer and its replica peer hear it directly, rank 2 through them.
    results = spawn(4, "fail", 2, 1, timeout=120)
    for rank, (rc, out, err) in enumerate(results):
        assert rc != 0, f"rank {rank} exited 0:\n{out}{err}"
        assert "boom in micro-batch 1" in err, f"rank {rank}:\n{err}"
        if rank != 1:
            assert "PeerFailed" in err and "stage 1: RuntimeError(" in err, f"rank {rank}:\n{err}"
        assert "CommTimeout" not in err


@pytest.mark.timeout(200)
def test_failing_stage_under_the_launcher():
    proc = launch(3, "fail", 3, 2, timeout=120)
    assert proc.returncode != 0
    assert "boom in micro-batch 1" in proc.stdout + proc.stderr


# -- the worker ------------------------------------------------------------------------------
def _models():
    import torch
    from torch import nn

    class Fork(nn.Module):
        """One tensor in, a tuple out: two floats with gradients, an int, an unused float and a
        float without gradient."""

        def forward(self, x):
            idx = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # per sample, as every layer
            return torch.tanh(x), x * 0.5, idx, x * 2, x.detach() + 1

        def __repr__(self):
            return "Fork()"

    class First(nn.Module):
        """Applies a layer to the tuple's first tensor."""

        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, t):
            return (self.layer(t[0]),) + tuple(t[1:])

    class Join(nn.Module):
        def forward(self, t):
            a, b, idx, _unused, c = t
            return a + b * (idx.unsqueeze(1).to(a.dtype) + 1) + 0.1 * c

    def mlp():
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                             nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    def tuples():
        return nn.Sequential(nn.Linear(5, 8), Fork(), First(nn.Linear(8, 8)), First(nn.Tanh()),
                             Join(), nn.ReLU(), nn.Linear(8, 3))

    return {"mlp": mlp, "tuples": tuples}


BALANCE = {1: [7], 2: [3, 4], 3: [2, 2, 3], 4: [2, 1, 2, 2]}


def _check_grads(stages, compress):
    import torch
    import torch.nn.functional as F

    import distrib
    from distrib.pipeline import GPipe, balance_by_time, schedule

    torch.set_default_dtype(torch.float64)
    rank, world = distrib.rank(), distrib.size()
    replicas = world // stages
    # Timings differ between processes, yet every rank must get the same balance.
    balance = balance_by_time(_models()["mlp"](), torch.randn(16, 5), stages)
    assert sum(balance) == 7 and len(balance) == stages
    agreed = distrib.allgather(torch.tensor(balance))
    assert all(torch.equal(b, agreed[0]) for b in agreed), agreed
    steps = 0
    for name, make in _models().items():
        for sched in ("gpipe", "1f1b"):
            for ck in ("always", "except_last", "never"):
                for n, chunks in ((7, 3), (2, 4)):
                    torch.manual_seed(1)
                    ref = make()
                    torch.manual_seed(1)
                    pipe = GPipe(make(), BALANCE[stages], chunks, checkpoint=ck, schedule=sched)
                    g = torch.Generator().manual_seed(steps)
                    # Each replica trains on its own n samples of one batch of replicas x n.
                    xs = torch.randn(replicas * n, 5, generator=g)
                    ys = torch.randint(0, 3, (replicas * n,), generator=g)
                    mine = slice(pipe.replica * n, (pipe.replica + 1) * n)
                    x = xs[mine] if pipe.is_first else None
                    y = ys[mine] if pipe.is_last else None
                    loss = pipe.train_step(x, y, F.cross_entropy)
                    expected = F.cross_entropy(ref(xs), ys)
                    expected.backward()
                    what = f"{name} {sched} checkpoint={ck} n={n} chunks={chunks}"
                    refs = dict(ref.named_parameters())
                    for pname, p in pipe.stage.named_parameters():
                        torch.testing.assert_close(p.grad, refs[pname].grad, rtol=1e-5,
                                                   atol=1e-12, msg=f"{what} {pname}")
                    assert (loss is None) != pipe.is_last, what
                    if pipe.is_last:
                        torch.testing.assert_close(loss, expected.detach(), msg=what)
                    m = len(pipe.last_sizes)
                    assert pipe.last_sizes == [n // m + (i < n % m) for i in range(m)], what
                    order = schedule.order(sched, m, stages, pipe.stage_index)
                    assert pipe.last_order == order, what
                    schedule.check_order(pipe.last_order, m)
                    alive = m if sched == "gpipe" else min(m, stages - pipe.stage_index)
                    assert pipe.max_alive == alive <= (m if sched == "gpipe" else stages), what
                    with torch.no_grad():
                        out = pipe(x)
                        if pipe.is_last:
                            torch.testing.assert_close(out, ref(xs[mine]), msg=what)
                        else:
                            assert out is None
                    steps += 1
    print(f"rank {rank} stages={stages} replicas={replicas}: checked {steps} steps", flush=True)
    if compress and replicas > 1:
        _check_compressed(stages)


def _check_compressed(stages):
    import torch
    import torch.nn.functional as F

    import distrib.compress as dc
    from distrib.pipeline import GPipe

    for comp, rtol in ((dc.NoCompression(), 1e-5), (dc.FP16(), 2e-3)):
        torch.manual_seed(2)
        ref = _models()["mlp"]()
        torch.manual_seed(2)
        pipe = GPipe(_models()["mlp"](), BALANCE[stages], 3, compressor=comp)
        g = torch.Generator().manual_seed(5)
        xs, ys = torch.randn(2 * 6, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
        mine = slice(pipe.replica * 6, (pipe.replica + 1) * 6)
        pipe.train_step(xs[mine], ys[mine], F.cross_entropy)
        F.cross_entropy(ref(xs), ys).backward()
        refs = dict(ref.named_parameters())
        for pname, p in pipe.stage.named_parameters():
            torch.testing.assert_close(p.grad, refs[pname].grad, rtol=rtol, atol=rtol * 1e-2,
                                       msg=f"{type(comp).__name__} {pname}")
    print("compressed hybrid ok", flush=True)


def _fail(stages, failing_rank):
    import torch
    import torch.nn.functional as F
    from torch import nn

    import distrib
    from distrib.pipeline import GPipe

    class Boom(nn.Module):
        calls = 0

        def forward(self, x):
            Boom.calls += 1
            if distrib.rank() == failing_rank and Boom.calls == 2:
                raise RuntimeError("boom in micro-batch 1")
            return x

    torch.manual_seed(0)
    layers = []
    for _ in range(stages):  # a Boom on every stage; only the failing rank's one fires
        layers += [nn.Linear(4, 4), nn.Sequential(nn.Tanh(), Boom())]
    pipe = GPipe(nn.Sequential(*layers), [2] * stages, chunks=4, checkpoint="never")
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    try:
        pipe.train_step(x, y, F.mse_loss)
    except Exception:
        with pytest.raises(distrib.DistribError, match="stopped after an error"):
            pipe.train_step(x, y, F.mse_loss)  # the pipeline stays stopped
        raise
    print(f"rank {distrib.rank()} finished a step that should have failed", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1] == "grads":
        ps = [int(a) for a in sys.argv[2:] if a != "--compress"]
        for p in ps:
            _check_grads(p, "--compress" in sys.argv)
    elif sys.argv[1] == "fail":
        _fail(int(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown scenario {sys.argv[1]!r}")
