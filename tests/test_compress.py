"""Single-process properties of the compressors (distrib.compress), against their papers."""
import math

import pytest
import torch

import distrib.compress as dc
from distrib.compress import (BF16, FP16, QSGD, CountSketch, ErrorFeedback, NoCompression,
                              PowerSGD, TopK, bitpack)


def all_compressors():
    return [NoCompression(), FP16(), BF16(), QSGD(7), QSGD(3, bucket_size=100), TopK(0.1),
            PowerSGD(2), CountSketch(3, 16, 4), ErrorFeedback(TopK(0.3)), ErrorFeedback(QSGD(1))]


# -- names ---------------------------------------------------------------------------------------
def test_get_builds_every_name():
    expect = {"none": NoCompression, "fp16": FP16, "bf16": BF16, "qsgd": QSGD, "topk": TopK,
              "powersgd": PowerSGD, "countsketch": CountSketch}
    args = {"qsgd": {"levels": 7, "bucket_size": 256}, "topk": {"ratio": 0.01},
            "powersgd": {"rank": 4, "warm_start": False},
            "countsketch": {"rows": 5, "cols": 100, "k": 10}}
    for name, cls in expect.items():
        c = dc.get(name, **args.get(name, {}))
        assert type(c) is cls
    assert dc.get("qsgd", levels=3, bucket_size=64).bucket_size == 64
    assert dc.get("powersgd", rank=4, warm_start=False).warm_start is False


def test_get_rejects_unknown_names_and_arguments():
    with pytest.raises(ValueError, match="valid names: none, fp16, bf16, qsgd, topk, powersgd"):
        dc.get("gzip")
    with pytest.raises(ValueError, match="its arguments: ratio"):
        dc.get("topk", ratio=0.1, levels=3)


@pytest.mark.parametrize("make", [lambda: QSGD(0), lambda: QSGD(128), lambda: QSGD(4, 0),
                                  lambda: TopK(0), lambda: TopK(1.5), lambda: PowerSGD(0),
                                  lambda: CountSketch(0, 10, 1), lambda: CountSketch(1, 0, 1),
                                  lambda: CountSketch(1, 10, 1.5),
                                  lambda: CountSketch(1, 10, 1, momentum=1.0),
                                  lambda: CountSketch(1, 10, 1, oversample=0.5)])
def test_bad_arguments_are_value_errors(make):
    with pytest.raises(ValueError):
        make()


def test_misuse_gives_clear_errors():
    # "ErrorFeedback wraps any compressor": one around PowerSGD takes over its feedback;
    # around CountSketch (feedback in sketch space) it passes through.
    assert ErrorFeedback(PowerSGD(2)).inner.error_feedback is False
    ErrorFeedback(CountSketch(3, 10, 2))
    ErrorFeedback(PowerSGD(2, error_feedback=False))
    with pytest.raises(TypeError, match="floating-point"):
        TopK(0.5).compress(torch.arange(10))
    with pytest.raises(TypeError, match="torch tensors"):
        QSGD(7).compress([1.0, 2.0])
    c = ErrorFeedback(TopK(0.5))
    c.compress(torch.ones(4), key="w")
    with pytest.raises(ValueError, match="key 'w' was used for a tensor of shape"):
        c.compress(torch.ones(5), key="w")
    with pytest.raises(ValueError, match="op='mean' or 'sum'"):
        TopK(0.5).reduce(torch.ones(4), op="max")
    with pytest.raises(ValueError, match="state dict of a QSGD"):
        TopK(0.5).load_state_dict(QSGD(7).state_dict())


