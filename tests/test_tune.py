"""Block tuning after GPTQ (quantize/tune.py): with no steps it reproduces GPTQ's codes from the compensated
weights, scales stay fp16-exact and zeros fixed, the block's output error against the float model falls (measured by plain forwards of separate float and quantized models, not
by the tuner's own functional calls), a block that cannot improve keeps GPTQ's codes, and a stopped run resumes to
the same weights."""
from __future__ import annotations


import pytest
import torch
from transformers.pytorch_utils import Conv1D

from hawqtool.allocate.plan import fixed_plan, plan_specs
from hawqtool.blocks import BlockInputs, capture_block_inputs, find_blocks, run_block
from hawqtool.models import load_model, quantizable_layers, set_weight_matrix, weight_matrix
from hawqtool.quantize.driver import QuantizeOptions, quantize_model
from hawqtool.quantize import tune
from hawqtool.quantize.tune import _Tunable, tune_block

IDS = torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(1))


def _specs(model, bits=3):
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(model).items()}
    return plan_specs(fixed_plan(shapes, bits, group_size=16))


def _block_out(model, i: int, ids) -> torch.Tensor:
    """Block i's output hidden states by an ordinary forward of the whole model."""
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[i + 1]


def _quantized(tiny_llama, iters: int):
    loaded = load_model(str(tiny_llama))
    res = quantize_model(loaded.model, _specs(loaded.model), IDS, QuantizeOptions(tune_iters=iters, batch_size=3))
    return loaded.model, res


def test_tuning_lowers_block_error_and_moves_codes_by_one(tiny_llama):
    floats = load_model(str(tiny_llama)).model
    gptq_model, gptq = _quantized(tiny_llama, 0)
    tuned_model, tuned = _quantized(tiny_llama, 40)
    # block 0 reads the same inputs in both chains: its output error is exactly what the tuner minimised
    ref = _block_out(floats, 0, IDS)
    e_gptq = float((_block_out(gptq_model, 0, IDS) - ref).pow(2).sum())
    e_tuned = float((_block_out(tuned_model, 0, IDS) - ref).pow(2).sum())
    assert e_tuned < 0.95 * e_gptq, (e_tuned, e_gptq)
    last = len(find_blocks(floats)[1]) - 1
    assert float((_block_out(tuned_model, last, IDS) - _block_out(floats, last, IDS)).pow(2).sum()) < \
        float((_block_out(gptq_model, last, IDS) - _block_out(floats, last, IDS)).pow(2).sum())
    moved = 0
    for n, r in tuned.items():
        g = gptq[n].weight
        if n.startswith("model.layers.0."):  # later blocks' GPTQ ran on other inputs (block 0 was tuned)
            assert torch.equal(r.weight.zeros, g.zeros), n
            moved += int((r.weight.q != g.q).sum())
        assert torch.equal(r.weight.scales, r.weight.scales.half().float()), n
        assert r.weight.q.min() >= 0 and r.weight.q.max() <= r.spec.maxq, n
        # the model holds exactly the weights the results will pack
        assert torch.equal(weight_matrix(dict(tuned_model.named_modules())[n]), r.weight.dequantize()), n
    assert moved > 0


def _gptq_with_updated(tiny_llama, monkeypatch, act_order=False):
    """GPTQ's results and compensated weights, as the driver hands them to the tuner (one step), by block."""
    loaded = load_model(str(tiny_llama))
    kept = {}
    orig = tune.tune_block

    def spy(block, layers, weights, updated, *a, **k):
        kept.update({n: (weights[n], updated[n]) for n in layers})
        return orig(block, layers, weights, updated, *a, **k)

    monkeypatch.setattr(tune, "tune_block", spy)
    quantize_model(loaded.model, _specs(loaded.model), IDS, QuantizeOptions(tune_iters=1, batch_size=3,
                                                                           act_order=act_order))
    monkeypatch.setattr(tune, "tune_block", orig)
    return loaded.model, kept


