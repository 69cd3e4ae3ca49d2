"""A timm model through the sensitivity and allocate stages from the CLI (BatchNorm folded, conv layers)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import hawqtool  # noqa: F401 - declares torchvision's op schemas before timm imports it
from hawqtool.cli import main

timm = pytest.importorskip("timm")


def invoke(*args, code: int = 0):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


@pytest.fixture(scope="module")
def small_timm(tmp_path_factory):
    from safetensors.torch import save_file

    model = timm.create_model("mobilenetv3_small_050", pretrained=False)
    path = tmp_path_factory.mktemp("timm") / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"timm:mobilenetv3_small_050:{path}"


def test_sensitivity_and_bops_allocation_on_a_timm_model(small_timm, tmp_path):
    sens, plan = tmp_path / "s.json", tmp_path / "p.json"
    invoke("sensitivity", small_timm, "--calib", "images", "--nsamples", 4, "--batch-size", 4, "--min-probes", 3,
           "--max-probes", 3, "-q", "-o", sens)
    rep = json.loads(sens.read_text())
    names = [l["name"] for l in rep["layers"]]
    assert "conv_stem" in names and any(".conv_dw" in n for n in names)  # convolutions, depthwise included
    assert all(l["probes"] == 3 for l in rep["layers"]) and rep["settings"]["estimator"] == "fisher"
    invoke("allocate", sens, "--avg-bits", 4, "--group-size", -1, "--act-bits", "8,16", "--bops-frac", 0.3,
           "--calib", "images", "-q", "-o", plan)
    p = json.loads(plan.read_text())
    assert p["costs"]["bops"] <= p["budget"]["max_bops"] * (1 + 1e-9)
    prof = json.loads(sens.with_suffix(".profile.json").read_text())
    assert all(v["unit"] == "image" and v["macs"] > 0 for v in prof["layers"].values())


def test_vision_references_fail_in_one_line(tmp_path):
    r = invoke("sensitivity", "timm:mobilenetv3_small_050", "-q", code=1)
    assert "give the weights too" in r.output and r.output.count("\n") == 1
    r = invoke("sensitivity", f"timm:mobilenetv3_small_050:{tmp_path / 'none.safetensors'}", "-q", code=1)
    assert "does not exist" in r.output
    r = invoke("sensitivity", "timm:no_such_net:x.safetensors", "-q", code=1)
    assert "unknown timm model" in r.output
