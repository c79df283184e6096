"""Parameter servers end to end, through the real launcher (``--servers S``), on zmq and MPI.

Each test is one small job: a tiny model, a few steps, 2 or 3 workers and 1 or 2 servers.
Timing checks only compare the order of events recorded with ``time.time()`` (one host), with
delays far larger than scheduling noise; they never assert speed.
"""
import json
import os
import re

import pytest

from jobs import ROOT, TRANSPORTS, assert_ok, lines_of, run_job

TIMEOUT = 240  # hard limit of one job (the machine may be busy)


def _launch(tmp_path, n, servers, body, transport, args=(), comm_timeout=20, server_timeout=20,
            extra=(), env=None, job_timeout=TIMEOUT):
    return run_job(tmp_path, n, body, transport, args=args, timeout=job_timeout,
                   comm_timeout=comm_timeout,
                   launch_args=[str(a) for a in ("--servers", servers, "--timeout",
                                                 server_timeout, *extra)],
                   env=env)


def _results(stdout, n, tag="RESULT"):
    out = {}
    for r in range(n):
        got = [l for l in lines_of(stdout, r) if l.startswith(tag + " ")]
        assert got, f"rank {r} printed no {tag} line:\n{stdout}"
        out[r] = json.loads(got[-1][len(tag) + 1:])
    return out


# A model with a tensor the two servers split between them, and per-rank data.
MODEL = """
import json
def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1)).double()
def batches(steps):
    g = torch.Generator().manual_seed(100 + R)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        yield x, x.sum(1, keepdim=True).sin()
def train(opt, model, steps=6, delay=0.0):
    for x, y in batches(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        time.sleep(delay)
        opt.step()
    return [p.detach().reshape(-1).tolist() for p in model.parameters()]
def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
"""

SYNC_VS_RING = MODEL + """
mode = sys.argv[1]
ring_model = make_model()
ring = distrib.DistributedOptimizer(sgd(ring_model), ring_model)
ring_params = train(ring, ring_model)
ring.close()
model = make_model()
options = {"mode": "ssp", "staleness": 0} if mode == "ssp0" else {"mode": "sync"}
opt = distrib.DistributedOptimizer(sgd(model), model, topology="ps", **options)
params = train(opt, model)
diff = max(abs(a - b) for p, q in zip(params, ring_params) for a, b in zip(p, q))
opt.close()
print("RESULT " + json.dumps({"diff": diff, "params": params}), flush=True)
time.sleep(1)  # the servers print their exit line before the launcher stops them
"""


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mode", ["sync", "ssp0"])
def test_sync_and_ssp0_follow_ring_allreduce(tmp_path, transport, mode):
    """sync and ssp with k = 0 give the parameters of ring all-reduce training (SGD, momentum
    and weight decay), on 2 servers that split a tensor; servers exit once all are done."""
    out = assert_ok(_launch(tmp_path, 2, 2, SYNC_VS_RING, transport, args=[mode]))
    res = _results(out, 2)
    for r in range(2):
        assert res[r]["diff"] < 1e-12, res[r]["diff"]
    assert res[0]["params"] == res[1]["params"]
    for s in range(2):
        assert any("all 2 workers done" in l for l in lines_of(out, f"s{s}")), out


COMPRESSED = MODEL + """
from distrib.compress import ErrorFeedback, TopK, QSGD
mode = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).double()
comp = ErrorFeedback(TopK(0.25)) if mode == "sync" else QSGD(levels=15, bucket_size=32)
opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                   topology="ps", mode=mode, compressor=comp, min_compress_numel=64)
x = torch.randn(32, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(R))
y = 0.3 * x.sum(1, keepdim=True)
losses = []
for step in range(25):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
s = opt.stats()
print("RESULT " + json.dumps({"losses": losses, "stats": {k: v for k, v in s.items() if isinstance(v, (int, float))},
                              "params": [p.detach().reshape(-1).tolist() for p in model.parameters()]}), flush=True)
"""


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_compressed_push_and_pull(tmp_path, transport, mode):
    """Compressed pushes and pulls train and are counted in both directions; in sync mode every
    worker applies the same decompressed mean, so the parameters stay identical."""
    out = assert_ok(_launch(tmp_path, 2, 2, COMPRESSED, transport, args=[mode]))
    res = _results(out, 2)
    for r in range(2):
        st, losses = res[r]["stats"], res[r]["losses"]
        assert losses[-1] < 0.5 * losses[0], losses
        assert st["push_compression_ratio"] > 1.3 and st["pull_compression_ratio"] > 1.3, st
        assert st["push_payload_bytes"] < st["push_raw_bytes"]
        assert st["pull_payload_bytes"] < st["pull_raw_bytes"]
        assert st["compression_ratio"] == pytest.approx(st["raw_bytes"] / st["payload_bytes"])
        assert st["bytes_sent"] > 0 and st["wait_s"] >= 0
    if mode == "sync":
        assert res[0]["params"] == res[1]["params"]


