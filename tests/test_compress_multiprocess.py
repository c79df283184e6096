"""Every compressor through the real collectives: ``distrib.allreduce(t, compressor=c)`` and
``DistributedOptimizer(..., compressor=c)`` in jobs started by the launcher (tests/jobs.py).

One job per (world size, transport) runs all compressors, so the suite starts few processes."""
import pytest
from jobs import assert_ok, run_job

BODY = """
import distrib.compress as dc
from distrib.compress import *

def same_everywhere(x):
    xs = distrib.allgather(x)
    return all(torch.equal(y, xs[0]) for y in xs)

makers = {
    "none": NoCompression, "fp16": FP16, "bf16": BF16, "qsgd": lambda: QSGD(7),
    "topk": lambda: TopK(0.05), "ef-topk": lambda: ErrorFeedback(TopK(0.05)),
    "ef-qsgd": lambda: ErrorFeedback(QSGD(3)), "powersgd": lambda: PowerSGD(2),
    "countsketch": lambda: CountSketch(3, 60, 20, momentum=0.5),
}
g = torch.Generator().manual_seed(R)
ts = [torch.randn(40, 30, generator=g) for _ in range(2)]
for name, make in makers.items():
    c = make()
    for t in ts:
        out = distrib.allreduce(t, compressor=c, key="w")
        assert out.shape == t.shape and same_everywhere(out), name
        if name == "none":
            assert torch.allclose(out, distrib.allreduce(t), atol=1e-5)
    assert c.stats["calls"] == 2 and c.stats["wire_bytes"] > 0, name
# exact cases: full-rank PowerSGD, a count sketch bigger than the tensor; op="mean"
t = ts[0]
want = distrib.allreduce(t, op="mean")
for c in (PowerSGD(30), CountSketch(5, 300, 10)):
    assert torch.allclose(distrib.allreduce(t, op="mean", compressor=c), want, atol=1e-5)
# any shape and dtype
for x in (torch.tensor(1.5), torch.empty(0), torch.randn(5, 3, 2).double(), torch.randn(7).half()):
    for name, make in makers.items():
        out = distrib.allreduce(x, op="mean", compressor=make(), key="x")
        assert out.shape == x.shape and out.dtype == x.dtype, (name, x.shape)
        assert same_everywhere(out), (name, x.shape)

# DistributedOptimizer with each compressor: parameters stay identical on every rank
for name, make in makers.items():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                                       compressor=make(), min_compress_numel=100)
    for step in range(3):
        x = torch.randn(16, 40, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert same_everywhere(flat), name
    st = opt.stats()
    assert st["compression_ratio"] >= 1.0, (name, st)
    opt.close()
print("compressors ok", R)
"""

CASES = [(2, "zmq"), (3, "zmq"), (4, "zmq"), (2, "mpi"), (3, "mpi"), (4, "mpi")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n,transport", CASES, ids=[f"{t}-{n}" for n, t in CASES])
def test_every_compressor_through_the_real_collectives(tmp_path, n, transport):
    out = assert_ok(run_job(tmp_path, n, BODY, transport=transport, timeout=240, comm_timeout=60))
    assert out.count("compressors ok") == n