# -- any tensor ----------------------------------------------------------------------------------
SHAPES = [(), (0,), (0, 5), (1,), (7,), (3, 5, 2), (130, 9)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_any_shape_and_dtype_round_trips(shape):
    for c in all_compressors():
        for dtype in DTYPES:
            t = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
            key = f"{shape}{dtype}"
            p = c.compress(t, key=key)
            out = c.decompress(p)
            assert out.shape == t.shape and out.dtype == t.dtype, (c, shape, dtype)
            assert p.nbytes == sum(x.numel() * x.element_size() for x in p.tensors)
            r = c.reduce(t, key="r" + key)
            assert r.shape == t.shape and r.dtype == t.dtype, (c, shape, dtype)
            assert torch.isfinite(r.float()).all()


def test_no_compression_is_exact_for_any_dtype():
    c = NoCompression()
    for t in [torch.randn(5, 3), torch.arange(10), torch.tensor(2.5, dtype=torch.float64)]:
        p = c.compress(t)
        assert p.nbytes == t.numel() * t.element_size()
        assert torch.equal(c.decompress(p), t)
        assert torch.equal(c.reduce(t), t)


def test_fp16_bf16_round_trip():
    t = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 100
    for c, dt in [(FP16(), torch.float16), (BF16(), torch.bfloat16)]:
        p = c.compress(t)
        assert p.nbytes == 2 * t.numel()
        assert p.tensors[0].dtype == dt
        assert torch.equal(c.decompress(p), t.to(dt).float())
        assert c.linear
    x = torch.randn(10).half()
    assert torch.equal(FP16().decompress(FP16().compress(x)), x)


# -- QSGD ----------------------------------------------------------------------------------------
def test_bitpack_round_trips_every_width():
    g = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        codes = torch.randint(0, 2 ** bits, (8 * 37,), generator=g).to(torch.uint8)
        packed = bitpack.pack(codes, bits)
        assert packed.numel() == 37 * bits
        assert torch.equal(bitpack.unpack(packed, bits, codes.numel()), codes)


def _repeated(v, reps):
    """reps copies of v, one per QSGD bucket: one compress call = reps independent draws."""
    return v.repeat(reps)


@pytest.mark.parametrize("levels", [1, 4, 7])
def test_qsgd_is_unbiased(levels):
    d, reps = 64, 4000
    v = torch.randn(d, generator=torch.Generator().manual_seed(3))
    c = QSGD(levels, bucket_size=d, seed=11)
    q = c.decompress(c.compress(_repeated(v, reps))).view(reps, d)
    mean = q.mean(0)
    # each coordinate's draws have variance <= (‖v‖/s)²/4: allow 5 standard errors
    tol = 5 * (v.norm() / levels / 2) / math.sqrt(reps)
    assert (mean - v).abs().max() < tol
    assert (q.std(0) > 0).any()  # it really is random


@pytest.mark.parametrize("levels,d", [(1, 256), (2, 64), (7, 512), (16, 100)])
def test_qsgd_variance_within_bound(levels, d):
    reps = 2000
    v = torch.randn(d, generator=torch.Generator().manual_seed(5))
    c = QSGD(levels, bucket_size=d, seed=1)
    q = c.decompress(c.compress(_repeated(v, reps))).view(reps, d)
    var = ((q - v) ** 2).sum(1).mean()
    bound = min(d / levels ** 2, math.sqrt(d) / levels) * v.norm() ** 2
    assert 0 < var <= bound


def test_qsgd_values_lie_on_the_level_grid():
    v = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    for levels in (1, 2, 3, 7, 15, 16, 31, 127):
        c = QSGD(levels, bucket_size=128)
        p = c.compress(v)
        q = c.decompress(p)
        norms = p.tensors[1]
        for b in range(norms.numel()):
            seg, orig = q[b * 128:(b + 1) * 128], v[b * 128:(b + 1) * 128]
            lv = seg * levels / norms[b]
            assert torch.allclose(lv, lv.round(), atol=1e-3)
            assert lv.abs().max() <= levels + 1e-3
            assert ((seg - orig).abs() <= norms[b] / levels * (1 + 1e-5)).all()


@pytest.mark.parametrize("levels", [1, 7, 127])
def test_qsgd_extremes_stay_on_the_grid(levels):
    # |v_i| = ‖v‖ is the edge of the level range: codes must not wrap around
    for sign in (-1.0, 1.0):
        v = torch.tensor([0, 0, 3.0 * sign, 0, 0, 0, 0, 0]).repeat(5000)
        c = QSGD(levels, bucket_size=8)
        q = c.decompress(c.compress(v)).view(-1, 8)
        assert (q[:, [0, 1, 3, 4, 5, 6, 7]] == 0).all()
        got = q[:, 2] * sign
        assert ((got - 3.0).abs() < 1e-4).float().mean() > 0.99  # (1-2⁻¹⁶)·s rounds up
        assert (got >= 3.0 * (levels - 1) / levels - 1e-4).all() and (got <= 3.0 + 1e-4).all()


def test_qsgd_nbytes_is_bit_packed():
    n = 1_000_000
    t = torch.randn(n)
    norms = 4 * math.ceil(n / 512)
    assert QSGD(7).compress(t).nbytes == n // 2 + norms          # 15 codes: 4 bits
    assert QSGD(127).compress(t).nbytes == n + norms              # 255 codes: 8 bits
    assert QSGD(1).compress(t).nbytes == n // 4 + norms           # 3 codes: 2 bits
    assert QSGD(3).compress(t).nbytes == 3 * n // 8 + norms       # 7 codes: 3 bits
    assert QSGD(7, bucket_size=1000).compress(t).nbytes == n // 2 + 4 * 1000


def test_qsgd_zero_and_tail_buckets():
    c = QSGD(7, bucket_size=10)
    t = torch.zeros(25)
    assert torch.equal(c.decompress(c.compress(t)), t)
    t = torch.tensor([0.0] * 20 + [3.0, -4.0, 0.0])  # tail bucket exactly representable
    out = c.decompress(c.compress(t))
    assert torch.equal(out[20:], t[20:]) or (out[20:] - t[20:]).abs().max() <= 5 / 7 + 1e-6


# -- top-k ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,ratio", [(10, 0.25), (1000, 0.07), (300_000, 0.01),
                                     (300_000, 0.001), (200_000, 0.3)])