SSP = MODEL + """
k, slow = int(sys.argv[1]), 1
model = make_model()
opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model,
                                   topology="ps", mode="ssp", staleness=k)
opt.synchronize()  # handshake (and a first pull) before the clock starts
start, push = {1: time.time()}, {}
for step, (x, y) in enumerate(batches(8), 1):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    time.sleep(0.35 if R == slow else 0.01)
    push[step] = time.time()
    opt.step()                 # pushes step `step`, returns when step+1 may start
    start[step + 1] = time.time()
opt.close()
print("RESULT " + json.dumps({"start": start, "push": push}), flush=True)
"""


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ssp_bounds_staleness_under_a_slow_worker(tmp_path, transport):
    """No worker starts step j before every worker has pushed step j - k - 1 (it is at most k
    steps ahead of the slowest), and the fast workers do use the slack."""
    k = 2
    out = assert_ok(_launch(tmp_path, 3, 1, SSP, transport, args=[k]))
    res = _results(out, 3)
    start = {r: {int(j): t for j, t in res[r]["start"].items()} for r in res}
    push = {r: {int(j): t for j, t in res[r]["push"].items()} for r in res}

    def lead(w, j):
        """How many steps worker w, starting step j, is ahead of the slowest worker then."""
        return (j - 1) - min(sum(1 for t in push[v].values() if t <= start[w][j]) for v in res)

    leads = [lead(w, j) for w in res for j in start[w]]
    assert len(leads) == 27 and max(leads) <= k, leads
    assert max(lead(0, j) for j in start[0]) == k  # the fast workers do run k steps ahead


ASYNC = MODEL + """
model = make_model()
deltas = []
class Recording(torch.optim.SGD):
    def step(self, closure=None):
        before = [p.detach().clone() for p in model.parameters()]
        super().step(closure)
        deltas.append([p.detach() - b for p, b in zip(model.parameters(), before)])
opt = distrib.DistributedOptimizer(Recording(model.parameters(), lr=0.05, momentum=0.5), model,
                                   topology="ps", mode="async")
done = {}
for step, (x, y) in enumerate(batches(6), 1):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    time.sleep(0.4 if R == 1 else 0.01)
    opt.step()
    done[step] = time.time()
distrib.barrier()
opt.synchronize()  # async: pull the parameters every push has gone into
mine = [sum(d[i] for d in deltas) for i in range(len(deltas[0]))]
total = [sum(distrib.allgather(m.reshape(-1))) for m in mine]
print("RESULT " + json.dumps({"done": done, "params": [p.detach().reshape(-1).tolist() for p in model.parameters()],
                              "delta_sum": [t.tolist() for t in total],
                              "init": [p.detach().reshape(-1).tolist() for p in make_model().parameters()]}), flush=True)
"""


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_async_never_waits_and_applies_every_update(tmp_path, transport):
    """The fast worker finishes all its steps before the slow one has done two; the servers'
    parameters end as the initial ones plus every worker's updates / N."""
    out = assert_ok(_launch(tmp_path, 2, 2, ASYNC, transport))
    res = _results(out, 2)
    init = res[0]["init"]
    done0, done1 = ({int(k): v for k, v in res[r]["done"].items()} for r in (0, 1))
    assert done0[6] < done1[2], (done0, done1)
    assert res[0]["params"] == res[1]["params"]
    for p, p0, d in zip(res[0]["params"], init, res[0]["delta_sum"]):
        for a, b, c in zip(p, p0, d):
            assert abs(a - (b + c / 2)) < 1e-12


