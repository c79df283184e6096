"""Parameter server parts that run in one process: layout, payload codec, options, coding."""
import math

import pytest
import torch

from distrib.coding import GradientCode
from distrib.compress import REGISTRY, ErrorFeedback, FP16, PowerSGD, QSGD, TopK
from distrib.errors import DistribError
from distrib.ps import codec, coded_backward
from distrib.ps.layout import Layout, Slot, split_ranges

F32, F64, F16 = torch.float32, torch.float64, torch.float16


def _covered(layout):
    """Every element of every parameter, as (index, flat position), from the servers' pieces."""
    seen = []
    for pieces in layout.pieces:
        for p in pieces:
            seen += [(p.index, i) for i in range(p.start, p.stop)]
    return seen


@pytest.mark.parametrize("servers", [1, 2, 3, 5])
def test_layout_covers_every_element_once_in_key_order(servers):
    specs = [("a", (10, 4), F32), ("b", (7,), F32), ("c", (), F32), ("d", (3, 2, 2), F64),
             ("e", (0, 3), F32), ("f", (33, 8), F16)]
    lay = Layout(specs, servers)
    want = [(i, j) for i, (_, s, _) in enumerate(specs) for j in range(math.prod(s))]
    assert _covered(lay) == want  # contiguous key ranges: server k's pieces follow server k-1's


def test_layout_balances_bytes_and_splits_large_tensors_at_rows():
    specs = [("small", (4,), F32), ("big", (100, 10), F32), ("tail", (6,), F32)]
    lay = Layout(specs, 4)
    sizes = lay.shard_bytes()
    assert sum(sizes) == (4 + 1000 + 6) * 4
    assert max(sizes) - min(sizes) <= 10 * 4 + 6 * 4  # within one row (+ the last small tensor)
    big = [p for pieces in lay.pieces for p in pieces if p.name == "big"]
    assert len(big) == 4  # the large tensor is spread over every server
    assert all(p.shape[1:] == (10,) and p.numel == p.shape[0] * 10 for p in big)


def test_layout_is_deterministic_and_signature_tracks_the_model():
    specs = [("w", (8, 8), F32), ("b", (8,), F32)]
    a, b = Layout(specs, 2), Layout(list(specs), 2)
    assert a.signature == b.signature
    assert [[u.describe() for u in us] for us in a.units] == \
           [[u.describe() for u in us] for us in b.units]
    assert Layout([("w", (8, 8), F32), ("b", (9,), F32)], 2).signature != a.signature
    assert Layout(specs, 3).signature != a.signature
    assert Layout(specs, 2, extra={"mode": "async"}).signature != a.signature


def test_units_compress_large_pieces_and_fuse_the_rest_by_dtype():
    specs = [("emb", (64, 32), F32), ("b1", (32,), F32), ("h", (16,), F16), ("b2", (8,), F32)]
    (units,) = Layout(specs, 1, compress=True, min_compress_numel=1024).units
    keys = [(u.key, u.compressed, u.shape) for u in units]
    assert keys == [("emb", True, (64, 32)), ("fused.float32", False, (40,)),
                    ("fused.float16", False, (16,))]
    split = Layout([("emb", (64, 32), F32)], 2, compress=True, min_compress_numel=16).units
    assert [u.key for us in split for u in us] == ["emb[0:32]", "emb[32:64]"]
    assert Layout(specs, 1).units[0][0].compressed is False  # no compressor: all fused


def test_split_ranges_rejects_zero_servers():
    with pytest.raises(ValueError):
        split_ranges([("a", (2,), F32)], 0)


def _all_compressors():
    out = []
    for name, cls in REGISTRY.items():
        c = cls(0.3) if name == "topk" else cls()
        out.append(c)
    out.append(ErrorFeedback(TopK(0.25)))
    out.append(QSGD(levels=3, bucket_size=64, seed=5))
    return out


@pytest.mark.parametrize("comp", _all_compressors(), ids=repr)
def test_servers_rebuild_every_compressor_and_decode_its_payloads(comp):
    desc = codec.describe(comp)
    twin = codec.rebuild(desc)
    assert type(twin) is type(comp) and repr(twin) == repr(comp)
    decoder = codec.rebuild(codec.innermost(desc))
    t = torch.randn(40, 30)
    payload = comp.compress(t, key="w")
    # What a server gets: the tensors, and the context through msgpack-able meta.
    slot = Slot("w", F32, (40, 30), True)
    tensors, meta = codec.pack([payload, torch.arange(5.0)])
    raw = Slot("fused.float32", F32, (5,), False)
    got, plain = codec.unpack(tensors, meta, [slot, raw], "worker 0")
    assert torch.equal(decoder.decompress(got), comp.decompress(payload))
    assert torch.equal(plain, torch.arange(5.0))