def test_topk_keeps_exactly_ceil_ratio_n_largest(n, ratio):
    t = torch.randn(n, generator=torch.Generator().manual_seed(n))
    c = TopK(ratio)
    p = c.compress(t)
    k = math.ceil(ratio * n)
    idx, vals = p.tensors
    assert idx.numel() == k and idx.dtype == torch.int32
    assert set(idx.tolist()) == set(torch.topk(t.abs(), k).indices.tolist())
    assert torch.equal(vals, t[idx.long()])
    out = c.decompress(p)
    assert (out != 0).sum() == k
    assert p.nbytes == k * 8


@pytest.mark.parametrize("layout", ["sample-misses", "sample-overestimates"])
def test_topk_is_exact_when_the_sample_is_misleading(layout):
    # The threshold comes from a strided sample (every 6th entry here). Whether the sample
    # misses the large entries or holds only them, the selection stays exact.
    n = 400_000
    t = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.1
    if layout == "sample-misses":
        t[1::2] = torch.linspace(1, 2, n // 2)
    else:
        t[0::6] = torch.linspace(5, 10, t[0::6].numel())
    k = math.ceil(0.01 * n)
    idx = TopK(0.01).compress(t).tensors[0]
    assert set(idx.tolist()) == set(torch.topk(t.abs(), k).indices.tolist())


def test_topk_keeps_input_dtype_on_the_wire():
    t = torch.randn(100).half()
    p = TopK(0.1).compress(t)
    assert p.tensors[1].dtype == torch.float16 and p.nbytes == 10 * 6


# -- error feedback ------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", [TopK(0.05), QSGD(1, bucket_size=16),
                                   PowerSGD(1, error_feedback=False)],
                         ids=["topk", "qsgd", "powersgd"])
def test_error_feedback_telescopes(inner):
    c = ErrorFeedback(inner)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(20, 10, generator=g) for _ in range(12)]
    sent = sum(c.decompress(c.compress(x, key="w")) for x in grads)
    e = c.state_dict()["state"]["w"]["e"]
    assert torch.allclose(sent, sum(grads) - e, atol=1e-5)
    assert e.abs().sum() > 0  # something really was held back


def test_error_feedback_sends_everything_eventually():
    c = ErrorFeedback(TopK(0.1))  # one coordinate of ten per step
    g = torch.arange(1.0, 11.0)
    sent, held = torch.zeros(10), []
    for step in range(1, 401):
        sent += c.decompress(c.compress(g, key="w"))
        if step in (40, 400):
            held.append((step * g - sent).abs().max())
    assert (sent > 0).all()           # every coordinate got through
    assert held[1] <= held[0] * 1.5   # what is held back stays bounded, it does not grow
    assert torch.allclose(sent / 400, g, atol=0.15)


# -- PowerSGD ------------------------------------------------------------------------------------
def _low_rank(n, m, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g) @ torch.randn(r, m, generator=g)