CODED = """
import json, random
from distrib.coding import CodedSampler, GradientCode
S, C, D, STEPS, B = 1, 0.05, 0.6, 7, 4
torch.manual_seed(0)
X = torch.randn(N * B * STEPS, 5, dtype=torch.float64)
Y = X @ torch.arange(1., 6., dtype=torch.float64) + 0.1 * torch.randn(len(X), dtype=torch.float64)
model = torch.nn.Linear(5, 1).double()
applied = []
class Recording(torch.optim.SGD):
    def step(self, closure=None):
        applied.append([(p.detach().clone(), p.grad.clone()) for p in model.parameters()])
        return super().step(closure)
code = GradientCode(N, S)
opt = distrib.DistributedOptimizer(Recording(model.parameters(), lr=0.05, momentum=0.5), model,
                                   topology="ps", stragglers=code)
sampler = CodedSampler(len(X), code, worker=R, batch_size=B, seed=1)
loss_of = lambda idx: torch.nn.functional.mse_loss(model(X[idx]).squeeze(1), Y[idx])

# A straggler's push is held back D seconds (a slow link) while the worker itself goes on.
link, stash, sent = opt._ps.link, [], {}
real_send, real_poll = link.send, link.poll
delay_now = [False]
def send(dst, op, meta=None, tensors=()):
    if op == "step" and delay_now[0]:
        stash.append((time.time() + D, dst, op, meta, list(tensors)))
    else:
        real_send(dst, op, meta, tensors)
def flush():
    for item in [i for i in stash if time.time() >= i[0]]:
        stash.remove(item)
        real_send(*item[1:])
        sent[item[3]["t"]] = time.time()
def poll(sources, timeout):
    end = time.monotonic() + timeout
    while True:
        flush()
        msg = real_poll(sources, max(0.0, min(0.01, end - time.monotonic())))
        if msg is not None or time.monotonic() >= end:
            return msg
link.send, link.poll = send, poll

done = {}
for parts in distrib.ps.coded_batches(opt, sampler):
    t = opt._ps.global_step
    delayed = random.Random(f"straggler-{t}").sample(range(N), S)  # same choice on every rank
    opt.zero_grad()
    distrib.ps.coded_backward(code, [loss_of(idx) for idx in parts])
    time.sleep(C)
    delay_now[0] = R in delayed and t > 0  # step 0 includes the handshake, which waits for all
    opt.step()
    done[t] = time.time()
while stash:
    flush()
    time.sleep(0.01)
# The exact full gradient of each step's global batch, at the parameters it was applied to.
err, full = 0.0, [sampler.partition_indices(p) for p in range(N)]
for t, state in enumerate(applied):
    with torch.no_grad():
        for p, (value, _) in zip(model.parameters(), state):
            p.copy_(value)
    model.zero_grad()
    (sum(loss_of(idx[t * B:(t + 1) * B]) for idx in full) / N).backward()
    for p, (_, g) in zip(model.parameters(), state):
        err = max(err, float((p.grad - g).abs().max() / p.grad.abs().max()))
opt.close()
print("RESULT " + json.dumps({"done": done, "sent": sent, "err": err, "applied": len(applied),
                              "late": opt.stats()["late_steps"]}), flush=True)
time.sleep(1)
"""


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_gradient_coding_goes_on_without_stragglers(tmp_path, transport):
    """n = 3, s = 1, one random straggler per step: every worker finishes step t before the
    straggler's push of t is even sent, and every applied gradient is the exact full one."""
    out = assert_ok(_launch(tmp_path, 3, 1, CODED, transport))
    res = _results(out, 3)
    delayed_pushes = 0
    for d in res:
        for t, sent in res[d]["sent"].items():
            delayed_pushes += 1
            for w in res:
                assert res[w]["done"][t] < sent, (w, t, d)
    assert delayed_pushes >= 4
    for r in res:
        assert res[r]["applied"] == 7 and res[r]["err"] < 1e-9, res[r]
    # Every delayed push was dropped (plus the third push of step 0, if it was sent at all).
    dropped = [int(re.search(r"\((\d+) late pushes dropped\)", l).group(1))
               for l in lines_of(out, "s0") if "late pushes dropped" in l]
    assert dropped and dropped[0] >= delayed_pushes, out


# -- failures ---------------------------------------------------------------------------------
HANGING_SERVER = """
import sys, time
from distrib.ps import aggregate, server
real = aggregate.Aggregator.on_step
def on_step(self, w, msg):
    if msg.meta.get("t") == 2:
        time.sleep(3600)  # the server stops answering anybody (SIGTERM still ends it)
    return real(self, w, msg)
aggregate.Aggregator.on_step = on_step
sys.exit(server.main())
"""

FAILURE = MODEL + """
who = sys.argv[1]
model = make_model()
opt = distrib.DistributedOptimizer(sgd(model), model, topology="ps")
for step, (x, y) in enumerate(batches(6)):
    if who == "worker" and R == 1 and step == 2:
        time.sleep(3600)  # this worker hangs without a word
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
print("finished", flush=True)
"""


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_hanging_server_is_named_by_the_workers(tmp_path, transport):
    (tmp_path / "hanging_server.py").write_text(HANGING_SERVER)
    env = {"PYTHONPATH": os.pathsep.join([ROOT, str(tmp_path)])}
    proc = _launch(tmp_path, 2, 1, FAILURE, transport, args=["server"], comm_timeout=3,
                   extra=("--server-module", "hanging_server", "--grace", "1"), env=env,
                   job_timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "CommTimeout" in text and "parameter server 0 (rank 2)" in text, text
    assert "does not answer pings" in text, text
    assert "finished" not in text


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_vanished_worker_is_named_by_the_servers(tmp_path, transport):
    proc = _launch(tmp_path, 2, 1, FAILURE, transport, args=["worker"], server_timeout=3,
                   comm_timeout=30, extra=("--grace", "1"))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "parameter server 0 (rank 2): worker 1 sent nothing" in text, text
    assert "PeerFailed" in text, text  # worker 0 stopped waiting, with the server's reason
    assert "finished" not in text
