"""Compressor.reduce over 1..4 simulated ranks (threads, tests/_compress_helpers.ThreadComm):
every rank gets the same bits, and the right mean where the compressor is exact."""
import math

import pytest
import torch
from _compress_helpers import run_ranks

from distrib.compress import (BF16, FP16, QSGD, CountSketch, ErrorFeedback, NoCompression,
                              PowerSGD, TopK)
from distrib.errors import CollectiveMismatch

SIZES = [1, 2, 3, 4]


def rank_tensor(rank, shape=(40, 30), step=0):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(shape, generator=g)


def reduce_all(make, size, shape=(40, 30), steps=1, **kw):
    """Each rank builds its compressor and reduces its own tensors; returns per-rank outputs."""
    def body(comm):
        c = make()
        return [c.reduce(rank_tensor(comm.rank, shape, s), comm, key="w", **kw)
                for s in range(steps)]
    return run_ranks(size, body)


def mean_of(size, shape=(40, 30), step=0):
    return sum(rank_tensor(r, shape, step) for r in range(size)) / size


MAKERS = {
    "none": NoCompression, "fp16": FP16, "bf16": BF16, "qsgd": lambda: QSGD(7),
    "topk": lambda: TopK(0.05), "ef-topk": lambda: ErrorFeedback(TopK(0.05)),
    "powersgd": lambda: PowerSGD(2), "countsketch": lambda: CountSketch(3, 60, 20),
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", list(MAKERS))
def test_every_rank_gets_the_same_bits(name, size):
    outs = reduce_all(MAKERS[name], size, steps=2)
    for step in range(2):
        for r in range(1, size):
            assert torch.equal(outs[r][step], outs[0][step]), (name, size, r)
    assert outs[0][0].shape == (40, 30)


@pytest.mark.parametrize("size", SIZES)
def test_linear_and_exact_cases_give_the_mean(size):
    want = mean_of(size)
    assert torch.allclose(reduce_all(NoCompression, size)[0][0], want, atol=1e-6)
    half = sum(rank_tensor(r).half().float() for r in range(size)) / size
    assert torch.allclose(reduce_all(FP16, size)[0][0], half, atol=2e-3)
    assert torch.allclose(reduce_all(lambda: PowerSGD(30), size)[0][0], want, atol=1e-6)
    assert torch.allclose(reduce_all(lambda: CountSketch(5, 300, 10), size)[0][0], want, atol=1e-6)
    # op="sum"
    got = reduce_all(NoCompression, size, op="sum")[0][0]
    assert torch.allclose(got, want * size, atol=1e-5)


@pytest.mark.parametrize("size", SIZES)
def test_topk_reduce_is_the_mean_of_each_ranks_topk(size):
    outs = reduce_all(lambda: TopK(0.05), size)
    local = TopK(0.05)
    want = sum(local.decompress(local.compress(rank_tensor(r))) for r in range(size)) / size
    assert torch.allclose(outs[0][0], want, atol=1e-6)


@pytest.mark.parametrize("size", [2, 4])
def test_qsgd_reduce_is_unbiased_and_ranks_dither_independently(size):
    x = torch.full((20_000,), 0.3)  # the same tensor on every rank

    def body(comm):
        c = QSGD(7, bucket_size=256)
        codes = None

        class Spy:  # sees the bytes each rank puts on the wire
            rank, size = comm.rank, comm.size

            def allgather(self, t):
                nonlocal codes
                codes = t.clone()
                return comm.allgather(t)
        return c.reduce(x, Spy(), key="w"), codes

    outs = run_ranks(size, body)
    # levels 0/1 with p = 7/16, one level = 4.8/7: the mean's std is <= 0.0017 (size 2)
    assert abs(outs[0][0].mean().item() - 0.3) < 0.01
    assert not torch.equal(outs[0][1], outs[1][1])  # each rank draws its own dither


@pytest.mark.parametrize("size", SIZES)
def test_powersgd_is_exact_for_a_mean_of_its_rank(size):
    # each rank holds a rank-1 matrix: the mean has rank <= size <= 4
    def make(r):
        g = torch.Generator().manual_seed(r)
        return torch.randn(50, 1, generator=g) @ torch.randn(1, 36, generator=g)

    log = []
    outs = run_ranks(size, lambda comm: PowerSGD(4).reduce(make(comm.rank), comm, key="m"), log=log)
    want = sum(make(r) for r in range(size)) / size
    for o in outs:
        assert torch.equal(o, outs[0])
    assert torch.allclose(outs[0], want, atol=1e-4)
    # two all-reduces per rank: P (50×4) then Q (36×4)
    mine = [b for op, r, b in log if r == 0]
    assert [op for op, r, b in log if r == 0] == ["allreduce", "allreduce"]
    assert mine == [50 * 4 * 4, 36 * 4 * 4]


def test_powersgd_q_is_shared_and_warm_started():
    def body(comm):
        c = PowerSGD(2)
        for s in range(3):
            c.reduce(rank_tensor(comm.rank, step=s), comm, key="w")
        return c.state_dict()["state"]["w"]

    states = run_ranks(4, body)
    for st in states[1:]:
        assert torch.equal(st["q"], states[0]["q"])     # same Q everywhere
        assert not torch.equal(st["e"], states[0]["e"])  # each rank its own error
    assert states[0]["step"] == 3


@pytest.mark.parametrize("size", [2, 4])
def test_countsketch_recovers_shared_heavy_hitters(size):
    n, heavy = 50_000, 10
    pos = torch.randperm(n, generator=torch.Generator().manual_seed(9))[:heavy]

    def make(r):
        g = torch.Generator().manual_seed(r)
        t = torch.randn(n, generator=g) * 0.01
        t[pos] += 50 + 10 * r
        return t

    outs = run_ranks(size, lambda comm: CountSketch(5, 1000, heavy).reduce(make(comm.rank), comm))
    want = sum(make(r) for r in range(size)) / size
    assert set(outs[0].nonzero().view(-1).tolist()) == set(pos.tolist())
    assert torch.allclose(outs[0][pos], want[pos], atol=1e-5)  # exact second round


def test_ranks_with_different_shapes_raise_collective_mismatch():
    def body(comm):
        return TopK(0.1).reduce(torch.randn(100 + comm.rank * 10), comm, key="w")

    with pytest.raises(CollectiveMismatch, match="different shapes"):
        run_ranks(2, body)


@pytest.mark.parametrize("size", [2, 3])
def test_stats_account_the_payload(size):
    def body(comm):
        c = ErrorFeedback(TopK(0.01))
        c.reduce(torch.randn(10_000), comm, key="w")
        return c.last_stats

    for st in run_ranks(size, body):
        assert st["raw_bytes"] == 40_000 and st["wire_bytes"] == math.ceil(0.01 * 10_000) * 8
        assert st["comm_s"] > 0
