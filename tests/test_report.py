"""Sensitivity report: Markdown + self-contained HTML from a synthetic report, and the `report` command."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from hawqtool import artifacts
from hawqtool.artifacts import LayerPlan, LayerSensitivity, Plan, SensitivityReport, qerror_key
from hawqtool.cli import main
from hawqtool.report import short_names, write_sensitivity_report

NEGATIVE = {"model.layers.1.mlp.up_proj", "model.layers.2.self_attn.v_proj"}
NOISY = "model.layers.0.self_attn.q_proj"  # rel. s.e. 50% > target 10%


def synthetic_report() -> SensitivityReport:
    """12 layers in 3 blocks, two negative traces, one noisy layer, qerror for 2/3/4/8-bit at group 128 asym."""
    layers = []
    for i, name in enumerate(f"model.layers.{b}.{m}" for b in range(3)
                             for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")):
        n = 64 * 64 * (1 + i % 3)
        trace = -0.3 * (i + 1) if name in NEGATIVE else 10.0 ** (i % 5 - 1)
        stderr = 0.5 * abs(trace) if name in NOISY or name in NEGATIVE else 0.04 * abs(trace)
        samples = [trace + stderr * s for s in (-1.5, -0.5, 0.5, 1.5)]
        qerror = {qerror_key(b, 128, False): n * 4.0 ** -b for b in (2, 3, 4, 8)}
        layers.append(LayerSensitivity(name=name, shape=[64, 64 * (1 + i % 3)], n_params=n, trace=trace,
                                       stderr=stderr, probes=16, samples=samples, qerror=qerror))
    settings = dict(objective="self-kl", target_rel_se=0.10, min_probes=8, max_probes=32, seed=0)
    return SensitivityReport(model="tiny/synthetic", objective="self-kl", estimator="hutchinson (autograd)",
                             settings=settings, layers=layers, seconds=12.5, fingerprint="abc")  # not reported


def synthetic_plan(report: SensitivityReport) -> Plan:
    """A plan giving 2/3/4/8 bits in turn, with Ω from the report's qerror."""
    layers = []
    for i, ls in enumerate(report.layers):
        bits = (2, 3, 4, 8)[i % 4]
        layers.append(LayerPlan(name=ls.name, bits=bits, group_size=128, symmetric=False, n_params=ls.n_params,
                                storage_bytes=ls.n_params * bits / 8,
                                omega=max(ls.trace, 0) / ls.n_params * ls.qerror[qerror_key(bits, 128, False)]))
    total = sum(lp.storage_bytes for lp in layers)
    return Plan(model=report.model, budget={"kind": "avg_bits", "value": 4.0, "max_bytes": total},
                bit_choices=[2, 3, 4, 8], group_size=128, symmetric=False, layers=layers,
                avg_bits=8 * total / sum(lp.n_params for lp in layers), total_bytes=total,
                predicted_omega=sum(lp.omega for lp in layers), solve_seconds=0.01)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[dict[str, Path], SensitivityReport]:
    report = synthetic_report()
    return write_sensitivity_report(report, tmp_path_factory.mktemp("rep"), synthetic_plan(report)), report


def test_files_are_written_and_html_is_self_contained(written):
    paths, _ = written
    assert set(paths) == {"markdown", "html"} and all(p.is_file() for p in paths.values())
    page = paths["html"].read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 5  # trace, trace/param, Ω, probes, bits
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "<script" not in page
    assert not list(paths["html"].parent.glob(".*tmp*"))  # atomic writes left no temporaries


def test_markdown_lists_top_layers_nonconverged_and_negative(written):
    paths, report = written
    md = paths["markdown"].read_text(encoding="utf-8")
    for word in ("tiny/synthetic", "self-kl", "hutchinson (autograd)", "target_rel_se=0.1"):
        assert word in md
    assert "12.5" not in md  # the stage's seconds: the same inputs give the same report bytes
    conv = md.split("## Did not converge")[1].split("## ")[0]
    assert f"`{NOISY}`" in conv and all(f"`{n}`" in conv for n in NEGATIVE)
    assert "`model.layers.0.self_attn.v_proj`" not in conv  # 4% rel. s.e. converged
    neg = md.split("## Negative mean trace")[1]
    assert all(f"`{n}`" in neg for n in NEGATIVE) and neg.count("[") == len(NEGATIVE)
    top = md.split("## Most sensitive")[1].split("## ")[0]
    assert top.count("\n| `") == 12  # all 12 layers (≤ 20)
    html_text = paths["html"].read_text(encoding="utf-8")
    assert f"<code>{NOISY}</code>" in html_text and "Negative mean trace" in html_text


