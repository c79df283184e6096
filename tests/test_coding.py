"""GradientCode: exact decoding from every straggler set, the encoding matrix, errors."""

import itertools

import pytest
import torch

from distrib.coding import GradientCode
from distrib.errors import DistribError

CASES = [(3, 1), (4, 1), (5, 2), (6, 2), (8, 3)]
CODES = [(n, s, scheme) for n, s in CASES for scheme in ("cyclic", "fractional")
         if scheme == "cyclic" or n % (s + 1) == 0]
SHAPES = [(7,), (3, 4), (2, 3, 2)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _grads(n, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


def _encode_all(code, grads):
    return {w: code.encode(w, [grads[p] for p in code.partitions(w)]) for w in range(code.n)}


def _assert_exact(got, grads, dtype):
    want = torch.stack([g.double() for g in grads]).sum(0)
    assert got.dtype == dtype and got.shape == want.shape
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_fractional_is_built_exactly_where_valid():
    assert [c[:2] for c in CODES if c[2] == "fractional"] == [(4, 1), (6, 2), (8, 3)]


@pytest.mark.parametrize("n,s,scheme", CODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_decode_from_every_straggler_set(n, s, scheme, dtype):
    code = GradientCode(n, s, scheme=scheme)
    for i, shape in enumerate(SHAPES):
        grads = _grads(n, shape, dtype, seed=100 * n + 10 * s + i)
        coded = _encode_all(code, grads)
        assert all(c.shape == shape and c.dtype == dtype for c in coded.values())
        # every straggler set of size s, then smaller ones (more than n - s workers arrive)
        for k in range(s, -1, -1):
            for stragglers in itertools.combinations(range(n), k):
                arrived = {w: c for w, c in coded.items() if w not in stragglers}
                _assert_exact(code.decode(arrived), grads, dtype)


@pytest.mark.parametrize("n,s,scheme", CODES)
def test_partitions_and_matrix(n, s, scheme):
    code = GradientCode(n, s, scheme)
    assert (code.n, code.s, code.scheme) == (n, s, scheme)
    B = code.B
    assert isinstance(B, torch.Tensor) and B.dtype == torch.float64 and B.shape == (n, n)
    held = {p: [] for p in range(n)}
    for w in range(n):
        parts = code.partitions(w)
        assert len(parts) == s + 1 and len(set(parts)) == s + 1
        assert all(0 <= p < n for p in parts)
        # B's row is supported exactly on the worker's partitions
        assert set(torch.nonzero(B[w]).flatten().tolist()) == set(parts)
        for p in parts:
            held[p].append(w)
    for p, workers in held.items():
        assert len(workers) == s + 1
        assert code.holders(p) == sorted(workers)
    if scheme == "fractional":
        assert set(B.unique().tolist()) <= {0.0, 1.0}
        assert code.amplification == 1.0
    else:
        assert [code.partitions(w)[0] for w in range(n)] == list(range(n))
        assert 1.0 <= code.amplification < 10.0


@pytest.mark.parametrize("n,s,scheme", CODES)
def test_decoding_vector_solves_the_span_condition(n, s, scheme):
    code = GradientCode(n, s, scheme)
    B = code.B
    for k in range(n - s, n + 1):
        for workers in itertools.combinations(range(n), k):
            a = code.decoding_vector(list(workers))
            assert a.dtype == torch.float64 and a.shape == (k,)
            torch.testing.assert_close(a @ B[list(workers)], torch.ones(n, dtype=torch.float64),
                                       rtol=0, atol=1e-10)


def test_decoding_vector_order_and_cache_safety():
    code = GradientCode(5, 2)
    a = code.decoding_vector([4, 0, 2])
    b = code.decoding_vector({0, 2, 4})          # sets are taken in sorted order
    torch.testing.assert_close(a, b[[2, 0, 1]])
    b.zero_()                                    # returned tensors are copies of the cache
    torch.testing.assert_close(code.decoding_vector(frozenset({0, 2, 4})), a[[1, 2, 0]])


def test_decode_ignores_mapping_order():
    code = GradientCode(5, 2)
    grads = _grads(5, (6,), torch.float64, seed=3)
    coded = _encode_all(code, grads)
    forward = code.decode({w: coded[w] for w in (1, 2, 4)})
    backward = code.decode({w: coded[w] for w in (4, 2, 1)})
    assert torch.equal(forward, backward)


@pytest.mark.parametrize("scheme", ["cyclic", "fractional"])
def test_same_code_on_every_rank(scheme):
    assert torch.equal(GradientCode(8, 3, scheme).B, GradientCode(8, 3, scheme).B)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("scheme", ["cyclic", "fractional"])
def test_edge_cases_no_straggler_and_all_but_one(n, scheme):
    grads = _grads(n, (5,), torch.float64, seed=n)
    plain = GradientCode(n, 0, scheme)                   # s = 0: plain sum, all must arrive
    assert torch.equal(plain.B, torch.eye(n, dtype=torch.float64)) and plain.amplification == 1
    _assert_exact(plain.decode(_encode_all(plain, grads)), grads, torch.float64)
    full = GradientCode(n, n - 1, scheme)                # s = n - 1: any one worker suffices
    coded = _encode_all(full, grads)
    for w in range(n):
        _assert_exact(full.decode({w: coded[w]}), grads, torch.float64)


def test_every_small_cyclic_code_satisfies_the_span_condition():
    for n in range(2, 10):
        for s in range(1, n):
            code = GradientCode(n, s)
            B = code.B
            for workers in itertools.combinations(range(n), n - s):
                a = code.decoding_vector(list(workers))
                assert (a @ B[list(workers)] - 1).abs().max() < 1e-9, (n, s, workers)


def test_larger_cyclic_code_worst_straggler_runs_fp32():
    n, s = 12, 4
    code = GradientCode(n, s)
    grads = _grads(n, (1000,), torch.float32, seed=7)
    coded = _encode_all(code, grads)
    want = torch.stack([g.double() for g in grads]).sum(0)
    for start in range(n):                               # s consecutive stragglers
        missing = {(start + k) % n for k in range(s)}
        got = code.decode({w: c for w, c in coded.items() if w not in missing})
        assert ((got.double() - want).norm() / want.norm()) < 1e-5


def test_half_precision_gradients():
    code = GradientCode(5, 2)
    for dtype in (torch.float16, torch.bfloat16):
        grads = _grads(5, (64,), dtype, seed=1)
        coded = _encode_all(code, grads)
        got = code.decode({w: coded[w] for w in (0, 1, 3)})
        want = torch.stack([g.double() for g in grads]).sum(0)
        assert got.dtype == dtype
        assert ((got.double() - want).norm() / want.norm()) < 3e-2


def test_ill_conditioned_code_warns():
    with pytest.warns(RuntimeWarning, match="ill-conditioned"):
        code = GradientCode(32, 8)
    assert code.amplification > 1e4


@pytest.mark.parametrize("args,match", [
    ((3, -1), "0 <= s < n"),
    ((3, 3), "0 <= s < n"),
    ((3, 5), "0 <= s < n"),
    ((0, 0), "n >= 1"),
    ((-2, 0), "n >= 1"),
    ((3, 1, "fractional"), r"\(s\+1\) \| n"),
    ((5, 2, "fractional"), r"\(s\+1\) \| n"),
    ((4, 1, "mds"), "unknown gradient-coding scheme"),
])
def test_impossible_codes(args, match):
    with pytest.raises(ValueError, match=match):
        GradientCode(*args)


def test_non_integer_arguments():
    with pytest.raises(TypeError):
        GradientCode(4.0, 1)
    with pytest.raises(TypeError):
        GradientCode(4, True)


def test_decode_errors():
    code = GradientCode(5, 2)
    grads = _grads(5, (4,), torch.float32, seed=0)
    coded = _encode_all(code, grads)
    with pytest.raises(ValueError, match=r"at least n - s = 3 .*got 2: \[1, 4\]"):
        code.decode({4: coded[4], 1: coded[1]})
    with pytest.raises(ValueError, match="at least n - s = 3"):
        code.decode({})
    with pytest.raises(ValueError, match="unknown worker 5"):
        code.decode({0: coded[0], 1: coded[1], 5: coded[2]})
    with pytest.raises(ValueError, match="mismatched shapes"):
        code.decode({0: coded[0], 1: coded[1], 2: torch.zeros(5)})
    with pytest.raises(TypeError, match="mismatched dtypes"):
        code.decode({0: coded[0], 1: coded[1], 2: coded[2].double()})
    with pytest.raises(TypeError, match="torch tensors"):
        code.decode({0: coded[0], 1: coded[1], 2: [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(TypeError, match="mapping"):
        code.decode([coded[0], coded[1], coded[2]])
    with pytest.raises(ValueError, match="at least n - s = 3"):
        code.decoding_vector([0, 1])
    with pytest.raises(ValueError, match="duplicate"):
        code.decoding_vector([0, 1, 1])


def test_encode_errors():
    code = GradientCode(5, 2)
    g = torch.zeros(4)
    with pytest.raises(ValueError, match="holds 3 partitions"):
        code.encode(0, [g, g])
    with pytest.raises(ValueError, match="unknown worker"):
        code.encode(7, [g, g, g])
    with pytest.raises(ValueError, match="unknown worker"):
        code.partitions(-1)
    with pytest.raises(ValueError, match="mismatched shapes"):
        code.encode(0, [g, g, torch.zeros(2, 2)])
    with pytest.raises(TypeError, match="floating point"):
        code.encode(0, [torch.zeros(4, dtype=torch.int64)] * 3)
    with pytest.raises(TypeError, match="list or tuple"):
        code.encode(0, torch.zeros(3, 4))


def test_bad_matrix_is_never_decoded_silently():
    code = GradientCode(4, 1)
    code._B = code._B.copy()
    code._B[:, 0] = 0.0                       # partition 0 no longer encoded by anyone
    code._solve.cache_clear()
    with pytest.raises(DistribError, match="cannot decode"):
        code.decoding_vector([0, 1, 2])
