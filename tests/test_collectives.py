"""Collectives over real processes: every dtype, op, length and world size; mismatch; timeout."""
import pytest

from jobs import TRANSPORTS, assert_ok, lines_of, run_job

CHECK_ALL = """
import itertools
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64]
LENGTHS = [0, 1, N - 1, N, N + 1, 2 * N + 3, 1000]
def value(k, L, dt):
    return ((torch.arange(L) * 7 + 3 * k) % 11 - 5).to(dt)
checked, results = 0, []
for dt, L, op in itertools.product(DTYPES, LENGTHS, ["sum", "mean", "min", "max"]):
    t = value(R, L, dt).reshape(-1, 1) if L % 2 else value(R, L, dt)
    before = t.clone()
    out = distrib.allreduce(t, op=op)
    assert torch.equal(t, before), "input modified"
    assert out.dtype == dt and out.shape == t.shape, (out.dtype, out.shape)
    stack = torch.stack([value(k, L, dt).double() for k in range(N)])
    exp = {"sum": stack.sum(0), "min": stack.min(0).values, "max": stack.max(0).values,
           "mean": stack.mean(0) if dt.is_floating_point else torch.floor(stack.sum(0) / N)}[op]
    assert torch.allclose(out.double().reshape(-1), exp, rtol=1e-2, atol=1e-2), (dt, L, op, out, exp)
    results.append(out.reshape(-1).view(torch.uint8) if out.numel() else out.reshape(-1).to(torch.uint8))
    checked += 1
# every rank holds the same bits, for every result
gathered = distrib.allgather(torch.cat(results))
assert all(torch.equal(gathered[0], g) for g in gathered)
# a large float32 tensor streams through in chunks
big = torch.randn(3 * 2 ** 20 + 7, generator=torch.Generator().manual_seed(R))
out = distrib.allreduce(big)
ref = sum(torch.randn(3 * 2 ** 20 + 7, generator=torch.Generator().manual_seed(k)) for k in range(N))
assert torch.allclose(out, ref, atol=1e-4)
g = distrib.allgather(torch.full((R + 1, 2), float(R)))
assert [tuple(x.shape) for x in g] == [(k + 1, 2) for k in range(N)]
assert all(torch.equal(x, torch.full((k + 1, 2), float(k))) for k, x in enumerate(g))
e = distrib.allgather(torch.zeros(0, dtype=torch.int64))
assert len(e) == N and all(x.numel() == 0 for x in e)
root = N - 1
src = torch.arange(10.) * (R + 1)
b = distrib.broadcast(src, root=root)
assert torch.equal(b, torch.arange(10.) * N) and torch.equal(src, torch.arange(10.) * (R + 1))
distrib.barrier()
model = torch.nn.Linear(3, 2)
with torch.no_grad():
    model.weight.fill_(R)
distrib.broadcast_parameters(model, root=0)
assert torch.all(model.weight == 0)
print("checked", checked)
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport,n,path", [("zmq", 1, "shm"), ("zmq", 2, "shm"), ("zmq", 3, "shm"),
                                              ("zmq", 5, "shm"), ("zmq", 3, "ring"), ("mpi", 2, "shm"),
                                              ("mpi", 3, "ring")])
def test_allreduce_allgather_broadcast_barrier(tmp_path, transport, n, path):
    """``path``: same-host shared memory (the default on one host) or the TCP/MPI ring."""
    env = {"DISTRIB_SHM": "0" if path == "ring" else "1"}
    out = assert_ok(run_job(tmp_path, n, CHECK_ALL, transport, timeout=280, env=env))
    for r in range(n):
        assert "checked 168" in lines_of(out, r), out


@pytest.mark.timeout(300)
def test_eight_ranks(tmp_path):
    body = """
for L in [0, 5, 8, 13, 100003]:
    out = distrib.allreduce(torch.arange(L, dtype=torch.float64) + R, op="mean")
    assert torch.equal(out, torch.arange(L, dtype=torch.float64) + (N - 1) / 2)
print("ok8")
"""
    out = assert_ok(run_job(tmp_path, 8, body, timeout=280))
    assert all("ok8" in lines_of(out, r) for r in range(8))


MISMATCH = """
kind = sys.argv[1]
odd = R == N - 1
try:
    if kind == "shape":
        distrib.allreduce(torch.ones(5 if odd else 4))
    elif kind == "dtype":
        distrib.allreduce(torch.ones(4, dtype=torch.float64 if odd else torch.float32))
    elif kind == "op":
        distrib.allreduce(torch.ones(4), op="max" if odd else "sum")
    elif kind == "collective":
        if odd:
            distrib.broadcast(torch.ones(4))
        else:
            distrib.allreduce(torch.ones(4))
    print("no error")
except distrib.CollectiveMismatch as e:
    print("mismatch:", e)
# the ranks can go on with a good collective
print("after", distrib.allreduce(torch.ones(1)).item())
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport,path,kind", [
    ("zmq", "shm", "shape"), ("zmq", "shm", "dtype"), ("zmq", "shm", "op"),
    ("zmq", "shm", "collective"), ("zmq", "ring", "shape"), ("zmq", "ring", "collective"),
    ("mpi", "shm", "dtype"), ("mpi", "ring", "op")])
def test_mismatch_raises_on_every_rank(tmp_path, transport, path, kind):
    n = 3
    out = assert_ok(run_job(tmp_path, n, MISMATCH, transport, args=[kind], comm_timeout=20,
                            env={"DISTRIB_SHM": "0" if path == "ring" else "1"}))
    for r in range(n):
        lines = lines_of(out, r)
        assert any(l.startswith("mismatch:") for l in lines), out
        assert f"after {float(n)}" in lines, out


TIMEOUT = """
try:
    if R == 1:
        time.sleep(12)
    else:
        distrib.allreduce(torch.ones(4))
    print("no error")
except distrib.CommTimeout as e:
    print("timeout:", e.missing, e)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_timeout_names_the_missing_rank(tmp_path, transport):
    out = assert_ok(run_job(tmp_path, 4, TIMEOUT, transport, comm_timeout=3))
    for r in (0, 2, 3):
        lines = [l for l in lines_of(out, r) if l.startswith("timeout:")]
        assert lines and lines[0].startswith("timeout: [1]"), out


CRASH = """
if R == 1:
    raise RuntimeError("boom on purpose")
distrib.allreduce(torch.ones(4))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_crashing_worker_stops_the_job(tmp_path, transport):
    proc = run_job(tmp_path, 3, CRASH, transport, comm_timeout=60, timeout=100)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "boom on purpose" in text and "rank 1" in text.lower(), text