def test_pull_compressor_gets_its_own_error_feedback():
    assert isinstance(codec.rebuild(codec.describe(TopK(0.1)), error_feedback=True), ErrorFeedback)
    ef = codec.rebuild(codec.describe(PowerSGD(rank=2)), error_feedback=True)
    assert isinstance(ef, ErrorFeedback) and ef.inner.error_feedback is False
    again = codec.rebuild(codec.describe(ErrorFeedback(FP16())), error_feedback=True)
    assert isinstance(again, ErrorFeedback) and not isinstance(again.inner, ErrorFeedback)


def test_codec_rejects_what_it_cannot_carry():
    class Custom(TopK):
        pass

    with pytest.raises(DistribError, match="cannot rebuild"):
        codec.describe(Custom(0.1))
    with pytest.raises(DistribError):
        codec.encode_ctx({"t": torch.zeros(2)})
    with pytest.raises(DistribError):
        codec.decode_ctx({"__dtype": "complex64"})
    slot = Slot("w", F32, (4,), False)
    with pytest.raises(DistribError, match="elements"):
        codec.unpack([torch.zeros(3)], {"n": [-1], "ctx": [None]}, [slot], "worker 2")
    with pytest.raises(DistribError, match="units"):
        codec.unpack([], {"n": [], "ctx": []}, [slot], "worker 2")
    with pytest.raises(DistribError, match="tensors"):
        codec.unpack([torch.zeros(4)], {"n": [2], "ctx": [None]}, [slot], "worker 2")


def test_ctx_round_trip_keeps_dtypes_and_sizes():
    ctx = {"inner_shape": torch.Size([3, 4]), "inner_dtype": torch.bfloat16, "buckets": 7,
           "nested": [1, 2.5, "x", None, True]}
    assert codec.decode_ctx(codec.encode_ctx(ctx)) == ctx


def test_coded_backward_leaves_the_encoded_gradient():
    code = GradientCode(4, 1)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    X, Y = torch.randn(4, 5, 3, dtype=F64), torch.randn(4, 5, 1, dtype=F64)
    worker = 2
    grads = []
    for p in code.partitions(worker):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(X[p]), Y[p]).backward()
        grads.append(torch.cat([q.grad.reshape(-1) for q in model.parameters()]))
    model.zero_grad()
    coded_backward(code, [torch.nn.functional.mse_loss(model(X[p]), Y[p])
                          for p in code.partitions(worker)], worker=worker)
    got = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
    assert torch.allclose(got, code.encode(worker, grads), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="needs 2 losses"):
        coded_backward(code, [torch.zeros((), requires_grad=True)], worker=worker)


def test_ps_optimizer_needs_servers_and_checks_its_options():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    import distrib
    from distrib.ps import PSWorker
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match="mode"):
        PSWorker(opt, named, mode="bsp")
    with pytest.raises(ValueError, match="staleness"):
        PSWorker(opt, named, mode="ssp")
    with pytest.raises(ValueError, match="staleness"):
        PSWorker(opt, named, mode="sync", staleness=2)
    with pytest.raises(TypeError, match="compressor"):
        PSWorker(opt, named, compressor="topk")
    with pytest.raises(DistribError, match="--servers"):  # a job of one has no servers
        distrib.DistributedOptimizer(opt, model, topology="ps")


# -- the servers' engines, driven by hand -------------------------------------------------------
class _FakeServer:
    """Stands in for a Server: records what its engine sends."""

    def __init__(self):
        self.sent = []
        self.link = self

    def send(self, dst, op, meta=None, tensors=()):
        self.sent.append((dst, op, dict(meta or {}), list(tensors)))


def _msg(t, *tensors):
    from distrib.transport.wire import Message
    tensors, meta = codec.pack(list(tensors))
    meta["t"] = t
    return Message(meta=meta, tensors=tensors)


