"""`hawqtool quantize --method aphq` end to end on a tiny BERT: checkpoint, manifest, reload, eval, refusals."""
from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from torch import nn

from hawqtool.cli import main
from hawqtool.runtime import load_quantized
from test_encoder import tiny_bert  # noqa: F401 - fixture


def test_aphq_checkpoint_of_an_encoder_loads_with_its_relus_and_ranges(tiny_bert, text_file, tmp_path):  # noqa: F811
    run = CliRunner().invoke
    sens, plan, ckpt = tmp_path / "s.json", tmp_path / "p.json", tmp_path / "ckpt"
    r = run(main, ["sensitivity", str(tiny_bert), "--calib", str(text_file), "--objective", "output-mse",
                   "--nsamples", "4", "--seqlen", "32", "--max-probes", "8", "-q", "-o", str(sens)])
    assert r.exit_code == 0, r.output
    r = run(main, ["allocate", str(sens), "--bops-frac", "0.2", "--bits", "4,8", "--act-bits", "8,16", "--pairs", "4:8",
                   "--group-size", "32", "--scale-bits", "16", "--calib", str(text_file), "-q", "-o", str(plan)])
    assert r.exit_code == 0, r.output
    planned = json.loads(plan.read_text())["layers"]
    assert any(lp["act_bits"] == 8 for lp in planned)
    r = run(main, ["quantize", str(tiny_bert), "--plan", str(plan), "--calib", str(text_file), "--nsamples", "8",
                   "--seqlen", "32", "--method", "aphq", "--aphq-iters", "20", "-q", "-o", str(ckpt)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((ckpt / "hawqtool_manifest.json").read_text())
    assert manifest["method"] == "aphq" and manifest["act_fn"]  # every block's GELU became a clamped ReLU
    assert len(manifest["aphq"]["blocks"]) == 2
    a8 = [n for n, m in manifest["layers"].items() if m["act_bits"] == 8]
    assert a8 and all(manifest["layers"][n]["act_mode"] == "static" and manifest["layers"][n]["act_scale"] > 0
                      for n in a8)
    model = load_quantized(ckpt)
    for name, clip in manifest["act_fn"].items():
        m = model.get_submodule(name)
        assert isinstance(m, nn.Hardtanh) and m.min_val == 0.0 and m.max_val == clip
    r = run(main, ["eval", str(ckpt), "--data", str(text_file), "--seqlen", "32", "--windows", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert 0.0 < json.loads(r.output)["cosine"] <= 1.0


def test_aphq_checkpoint_with_a_bad_act_fn_is_refused(tiny_bert, text_file, tmp_path):  # noqa: F811
    from hawqtool.checkpoint import MANIFEST

    run = CliRunner().invoke
    sens, plan, ckpt = tmp_path / "s.json", tmp_path / "p.json", tmp_path / "ckpt"
    assert run(main, ["sensitivity", str(tiny_bert), "--calib", str(text_file), "--objective", "output-mse",
                      "--nsamples", "4", "--seqlen", "32", "--max-probes", "8", "-q", "-o", str(sens)]).exit_code == 0
    quantize = ["quantize", str(tiny_bert), "--plan", str(plan), "--calib", str(text_file), "--nsamples", "4",
                "--seqlen", "32", "--method", "aphq", "--aphq-iters", "5", "--no-aphq-mlp-relu", "-q", "-o", str(ckpt)]
    # groups of 32: output.dense (64 inputs) has two per row, so its scales are stored as codes
    assert run(main, ["allocate", str(sens), "--avg-bits", "4", "--group-size", "32", "-q", "-o", str(plan)]).exit_code == 0
    assert any(lp["scale_bits"] != 16 for lp in json.loads(plan.read_text())["layers"])
    r = run(main, quantize)  # allocate's default stores scale codes, which APHQ does not learn: one line, the fix
    assert r.exit_code == 1 and "allocate --scale-bits 16" in r.output and "Traceback" not in r.output
    assert run(main, ["allocate", str(sens), "--avg-bits", "4", "--scale-bits", "16", "-q", "-o", str(plan)]).exit_code == 0
    assert run(main, quantize).exit_code == 0
    m = json.loads((ckpt / MANIFEST).read_text())
    assert m["act_fn"] == {}
    m["act_fn"] = {"encoder.layer.0.attention.self.query": 3.0}  # not a GELU
    (ckpt / MANIFEST).write_text(json.dumps(m))
    r = run(main, ["eval", str(ckpt), "--data", str(text_file), "--seqlen", "32", "--windows", "2"])
    assert r.exit_code == 1 and "not a GELU" in r.output and "Traceback" not in r.output


def test_aphq_refuses_causal_lms(tiny_llama, text_file, tmp_path):
    run = CliRunner().invoke
    plan = tmp_path / "p.json"
    sens = tmp_path / "s.json"
    assert run(main, ["sensitivity", str(tiny_llama), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                      "--max-probes", "4", "-q", "-o", str(sens)]).exit_code == 0
    assert run(main, ["allocate", str(sens), "--avg-bits", "4", "-q", "-o", str(plan)]).exit_code == 0
    r = run(main, ["quantize", str(tiny_llama), "--plan", str(plan), "--calib", str(text_file), "--nsamples", "4",
                   "--seqlen", "32", "--method", "aphq", "-o", str(tmp_path / "ck")])
    assert r.exit_code == 1 and "--method gptq" in r.output
