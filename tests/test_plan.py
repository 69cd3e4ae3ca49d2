"""Ω table and plans: HAWQ-V2 perturbation, monotone in bits, budgets in bytes and avg bits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hawqtool.allocate.plan import allocate_bits, omega_table, uniform_bytes
from hawqtool.artifacts import LayerSensitivity, SensitivityReport
from hawqtool.errors import UserError
from hawqtool.quantize.quantizer import QuantSpec, quant_error

BITS = [2, 3, 4, 8]


def report_for(weights: dict[str, torch.Tensor], traces: dict[str, float]) -> SensitivityReport:
    layers = [LayerSensitivity(name=n, shape=list(W.shape), n_params=W.numel(), trace=traces[n], stderr=0.0,
                               probes=8) for n, W in weights.items()]
    return SensitivityReport(model="m", objective="self-kl", estimator="test", settings={}, layers=layers, seconds=0)


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return {f"l{i}": torch.randn(64, 256, generator=g) * (1 + i) for i in range(6)}


def test_omega_is_trace_per_param_times_quant_error_and_decreases_with_bits(weights):
    traces = {n: float(10 ** i) for i, n in enumerate(weights)}
    omega, nbytes = omega_table(report_for(weights, traces), lambda: weights, BITS, 128, False)
    for i, (n, W) in enumerate(weights.items()):
        for j, b in enumerate(BITS):
            assert omega[i, j] == pytest.approx(traces[n] / W.numel() * quant_error(W, QuantSpec(b, 128)))
            assert nbytes[i, j] == QuantSpec(b, 128).storage_bits(64, 256) / 8
    assert (np.diff(omega, axis=1) < 0).all()  # strictly better with more bits, never flattened


def test_plan_gives_sensitive_layers_more_bits(weights):
    traces = {n: 1.0 for n in weights}
    traces["l0"] = 1e6  # the smallest weights but by far the most sensitive
    plan = allocate_bits(report_for(weights, traces), lambda: weights, avg_bits=3.0, bit_choices=BITS)
    bits = plan.bits_of()
    assert bits["l0"] == max(bits.values()) and len(set(bits.values())) > 1
    assert plan.total_bytes <= plan.budget["max_bytes"] * (1 + 1e-9)
    _, nbytes = omega_table(report_for(weights, traces), lambda: weights, BITS, 128, False)
    assert plan.budget["max_bytes"] == pytest.approx(uniform_bytes(nbytes, BITS, 3.0))


def test_infeasible_budget_names_the_smallest(weights):
    rep = report_for(weights, {n: 1.0 for n in weights})
    with pytest.raises(UserError, match="at least --avg-bits 2"):
        allocate_bits(rep, lambda: weights, avg_bits=1.5)
    with pytest.raises(UserError, match="--max-bytes"):
        allocate_bits(rep, lambda: weights, max_bytes=100)
