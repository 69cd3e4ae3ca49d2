"""The default storage formats (2026-12-06): the sensitivity report measures groups of 32, 64 and 128 and, where they
save bytes, 6-bit scale codes; `allocate` offers what the report measured, so it needs no model for them; --avg-bits
B stays the bytes of uniform B-bit at the coarsest group size with fp16 scales."""
from __future__ import annotations

import json

import pytest

from cli_helpers import invoke, one_line_error

from hawqtool.artifacts import qerror_key
from hawqtool.quantize.quantizer import QuantSpec
from hawqtool.quantize.scale_codes import added_error


@pytest.fixture(scope="module")
def reports(tmp_path_factory, tiny_llama, text_file):
    d = tmp_path_factory.mktemp("formats")
    common = ["--calib", text_file, "--nsamples", 4, "--seqlen", 32, "--max-probes", 8, "-q"]
    invoke("sensitivity", tiny_llama, "-o", d / "default.json", *common)
    invoke("sensitivity", tiny_llama, "-o", d / "g128.json", "--group-size", 128, "--scale-bits", 16, *common)
    return d


def test_the_report_records_coded_errors_as_the_allocator_prices_them(reports, tiny_llama):
    from hawqtool.models import load_model
    from hawqtool.stages import layer_weights

    rep = json.loads((reports / "default.json").read_text())
    assert rep["settings"]["qerror_groups"] == [32, 64, 128] and rep["settings"]["qerror_scale_bits"] == 6
    weights = layer_weights(load_model(str(tiny_llama)))
    coded = 0
    for ls in rep["layers"]:
        W = weights[ls["name"]]
        for b in (2, 3, 4, 8):
            for g in (32, 64, 128):
                spec = QuantSpec(b, g, False, scale_bits=6).for_rows(W.shape[1])
                key = qerror_key(b, g, False, 6)
                if spec.scale_bits == 16:  # one group per row: a code and a step would cost more than one fp16 scale
                    assert key not in ls["qerror"]
                    continue
                fp16 = ls["qerror"][qerror_key(b, g, False)]
                assert ls["qerror"][key] == pytest.approx(fp16 * added_error(W, spec), rel=1e-12)
                coded += 1
    assert coded > 0
    assert "qerror_scale_bits" not in json.loads((reports / "g128.json").read_text())["settings"]


def test_allocate_offers_what_the_report_measured_without_the_model(reports, tmp_path):
    rep = json.loads((reports / "default.json").read_text())
    rep["model"] = str(tmp_path / "gone")  # the report alone must do: every coded error is in it
    (tmp_path / "sens.json").write_text(json.dumps(rep))
    invoke("allocate", tmp_path / "sens.json", "--avg-bits", 3, "-o", tmp_path / "p.json", "-q")
    plan = json.loads((tmp_path / "p.json").read_text())
    assert {lp["group_size"] for lp in plan["layers"]} <= {32, 64, 128}
    assert all(o.endswith("s6") for o in plan["options"])  # codes offered; kept wherever they save bytes
    width = {ls["name"]: ls["shape"][1] for ls in rep["layers"]}
    assert all(lp["scale_bits"] == (6 if -(-width[lp["name"]] // lp["group_size"]) * 10 > 16 else 16)
               for lp in plan["layers"])
    # the budget: uniform 3-bit at the coarsest group offered, fp16 scales, as the g128 report's plan has
    invoke("allocate", reports / "g128.json", "--avg-bits", 3, "-o", tmp_path / "old.json", "-q")
    old = json.loads((tmp_path / "old.json").read_text())
    assert all((lp["group_size"], lp["scale_bits"]) == (128, 16) for lp in old["layers"])
    assert plan["budget"]["max_bytes"] == pytest.approx(old["budget"]["max_bytes"], rel=1e-12)
    assert plan["total_bytes"] <= plan["budget"]["max_bytes"] * (1 + 1e-9)
    # one group size and fp16 scales on request, from the same report
    invoke("allocate", reports / "default.json", "--avg-bits", 3, "--group-size", 128, "--scale-bits", 16,
           "-o", tmp_path / "one.json", "-q")
    one = json.loads((tmp_path / "one.json").read_text())
    assert [lp["bits"] for lp in one["layers"]] == [lp["bits"] for lp in old["layers"]]


def test_recipes_take_a_null_group_size_and_check_scale_bits(tmp_path):
    from hawqtool.recipe import load_recipe

    (tmp_path / "ok.yaml").write_text("group_size: null\nallocate: {scale_bits: 16}\n")
    assert load_recipe(tmp_path / "ok.yaml") == {"group_size": None, "allocate": {"scale_bits": 16}}
    for text, words in (("group_size: 0\n", "group_size"), ("allocate: {scale_bits: 3}\n", "scale_bits")):
        (tmp_path / "bad.yaml").write_text(text)
        one_line_error(invoke("run", tmp_path / "bad.yaml", "-o", tmp_path / "out", ok=False), words)
