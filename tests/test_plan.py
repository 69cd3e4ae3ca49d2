"""Ω table and plans: HAWQ-V2 perturbation, monotone in bits, budgets in bytes and avg bits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hawqtool.allocate.budgets import uniform_bytes
from hawqtool.allocate.plan import allocate_bits, omega_table
from hawqtool.artifacts import LayerSensitivity, SensitivityReport, qerror_key
from hawqtool.errors import UserError
from hawqtool.quantize.importance import weighted_quant_error
from hawqtool.quantize.quantizer import QuantSpec

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
            assert omega[i, j] == pytest.approx(traces[n] / W.numel() * weighted_quant_error(W, QuantSpec(b, 128), None))
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


# ---- constraints: pins, allowed widths, ties (synthetic report with stored qerror: no weights, no model) ----

PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def synthetic_report(n_blocks: int = 3, group_size: int = 128, seed: int = 0) -> SensitivityReport:
    """Llama-like layer names; block i is 100^-i as sensitive, q/k/v differ inside a block; qerror for 1..8 bits."""
    rng = np.random.default_rng(seed)
    layers = []
    names = [f"model.layers.{i}.{p}" for i in range(n_blocks) for p in PROJ] + ["lm_head"]
    for n in names:
        out_f, in_f = (512, 128) if "gate" in n or "up" in n or n == "lm_head" else (128, 256 if "down" in n else 128)
        blk = int(n.split(".")[2]) if n.startswith("model.") else 0
        trace = 100.0 ** -blk * {"q_proj": 50.0, "v_proj": 0.02}.get(n.rsplit(".", 1)[-1], 1.0) * rng.uniform(0.5, 2)
        scale = rng.uniform(0.5, 2.0)
        qerr = {qerror_key(b, group_size, False): out_f * in_f * scale * 4.0 ** -b for b in range(1, 9)}
        layers.append(LayerSensitivity(name=n, shape=[out_f, in_f], n_params=out_f * in_f, trace=trace, stderr=0.0,
                                       probes=8, qerror=qerr))
    return SensitivityReport(model="no-such-model", objective="self-kl", estimator="test", settings={},
                             layers=layers, seconds=0, fingerprint="synthetic")


def no_weights() -> dict:
    raise AssertionError("weights must not be loaded when the report has every quantization error")


def test_pins_first_match_wins_and_are_recorded():
    rep = synthetic_report()
    pins = {r"layers\.0\.self_attn\.q_proj": 4, r"layers\.0\.": 2, "lm_head": 8}
    plan = allocate_bits(rep, no_weights, avg_bits=3.0, bit_choices=BITS, pins=pins)
    bits = plan.bits_of()
    assert bits["model.layers.0.self_attn.q_proj"] == 4 and bits["lm_head"] == 8
    assert all(b == 2 for n, b in bits.items() if n.startswith("model.layers.0.") and not n.endswith("q_proj"))
    assert plan.budget["constraints"]["pins"] == pins
    assert "constraints" not in allocate_bits(rep, no_weights, avg_bits=3.0, bit_choices=BITS).budget
    with pytest.raises(UserError, match="not in --bits"):
        allocate_bits(rep, no_weights, avg_bits=3.0, bit_choices=BITS, pins={"lm_head": 5})
    with pytest.raises(UserError, match="matches no layer"):
        allocate_bits(rep, no_weights, avg_bits=3.0, bit_choices=BITS, pins={"embed_tokens": 8})
    with pytest.raises(UserError, match="not a valid regular expression"):
        allocate_bits(rep, no_weights, avg_bits=3.0, bit_choices=BITS, pins={"(q": 8})


def test_allowed_widths_are_honoured_and_pins_override():
    rep = synthetic_report()
    free = allocate_bits(rep, no_weights, avg_bits=3.0, bit_choices=BITS).bits_of()
    assert {b for n, b in free.items() if ".mlp." in n} - {3, 4}  # the constraint is not trivially met
    plan = allocate_bits(rep, no_weights, avg_bits=3.0, bit_choices=BITS, allowed={r"\.mlp\.": [3, 4]},
                         pins={r"layers\.2\.mlp\.down": 2})
    bits = plan.bits_of()
    assert bits["model.layers.2.mlp.down_proj"] == 2
    assert all(b in (3, 4) for n, b in bits.items() if ".mlp." in n and n != "model.layers.2.mlp.down_proj")


def test_ties_equalise_qkv_within_a_block_but_blocks_stay_independent():
    rep = synthetic_report()
    free = allocate_bits(rep, no_weights, avg_bits=3.0, bit_choices=BITS).bits_of()
    assert any(free[f"model.layers.{i}.self_attn.q_proj"] != free[f"model.layers.{i}.self_attn.v_proj"]
               for i in range(3))  # without ties they differ, so the test means something
    for kw in ({"ties": [r"(q|k|v)_proj"]}, {"auto_ties": True}):
        plan = allocate_bits(rep, no_weights, avg_bits=3.0, bit_choices=BITS, **kw)
        bits = plan.bits_of()
        qkv = [{bits[f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"} for i in range(3)]
        assert all(len(s) == 1 for s in qkv), qkv
        assert len({next(iter(s)) for s in qkv}) > 1  # each block decides on its own
        assert len(plan.budget["constraints"]["tie_groups"]) >= 3
    bits = allocate_bits(rep, no_weights, avg_bits=3.0, bit_choices=BITS, auto_ties=True).bits_of()
    assert all(bits[f"model.layers.{i}.mlp.gate_proj"] == bits[f"model.layers.{i}.mlp.up_proj"] for i in range(3))
    with pytest.raises(UserError, match="no common allowed width"):
        allocate_bits(rep, no_weights, avg_bits=3.0, bit_choices=BITS, ties=[r"(q|k|v)_proj"],
                      pins={"q_proj": 8, "k_proj": 2})


def test_infeasible_under_pins_names_a_minimum_that_solves():
    import re

    rep = synthetic_report()
    cons = {"pins": {r"\.mlp\.": 8}, "ties": [r"(q|k|v)_proj"]}
    with pytest.raises(UserError, match="under these pins") as ei:
        allocate_bits(rep, no_weights, avg_bits=3.0, bit_choices=BITS, **cons)
    need = float(re.search(r"at least --avg-bits ([0-9.]+)", str(ei.value)).group(1))
    assert 3.0 < need < 8.0 and "\n" not in str(ei.value)
    plan = allocate_bits(rep, no_weights, avg_bits=need, bit_choices=BITS, **cons)
    assert all(b == 8 for n, b in plan.bits_of().items() if ".mlp." in n)
    with pytest.raises(UserError):  # and it is tight to the printed precision
        allocate_bits(rep, no_weights, avg_bits=need - 0.002, bit_choices=BITS, **cons)
    with pytest.raises(UserError, match="at least --max-bytes") as ei:
        allocate_bits(rep, no_weights, max_bytes=1000, bit_choices=BITS, **cons)
    most = int(re.search(r"at least --max-bytes (\d+)", str(ei.value)).group(1))
    assert allocate_bits(rep, no_weights, max_bytes=most, bit_choices=BITS, **cons).total_bytes <= most
