"""DistributedOptimizer and @distributed: replicas equal a single process on the whole batch."""
import pytest

from jobs import TRANSPORTS, assert_ok, lines_of, run_job

EQUIVALENCE = """
bpps = int(sys.argv[1])
def make():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).double()
model, ref = make(), make()
with torch.no_grad():
    model[0].weight.add_(R)           # replicas start different...
distrib.broadcast_parameters(model)   # ...and broadcast makes them equal
opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                   model=model, backward_passes_per_step=bpps, bucket_mb=0.001)
ropt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
g = torch.Generator().manual_seed(5)
B = 4
loss_fn = torch.nn.functional.cross_entropy
for step in range(4):
    X = torch.randn(N * B * bpps, 10, generator=g, dtype=torch.double)
    Y = torch.randint(0, 3, (N * B * bpps,), generator=g)
    opt.zero_grad()
    for k in range(bpps):
        sl = slice((k * N + R) * B, (k * N + R + 1) * B)
        loss_fn(model(X[sl]), Y[sl]).backward()
    opt.step()
    # reference: one process, the concatenated batch of every rank (summed over passes)
    ropt.zero_grad()
    for k in range(bpps):
        loss_fn(ref(X[k * N * B:(k + 1) * N * B]), Y[k * N * B:(k + 1) * N * B]).backward()
    ropt.step()
for p, q in zip(model.parameters(), ref.parameters()):
    assert torch.allclose(p, q, atol=1e-10), (p - q).abs().max()
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
assert all(torch.equal(flat, x) for x in distrib.allgather(flat)), "replicas differ"
print("equal", opt.stats()["steps"])
"""


@pytest.mark.timeout(200)
@pytest.mark.parametrize("transport,n,bpps", [("zmq", 2, 1), ("zmq", 3, 1), ("zmq", 2, 3),
                                              ("mpi", 3, 1), ("mpi", 2, 2)])
def test_matches_single_process_on_concatenated_batch(tmp_path, transport, n, bpps):
    out = assert_ok(run_job(tmp_path, n, EQUIVALENCE, transport, args=[bpps], timeout=180))
    assert all("equal 4" in lines_of(out, r) for r in range(n)), out


UNUSED = """
class M(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.a, s.b, s.c = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    def forward(s, x, use_b):
        return s.a(x) + (s.b(x) if use_b else 0)
torch.manual_seed(0)
m = M()
distrib.broadcast_parameters(m)
opt = distrib.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), model=m)
for step in range(3):
    opt.zero_grad()
    m(torch.ones(2, 4), use_b=(R == step % N)).sum().backward()   # b is used on one rank only
    opt.step()
assert m.b.weight.grad is not None          # averaged over ranks (zero where unused)
assert m.c.weight.grad is None              # used nowhere: left alone, as torch DDP does
flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
assert all(torch.equal(flat, x) for x in distrib.allgather(flat))
print("unused ok")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_parameter_without_gradient_on_some_ranks_does_not_deadlock(tmp_path, transport):
    out = assert_ok(run_job(tmp_path, 3, UNUSED, transport))
    assert all("unused ok" in lines_of(out, r) for r in range(3))


DECORATOR = """
@distrib.distributed()
class MySGD(torch.optim.SGD):
    pass

@distrib.distributed(bucket_mb=1)
def make_adam(params, lr):
    return torch.optim.Adam(params, lr=lr)

for maker in (lambda ps: MySGD(ps, lr=0.1), lambda ps: make_adam(ps, lr=0.01)):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    opt = maker(model.parameters())
    assert isinstance(opt, distrib.DistributedOptimizer) and isinstance(opt, torch.optim.Optimizer)
    x = torch.full((3, 5), float(R + 1))
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    # mean of the per-rank gradients: d/dw sum(w.x) = 3 * (R + 1), averaged over ranks
    expect = 3 * sum(k + 1 for k in range(N)) / N
    assert torch.allclose(model.weight.grad, torch.full((1, 5), expect)), model.weight.grad
print("decorated ok")
"""


@pytest.mark.timeout(120)
def test_decorator_on_class_and_factory(tmp_path):
    out = assert_ok(run_job(tmp_path, 2, DECORATOR))
    assert all("decorated ok" in lines_of(out, r) for r in range(2))


DOUBLE_BACKWARD = """
model = torch.nn.Linear(3, 1)
opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
model(torch.ones(1, 3)).sum().backward()
try:
    model(torch.ones(1, 3)).sum().backward()
    print("no error")
except distrib.DistribError as e:
    print("error:", "backward_passes_per_step" in str(e))
"""


@pytest.mark.timeout(120)
def test_two_backward_passes_without_step_is_an_error(tmp_path):
    out = assert_ok(run_job(tmp_path, 2, DOUBLE_BACKWARD))
    assert "error: True" in lines_of(out, 0), out


def test_single_process_is_plain_training():
    import torch
    import distrib
    model = torch.nn.Linear(3, 1)
    opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model=model)
    model(torch.ones(2, 3)).sum().backward()
    g = model.weight.grad.clone()
    w = model.weight.detach().clone()
    opt.step()
    assert torch.allclose(model.weight, w - 0.5 * g)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # sees an Optimizer
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.25


def test_bad_arguments():
    import torch
    import distrib
    model = torch.nn.Linear(3, 1)
    with pytest.raises(TypeError):
        distrib.DistributedOptimizer(model)
    with pytest.raises(ValueError):
        distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1), topology="tree")
    with pytest.raises(ValueError):
        distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1),
                                     backward_passes_per_step=0)
    with pytest.raises(TypeError, match="unknown"):
        distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1), bogus=3)
