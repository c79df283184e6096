"""CodedSampler: partitions, per-step chunks, agreement across ranks, and a coded training step."""

import pytest
import torch

from distrib.coding import CodedSampler, GradientCode


def _all_partitions(sampler):
    return [sampler.partition_indices(p) for p in range(sampler.code.n)]


@pytest.mark.parametrize("length", [5, 23, 100])
def test_partitions_are_disjoint_balanced_and_cover_the_dataset(length):
    code = GradientCode(5, 2)
    parts = _all_partitions(CodedSampler(length, code, worker=0, seed=3))
    assert sorted(i for p in parts for i in p) == list(range(length))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_full_batch_step_is_the_workers_partitions_in_order():
    code = GradientCode(6, 2, "fractional")
    for w in range(6):
        sampler = CodedSampler(40, code, worker=w)
        steps = list(sampler)
        assert len(sampler) == len(steps) == 1
        assert steps[0] == [sampler.partition_indices(p) for p in code.partitions(w)]


@pytest.mark.parametrize("length,batch", [(50, 3), (47, 4), (20, 4), (20, 100)])
def test_batched_steps_chunk_every_partition_alike(length, batch):
    code = GradientCode(4, 1)
    lengths = set()
    for w in range(4):
        sampler = CodedSampler(length, code, worker=w, batch_size=batch, seed=1)
        steps = list(sampler)
        lengths.add(len(steps))
        assert len(steps) == len(sampler)
        for k, step in enumerate(steps):
            assert len(step) == 2
            assert all(len(chunk) >= 1 for chunk in step)
            if k < len(steps) - 1:
                assert all(len(chunk) == batch for chunk in step)
        for j, p in enumerate(code.partitions(w)):   # chunks concatenate to the partition
            assert [i for step in steps for i in step[j]] == sampler.partition_indices(p)
    assert len(lengths) == 1                             # every worker runs the same steps


def test_identical_on_every_rank_and_reshuffled_per_epoch():
    code = GradientCode(5, 2)
    ranks = [CodedSampler(60, code, worker=w, seed=7) for w in range(5)]
    assert all(_all_partitions(r) == _all_partitions(ranks[0]) for r in ranks)
    again = CodedSampler(60, code, worker=3, seed=7)
    assert list(again) == list(ranks[3])

    first = _all_partitions(ranks[0])
    for r in ranks:
        r.set_epoch(1)
    second = _all_partitions(ranks[0])
    assert second != first
    assert all(_all_partitions(r) == second for r in ranks)
    ranks[0].set_epoch(0)
    assert _all_partitions(ranks[0]) == first
    assert _all_partitions(CodedSampler(60, code, worker=0, seed=8)) != first


def test_without_shuffle_partitions_are_contiguous_and_fixed():
    code = GradientCode(3, 1)
    sampler = CodedSampler(10, code, worker=1, shuffle=False)
    assert _all_partitions(sampler) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    sampler.set_epoch(5)
    assert _all_partitions(sampler) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_sampler_errors():
    code = GradientCode(4, 1)
    with pytest.raises(ValueError, match="at least one sample per partition"):
        CodedSampler(3, code, worker=0)
    with pytest.raises(ValueError, match="unknown worker"):
        CodedSampler(10, code, worker=4)
    with pytest.raises(ValueError, match="batch_size"):
        CodedSampler(10, code, worker=0, batch_size=0)
    with pytest.raises(TypeError, match="GradientCode"):
        CodedSampler(10, "cyclic", worker=0)
    with pytest.raises(ValueError, match="out of range"):
        CodedSampler(10, code, worker=0).partition_indices(4)


@pytest.mark.parametrize("scheme", ["cyclic", "fractional"])
def test_coded_step_recovers_the_full_batch_gradient(scheme):
    """The documented loop: grad per partition -> encode -> decode from the first n - s."""
    n, s, batch = 6, 2, 5
    torch.manual_seed(0)
    x, y = torch.randn(70, 3), torch.randn(70, 1)
    model = torch.nn.Linear(3, 1)
    code = GradientCode(n, s, scheme)

    def flat_grad(idx):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x[idx]), y[idx], reduction="sum").backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    samplers = [CodedSampler(len(x), code, worker=w, batch_size=batch, seed=2) for w in range(n)]
    for sampler in samplers:
        sampler.set_epoch(1)
    for step, per_worker in enumerate(zip(*samplers)):
        coded = {w: code.encode(w, [flat_grad(idx) for idx in per_worker[w]]) for w in range(n)}
        stragglers = set(torch.randperm(n, generator=torch.Generator().manual_seed(step))[:s]
                         .tolist())
        got = code.decode({w: c for w, c in coded.items() if w not in stragglers})
        batch_idx = sorted({i for worker_steps in per_worker for chunk in worker_steps
                            for i in chunk})
        torch.testing.assert_close(got, flat_grad(batch_idx), rtol=1e-5, atol=1e-5)
    assert step + 1 == len(samplers[0]) == 3            # ceil(11 samples per partition / 5)
