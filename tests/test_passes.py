"""distrib.passes: pruning, QAT fake quantization, distillation loss, torch.compile, and the
[passes] config switch."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distrib import checkpoint, config
from distrib.passes import (CompileError, Distiller, Pruner, apply_passes, compile_model,
                            distill_loss, fake_quantize, load_teacher, make_permanent,
                            prepare_qat, prune_model, soft_loss, sparsity, uncompile)
from distrib.passes.compile import compile_failed, is_compiled
from distrib.passes.qat import FakeQuant, QATLinear


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))


# -- pruning ---------------------------------------------------------------------------------
def test_global_pruning_exact_sparsity_and_masked_gradients():
    model = _mlp()
    params = list(model.parameters())
    prune_model(model, 0.3)
    assert sparsity(model) == 90 / 300  # round(0.3 * 300) weights, smallest |w| over all layers
    kept = torch.cat([m.weight_orig.detach().abs().reshape(-1)[m.weight_mask.reshape(-1) == 1]
                      for m in (model[0], model[2])])
    dropped = torch.cat([m.weight_orig.detach().abs().reshape(-1)[m.weight_mask.reshape(-1) == 0]
                         for m in (model[0], model[2])])
    assert dropped.max() <= kept.min()  # one global magnitude threshold
    assert all(any(p is q for q in model.parameters()) for p in params)  # same Parameter objects
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 10)).pow(2).sum().backward()
        for m in (model[0], model[2]):
            assert (m.weight_orig.grad[m.weight_mask == 0] == 0).all()
            assert (m.weight_orig.grad[m.weight_mask == 1] != 0).any()
        opt.step()
    model(torch.randn(1, 10))
    assert sparsity(model) == 90 / 300


def test_layer_pruning_and_make_permanent():
    model = _mlp()
    prune_model(model, 0.25, scope="layer")
    assert (model[0].weight == 0).sum() == 50 and (model[2].weight == 0).sum() == 25
    before = model(torch.ones(2, 10))
    make_permanent(model)
    assert not hasattr(model[0], "weight_orig") and isinstance(model[0].weight, nn.Parameter)
    assert torch.equal(model(torch.ones(2, 10)), before) and sparsity(model) == 0.25


def test_pruner_refreshes_masks_at_exact_sparsity():
    model = _mlp()
    pruner = Pruner(model, 0.5, every=2)
    assert sparsity(model) == 0.5
    i = int(torch.nonzero(model[0].weight_mask.reshape(-1) == 0)[0])
    with torch.no_grad():
        model[0].weight_orig.view(-1)[i] = 100.0  # a pruned weight that outgrew every kept one
    assert not pruner.step()  # step 1 of 2: masks unchanged
    assert model[0].weight_mask.view(-1)[i] == 0
    assert pruner.step()
    assert model[0].weight_mask.view(-1)[i] == 1 and sparsity(model) == 0.5
    with pytest.raises(ValueError, match="amount"):
        Pruner(_mlp(), 1.5)
    with pytest.raises(ValueError, match="every"):
        Pruner(_mlp(), 0.5, every=0)


# -- quantization-aware training -------------------------------------------------------------
def _reference_quant(w, bits, per_channel):
    """dequantize(quantize(w)) with torch's quantized tensors (8 bits) or by the definition."""
    q = 2 ** (bits - 1) - 1
    w = w.detach()
    if per_channel:
        scale = w.abs().amax(dim=1) / q
        if bits == 8:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized tensors are deprecated, still right
                return torch.quantize_per_channel(w, scale.double(), torch.zeros(len(scale),
                                                  dtype=torch.long), 0, torch.qint8).dequantize()
        return (w / scale[:, None]).round().clamp(-q, q) * scale[:, None]
    scale = float(w.abs().max() / q)
    if bits == 8:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.quantize_per_tensor(w, scale, 0, torch.qint8).dequantize()
    return (w / scale).round().clamp(-q, q) * scale


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quantize_is_dequant_quant_with_straight_through_grad(bits, per_channel):
    torch.manual_seed(1)
    w = torch.randn(6, 9, requires_grad=True)
    out = fake_quantize(w, bits, per_channel=per_channel)
    ref = _reference_quant(w.detach(), bits, per_channel)
    assert torch.allclose(out, ref, rtol=0, atol=1e-6)
    levels = out.detach().unique() if not per_channel else out.detach()[0].unique()
    assert len(levels) <= 2 ** bits - 1 and not torch.equal(out, w)
    out.backward(torch.arange(54.0).view(6, 9))
    assert torch.equal(w.grad, torch.arange(54.0).view(6, 9))  # straight through


def test_qat_layers_forward_quantized_and_train():
    model = _mlp()
    params = list(model.parameters())
    prepare_qat(model, bits=8)
    assert isinstance(model[0], QATLinear) and isinstance(model[2], QATLinear)
    assert all(a is b for a, b in zip(params, model.parameters()))  # an existing optimizer works
    x = torch.randn(4, 10)
    h = F.relu(F.linear(_reference_quant(x, 8, False), _reference_quant(model[0].weight.detach(),
                                                                          8, True), model[0].bias))
    expect = F.linear(_reference_quant(h, 8, False),
                      _reference_quant(model[2].weight.detach(), 8, True), model[2].bias)
    out = model(x)
    assert torch.allclose(out, expect, atol=1e-5)
    out.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # eval uses the running activation range recorded in training
    model.eval()
    assert model[0].input_quant.amax == x.abs().max()
    with pytest.raises(ValueError, match="bits"):
        prepare_qat(_mlp(), bits=1)
    with pytest.raises(ValueError, match="no Linear/Conv"):
        prepare_qat(nn.ReLU())