def test_short_names_drop_the_shared_prefix():
    assert short_names(["model.layers.0.mlp.up_proj", "model.layers.11.self_attn.q_proj"]) == [
        "0.mlp.up_proj", "11.self_attn.q_proj"]


def test_cli_report_writes_to_output_folder(tmp_path):
    report = synthetic_report()
    artifacts.save(report, tmp_path / "sens.json")
    artifacts.save(synthetic_plan(report), tmp_path / "plan.json")
    res = CliRunner().invoke(main, ["report", str(tmp_path / "sens.json"), "--plan", str(tmp_path / "plan.json"),
                                    "-o", str(tmp_path / "out"), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, (res.output, res.stderr)
    paths = json.loads(res.stdout)
    assert {Path(p).parent for p in paths.values()} == {tmp_path / "out"}
    assert all(Path(p).is_file() for p in paths.values())


def test_cli_report_defaults_to_json_folder(tmp_path):
    artifacts.save(synthetic_report(), tmp_path / "sens.json")
    res = CliRunner().invoke(main, ["report", str(tmp_path / "sens.json")], catch_exceptions=False)
    assert res.exit_code == 0, (res.output, res.stderr)
    assert (tmp_path / "sensitivity.html").is_file() and (tmp_path / "sensitivity.md").is_file()
    assert "sensitivity.html" in res.stderr and "trace/param" in res.stderr


@pytest.mark.parametrize("content", ['{"kind": "sensitivity", "layers": [', None])
def test_cli_report_bad_input_is_one_line(tmp_path, content):
    path = tmp_path / "sens.json"
    if content is not None:
        path.write_text(content)
    res = CliRunner().invoke(main, ["report", str(path)], catch_exceptions=False)
    assert res.exit_code == 1, (res.exit_code, res.output)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output


def test_omega_plot_follows_a_multi_format_plan():
    """A plan over groups 32/128 with 6-bit scale codes: the Ω lines are at the format most of its layers use
    (g32 with codes, not the first key found), and every layer's choice is marked at its own format."""
    from hawqtool.report import omega_plot, omega_setting

    report = synthetic_report()
    for ls in report.layers:
        for b in (2, 3, 4, 8):
            for g, f in ((32, 0.5), (128, 1.0)):
                ls.qerror[qerror_key(b, g, False, 6)] = f * 1.01 * ls.n_params * 4.0 ** -b
    plan = synthetic_plan(report)
    for i, lp in enumerate(plan.layers):
        lp.group_size, lp.scale_bits = (128, 6) if i % 3 == 0 else (32, 6)
        lp.omega = max(report.layers[i].trace, 0) / lp.n_params * \
            report.layers[i].qerror[qerror_key(lp.bits, lp.group_size, False, 6)]
    assert omega_setting(report, plan) == (32, False, 6, [2, 3, 4, 8])
    assert omega_setting(report, None)[:3] in {(128, False, 16), (32, False, 6), (128, False, 6)}
    ax = omega_plot(report, plan).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "plan's choice (g32 asym s6)" in labels and "plan's choice (g128 asym s6)" in labels
    assert "g32 asym s6" in ax.get_title()
    marked = {lab: line for line, lab in zip(*ax.get_legend_handles_labels())}
    positive = [i for i, ls in enumerate(report.layers) if ls.trace > 0]
    assert len(marked["plan's choice (g32 asym s6)"].get_xdata()) + \
        len(marked["plan's choice (g128 asym s6)"].get_xdata()) == len(positive)
    from hawqtool.report import sections

    summary = "\n".join(sections(report, plan)[0].lines)
    # layers i % 4 give the width, i % 3 == 0 the g128 ones: 0, 4, 8 are 2-bit; 3 is 8-bit; 6 is 3-bit; 9 is 4-bit
    assert ("layers per format: 2-bit g32 asym s6 2, 2-bit g128 asym s6 1, 3-bit g32 asym s6 2, 3-bit g128 asym s6 1, "
            "4-bit g32 asym s6 2, 4-bit g128 asym s6 1, 8-bit g32 asym s6 2, 8-bit g128 asym s6 1") in summary
    assert "layers per format" not in "\n".join(sections(report, synthetic_plan(report))[0].lines)  # one format
