"""distrib.checkpoint: atomic per-rank checkpoints that resume bitwise (model, momentum,
error-feedback residuals, loss scale, RNG states), alone, on 2 ranks and across a restart."""
import os
import random
import warnings

import numpy as np
import pytest
import torch

from distrib import checkpoint
from distrib.amp import LossScaler
from distrib.checkpoint import CheckpointError
from jobs import assert_ok, run_job

K = 4  # save after K steps, stop after 2K

# Modes: "ref" trains 2K steps and saves at K on the way; "resume" loads that checkpoint in
# fresh processes and trains K more; "crash" saves at K, then rank 1 dies on the first attempt
# and the restarted job resumes from the checkpoint. Each run dumps its final state.
TRAIN_JOB = """
import random
import numpy as np
from distrib import checkpoint
from distrib.amp import LossScaler
from distrib.compress import ErrorFeedback, TopK
mode, ckpt, out = sys.argv[1], sys.argv[2], sys.argv[3]
K = %d
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                            torch.nn.Linear(16, 3))
opt = distrib.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                   model=model, compressor=ErrorFeedback(TopK(0.25)),
                                   min_compress_numel=32)
scaler = LossScaler(init_scale=2.0 ** 10, growth_interval=3)
torch.manual_seed(100 + R); np.random.seed(R); random.seed(R)  # per-rank data streams
start = 0
if mode == "resume" or (mode == "crash" and os.path.exists(ckpt)):
    start = checkpoint.load(ckpt, model, opt, loss_scaler=scaler)["step"]
    assert start == K, start
for step in range(start, 2 * K):
    x = torch.randn(8, 6) + float(np.random.rand())
    y = torch.tensor([random.randrange(3) for _ in range(8)])
    opt.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    if step + 1 == K and mode != "resume":
        checkpoint.save(ckpt, model, opt, step=K)
        if mode == "crash" and os.environ.get("DISTRIB_RESTART_COUNT") == "0" and R == N - 1:
            print("crashing after the checkpoint", flush=True)
            os._exit(3)
residual = sum(v["e"].abs().sum() for v in opt.compressor.state_dict()["state"].values()) \\
    if N > 1 else torch.zeros(())
torch.save({"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            "scale": scaler.get_scale(), "residual": residual}, f"{out}.rank{R}")
""" % K


def _run(tmp_path, n, mode, ckpt, out, **kw):
    return assert_ok(run_job(tmp_path, n, TRAIN_JOB, args=(mode, ckpt, out), timeout=150, **kw))


def _final(out, n):
    return [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(n)]


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x["params"], y["params"])
        assert x["scale"] == y["scale"] and torch.equal(x["residual"], y["residual"])


@pytest.fixture(scope="module")
def reference_two_ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref2")
    _run(d, 2, "ref", d / "ckpt.pt", d / "final")
    return d


@pytest.mark.timeout(200)
def test_two_ranks_resume_bitwise(reference_two_ranks, tmp_path):
    d = reference_two_ranks
    assert os.path.exists(d / "ckpt.pt") and os.path.exists(d / "ckpt.pt.rank1")
    _run(tmp_path, 2, "resume", d / "ckpt.pt", tmp_path / "final")
    ref, resumed = _final(d / "final", 2), _final(tmp_path / "final", 2)
    _assert_same(ref, resumed)
    assert torch.equal(ref[0]["params"], ref[1]["params"])  # data parallel: replicas agree
    assert ref[0]["residual"] > 0 and not torch.equal(ref[0]["residual"], ref[1]["residual"])
    assert ref[0]["scale"] > 2.0 ** 10  # the scale grew: its state went through the checkpoint


@pytest.mark.timeout(200)
def test_restart_after_crash_resumes_bitwise(reference_two_ranks, tmp_path):
    proc = run_job(tmp_path, 2, TRAIN_JOB, args=("crash", tmp_path / "c.pt", tmp_path / "final"),
                   launch_args=("--max-restarts", "1"), timeout=200)
    out = assert_ok(proc)
    assert "crashing after the checkpoint" in out
    _assert_same(_final(reference_two_ranks / "final", 2), _final(tmp_path / "final", 2))


@pytest.mark.timeout(150)
def test_single_process_resume_bitwise(tmp_path):
    _run(tmp_path, 1, "ref", tmp_path / "ckpt.pt", tmp_path / "ref")
    assert not os.path.exists(tmp_path / "ckpt.pt.rank1")
    _run(tmp_path, 1, "resume", tmp_path / "ckpt.pt", tmp_path / "resumed")
    _assert_same(_final(tmp_path / "ref", 1), _final(tmp_path / "resumed", 1))


# -- in-process: state round trips and the error paths ----------------------------------------
def _model_opt():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _step(model, opt, scaler):
    opt.zero_grad()
    scaler.scale(model(torch.randn(4, 3)).pow(2).sum()).backward()
    scaler.step(opt)
    scaler.update()


