"""distrib.amp.LossScaler: GradScaler's exact scale sequence, and overflow agreed by all ranks."""
import json

import pytest
import torch

from distrib.amp import LossScaler
from jobs import assert_ok, lines_of, run_job

INF, NAN = float("inf"), float("nan")


def _train(scaler, pattern, make_opt=None):
    """A few steps of a tiny model; ``pattern[i]`` injects inf/nan into a gradient at step i."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = (make_opt or (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)))(model.parameters())
    scales, skipped = [], []
    for bad in pattern:
        opt.zero_grad()
        loss = model(torch.randn(3, 4)).pow(2).mean()
        scaler.scale(loss).backward()
        if bad is not None:
            model[0].weight.grad[1, 2] = bad
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        skipped.append(all(torch.equal(a, p) for a, p in zip(before, model.parameters())))
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, skipped, [p.detach().clone() for p in model.parameters()]


PATTERN = [None, INF, None, None, None, NAN, None, None, None, None, None, INF, INF, None, None,
           None, None]


@pytest.mark.parametrize("kw", [dict(init_scale=8.0, growth_interval=3),
                                dict(init_scale=2.0 ** 16, growth_factor=3.0, backoff_factor=0.25,
                                     growth_interval=2)])
def test_same_sequence_as_gradscaler(kw):
    ours = _train(LossScaler(**kw), PATTERN)
    theirs = _train(torch.amp.GradScaler("cpu", **kw), PATTERN)
    assert ours[0] == theirs[0]
    assert ours[0] != [ours[0][0]] * len(PATTERN)  # the scale did move both ways
    assert ours[1] == [bad is not None for bad in PATTERN]  # exactly the overflow steps skipped
    assert all(torch.equal(a, b) for a, b in zip(ours[2], theirs[2]))  # same parameters, bitwise


def test_state_dict_matches_gradscaler_and_resumes():
    kw = dict(init_scale=8.0, growth_interval=3)
    ours, theirs = LossScaler(**kw), torch.amp.GradScaler("cpu", **kw)
    _train(ours, PATTERN[:6])
    _train(theirs, PATTERN[:6])
    assert ours.state_dict() == theirs.state_dict()
    resumed = LossScaler()
    resumed.load_state_dict(theirs.state_dict())  # GradScaler's state loads into ours
    assert _train(resumed, PATTERN[6:])[0] == _train(ours, PATTERN[6:])[0]


def test_unscale_then_step_clips_true_gradients():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.SGD([w], lr=1.0)
    scaler = LossScaler(init_scale=1024.0)
    scaler.scale((w * w).sum()).backward()
    scaler.unscale_(opt)
    assert torch.allclose(w.grad, 2 * w.detach())  # unscaled in place
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    before = w.detach().clone()
    scaler.step(opt)  # does not unscale twice
    assert torch.allclose(w.detach(), before - 2 * before)
    with pytest.raises(RuntimeError, match="already been called since the last update"):
        scaler.step(opt)
    scaler.update()
    assert opt.loss_scalers == [scaler]  # registered for checkpoints, once
    with pytest.raises(RuntimeError, match="no inf checks"):
        scaler.update()


def test_scale_lists_disabled_and_bad_arguments():
    s = LossScaler(init_scale=4.0)
    a, b = s.scale([torch.tensor(1.0), torch.tensor(2.0)])
    assert (a.item(), b.item()) == (4.0, 8.0)
    off = LossScaler(enabled=False)
    x = torch.tensor(3.0)
    assert off.scale(x) is x and off.get_scale() == 1.0
    for bad in (dict(growth_factor=1.0), dict(backoff_factor=1.5), dict(growth_interval=0),
                dict(init_scale=0.0), dict(init_scale=INF)):
        with pytest.raises(ValueError):
            LossScaler(**bad)
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    p.grad = torch.ones(2, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16"):
        LossScaler().unscale_(torch.optim.SGD([p], lr=0.1))


def test_with_distributed_optimizer_in_a_job_of_one():
    import distrib
    scales = _train(LossScaler(init_scale=8.0, growth_interval=3), PATTERN,
                    lambda ps: distrib.DistributedOptimizer(torch.optim.SGD(ps, lr=0.1,
                                                                            momentum=0.9)))
    assert scales[0] == _train(torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3),
                               PATTERN)[0]


# Rank 1 alone overflows at step 2 (a hook turns its gradient into inf): every rank must skip
# that step, keep the same scale and the same parameters. Once through a DistributedOptimizer
# (gradients averaged first), once with plain per-rank optimizers (only the flag is shared).
OVERFLOW_JOB = """
import json
from distrib.amp import LossScaler
for mode in ("distributed", "plain"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if mode == "distributed":
        opt = distrib.DistributedOptimizer(opt, model=model)
    scaler = LossScaler(init_scale=8.0, growth_interval=2)
    gen = torch.Generator().manual_seed(R)
    scales, skipped = [], []
    for step in range(6):
        opt.zero_grad()
        hook = None
        if step == 2 and R == 1:
            hook = model[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        scaler.scale(model(torch.randn(3, 4, generator=gen)).pow(2).mean()).backward()
        if hook is not None:
            hook.remove()
        scaler.step(opt)
        skipped.append(scaler.found_inf(opt))
        scaler.update()
        scales.append(scaler.get_scale())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    same = all(torch.equal(flat, g) for g in distrib.allgather(flat))
    print("RESULT", json.dumps({"mode": mode, "scales": scales, "skipped": skipped,
                                "params_equal": same}))
"""


@pytest.mark.timeout(120)
def test_overflow_on_one_rank_skips_everywhere(tmp_path):
    out = assert_ok(run_job(tmp_path, 3, OVERFLOW_JOB))
    expected = _train(torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=2),
                      [None, None, INF, None, None, None])[0]
    for r in range(3):
        results = [json.loads(l.split(" ", 1)[1]) for l in lines_of(out, r)
                   if l.startswith("RESULT")]
        assert [res["mode"] for res in results] == ["distributed", "plain"], out
        for res in results:
            assert res["skipped"] == [False, False, True, False, False, False], (r, res)
            assert res["scales"] == expected, (r, res)
            if res["mode"] == "distributed":
                assert res["params_equal"], (r, res)
