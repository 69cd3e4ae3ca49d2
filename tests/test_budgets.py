"""BOPs and latency budgets, combined budgets, group-size and W8A8 options, MAC profiling, latency tables."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hawqtool.allocate.budgets import Budgets
from hawqtool.allocate.options import Option, make_options
from hawqtool.allocate.plan import act_noise_ratio, allocate_bits, layer_tables
from hawqtool.errors import UserError
from hawqtool.latency import LatencyTable, load_latency_table, measure_latency_table, save_latency_table
from hawqtool.macs import LayerProfile, profile_layers
from hawqtool.quantize.quantizer import QuantSpec

from test_plan import BITS, report_for, synthetic_report


def no_weights() -> dict:
    raise AssertionError("the synthetic report has every quantization error; weights must not be needed")


def with_w8a8_errors(report):
    """The synthetic report plus ‖ΔW‖² of symmetric per-channel 8-bit weights (the W8A8 weight quantizer)."""
    for ls in report.layers:
        ls.qerror["8/-1/sym"] = 1.5 * ls.qerror["8/128/asym"]
    return report


def profile_of(report, macs_per_param: float = 1.0, crest: float = 20.0) -> dict[str, LayerProfile]:
    return {ls.name: LayerProfile(macs=ls.n_params * macs_per_param, crest=crest, unit="token",
                                  weight_sq=float(ls.n_params)) for ls in report.layers}


# ---- options ----

def test_options_cross_widths_and_groups_and_add_one_w8a8():
    opts = make_options([4, 2], [64, 128], [16, 8])
    assert [o.label for o in opts] == ["w2g64a16", "w2g128a16", "w4g64a16", "w4g128a16", "w8gca8"]
    assert opts[-1].spec(False) == QuantSpec(8, -1, True)  # W8A8 weights: symmetric per channel
    assert opts[0].spec(True).symmetric
    with pytest.raises(UserError, match="group sizes"):
        make_options([4], [0], [16])
    with pytest.raises(UserError, match="--act-bits must be 8"):
        make_options([4], [128], [4])


def test_group_size_options_count_their_overhead():
    rep = synthetic_report()
    opts = make_options([4], [32, 128])
    weights = {ls.name: torch.randn(*ls.shape) for ls in rep.layers}
    rep2 = report_for(weights, {n: 1.0 for n in weights})
    _, nbytes = layer_tables(rep2, lambda: weights, opts, False)
    for i, ls in enumerate(rep2.layers):
        out_f, in_f = ls.shape
        for j, g in enumerate((32, 128)):
            groups = out_f * -(-in_f // g)
            assert nbytes[i, j] == (out_f * in_f * 4 + groups * (16 + 4)) / 8


def test_group_size_choice_spends_bytes_on_sensitive_layers():
    g = torch.Generator().manual_seed(0)
    weights = {f"l{i}": torch.randn(64, 256, generator=g) for i in range(4)}
    rep = report_for(weights, {"l0": 100.0, "l1": 1.0, "l2": 1.0, "l3": 1.0})
    plan = allocate_bits(rep, lambda: weights, avg_bits=4.0, bit_choices=(3, 4), group_sizes=[128, 32])
    by = {lp.name: (lp.bits, lp.group_size) for lp in plan.layers}
    assert by["l0"] == (4, 32)  # the sensitive layer buys the finer grouping
    assert plan.total_bytes <= plan.budget["max_bytes"] * (1 + 1e-9)
    assert set(plan.layers[0].omega_by_bits) == {"w3g128a16", "w3g32a16", "w4g128a16", "w4g32a16"}
    assert plan.options and plan.costs["bytes"] == pytest.approx(plan.total_bytes)


def test_avg_bits_is_measured_at_the_coarsest_group_size_whatever_the_order():
    """--avg-bits B allows the bytes of uniform B-bit at the coarsest positive group size (README: finer groups are
    what the budget buys), also when per-channel (-1) or a finer group comes first; one width below B is a one-line
    error, not a traceback."""
    g = torch.Generator().manual_seed(0)
    weights = {f"l{i}": torch.randn(64, 256, generator=g) for i in range(4)}
    rep = report_for(weights, {"l0": 100.0, "l1": 1.0, "l2": 1.0, "l3": 1.0})
    ref = allocate_bits(rep, lambda: weights, avg_bits=4.0, bit_choices=(3, 4), group_sizes=[128])
    assert ref.budget["max_bytes"] < allocate_bits(rep, lambda: weights, avg_bits=4.0, bit_choices=(3, 4),
                                                   group_sizes=[32]).budget["max_bytes"]
    for order in ([-1, 32, 128], [128, 32], [32, 128, -1]):
        plan = allocate_bits(rep, lambda: weights, avg_bits=4.0, bit_choices=(3, 4), group_sizes=order)
        assert plan.budget["max_bytes"] == pytest.approx(ref.budget["max_bytes"]), order
    for avg in (3.5, 8.0):  # below or above the only width: the fixes named must be ones that work
        with pytest.raises(UserError, match=r"only width is 4; give --avg-bits 4, .*--max-bytes") as err:
            allocate_bits(rep, lambda: weights, avg_bits=avg, bit_choices=(4,))
        assert "or more" not in str(err.value)
    assert {lp.bits for lp in allocate_bits(rep, lambda: weights, avg_bits=4.0, bit_choices=(4,)).layers} == {4}
    assert {lp.bits for lp in allocate_bits(rep, lambda: weights, max_bytes=1e15, bit_choices=(4,)).layers} == {4}


def test_a_layer_left_without_options_is_named():
    """A pin that leaves a layer no option (a 4-bit pin where the only 4-bit ggml type, Q4_K, cannot tile its
    96-wide rows) names the layer in one line; the solver said only "layer 1"."""
    g = torch.Generator().manual_seed(0)
    weights = {"l0": torch.randn(64, 256, generator=g), "l1": torch.randn(64, 96, generator=g)}
    rep = report_for(weights, {n: 1.0 for n in weights})
    with pytest.raises(UserError, match="no option is left for l1"):
        allocate_bits(rep, lambda: weights, avg_bits=8.5, formats=["Q4_K", "Q8_0"], pins={"l1": 4})


# ---- BOPs ----

def test_bops_budget_holds_and_fraction_is_of_16x16():
    rep = with_w8a8_errors(synthetic_report())
    prof = profile_of(rep)
    macs = sum(p.macs for p in prof.values())
    plan = allocate_bits(rep, no_weights, bit_choices=BITS, budgets=Budgets(bops_frac=3 * 16 / 256), profile=prof)
    assert plan.costs["bops"] <= 3 * 16 * macs * (1 + 1e-9)
    assert plan.budget["max_bops"] == pytest.approx(3 * 16 * macs)
    exact = sum(prof[lp.name].macs * lp.bits * lp.act_bits for lp in plan.layers)
    assert plan.costs["bops"] == pytest.approx(exact)


def test_bops_needs_a_profile_and_too_small_names_the_smallest():
    rep = synthetic_report()
    with pytest.raises(UserError, match="MACs"):
        allocate_bits(rep, no_weights, bit_choices=BITS, budgets=Budgets(max_bops=1e9))
    with pytest.raises(UserError, match=r"use at least --bops-frac 0\.125") as e:
        allocate_bits(rep, no_weights, bit_choices=BITS, budgets=Budgets(bops_frac=0.1), profile=profile_of(rep))
    assert "\n" not in str(e.value)


def test_w8a8_option_adds_activation_noise_and_lowers_bops():
    g = torch.Generator().manual_seed(0)
    weights = {f"l{i}": torch.randn(32, 64, generator=g) for i in range(3)}
    wrep = report_for(weights, {"l0": 2.0, "l1": 1.0, "l2": 0.5})
    wprof = {n: LayerProfile(macs=W.numel(), crest=20.0, unit="token", weight_sq=float(W.double().pow(2).sum()))
             for n, W in weights.items()}
    opts = make_options([4, 8], [128], [8, 16])
    omega, _ = layer_tables(wrep, lambda: weights, opts, False, wprof)
    j88 = [o.label for o in opts].index("w8gca8")
    from hawqtool.quantize.importance import weighted_quant_error

    for i, (n, W) in enumerate(weights.items()):  # weight error (sym per channel) + Tr/n·‖W‖²·noise ratio
        expect = wrep.layers[i].trace / W.numel() * (weighted_quant_error(W, QuantSpec(8, -1, True), None)
                                                      + wprof[n].weight_sq * act_noise_ratio(8, 20.0))
        assert omega[i, j88] == pytest.approx(expect, rel=1e-6)
    assert act_noise_ratio(8, 12.0 * 127**2) == pytest.approx(1.0)
    rep = with_w8a8_errors(synthetic_report())
    prof = profile_of(rep, crest=1000.0)  # activation noise ≈ 4-bit weight noise: the choice depends on the layer
    plan = allocate_bits(rep, no_weights, bit_choices=(4, 8), act_bits=(8, 16), profile=prof,
                         budgets=Budgets(bops_frac=64 / 256))
    # at 64 BOPs per MAC only W4A16 and W8A8 fit, and each layer takes the one with the smaller Ω
    assert {(lp.bits, lp.act_bits) for lp in plan.layers} == {(4, 16), (8, 8)}
    with pytest.raises(UserError, match=r"use at least --bops-frac 0\.25"):
        allocate_bits(rep, no_weights, bit_choices=(4, 8), act_bits=(8, 16), profile=prof,
                      budgets=Budgets(bops_frac=0.2))
    with pytest.raises(UserError, match="input statistics"):
        allocate_bits(rep, no_weights, bit_choices=(8,), act_bits=(8,), avg_bits=8)


# ---- combined budgets ----

def test_combined_budgets_all_hold_and_joint_infeasibility_is_named():
    rep = with_w8a8_errors(synthetic_report())
    prof = profile_of(rep)
    plan = allocate_bits(rep, no_weights, avg_bits=4.0, bit_choices=BITS, profile=prof,
                         budgets=Budgets(bops_frac=3.5 * 16 / 256))
    assert plan.costs["bytes"] <= plan.budget["max_bytes"] * (1 + 1e-9)
    assert plan.costs["bops"] <= plan.budget["max_bops"] * (1 + 1e-9)
    # a table where 2-bit layers are slow: bytes push to 2 bits, latency to 8 bits; each alone is feasible
    labels = [Option(b).label for b in (2, 8)]
    slow2 = LatencyTable(tokens=1, layers={ls.name: {labels[0]: 2.0, labels[1]: 1.0} for ls in rep.layers})
    n = len(rep.layers)
    with pytest.raises(UserError, match="cannot all be met together") as e:
        allocate_bits(rep, no_weights, avg_bits=2.5, bit_choices=(2, 8), latency=slow2,
                      budgets=Budgets(max_latency_ms=1.2 * n))
    msg = str(e.value)
    assert "--avg-bits 2.5" in msg and "--max-latency-ms" in msg and "\n" not in msg
    with pytest.raises(UserError, match="add 16 to --act-bits"):
        allocate_bits(rep, no_weights, avg_bits=8, bit_choices=(8,), act_bits=(8,), profile=prof)


# ---- latency ----

def _table(rep, labels, per_bit_ms: float = 0.01) -> LatencyTable:
    return LatencyTable(tokens=1, layers={ls.name: {lab: ls.n_params * 1e-6 * (0.5 + per_bit_ms * int(lab[1]))
                                                    for lab in labels} for ls in rep.layers},
                        fp32={ls.name: ls.n_params * 1e-6 * 2 for ls in rep.layers})


def test_latency_budget_and_fraction(tmp_path):
    rep = synthetic_report()
    labels = [Option(b).label for b in BITS]
    table = _table(rep, labels)
    save_latency_table(table, tmp_path / "lat.json")
    table = load_latency_table(tmp_path / "lat.json")
    fp = table.fp32_total([ls.name for ls in rep.layers])
    plan = allocate_bits(rep, no_weights, bit_choices=BITS, latency=table, budgets=Budgets(latency_frac=0.28))
    assert plan.costs["latency_ms"] <= 0.28 * fp * (1 + 1e-9)
    assert any(lp.bits > 2 for lp in plan.layers)
    with pytest.raises(UserError, match="use at least --latency-frac"):
        allocate_bits(rep, no_weights, bit_choices=BITS, latency=table, budgets=Budgets(latency_frac=0.1))
    with pytest.raises(UserError, match="needs a table"):
        allocate_bits(rep, no_weights, bit_choices=BITS, budgets=Budgets(max_latency_ms=1.0))
    small = LatencyTable(tokens=1, layers={rep.layers[0].name: {lab: 1.0 for lab in labels}})
    with pytest.raises(UserError, match="has no layer"):
        allocate_bits(rep, no_weights, bit_choices=BITS, latency=small, budgets=Budgets(max_latency_ms=1.0))


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"), ("{", "not valid JSON"), ('{"kind": "plan"}', "not a hawqtool latency table"),
    ('{"kind": "latency-table", "schema_version": 1, "layers": {}}', "non-empty"),
    ('{"kind": "latency-table", "schema_version": 1, "layers": {"a": {"w4g128a16": -1}}}', "non-negative"),
    ('{"kind": "latency-table", "schema_version": 1, "tokens": 0, "layers": {"a": {"w4g128a16": 1}}}', "tokens"),
])
def test_bad_latency_tables_are_one_line_errors(tmp_path, content, fragment):
    p = tmp_path / "lat.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(UserError, match=fragment) as e:
        load_latency_table(p)
    assert "\n" not in str(e.value)


def test_measured_latency_table_covers_every_layer_and_option():
    shapes = {"a": (64, 128), "b": (64, 128), "c": (32, 64)}
    opts = make_options([2, 4, 8], [64], [8, 16])
    t = measure_latency_table(shapes, opts, tokens=2, repeats=2)
    assert set(t.layers) == set(shapes) and t.layers["a"] == t.layers["b"]  # equal shapes measured once
    assert all(set(r) == {o.label for o in opts} and all(v > 0 for v in r.values()) for r in t.layers.values())
    assert t.fp32["c"] > 0 and t.tokens == 2


# ---- MAC profiling ----

def test_profile_counts_macs_per_token_and_per_image():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(50, 16), lin

        def forward(self, input_ids):
            return self.fc(self.emb(input_ids))

    prof = profile_layers(LM(), {"fc": lin}, [{"input_ids": torch.randint(0, 50, (2, 5))}])
    assert prof["fc"].macs == 16 * 8 and prof["fc"].unit == "token"
    assert prof["fc"].weight_sq == pytest.approx(float(lin.weight.detach().double().pow(2).sum()))
    assert prof["fc"].crest >= 1.0
    conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
    dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    net = nn.Sequential(conv, dw)
    prof = profile_layers(net, {"conv": conv, "dw": dw}, [{"input": torch.randn(2, 3, 6, 6)}])
    assert prof["conv"].macs == 4 * 6 * 6 * 3 * 9 and prof["dw"].macs == 4 * 6 * 6 * 9
    assert prof["conv"].unit == "image"


def test_constant_rows_have_crest_one():
    lin = nn.Linear(8, 2)
    prof = profile_layers(lin, {"l": lin}, [{"input": torch.ones(3, 8)}])
    assert prof["l"].crest == pytest.approx(1.0)


def test_w8a8_runtime_layer_matches_quantized_input_reference():
    from quant_kernels import dequantize_reference
    from quant_kernels.activation import quantize_per_token

    from hawqtool.checkpoint import pack_layer
    from hawqtool.quantize.quantizer import rtn
    from hawqtool.runtime import QuantLinear

    g = torch.Generator().manual_seed(1)
    W, x = torch.randn(24, 40, generator=g), torch.randn(5, 40, generator=g)
    pw = pack_layer(rtn(W, QuantSpec(8, -1, True)))
    q, s = quantize_per_token(x)
    w_int = torch.round(dequantize_reference(pw) / pw.scales.double()).to(torch.int64)  # int8 weights q−128
    ref = (q.to(torch.int64) @ w_int.T).double() * s.double() * pw.scales.double().T
    out = QuantLinear(pw, None, act_bits=8)(x)
    assert (out.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_pairs_add_weight_activation_options_and_bops_prefers_them():
    from hawqtool.allocate.options import parse_pairs

    assert parse_pairs("4:8, 4:4") == [(4, 8), (4, 4)] and parse_pairs(None) == []
    for bad in ("4", "9:8", "4:1", "a:b"):
        with pytest.raises(UserError, match="--pairs takes W:A"):
            parse_pairs(bad)
    opts = make_options([2, 4], [128], [16, 8], [(4, 8), (4, 4), (8, 8)])
    assert [o.label for o in opts] == ["w2g128a16", "w4g128a16", "w8gca8", "w4g128a8", "w4g128a4"]  # 8:8 = W8A8
    rep = synthetic_report()
    for ls in rep.layers:  # errors of the options' weight quantizers
        ls.qerror["8/-1/sym"] = 1.5 * ls.qerror["8/128/asym"]
    prof = profile_of(rep)
    plan = allocate_bits(rep, no_weights, bit_choices=(2, 4), act_bits=(16,), pairs=[(4, 8), (4, 4)], profile=prof,
                         budgets=Budgets(bops_frac=4 * 8 / 256))
    assert plan.costs["bops"] <= plan.budget["max_bops"] * (1 + 1e-9)
    assert {lp.act_bits for lp in plan.layers} - {16} and "w4g128a8" in plan.options
    # a W4A4 layer's Ω carries the activation-noise term of 4-bit activations: more than W4A8's
    lp = plan.layers[0]
    assert lp.omega_by_bits["w4g128a4"] > lp.omega_by_bits["w4g128a8"] > lp.omega_by_bits["w4g128a16"]


def test_allocate_stage_takes_the_options_budgets():
    """allocate_stage(report, weights, AllocateOptions): the options' BOPs budget holds with the profile given as
    its inputs, equals allocate_bits called directly, and without the inputs it needs is a ValueError."""
    from hawqtool.allocate_stage import BudgetInputs, allocate_stage
    from hawqtool.options import AllocateOptions

    rep = with_w8a8_errors(synthetic_report())
    prof = profile_of(rep)
    opts = AllocateOptions(bops_frac=3 * 16 / 256)
    plan = allocate_stage(rep, no_weights, opts, avg_bits=None, bit_choices=BITS, group_size=128, symmetric=False,
                          inputs=BudgetInputs(profile=prof))
    direct = allocate_bits(rep, no_weights, bit_choices=BITS, budgets=Budgets(bops_frac=3 * 16 / 256), profile=prof)
    assert [lp.bits for lp in plan.layers] == [lp.bits for lp in direct.layers]
    assert plan.fingerprint == direct.fingerprint
    with pytest.raises(ValueError, match="budget_inputs"):
        allocate_stage(rep, no_weights, opts, avg_bits=None, bit_choices=BITS, group_size=128, symmetric=False)
