"""quantize/measured.py: the error the quantizer leaves, in the units of the weighted RTN estimate."""
from __future__ import annotations

import pytest
import torch

from hawqtool.artifacts import qerror_key
from hawqtool.quantize.gptq import HessianAccumulator
from hawqtool.quantize.importance import weighted_quant_error
from hawqtool.quantize.driver import QuantizeOptions
from hawqtool.quantize.measured import layer_hessians, measured_errors
from hawqtool.quantize.quantizer import QuantSpec


def test_rtn_measured_error_with_a_diagonal_hessian_is_the_weighted_estimate():
    torch.manual_seed(0)
    W = torch.randn(24, 64) * torch.rand(24, 1)
    d = torch.rand(64) * 5 + 0.1
    spec = QuantSpec(3, 32, False)
    got = measured_errors(W, torch.diag(2 * d), [spec], QuantizeOptions(method="rtn"))[qerror_key(3, 32, False)]
    assert got == pytest.approx(weighted_quant_error(W, spec, d), rel=1e-5)


def test_gptq_measured_error_is_its_output_error_and_below_rtn_on_correlated_inputs():
    torch.manual_seed(1)
    W = torch.randn(32, 64)
    X = torch.randn(2048, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(2048, 64)  # low-rank inputs
    acc = HessianAccumulator(64)
    acc.add_batch(X)
    H = acc.H
    specs = [QuantSpec(b, 32, False) for b in (2, 3, 4)]
    g, r = measured_errors(W, H, specs, QuantizeOptions()), measured_errors(W, H, specs, QuantizeOptions(method="rtn"))
    mean_d = float((X * X).mean(0).mean())
    for s in specs:
        k = qerror_key(s.bits, s.group_size, s.symmetric)
        assert g[k] < 0.8 * r[k]
        # in the units of mean ‖ΔW x‖² / mean(E x_j²): recompute from an RTN reconstruction directly
    from hawqtool.quantize.quantizer import rtn
    D = rtn(W, specs[1], search=True, d=H.diagonal()).dequantize() - W
    direct = float(((X @ D.t()) ** 2).sum(1).mean()) / mean_d
    assert r[qerror_key(3, 32, False)] == pytest.approx(direct, rel=1e-3)
    assert g[qerror_key(2, 32, False)] > g[qerror_key(3, 32, False)] > g[qerror_key(4, 32, False)]


def test_layer_hessians_match_an_accumulator_over_each_layers_inputs_with_first_token_weight():
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    X = torch.randn(3, 5, 8)
    Hs = layer_hessians(Wrap(), {"net.0": net[0], "net.2": net[2]}, [{"x": X[:2]}, {"x": X[2:]}], first_weight=9.0)
    for name, inp in (("net.0", X), ("net.2", torch.relu(net[0](X)).detach())):
        w = torch.ones(3, 5, 1)
        w[:, 0] = 3.0  # sqrt of the first-token weight scales the row
        acc = HessianAccumulator(inp.shape[-1])
        acc.add_batch(inp * w)
        torch.testing.assert_close(Hs[name], acc.H)
