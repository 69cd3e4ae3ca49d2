"""CLI: BOPs/latency budgets, group-size and W8A8 choices, latency tables and `hawqtool bench` on a tiny Llama."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hawqtool.cli import main
from hawqtool.options import SensitivityOptions


def invoke(*args, code: int = 0):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res


@pytest.fixture(scope="module")
def sens(tiny_llama, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("budgets") / "sens.json"
    invoke("sensitivity", tiny_llama, "--calib", text_file, "--nsamples", 4, "--seqlen", 32, "--max-probes", 8,
           "--bits", "2,3,4,8", "--group-size", 32, "-q", "-o", out)
    return out


def test_bops_and_w8a8_plan_quantizes_and_runs(sens, tiny_llama, text_file, tmp_path):
    plan_path, ckpt = tmp_path / "plan.json", tmp_path / "ckpt"
    invoke("allocate", sens, "--model", tiny_llama, "--calib", text_file, "--bits", "2,4,8", "--group-sizes", "32,16",
           "--act-bits", "8,16", "--bops-frac", 0.2, "--avg-bits", 5, "-q", "-o", plan_path)
    plan = json.loads(plan_path.read_text())
    assert plan["costs"]["bops"] <= plan["budget"]["max_bops"] * (1 + 1e-9)
    assert plan["costs"]["bytes"] <= plan["budget"]["max_bytes"] * (1 + 1e-9)
    assert sens.with_suffix(".profile.json").exists()  # MACs cached beside the report for re-allocations
    invoke("quantize", tiny_llama, "--plan", plan_path, "--calib", text_file, "--nsamples", 4, "--seqlen", 32,
           "-q", "-o", ckpt)
    manifest = json.loads((ckpt / "hawqtool_manifest.json").read_text())
    for lp in plan["layers"]:  # every layer at its own planned width, group and activation bits
        m = manifest["layers"][lp["name"]]
        assert (m["bits"], m["group_size"], m["act_bits"]) == (lp["bits"], lp["group_size"], lp["act_bits"])
    res = json.loads(invoke("eval", ckpt, "--data", text_file, "--seqlen", 32, "--windows", 2, "--json").stdout)
    assert res["ppl"] > 1


def test_latency_table_then_latency_budget(sens, tiny_llama, tmp_path):
    table, plan_path = tmp_path / "lat.json", tmp_path / "plan.json"
    # the default widths and group sizes are sensitivity's, which allocate offers by default
    invoke("bench", tiny_llama, "--latency-table", table, "--repeats", 5, "-q")
    t = json.loads(table.read_text())
    n = len(SensitivityOptions.bits) * len(SensitivityOptions.group_sizes)
    assert t["kind"] == "latency-table" and all(len(r) == n for r in t["layers"].values()), \
        [sorted(r) for r in t["layers"].values()][:2]
    invoke("allocate", sens, "--latency-table", table, "--latency-frac", 100, "--sweep", "-q", "-o", plan_path)
    plan = json.loads(plan_path.read_text())
    assert plan["costs"]["latency_ms"] <= plan["budget"]["max_latency_ms"] * (1 + 1e-9)
    sweep = json.loads((tmp_path / "plan.sweep.json").read_text())
    assert sweep["axes"] == ["bytes", "latency_ms"] and sweep["frontiers"]["latency_ms"]
    assert sweep["chosen"]["costs"]["latency_ms"] == plan["costs"]["latency_ms"]
    r = invoke("allocate", sens, "--latency-table", table, "--max-latency-ms", 1e-9, "-q", "-o", plan_path, code=1)
    assert "use at least --max-latency-ms" in r.output and r.output.count("\n") == 1
    # the table's path is claimed before measuring: our own table is replaced, a user's file or an input never
    invoke("bench", tiny_llama, "--latency-table", table, "--bits", "4", "--repeats", 5, "-q")
    assert all(len(r) == 3 for r in json.loads(table.read_text())["layers"].values())  # 4 bits × 3 group sizes
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    for target in (tmp_path / "notes.json", tiny_llama / "config.json"):
        before = target.read_bytes()
        r = invoke("bench", tiny_llama, "--latency-table", target, "--bits", "4", "-q", code=1)
        assert r.output.count("\n") == 1 and target.read_bytes() == before


def test_bench_checkpoint_reports_speed_against_full_precision(tiny_llama, text_file, tmp_path):
    plan_path, ckpt = tmp_path / "plan.json", tmp_path / "ckpt"
    invoke("sensitivity", tiny_llama, "--calib", text_file, "--nsamples", 2, "--seqlen", 32, "--max-probes", 8,
           "-q", "-o", tmp_path / "s.json")
    invoke("allocate", tmp_path / "s.json", "--avg-bits", 4, "-q", "-o", plan_path)
    invoke("quantize", tiny_llama, "--plan", plan_path, "--calib", text_file, "--method", "rtn", "-q", "-o", ckpt)
    res = json.loads(invoke("bench", ckpt, "--prompt-tokens", 8, "--decode-tokens", 4, "--repeats", 2,
                            "--json").stdout)
    assert res["quantized"]["decode_tokens_per_s"] > 0 and res["full_precision"]["prefill_ms"] > 0
    assert len(res["layers"]) == len(json.loads(plan_path.read_text())["layers"])
    assert res["decode_speedup"] > 0 and res["peak_rss_bytes"] > 0
    text = invoke("bench", ckpt, "--prompt-tokens", 8, "--decode-tokens", 4, "--repeats", 2).output
    assert "prefill ms" in text and "slowest 12 of 14" in text and "×fp32" in text, text  # and the per-layer table
    assert "model.layers.0.self_attn" in text.replace("\n", "")  # names readable at 80 columns
    r = invoke("bench", tmp_path / "nope", code=1)
    assert "not a hawqtool checkpoint" in r.output


def test_five_and_six_bit_options_quantize_pack_and_run(sens, tiny_llama, text_file, tmp_path):
    """Widths between 4 and 8 (the 4-bit budget's v_proj choice, benchmarks/RESULTS.md) go through every stage:
    the plan uses them, the checkpoint stores them, and the packed model runs on the CPU kernels."""
    plan_path, ckpt = tmp_path / "plan.json", tmp_path / "ckpt"
    invoke("allocate", sens, "--model", tiny_llama, "--calib", text_file, "--bits", "2,3,4,5,6,8", "--group-size", 32,
           "--avg-bits", 5.5, "-q", "-o", plan_path)
    plan = json.loads(plan_path.read_text())
    assert {5, 6} & {lp["bits"] for lp in plan["layers"]}
    invoke("quantize", tiny_llama, "--plan", plan_path, "--calib", text_file, "--nsamples", 4, "--seqlen", 32,
           "-q", "-o", ckpt)
    manifest = json.loads((ckpt / "hawqtool_manifest.json").read_text())
    assert {lp["name"]: lp["bits"] for lp in plan["layers"]} == {n: m["bits"] for n, m in manifest["layers"].items()}
    res = json.loads(invoke("eval", ckpt, "--data", text_file, "--seqlen", 32, "--windows", 2, "--json").stdout)
    assert 1 < res["ppl"] < 1e4


def test_one_format_uniform_points_of_the_frontier_bench(sens, tmp_path):
    """scripts/bench_frontier.py's `--uniform 3g32` points: `allocate` with the options it passes gives every layer
    exactly that width and group size, and a plain width keeps the old within-budget meaning."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_frontier.py"
    spec = importlib.util.spec_from_file_location("bench_frontier", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.uniform_alloc_args("3") == ["--bits", "3", "--avg-bits", "3"]
    for token, (bits, group) in {"3g32": (3, 32), "2g64": (2, 64), "4g128": (4, 128)}.items():
        out = tmp_path / f"{token}.json"
        invoke("allocate", sens, "--group-sizes", "32,64,128", *bench.uniform_alloc_args(token), "-q", "-o", out)
        layers = json.loads(out.read_text())["layers"]
        assert {(lp["bits"], lp["group_size"]) for lp in layers} == {(bits, group)}, token