@pytest.mark.parametrize("act_order", [False, True])
def test_zero_steps_reproduce_gptq_codes(tiny_llama, monkeypatch, act_order):
    """V = θ = 0: rounding GPTQ's compensated weights against its scales gives exactly its codes (act-order: in
    the layer's input order, through g_idx)."""
    _, kept = _gptq_with_updated(tiny_llama, monkeypatch, act_order)
    assert kept
    for n, (qw, U) in kept.items():
        assert U is not None and U.shape == qw.q.shape, n
        assert torch.equal(_Tunable(qw, U, False).final().q, qw.q), n


def test_block_that_cannot_improve_keeps_gptq(tiny_llama, monkeypatch):
    """Targets equal to the GPTQ block's own outputs: the error starts at 0, so GPTQ's weights come back."""
    model, kept = _gptq_with_updated(tiny_llama, monkeypatch)
    _, blocks = find_blocks(model)
    block = blocks[0]
    inputs = capture_block_inputs(model, block, [{"input_ids": IDS[:3]}])
    g = torch.Generator().manual_seed(5)
    inputs = BlockInputs([h + torch.randn(h.shape, generator=g) for h in inputs.hidden], inputs.args, inputs.kwargs)
    layers = {n: m for n, m in quantizable_layers(model).items() if n.startswith("model.layers.0.")}
    for n, m in layers.items():  # the block as GPTQ left it (the model holds the one-step tune's result)
        set_weight_matrix(m, kept[n][0].dequantize())
    with torch.no_grad():
        targets = [run_block(block, inputs, 0)]
    out = tune_block(block, layers, {n: kept[n][0] for n in layers}, {n: kept[n][1] for n in layers}, inputs,
                     targets, iters=5)
    assert out.kept and out.loss_before == 0.0 and out.changed == 0.0
    for n in layers:
        assert out.weights[n] is kept[n][0]


def test_resumed_run_equals_whole(tiny_llama, tmp_path):
    """A run stopped after block 0 resumes with the saved float chain and ends with the same tuned weights."""
    def run(state, stop_after=None):
        loaded = load_model(str(tiny_llama))
        specs = _specs(loaded.model)
        if stop_after is not None:
            specs = {n: s for n, s in specs.items() if n.startswith("model.layers.0.")}
        res = quantize_model(loaded.model, specs, IDS, QuantizeOptions(tune_iters=10, batch_size=3),
                             state_dir=state, state_key="k")
        return {n: r.weight.dequantize() for n, r in res.items()}

    whole = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=0)
    resumed = run(tmp_path / "b")
    assert whole.keys() == resumed.keys()
    for n in whole:
        assert torch.equal(whole[n], resumed[n]), n


def test_tuning_leaves_the_block_holding_the_returned_weights(tiny_llama, monkeypatch):
    """The tuner moves the layers' own weights while it runs; afterwards every tuned layer holds exactly the weight
    it returns, and the parameters' requires_grad flags are as they were."""
    model, kept = _gptq_with_updated(tiny_llama, monkeypatch)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    block = find_blocks(model)[1][1]
    inputs = capture_block_inputs(model, block, [{"input_ids": IDS[:3]}])
    layers = {n: m for n, m in quantizable_layers(model).items() if n.startswith("model.layers.1.")}
    for targets in ([t + 0.01 for t in inputs.hidden], None):
        if targets is None:  # the block's own outputs: nothing to gain, GPTQ's weights come back and are in place
            for n, m in layers.items():
                set_weight_matrix(m, kept[n][0].dequantize())
            with torch.no_grad():
                targets = [run_block(block, inputs, 0)]
        out = tune_block(block, layers, {n: kept[n][0] for n in layers}, {n: kept[n][1] for n in layers}, inputs,
                         targets, iters=3)
        assert before == {n: p.requires_grad for n, p in model.named_parameters()}
        for n, m in layers.items():
            assert torch.equal(weight_matrix(m), out.weights[n].dequantize()), n


