"""Weighted grid search (quantize/grid.py): never worse than min-max under its own weights, exact on
on-grid weights, follows the weights, and GPTQ on the searched grid keeps its exact recurrence."""
from __future__ import annotations

import pytest
import torch

from hawqtool.quantize.gptq import gptq_quantize
from hawqtool.quantize.quantizer import QuantSpec, qparams, rtn


def weighted_err(W, Q, d):
    return float((d[None, :] * (W - Q) ** 2).sum())


def heavy_tailed(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) + \
        0.3 * torch.randn(rows, cols, generator=g) ** 3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_search_never_worse_than_minmax_and_much_better_at_low_bits(bits, symmetric):
    W = heavy_tailed(64, 256, seed=bits)
    d = torch.rand(256, generator=torch.Generator().manual_seed(9)) ** 4 + 1e-3
    spec = QuantSpec(bits, 64, symmetric)
    mm = rtn(W, spec)
    se = rtn(W, spec, search=True, d=d)
    # per group and row: the min-max grid is one candidate, so no row of any group can get worse
    for g0 in range(0, 256, 64):
        sl = slice(g0, g0 + 64)
        e_mm = (d[None, sl] * (W[:, sl] - mm.dequantize()[:, sl]) ** 2).sum(1)
        e_se = (d[None, sl] * (W[:, sl] - se.dequantize()[:, sl]) ** 2).sum(1)
        assert bool((e_se <= e_mm * (1 + 1e-6)).all())
    if bits <= 3:  # heavy tails: the search clips and wins clearly
        assert weighted_err(W, se.dequantize(), d) < 0.8 * weighted_err(W, mm.dequantize(), d)
    # scales are fp16-exact and codes in range, as the packed format needs
    assert torch.equal(se.scales, se.scales.half().float())
    assert int(se.q.min()) >= 0 and int(se.q.max()) <= spec.maxq
    if symmetric:
        assert bool((se.zeros == 2 ** (bits - 1)).all())


@pytest.mark.parametrize("symmetric", [False, True])
def test_search_recovers_an_exact_grid(symmetric):
    g = torch.Generator().manual_seed(3)
    spec = QuantSpec(3, -1, symmetric)
    s = (torch.rand(8, generator=g) * 0.1 + 0.01).half().float()
    z = torch.full((8,), 4.0) if symmetric else torch.randint(1, 7, (8,), generator=g).float()
    q = torch.randint(0, 8, (8, 40), generator=g).float()
    q[:, 0], q[:, 1] = 0, 7  # the full code range is used
    W = s[:, None] * (q - z[:, None])
    se = rtn(W, spec, search=True, d=torch.rand(40, generator=g) + 0.1)
    assert torch.allclose(se.dequantize(), W, atol=1e-6)


def test_weights_steer_the_error_to_the_unimportant_inputs():
    W = heavy_tailed(128, 128, seed=4)
    d = torch.ones(128)
    d[:16] = 100.0  # the first 16 inputs carry most of the activation energy
    spec = QuantSpec(3, 128, False)
    plain = rtn(W, spec, search=True)
    weighted = rtn(W, spec, search=True, d=d)
    err_imp = lambda Q: float(((W - Q)[:, :16] ** 2).sum())
    assert err_imp(weighted.dequantize()) < 0.9 * err_imp(plain.dequantize())
    assert weighted_err(W, weighted.dequantize(), d) < weighted_err(W, plain.dequantize(), d)


def test_qparams_search_defaults_to_equal_weights():
    W = heavy_tailed(16, 32, seed=5)
    spec = QuantSpec(3, -1, False)
    a = qparams(W, spec, search=True)
    b = qparams(W, spec, search=True, d=torch.full((32,), 7.0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("static_groups", [False, True])
def test_gptq_on_searched_grid_beats_rtn_on_it(symmetric, static_groups):
    from test_gptq import correlated_inputs, hessian

    X = correlated_inputs(512, 128, seed=6)
    H = hessian(X)
    W = heavy_tailed(32, 128, seed=7)
    spec = QuantSpec(3, 32, symmetric)
    base = rtn(W, spec, search=True, d=H.diagonal())
    res = gptq_quantize(W, H, spec, search=True, static_groups=static_groups)
    out = lambda Q: float(((W - Q) @ X.t()).pow(2).sum())
    assert out(res.dequantized) < 0.7 * out(base.dequantize())
    if static_groups:  # static groups are the searched grid of the original W, exactly
        assert torch.equal(res.weight.scales, base.scales) and torch.equal(res.weight.zeros, base.zeros)


def test_input_importance_is_the_mean_square_input_with_first_token_weight():
    from hawqtool.quantize.importance import input_importance

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)

    wrap = Wrap()
    X = torch.randn(3, 5, 8)
    layers = {"net.0": model[0], "net.2": model[2]}
    d = input_importance(wrap, layers, [{"x": X[:2]}, {"x": X[2:]}], first_weight=4.0)
    w = torch.ones(3, 5)
    w[:, 0] = 4.0
    expect0 = (X ** 2 * w[..., None]).sum((0, 1)) / w.sum()
    torch.testing.assert_close(d["net.0"], expect0)
    h = torch.relu(model[0](X)).detach()
    torch.testing.assert_close(d["net.2"], (h ** 2 * w[..., None]).sum((0, 1)) / w.sum())


def test_weighted_quant_error_reduces_to_plain_error_for_equal_importance():
    from hawqtool.quantize.importance import weighted_quant_error

    W = heavy_tailed(32, 64, seed=8)
    spec = QuantSpec(3, 32, False)
    plain = float((rtn(W, spec, search=True).dequantize() - W).pow(2).sum())
    assert weighted_quant_error(W, spec, None) == pytest.approx(plain)
    assert weighted_quant_error(W, spec, torch.full((64,), 3.0)) == pytest.approx(plain, rel=1e-6)
    d = torch.ones(64)
    d[:8] = 50.0
    Q = rtn(W, spec, search=True, d=d).dequantize()
    expect = float((d * (Q - W).pow(2).sum(0)).sum() / d.mean())
    assert weighted_quant_error(W, spec, d) == pytest.approx(expect, rel=1e-6)


def test_unknown_grid_is_refused_not_silently_min_max():
    from hawqtool.quantize.driver import QuantizeOptions, quantize_model

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="grid"):
        quantize_model(model, {"0": QuantSpec(4, -1)}, torch.randn(4, 8), QuantizeOptions(grid="serch"))
