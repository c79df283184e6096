"""distrib.pipeline in one process: schedules, micro-batches, balance helpers, argument checks,
the activation meter, and a one-stage pipeline against the plain model.
(Real multi-process pipelines: tests/test_pipeline_dist.py.)"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distrib.pipeline import GPipe, balance_by_params, balance_by_time, schedule
from distrib.pipeline.balance import partition
from distrib.pipeline.memory import ActivationMeter
from distrib.pipeline.microbatch import join, split, split_sizes


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3)).to(dtype)


# -- schedules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_schedules_run_each_microbatch_once_in_m_plus_p_minus_1_clocks(m, p):
    for orders in (schedule.gpipe_order(m, p), schedule.one_f_one_b_order(m, p)):
        for tasks in orders:
            schedule.check_order(tasks, m)  # F and B of every micro-batch once, B after F
            assert len(tasks) == 2 * m
        clocks = schedule.clock_cycles(orders)
        # Unit-time tasks: the forward wave takes m + p - 1 clocks and the backward wave mirrors it.
        assert len(clocks) == 2 * (m + p - 1)
    forward = schedule.clock_cycles([[t for t in o if t[0] == "F"]
                                     for o in schedule.gpipe_order(m, p)])
    assert len(forward) == m + p - 1
    # torchgpipe's clock: stage j runs micro-batch k - j in forward clock k.
    assert forward == [[(j, "F", k - j) for j in range(p) if 0 <= k - j < m]
                       for k in range(m + p - 1)]


@pytest.mark.parametrize("m,p", [(8, 4), (16, 4), (3, 4), (5, 2)])
def test_1f1b_holds_at_most_p_microbatches_gpipe_holds_all(m, p):
    for s in range(p):
        assert schedule.max_alive(schedule.gpipe_order(m, p, s)) == m
        alive = schedule.max_alive(schedule.one_f_one_b_order(m, p, s))
        assert alive == min(m, p - s) <= p


def test_schedule_drawing_matches_the_docstring():
    for fn in (schedule.gpipe_order, schedule.one_f_one_b_order):
        chart = schedule.draw(schedule.clock_cycles(fn(4, 3)))
        assert "\n".join("    " + line for line in chart.splitlines()) in schedule.__doc__


def test_check_order_and_clock_cycles_reject_bad_orders():
    with pytest.raises(ValueError, match="twice"):
        schedule.check_order([("F", 0), ("F", 0), ("B", 0)], 1)
    with pytest.raises(ValueError, match="before forward"):
        schedule.check_order([("B", 0), ("F", 0)], 1)
    with pytest.raises(ValueError, match="not every"):
        schedule.check_order([("F", 0), ("B", 0)], 2)
    # Stage 0 wants B0 before it sends F1; stage 1 wants F1 before it runs B0.
    bad = [[("F", 0), ("B", 0), ("F", 1), ("B", 1)], [("F", 0), ("F", 1), ("B", 0), ("B", 1)]]
    with pytest.raises(ValueError, match="deadlock"):
        schedule.clock_cycles(bad)
    with pytest.raises(ValueError):
        schedule.order("interleaved", 2, 2, 0)


# -- micro-batches -----------------------------------------------------------------------------
def test_split_sizes_uneven_and_small_batches():
    assert split_sizes(7, 3) == [3, 2, 2]
    assert split_sizes(2, 4) == [1, 1]
    assert split_sizes(8, 1) == [8]
    with pytest.raises(ValueError):
        split_sizes(0, 2)


def test_split_and_join_tuples():
    a, b = torch.arange(14.).reshape(7, 2), torch.arange(7)
    parts = split((a, b), [3, 2, 2])
    assert [p[0].shape[0] for p in parts] == [3, 2, 2] and isinstance(parts[0], tuple)
    joined = join(parts)
    assert torch.equal(joined[0], a) and torch.equal(joined[1], b)


# -- balance -----------------------------------------------------------------------------------
def test_partition_minimises_the_largest_stage():
    assert partition([1, 1, 1, 1], 2) == [2, 2]
    assert partition([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    assert partition([1, 2, 3, 4, 5, 6, 7, 8, 9], 3) == [5, 2, 2]  # 15 | 13 | 17
    assert sum(partition([0] * 6, 4)) == 6
    with pytest.raises(ValueError):
        partition([1, 2], 3)


def test_balance_by_params_and_by_time():
    model = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10), nn.ReLU(),
                          nn.Linear(10, 10), nn.Linear(10, 10))
    bal = balance_by_params(model, 2)
    assert bal == [1, 5]  # the first layer has 10100 of the 11330 parameters
    bal = balance_by_time(model, torch.randn(64, 100), 3)
    assert sum(bal) == len(model) and len(bal) == 3 and min(bal) >= 1
    assert all(p.grad is None for p in model.parameters())  # timing leaves .grad alone
    with pytest.raises(ValueError):
        balance_by_params(model, 7)
    with pytest.raises(TypeError):
        balance_by_params(nn.Linear(2, 2), 1)


# -- arguments ---------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    model = mlp()
    with pytest.raises(ValueError, match="sum\\(balance\\)"):
        GPipe(model, [2, 2], chunks=2)
    with pytest.raises(ValueError, match="chunks"):
        GPipe(model, [5], chunks=0)
    with pytest.raises(ValueError, match="checkpoint"):
        GPipe(model, [5], chunks=2, checkpoint="sometimes")
    with pytest.raises(ValueError, match="schedule"):
        GPipe(model, [5], chunks=2, schedule="zigzag")
    with pytest.raises(ValueError, match="balance"):
        GPipe(model, [5, 0], chunks=2)
    with pytest.raises(TypeError):
        GPipe(nn.Linear(2, 2), [1], chunks=1)
    # This process is a job of one: two stages need a world size that is a multiple of two.
    with pytest.raises(ValueError, match="multiple"):
        GPipe(model, [3, 2], chunks=2)
    pipe = GPipe(model, [5], chunks=2)
    with pytest.raises(ValueError, match="x"):
        pipe.train_step(None, torch.zeros(3, dtype=torch.long), F.cross_entropy)
    with pytest.raises(ValueError, match="samples"):
        pipe.train_step(torch.zeros(4, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.long),
                        F.cross_entropy)
    with pytest.raises(ValueError, match="y"):
        pipe.train_step(torch.zeros(4, 5, dtype=torch.float64), None, F.cross_entropy)
    with pytest.raises(ValueError, match="scalar"):
        pipe.train_step(torch.zeros(4, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.long),
                        lambda out, y: out)
    with pytest.raises(TypeError):
        pipe.train_step(torch.zeros(4, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.long),
                        None)
    # In a job of one a bad call leaves nothing broken: the next one works.
    assert pipe(torch.zeros(2, 5, dtype=torch.float64)).shape == (2, 3)


# -- one stage, every option -------------------------------------------------------------------
@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
@pytest.mark.parametrize("sched", ["gpipe", "1f1b"])
@pytest.mark.parametrize("n,chunks", [(7, 3), (2, 4)])
def test_one_stage_matches_the_plain_model(checkpoint, sched, n, chunks):
    ref, model = mlp(1), mlp(1)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    expected = F.cross_entropy(ref(x), y)
    expected.backward()
    pipe = GPipe(model, [5], chunks, checkpoint=checkpoint, schedule=sched)
    loss = pipe.train_step(x, y, F.cross_entropy)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-10, atol=0)
    for (name, p), q in zip(pipe.stage.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-12, msg=name)
    assert pipe.last_sizes == split_sizes(n, chunks)
    assert pipe.last_order == schedule.order(sched, len(pipe.last_sizes), 1, 0)
    torch.testing.assert_close(pipe(x), ref(x))


def test_activation_meter_counts_what_a_schedule_keeps():
    model = nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 8))
    x, y = torch.randn(32, 8), torch.randn(32, 8)
    peaks = {}
    for ck in ("never", "always"):
        pipe = GPipe(model, [3], 4, checkpoint=ck, measure_memory=True)
        pipe.train_step(x, y, F.mse_loss)
        peaks[ck] = pipe.peak_activation_bytes
        assert pipe._meter.current == 0  # everything is freed after the backward
    # Without checkpoints the 4 micro-batches keep their 32 x 256 hidden activations (tanh
    # output, 4 bytes each) at once; with checkpoints only the inputs and outputs stay.
    assert peaks["never"] >= 32 * 256 * 4
    assert peaks["always"] < peaks["never"] / 4
    meter = ActivationMeter()
    t = torch.zeros(10)
    meter.hold([t, t[2:]])
    assert meter.current == 40  # one storage, counted once
    meter.release([t, t[2:]])
    assert meter.current == 0 and meter.peak == 40