def test_powersgd_is_exact_at_full_rank():
    t = torch.randn(6, 4, 3)
    c = PowerSGD(rank=4)  # >= min(6, 12)? no: 4 < 6, but (6+12)*4 >= 72 -> sent as it is
    assert torch.equal(c.reduce(t, key="a"), t)
    c = PowerSGD(rank=6)
    assert torch.equal(c.reduce(t, key="a"), t)
    assert c.last_stats["wire_bytes"] == t.numel() * 4
    b = torch.randn(50)
    assert torch.equal(PowerSGD(rank=1).reduce(b), b)  # 1-D: uncompressed


def test_powersgd_recovers_a_matrix_of_its_rank():
    M = _low_rank(60, 40, 3, seed=1)
    c = PowerSGD(rank=3)
    out = c.reduce(M, key="m")
    assert torch.allclose(out, M, atol=1e-4)
    assert c.last_stats["wire_bytes"] == (60 + 40) * 3 * 4
    # the payload of compress() is the two factors
    p = PowerSGD(rank=3).compress(M)
    assert [x.shape for x in p.tensors] == [(60, 3), (40, 3)]
    assert p.nbytes == (60 + 40) * 3 * 4


def test_powersgd_warm_start_reuses_q():
    g = torch.Generator().manual_seed(4)
    U, _ = torch.linalg.qr(torch.randn(80, 80, generator=g))
    V, _ = torch.linalg.qr(torch.randn(50, 50, generator=g))
    s = torch.tensor([10.0, 8, 6] + [0.5 ** i for i in range(47)])
    M = U[:, :50] * s @ V.t()
    best = s[2:].norm()  # the optimal rank-2 error
    warm, cold = PowerSGD(rank=2), PowerSGD(rank=2, warm_start=False)
    for _ in range(30):
        ew = (warm.decompress(warm.compress(M, key="m")) - M).norm()
        ec = (cold.decompress(cold.compress(M, key="m")) - M).norm()
    # power iteration over steps converges to the best rank-2 approximation
    assert ew < best * 1.01
    assert ec > best * 1.05
    q = warm.state_dict()["state"]["m"]["q"]
    assert q.shape == (50, 2)
    assert "q" not in cold.state_dict()["state"]["m"]


def test_powersgd_error_feedback_telescopes_in_reduce():
    c = PowerSGD(rank=1)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(16, 12, generator=g) for _ in range(10)]
    sent = sum(c.reduce(x, key="w") for x in grads)
    e = c.state_dict()["state"]["w"]["e"]
    assert torch.allclose(sent, sum(grads) - e, atol=1e-4)


# -- count sketch --------------------------------------------------------------------------------
def test_countsketch_is_linear():
    c = CountSketch(rows=5, cols=50, k=10)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-100, 100, (3000,), generator=g).float()
    b = torch.randint(-100, 100, (3000,), generator=g).float()
    sa, sb, sab = (c.compress(x, key="w").tensors[0] for x in (a, b, a + b))
    assert torch.equal(sa + sb, sab)  # integer data: exact in float32
    x, y = torch.randn(3000, generator=g), torch.randn(3000, generator=g)
    assert torch.allclose(c.compress(x).tensors[0] + c.compress(y).tensors[0],
                          c.compress(x + y).tensors[0], atol=1e-4)
    assert c.linear and c.compress(a).nbytes == 5 * 50 * 4


def _heavy(n, heavy, seed, noise=0.01):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g) * noise
    pos = torch.randperm(n, generator=g)[:heavy]
    sign = torch.sign(torch.randn(heavy, generator=g))
    t[pos] = (torch.rand(heavy, generator=g) + 1) * 100 * sign
    return t, pos


def test_countsketch_recovers_heavy_hitters():
    t, pos = _heavy(100_000, 20, seed=1)
    c = CountSketch(rows=5, cols=2000, k=20)
    out = c.reduce(t, key="g")
    assert set(out.nonzero().view(-1).tolist()) == set(pos.tolist())
    assert torch.equal(out[pos], t[pos])  # the second round fetched the exact values
    # the sketch alone (compress / decompress) estimates them closely
    est = c.decompress(c.compress(t))
    assert set(est.nonzero().view(-1).tolist()) == set(pos.tolist())
    assert torch.allclose(est[pos], t[pos], atol=0.1)