def test_aggregator_decodes_from_the_first_n_minus_s_and_drops_late_pushes():
    from distrib.ps.aggregate import Aggregator
    code = GradientCode(3, 1)
    grads = [torch.randn(5, dtype=F64) for _ in range(3)]  # one per partition
    coded = [code.encode(w, [grads[p] for p in code.partitions(w)]) for w in range(3)]
    server = _FakeServer()
    agg = Aggregator(server, [Slot("fused.float64", F64, (5,), False)], 3, code=code)
    agg.on_step(2, _msg(0, coded[2]))
    assert server.sent == [] and agg.held() == {2}
    agg.on_step(0, _msg(0, coded[0]))  # n - s = 2 pushes: the step completes
    assert [(d, op, m["t"]) for d, op, m, _ in server.sent] == [(0, "agg", 0), (1, "agg", 0),
                                                                (2, "agg", 0)]
    mean = server.sent[0][3][0]
    assert torch.allclose(mean, sum(grads) / 3, rtol=1e-12, atol=1e-15)
    agg.on_step(1, _msg(0, coded[1]))  # the straggler: dropped
    assert agg.stats() == {"late_pushes": 1, "step": 1} and len(server.sent) == 3
    with pytest.raises(DistribError, match="step 5"):
        agg.on_step(1, _msg(5, coded[1]))


def test_plain_sync_needs_every_worker_and_reports_one_that_left():
    from distrib.ps.aggregate import Aggregator
    server = _FakeServer()
    agg = Aggregator(server, [Slot("fused.float32", F32, (2,), False)], 3)
    agg.on_step(0, _msg(0, torch.tensor([1.0, 2.0])))
    agg.on_step(2, _msg(0, torch.tensor([3.0, 4.0])))
    assert server.sent == []
    with pytest.raises(DistribError, match=r"worker\(s\) \[1\] finished without pushing"):
        agg.on_done(1, {1})


def test_ssp_holds_a_worker_k_steps_ahead_until_the_slowest_catches_up():
    from distrib.ps.store import ParamStore
    server = _FakeServer()
    slot = Slot("fused.float64", F64, (2,), False)
    store = ParamStore(server, [slot], 2, [torch.zeros(2, dtype=F64)], staleness=1)
    store.on_step(0, _msg(1, torch.tensor([2.0, 2.0], dtype=F64)))   # clocks 1, 0: lead 1 ok
    assert [d for d, *_ in server.sent] == [0]
    assert server.sent[0][3][0].tolist() == [1.0, 1.0]  # delta / n
    store.on_step(0, _msg(2, torch.tensor([2.0, 0.0], dtype=F64)))   # would start step 3
    assert len(server.sent) == 1 and store.held() == {0}
    store.on_step(1, _msg(1, torch.tensor([0.0, 4.0], dtype=F64)))   # the slowest moves
    assert sorted(d for d, *_ in server.sent[1:]) == [0, 1]
    assert server.sent[-1][3][0].tolist() == [2.0, 3.0]
    with pytest.raises(DistribError, match="one step at a time"):
        store.on_step(1, _msg(3, torch.zeros(2, dtype=F64)))


def test_async_answers_at_once_and_compressed_pulls_track_each_worker():
    from distrib.ps.store import ParamStore
    server = _FakeServer()
    slot = Slot("w", F32, (4, 4), True)
    top = TopK(0.25)
    store = ParamStore(server, [slot], 2, [torch.zeros(16)], staleness=None,
                       decoder=TopK(0.25), pull=TopK(0.25))
    for step in range(1, 4):  # worker 0 runs ahead freely
        store.on_step(0, _msg(step, top.compress(torch.ones(4, 4) * step, key="w")))
    assert [d for d, *_ in server.sent] == [0, 0, 0]
    # What worker 0 holds (the sum of the changes it was sent) approaches the parameters.
    got = sum(TopK(0.25).decompress(codec.unpack(t, m["parts"][0], [slot], "s")[0])
              for _, _, m, t in server.sent)
    assert torch.equal(got.reshape(-1), store.replica[0][0])
    assert (store.params[0] - store.replica[0][0]).abs().sum() < store.params[0].abs().sum()


def test_server_names_the_worker_whose_model_or_options_differ():
    from distrib.ps.server import Server, ServerError
    srv = Server.__new__(Server)
    srv.index, srv.rank = 0, 4
    ref = {"sig": 1, "config": {"mode": "sync", "staleness": None}, "units": [["a"]], "t": 0}
    srv._check_same(0, ref, ref)
    with pytest.raises(ServerError, match="mode='async' on worker 2 but 'sync' on worker 0"):
        srv._check_same(2, {**ref, "config": {"mode": "async", "staleness": None}}, ref)
    with pytest.raises(ServerError, match="worker 3's parameters"):
        srv._check_same(3, {**ref, "sig": 2}, ref)
    with pytest.raises(ServerError, match="starts at step 7"):
        srv._check_same(1, {**ref, "t": 7}, ref)
    with pytest.raises(ServerError, match="lacks"):
        srv._check_same(1, {"sig": 1}, ref)