def test_qat_conv_and_pruning_compose():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    prepare_qat(model, bits=4)
    prune_model(model, 0.5)
    model(torch.randn(2, 2, 6, 6)).sum().backward()
    for m in (model[0], model[2]):
        assert (m.quantized_weight()[m.weight_mask == 0] == 0).all()  # zeros stay zeros
        assert (m.weight_orig.grad[m.weight_mask == 0] == 0).all()
    fresh = torch.tensor([0.5, -1.0])  # eval before any training batch: the input's own range
    assert torch.equal(FakeQuant(8).eval()(fresh), fake_quantize(fresh, 8))


# -- distillation ----------------------------------------------------------------------------
def test_distill_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], requires_grad=True)
    t = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]], requires_grad=True)
    y = torch.tensor([1, 2])
    T, alpha = 3.0, 0.7
    loss = distill_loss(s, t, y, temperature=T, alpha=alpha)
    pt, ps = torch.softmax(t.detach() / T, 1), torch.softmax(s.detach() / T, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()
    ce = -(torch.log_softmax(s.detach(), 1)[torch.arange(2), y]).mean()
    assert torch.allclose(loss, alpha * T * T * kl + (1 - alpha) * ce, atol=1e-6)
    loss.backward()
    assert t.grad is None and s.grad.abs().sum() > 0  # the teacher gets no gradient
    same = torch.randn(5, 7)
    assert soft_loss(same, same.clone(), 4.0).abs() < 1e-6
    assert distill_loss(same, same.clone(), None, 2.0, alpha=1.0).abs() < 1e-6
    with pytest.raises(ValueError, match="targets"):
        distill_loss(s, t, None, 2.0, alpha=0.5)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(s, t, y, temperature=0)
    with pytest.raises(ValueError, match="shape"):
        soft_loss(s, t[:, :2])


def test_distiller_and_teacher_loading(tmp_path):
    teacher = _mlp(seed=1)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    student = _mlp(seed=2)
    loaded = load_teacher(str(tmp_path / "teacher.pt"), student)
    x = torch.randn(3, 10)
    assert torch.equal(loaded(x), teacher(x)) and loaded is not student
    checkpoint.save(tmp_path / "ckpt.pt", teacher)
    assert torch.equal(load_teacher(str(tmp_path / "ckpt.pt"), student)(x), teacher(x))
    assert isinstance(load_teacher("torch.nn:Identity"), nn.Identity)
    with pytest.raises(ValueError, match="neither"):
        load_teacher("no-such-file.pt", student)
    d = Distiller(loaded, temperature=2.0, alpha=0.5)
    y = torch.tensor([0, 1, 2])
    out = student(x)
    loss = d.loss(out, x, y)
    assert torch.allclose(loss, distill_loss(out, teacher(x), y, 2.0, 0.5))
    loss.backward()
    assert all(p.grad is None for p in loaded.parameters())


# -- compile ---------------------------------------------------------------------------------
def test_compile_matches_eager():
    model, ref = _mlp(), _mlp()
    keys = list(model.state_dict())
    compile_model(model, backend="eager")  # dynamo capture without a C++ build (fast)
    x = torch.randn(4, 10)
    out = model(x)
    assert is_compiled(model) and compile_failed(model) is None
    assert torch.allclose(out, ref(x), atol=1e-6) and list(model.state_dict()) == keys
    out.sum().backward()
    ref(x).sum().backward()
    assert all(torch.allclose(a.grad, b.grad) for a, b in zip(model.parameters(),
                                                              ref.parameters()))
    assert not is_compiled(uncompile(model))


def _broken_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


def test_compile_failure_falls_back_or_raises():
    model, ref = _mlp(), _mlp()
    compile_model(model, backend=_broken_backend)
    x = torch.randn(2, 10)
    with pytest.warns(RuntimeWarning, match="running the model eagerly"):
        out = model(x)
    assert torch.equal(out, ref(x)) and "no compiler here" in str(compile_failed(model))
    strict = compile_model(_mlp(), backend=_broken_backend, fallback=False)
    with pytest.raises(CompileError, match="no compiler here"):
        strict(x)
    with pytest.raises(ValueError, match="mode"):
        compile_model(_mlp(), mode="fastest")


# -- the [passes] config switch ----------------------------------------------------------------
def test_apply_passes_from_config(tmp_path):
    teacher = _mlp(seed=1)
    torch.save(teacher.state_dict(), tmp_path / "t.pt")
    cfg = config.loads(f"""
[passes.prune]
amount = 0.4
every = 3
[passes.qat]
bits = 6
[passes.distill]
teacher = "{tmp_path / 't.pt'}"
temperature = 2.0
alpha = 0.5
[passes.compile]
enabled = false
""")
    model = apply_passes(_mlp(), cfg)
    assert isinstance(model[0], QATLinear) and model[0].bits == 6
    assert sparsity(model) == pytest.approx(0.4, abs=1 / 300) and model.pruner.every == 3
    assert model.distiller.temperature == 2.0 and not is_compiled(model)
    assert not any(p is q for p in model.distiller.teacher.parameters()
                   for q in model.parameters())  # teacher's weights stay out of the optimizer
    x, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    model.distiller.loss(model(x), x, y).backward()
    assert model[0].weight_orig.grad is not None
    assert is_compiled(apply_passes(_mlp(), {"compile": {"mode": "default"}}))  # lazy: no build
    assert apply_passes(_mlp(), None) is not None and not hasattr(apply_passes(_mlp(), {}),
                                                                   "pruner")
    with pytest.raises(config.ConfigError, match="bogus"):
        apply_passes(_mlp(), {"prune": {"bogus": 1}})
    with pytest.raises(config.ConfigError, match="teacher"):
        apply_passes(_mlp(), {"distill": {"alpha": 0.5}})