def test_countsketch_error_accumulates_in_sketch_space():
    c = CountSketch(rows=3, cols=300, k=30)
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(5000, generator=g) for _ in range(6)]
    want = torch.zeros(3, 300)
    for x in grads:
        out = c.reduce(x, key="w")
        # S_e ← S_e + sketch(g), then the cells of the k applied coordinates are zeroed
        want += c.sketch(x, 300)
        sent = out.nonzero().view(-1)
        assert sent.numel() == 30
        idx, _ = c._hashes_at(5000, 300, sent)
        want.view(-1)[idx.reshape(-1).long()] = 0
        assert torch.allclose(c.state_dict()["state"]["w"]["e"], want, atol=1e-4)
        # every other cell still holds the sketch of everything not sent
    assert c.last_stats["wire_bytes"] == 3 * 300 * 4 + 2 * 30 * 4  # sketch, 2k candidates


def test_countsketch_momentum_runs_and_is_deterministic():
    outs = []
    for _ in range(2):
        c = CountSketch(rows=3, cols=200, k=20, momentum=0.9)
        g = torch.Generator().manual_seed(3)
        steps = [c.reduce(torch.randn(4000, generator=g), key="w") for _ in range(4)]
        outs.append(torch.stack(steps))
    assert torch.equal(outs[0], outs[1])
    assert (outs[0][-1] != 0).sum() == 20


def test_countsketch_small_tensors_go_exact():
    t = torch.randn(30)
    c = CountSketch(rows=5, cols=10, k=3)  # 5·10 + 2·3 >= 30
    assert torch.equal(c.reduce(t), t)


# -- checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: QSGD(7), lambda: ErrorFeedback(TopK(0.1)),
                                  lambda: ErrorFeedback(QSGD(2, bucket_size=32)),
                                  lambda: PowerSGD(2), lambda: PowerSGD(2, warm_start=False),
                                  lambda: CountSketch(3, 100, 10, momentum=0.5)],
                         ids=["qsgd", "ef-topk", "ef-qsgd", "powersgd", "powersgd-cold",
                              "countsketch"])
def test_state_dict_resumes_bitwise(make):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(40, 30, generator=g) for _ in range(6)]
    a = make()
    for x in grads[:3]:
        a.reduce(x, key="w")
    sd = a.state_dict()
    after_a = [a.reduce(x, key="w") for x in grads[3:]]
    b = make()
    b.load_state_dict(sd)
    after_b = [b.reduce(x, key="w") for x in grads[3:]]
    for x, y in zip(after_a, after_b):
        assert torch.equal(x, y)
    # the state dict was a copy: running `a` on did not change it
    c = make()
    c.load_state_dict(sd)
    assert torch.equal(c.reduce(grads[3], key="w"), after_a[0])


# -- accounting ----------------------------------------------------------------------------------
def test_stats_count_bytes_and_time():
    c = TopK(0.01)
    t = torch.randn(10_000)
    c.reduce(t, key="a")
    st = c.last_stats
    assert st["calls"] == 1 and st["raw_bytes"] == 40_000 and st["wire_bytes"] == 100 * 8
    assert st["compress_s"] > 0 and st["comm_s"] >= 0
    c.compress(t)
    assert c.last_stats["wire_bytes"] == 800 and c.stats["calls"] == 2
    assert c.stats["raw_bytes"] == 80_000
    c.reset_stats()
    assert c.stats["calls"] == 0


@pytest.mark.parametrize("make", [lambda: ErrorFeedback(TopK(0.5)), lambda: PowerSGD(rank=1),
                                  lambda: CountSketch(rows=2, cols=16, k=4)])
def test_overflowed_step_does_not_poison_error_feedback(make):
    """Loss scaling sends inf/nan on an overflowed step: it must come out non-finite (so the
    step is skipped) and leave the compressor's residual and warm start clean."""
    from distrib.compress import LocalComm
    c, comm = make(), LocalComm()
    g = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    bad = g.clone()
    bad[0, 0] = float("inf")
    c.reduce(g, comm, key="w")
    assert not torch.isfinite(c.reduce(bad, comm, key="w")).all()
    assert torch.isfinite(c.reduce(g, comm, key="w")).all()