def test_round_trip_restores_everything(tmp_path):
    model, opt = _model_opt()
    scaler = LossScaler(init_scale=4.0, growth_interval=1)
    for _ in range(3):
        _step(model, opt, scaler)
    checkpoint.save(tmp_path / "c.pt", model, opt, step=3, tag="x", table={"a": [1, 2.5]})
    draws = (torch.rand(3), np.random.rand(3), random.random())
    m2, o2 = _model_opt()
    s2 = LossScaler().attach(o2)  # attached before load: restored through o2.loss_scalers
    extra = checkpoint.load(tmp_path / "c.pt", m2, o2)
    assert extra == {"step": 3, "tag": "x", "table": {"a": [1, 2.5]}}
    assert s2.state_dict() == scaler.state_dict() and s2.get_scale() == 32.0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 m2.state_dict().values()))
    assert torch.equal(o2.state_dict()["state"][0]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and (draws[1] == again[1]).all() and draws[2] == again[2]
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # no temporary files left


def test_unmatched_loss_scaler_warns(tmp_path):
    model, opt = _model_opt()
    _step(model, opt, LossScaler())
    checkpoint.save(tmp_path / "c.pt", model, opt)
    m2, o2 = _model_opt()
    with pytest.warns(UserWarning, match="loss_scaler="):
        checkpoint.load(tmp_path / "c.pt", m2, o2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint.load(tmp_path / "c.pt", m2, o2, loss_scaler=LossScaler())


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    model, opt = _model_opt()
    checkpoint.save(tmp_path / "c.pt", model, opt, step=1)
    with pytest.raises(CheckpointError, match="could not write"):
        checkpoint.save(tmp_path / "c.pt", model, opt, step=2, bad=lambda: 0)  # unpicklable
    assert checkpoint.load(tmp_path / "c.pt", model, opt) == {"step": 1}
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]
    with pytest.raises(CheckpointError, match="could not write"):
        checkpoint.save(tmp_path / "no" / "such" / "dir.pt", model)


def test_failure_on_another_rank_commits_nothing(tmp_path, monkeypatch):
    model, opt = _model_opt()
    checkpoint.save(tmp_path / "c.pt", model, opt, step=1)
    monkeypatch.setattr(checkpoint, "_failed_ranks", lambda failed: [1])  # rank 1 failed to write
    with pytest.raises(CheckpointError, match=r"rank\(s\) \[1\] failed"):
        checkpoint.save(tmp_path / "c.pt", model, opt, step=2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]
    assert checkpoint.load(tmp_path / "c.pt", model, opt) == {"step": 1}


def test_unsafe_extra_needs_weights_only_false(tmp_path):
    checkpoint.save(tmp_path / "c.pt", when=np.datetime64("2024-01-01"))
    with pytest.raises(CheckpointError, match="weights_only=False"):
        checkpoint.load(tmp_path / "c.pt")
    assert checkpoint.load(tmp_path / "c.pt", weights_only=False)["when"] == \
        np.datetime64("2024-01-01")


def test_bad_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "missing.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a distrib checkpoint"):
        checkpoint.load(tmp_path / "plain.pt")
    model, _ = _model_opt()
    checkpoint.save(tmp_path / "c.pt", optimizer=None, step=1)
    with pytest.raises(CheckpointError, match="no model state"):
        checkpoint.load(tmp_path / "c.pt", model)


def _as_rank(monkeypatch, rank, size):
    monkeypatch.setattr(checkpoint.context, "rank", lambda: rank)
    monkeypatch.setattr(checkpoint.context, "size", lambda: size)


def test_world_size_mismatch_missing_and_stale_shards(tmp_path, monkeypatch):
    model, opt = _model_opt()
    path = tmp_path / "c.pt"
    checkpoint.save(path, model, opt)  # written by a job of one
    _as_rank(monkeypatch, 1, 2)
    with pytest.raises(CheckpointError, match="job of 1 worker.*this job has 2"):
        checkpoint.load(path, model, opt)
    # Rank 0 of a 2-worker job (the collectives of this one-process test are copies).
    _as_rank(monkeypatch, 0, 2)
    checkpoint.save(path, model, opt)
    _as_rank(monkeypatch, 1, 2)
    with pytest.raises(CheckpointError, match=r"c\.pt\.rank1 of rank 1 is missing"):
        checkpoint.load(path, model, opt)
    checkpoint.save(path, model, opt)  # rank 1's part of *another* save
    with pytest.raises(CheckpointError, match="does not belong"):
        checkpoint.load(path, model, opt)
    with pytest.raises(CheckpointError, match="rank 1's shard"):
        checkpoint.load(f"{path}.rank1", model, opt)


def test_only_parts_that_differ_go_to_the_shards(monkeypatch):
    items = {"model": {"w": torch.ones(3)}, "optimizer/state": {0: torch.zeros(2)},
             "extra/step": 5}
    real = checkpoint.api.allgather

    def two_ranks(t):  # a peer whose model differs (as a pipeline stage's would)
        other = t.clone()
        other[0, 0] += 1
        return real(t) + [other]

    monkeypatch.setattr(checkpoint.api, "allgather", two_ranks)
    assert checkpoint._shared_items(items) == {"optimizer/state", "extra/step"}
    monkeypatch.setattr(checkpoint.api, "allgather", lambda t: real(t) + [t[:1]])
    assert checkpoint._shared_items(items) == set()  # different parts: nothing shared
