"""Pareto sweep of size vs Ω: monotone frontier, uniform baselines never beat it, files and CLI end to end."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hawqtool import artifacts
from hawqtool.allocate.budgets import Budgets
from hawqtool.allocate.options import make_options
from hawqtool.allocate.plan import allocate_bits
from hawqtool.allocate.sweep import sweep_plans
from hawqtool.report import write_sweep
from hawqtool.cli import main
from hawqtool.latency import LatencyTable
from test_plan import BITS, no_weights, synthetic_report


@pytest.fixture(scope="module")
def rep():
    return synthetic_report()


def test_frontier_is_monotone_and_uniform_points_lie_on_or_above_it(rep):
    res = sweep_plans(rep, no_weights, BITS, 128, False, n_points=8)
    fr = res["frontier"]
    assert len(fr) >= 4
    for a, b in zip(fr, fr[1:]):
        assert b["total_bytes"] > a["total_bytes"] and b["predicted_omega"] < a["predicted_omega"]
    n_layers = len(rep.layers)
    assert all(sum(p["bits_histogram"].values()) == n_layers for p in fr)
    assert [u["bits"] for u in res["uniform"]] == BITS and all(u["feasible"] for u in res["uniform"])
    for u in res["uniform"]:
        assert u["label"] == f"uniform {u['bits']}-bit"
        assert u["predicted_omega"] == pytest.approx(sum(ls.trace / ls.n_params * ls.qerror[f"{u['bits']}/128/asym"]
                                                         for ls in rep.layers))
        assert any(p["total_bytes"] <= u["total_bytes"] * (1 + 1e-6)
                   and p["predicted_omega"] <= u["predicted_omega"] * (1 + 1e-9) for p in fr), u


def test_sweep_honours_constraints_and_flags_uniform_points_that_break_them(rep):
    res = sweep_plans(rep, no_weights, BITS, 128, False, n_points=5, pins={"lm_head": 8}, ties=[r"(q|k|v)_proj"])
    assert all(p["bits_histogram"]["8"] >= 1 for p in res["frontier"])
    assert [u["feasible"] for u in res["uniform"]] == [False, False, False, True]
    assert res["constraints"]["pins"] == {"lm_head": 8}


def test_write_sweep_writes_json_and_png_with_the_chosen_plan(rep, tmp_path):
    plan = allocate_bits(rep, no_weights, avg_bits=3.0, bit_choices=BITS)
    res = sweep_plans(rep, no_weights, BITS, 128, False, n_points=4, extra_budgets=[plan.budget["max_bytes"]])
    paths = write_sweep(res, tmp_path / "s.json", tmp_path / "s.png", plan)
    data = json.loads(paths["json"].read_text())
    assert data["chosen"]["total_bytes"] == plan.total_bytes and data["frontier"] == res["frontier"]
    assert any(p["predicted_omega"] == pytest.approx(plan.predicted_omega) for p in data["frontier"])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 5000
    assert not list(tmp_path.glob(".*tmp*"))


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_sweep_pin_tie_end_to_end(rep, tmp_path):
    sens = tmp_path / "sens.json"
    artifacts.save(rep, sens)  # model "no-such-model": any attempt to load weights would fail
    out = tmp_path / "plan.json"
    res = run_cli("allocate", sens, "--avg-bits", 3, "--sweep", "--pin", "lm_head=8", "--tie", "(q|k|v)_proj",
                  "--allow", r"\.mlp\.down=2,3,4", "-o", out, "-q")
    assert res.exit_code == 0, (res.output, res.stderr)
    plan = artifacts.load(out, "plan")
    bits = plan.bits_of()
    assert bits["lm_head"] == 8
    assert all(len({bits[f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"}) == 1 for i in range(3))
    assert all(b <= 4 for n, b in bits.items() if "down_proj" in n)
    assert plan.budget["constraints"]["ties"] == ["(q|k|v)_proj"]
    sweep = json.loads((tmp_path / "plan.sweep.json").read_text())
    assert sweep["chosen"]["fingerprint"] == plan.fingerprint and sweep["constraints"]["pins"] == {"lm_head": 8}
    assert (tmp_path / "plan.sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, words", [
    (["--pin", "lm_head"], "--pin must look like PATTERN=BITS"),
    (["--pin", "lm_head=9"], "--pin must look like"),
    (["--allow", "mlp=3,x"], "--allow must look like"),
    (["--pin", "lm_head=7"], "not in --bits"),
    (["--pin", r"\.mlp\.=8", "--avg-bits", 3], "at least --avg-bits"),
])
def test_cli_bad_constraints_are_one_line_errors(rep, tmp_path, args, words):
    sens = tmp_path / "sens.json"
    artifacts.save(rep, sens)
    if "--avg-bits" not in args:
        args = [*args, "--max-bytes", 1e9]
    res = run_cli("allocate", sens, *args, "-o", tmp_path / "p.json", "-q")
    assert res.exit_code == 1, (res.exit_code, res.output)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.stderr


def test_sweep_with_profile_and_latency_table_has_a_frontier_per_axis(tmp_path):
    from test_budgets import profile_of, with_w8a8_errors

    rep = with_w8a8_errors(synthetic_report())
    labels = [o.label for o in make_options(BITS, [128], [8, 16])]
    lat = LatencyTable(tokens=1, layers={ls.name: {lab: ls.n_params * 1e-6 * (0.5 + 0.1 * int(lab[1]) - 0.5 * (lab == "w8gca8"))
                                                  for lab in labels} for ls in rep.layers})
    prof = profile_of(rep)
    res = sweep_plans(rep, no_weights, BITS, 128, False, n_points=6, act_bits=(8, 16), profile=prof, latency=lat)
    assert res["axes"] == ["bytes", "bops", "latency_ms"]
    assert [u["label"] for u in res["uniform"]][-1] == "uniform w8gca8"
    for axis, fr in res["frontiers"].items():
        assert len(fr) >= 2, axis
        for a, b in zip(fr, fr[1:]):
            assert b["costs"][axis] > a["costs"][axis] and b["predicted_omega"] < a["predicted_omega"]
        for u in res["uniform"]:  # no uniform plan beats the frontier on its own axis
            assert any(p["costs"][axis] <= u["costs"][axis] * (1 + 1e-6)
                       and p["predicted_omega"] <= u["predicted_omega"] * (1 + 1e-9) for p in fr), (axis, u)
    # the latency frontier really trades latency: its cheapest point is faster than the bytes frontier's
    assert res["frontiers"]["latency_ms"][0]["costs"]["latency_ms"] <= min(
        p["costs"]["latency_ms"] for p in res["frontiers"]["bytes"]) + 1e-12
    fastest = sum(min(r.values()) for r in lat.layers.values())
    plan = allocate_bits(rep, no_weights, bit_choices=BITS, act_bits=(8, 16), profile=prof, latency=lat,
                         budgets=Budgets(max_latency_ms=1.5 * fastest))
    paths = write_sweep(res, tmp_path / "s.json", tmp_path / "s.png", plan)
    data = json.loads(paths["json"].read_text())
    assert set(data["chosen"]["costs"]) == {"bytes", "bops", "latency_ms"}
    assert data["chosen"]["costs"]["latency_ms"] == pytest.approx(plan.costs["latency_ms"])
    assert "_costs" not in data and paths["png"].stat().st_size > 5000