def _autograd_weight(V, theta, U, s0, z, g, maxq):
    """The tuned weight by plain autograd ops (the straight-through round as x + (⌊x⌉ − x).detach())."""
    s = s0 * torch.exp(theta)
    x = U / s[:, g] + V
    c = torch.clamp(x + (torch.round(x) - x).detach() + z[:, g], 0, maxq)
    return s[:, g] * (c - z[:, g])


@pytest.mark.parametrize("transposed", [False, True])
def test_tuner_gradients_match_plain_autograd(transposed, monkeypatch):
    """_Tunable's weight and its ∂L/∂V from ∂L/∂Ŵ equal plain autograd's bit for bit, ∂L/∂θ to float tolerance,
    with codes clipped at 0 and at maxq and several groups (transposed: an HF Conv1D's [in, out] gradient); the
    row-sliced forms (signs, the weight written into a layer) equal the whole-matrix ones."""
    monkeypatch.setattr(tune, "SLICE", 70)  # two rows of 32 per slice, and a last slice of 2
    from hawqtool.quantize.quantizer import QuantizedWeight, QuantSpec

    gen = torch.Generator().manual_seed(3)
    rows, cols, gs, maxq = 6, 32, 8, 7
    g = torch.arange(cols) // gs
    s0 = torch.rand(rows, cols // gs, generator=gen) * 0.1 + 0.02
    z = torch.randint(0, maxq + 1, (rows, cols // gs), generator=gen)
    U = torch.randn(rows, cols, generator=gen) * 0.4  # wide enough that some codes clip at both ends
    V0 = torch.rand(rows, cols, generator=gen) - 0.5
    th0 = (torch.rand(rows, cols // gs, generator=gen) - 0.5) * 0.2
    G = torch.randn(rows, cols, generator=gen)
    V, th = V0.clone().requires_grad_(True), th0.clone().requires_grad_(True)
    W_ref = _autograd_weight(V, th, U, s0, z.float(), g, maxq)
    (W_ref * G).sum().backward()
    qw = QuantizedWeight(q=torch.zeros(rows, cols, dtype=torch.int32), scales=s0, zeros=z,
                         spec=QuantSpec(bits=3, group_size=gs))
    t = _Tunable(qw, U, transposed)
    t.V, t.theta = V0.clone(), th0.clone()
    gV, gθ = t.grads(G.t() if transposed else G)
    c = torch.round(U / (s0 * th0.exp())[:, g] + V0) + z[:, g]
    assert bool((c < 0).any()) and bool((c > maxq).any())  # both clamp ends exercised
    assert torch.equal(t.weight(), W_ref.detach())
    assert torch.equal(gV, V.grad)
    assert torch.allclose(gθ, th.grad, rtol=1e-5, atol=1e-6)
    assert bool((gV == 0).any()) and bool((gV != 0).any())
    sV, sθ = t.signs(G.t() if transposed else G)
    assert sV.dtype == torch.int8 and torch.equal(sV, V.grad.sign().to(torch.int8))
    assert torch.equal(sθ, gθ.sign().to(torch.int8))
    layer = torch.nn.Linear(cols, rows, bias=False) if not transposed else Conv1D(rows, cols)
    t.write(layer)
    assert torch.equal(weight_matrix(layer), W_ref.detach())
    plain = _Tunable(qw, U, transposed, scales=False)
    Gl = G.t() if transposed else G
    assert plain.grads(Gl)[1] is None and plain.signs(Gl)[1] is None



def test_weighted_loss_weighs_each_windows_first_position(tiny_llama):
    """loss="weighted": the squared output error of each window's first position counts `first` times, the rest
    once, computed here position by position from the block's plain output."""
    model = load_model(str(tiny_llama)).model
    block = find_blocks(model)[1][0]
    inputs = capture_block_inputs(model, block, [{"input_ids": IDS[:3]}])
    with torch.no_grad():
        y = run_block(block, inputs, 0) + 0.1 * torch.randn(3, IDS.shape[1], generator=torch.Generator().manual_seed(2))[..., None]
        e = (run_block(block, inputs, 0) - y).pow(2).sum(-1)  # [window, position]
        got = float(tune._block_loss(block, inputs, [y], 0, False, 64.0))
    want = float(64.0 * e[:, 0].sum() + e[:, 1:].sum())
    assert got == pytest.approx(want, rel=1e-6) and want > 2 * float(e.sum())
    with pytest.raises(ValueError, match="weighted"):
        tune_block(block, {}, {}, {}, inputs, [y], iters=1, loss="sink")


def test_bf16_descent_under_autocast_decides_in_float32(tiny_llama, monkeypatch):
    """tune_dtype="bfloat16": every descent step's forward runs under bf16 autocast, every keep-or-not total
    without it, so the error GPTQ's weights leave is the float32 tuner's to the bit; the block's error still falls."""
    seen = []
    real = tune._block_loss

    def spy(*a, **k):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(*a, **k)

    monkeypatch.setattr(tune, "_block_loss", spy)
    results = {}
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(str(tiny_llama))
        seen.clear()
        res = quantize_model(loaded.model, _specs(loaded.model), IDS,
                             QuantizeOptions(tune_iters=40, batch_size=3, tune_dtype=dtype))
        results[dtype] = (res, [s for s in seen])
    steps = [s for s in results["bfloat16"][1] if s[0]]
    totals = [s for s in results["bfloat16"][1] if not s[0]]
    assert len(steps) == 40 * 2 and all(s[1] and s[2] == torch.bfloat16 for s in steps)  # 2 blocks × 40 steps
    assert totals and not any(s[1] for s in totals)
    assert not any(s[1] for s in results["float32"][1])
    n = "model.layers.0.self_attn.q_proj"
    notes32, notes16 = results["float32"][0][n].notes[-1], results["bfloat16"][0][n].notes[-1]
    before = lambda note: note.split("error ")[1].split(" ->")[0]  # noqa: E731
    assert before(notes32) == before(notes16), (notes32, notes16)
    after = float(notes16.split("-> ")[1].split(";")[0])
    assert after < 0.95 * float(before(notes16)), notes16
    with pytest.raises(ValueError, match="tune_dtype"):
        quantize_model(load_model(str(tiny_llama)).model, {}, IDS, QuantizeOptions(tune_dtype="int8"))


def test_engine_takes_the_tuned_blocks_outputs_from_the_last_loss(tiny_llama, monkeypatch):
    """The block engine's next inputs come from tuning's last loss (the tuned weights in place) instead of one more
    forward of every batch: the results are the recomputing run's to the bit, with that forward saved per block."""
    from hawqtool.quantize import driver

    def run():
        loaded = load_model(str(tiny_llama))
        blocks = find_blocks(loaded.model)[1]
        calls = [0]
        for b in blocks:
            b.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        res = quantize_model(loaded.model, _specs(loaded.model), IDS, QuantizeOptions(tune_iters=20, batch_size=3))
        kept = sum("GPTQ's codes kept" in " ".join(r.notes) for n, r in res.items() if n.endswith("down_proj"))
        return res, calls[0], len(blocks) - kept

    reused, n_reused, tuned_blocks = run()
    orig = driver.tune_results
    monkeypatch.setattr(driver, "tune_results", lambda *a: orig(*a) and None)  # the engine runs every block again
    again, n_again, _ = run()
    assert reused.keys() == again.keys()
    for n in reused:
        for f in ("q", "scales", "zeros"):
            assert torch.equal(getattr(reused[n].weight, f), getattr(again[n].weight, f)), (n, f)
    assert tuned_blocks > 0 and n_again - n_reused == tuned_blocks * 2, (n_again, n_reused, tuned_blocks)
