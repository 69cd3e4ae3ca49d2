"""The GGUF path end to end through the CLI on a tiny Llama: sensitivity --formats, allocate --formats,
quantize (GPTQ onto the planned ggml grids), eval of the checkpoint, export --format gguf, and `run --formats`."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from cli_helpers import invoke, one_line_error
from conftest import make_tiny_llama
from hawqtool.checkpoint import MANIFEST, WEIGHTS
from hawqtool.loader import load_quantized

SMALL = ["--nsamples", "4", "--seqlen", "64"]


@pytest.fixture(scope="module")
def llama256(tmp_path_factory, corpus_text):
    """Hidden 256, MLP 512: q/k/v/o/gate/up rows of 256 (K-quants fit), down_proj rows of 512."""
    return make_tiny_llama(tmp_path_factory.mktemp("llama256"), corpus_text, hidden=256, layers=2)


@pytest.fixture(scope="module")
def staged(tmp_path_factory, llama256, text_file):
    d = tmp_path_factory.mktemp("ggml_stages")
    invoke("sensitivity", llama256, "--calib", text_file, "--nsamples", 4, "--seqlen", 32, "--max-probes", 4,
           "--formats", "gguf", "-o", d / "sens.json")
    invoke("allocate", d / "sens.json", "--formats", "gguf", "--avg-bits", 4.6, "-o", d / "plan.json")
    invoke("quantize", llama256, "--plan", d / "plan.json", "--calib", text_file, *SMALL, "-o", d / "ckpt")
    return d


def test_plan_checkpoint_and_eval(staged, llama256, text_file):
    sens = json.loads((staged / "sens.json").read_text())
    assert sens["settings"]["qerror_formats"][0] == "Q2_K"
    assert all("Q4_K" in ls["qerror"] and "Q4_0" in ls["qerror"] for ls in sens["layers"])
    plan = json.loads((staged / "plan.json").read_text())
    types = {lp["name"]: lp["ggml_type"] for lp in plan["layers"]}
    assert all(types.values()) and len(set(types.values())) > 1  # a mix of ggml types
    assert plan["avg_bits"] <= 4.6 + 1e-9
    manifest = json.loads((staged / "ckpt" / MANIFEST).read_text())
    assert {n: m["ggml_type"] for n, m in manifest["layers"].items()} == types
    assert all(m["method"] == "gptq" and m["error"] < m["rtn_error"] for m in manifest["layers"].values())
    model = load_quantized(staged / "ckpt")  # dense Linear layers holding the exact dequantized weights
    from safetensors.torch import load_file

    from hawqtool.quantize.quantizer import QuantSpec, ggml_from_bytes

    t = load_file(str(staged / "ckpt" / WEIGHTS))
    for name, fmt in types.items():
        W = model.get_submodule(name).weight
        qw = ggml_from_bytes(t[f"{name}.ggml"], QuantSpec.for_ggml(fmt), W.shape[1])
        assert torch.equal(W, qw.dequantize())
    res = json.loads(invoke("eval", staged / "ckpt", "--data", text_file, "--seqlen", 64, "--windows", 2,
                            "--json").stdout)
    assert np.isfinite(res["ppl"]) and res["sizes"]["linear_bits_per_weight"] == pytest.approx(plan["avg_bits"])


def test_streamed_eval_of_ggml_layers_is_refused(staged, text_file, caplog):
    """ggml layers load as dequantized dense Linear layers, whole: --offload says so in one line."""
    one_line_error(invoke("eval", staged / "ckpt", "--data", text_file, "--offload", ok=False), "ggml", "--offload")
    # where streaming would only be chosen by a memory limit, it is loaded whole, with a warning that says so
    res = invoke("eval", staged / "ckpt", "--data", text_file, "--seqlen", 64, "--windows", 2, "--max-memory", 1000,
                 "--json")
    assert np.isfinite(json.loads(res.stdout)["ppl"]) and "ggml" in caplog.text and "loaded whole" in caplog.text


def test_export_gguf_holds_the_checkpoint_bytes(staged, tmp_path):
    out = tmp_path / "m.gguf"
    invoke("export", staged / "ckpt", "--format", "gguf", "-o", out)
    reader = gguf.GGUFReader(str(out))
    manifest = json.loads((staged / "ckpt" / MANIFEST).read_text())
    from safetensors.torch import load_file

    t = load_file(str(staged / "ckpt" / WEIGHTS))
    by_name = {x.name: x for x in reader.tensors}
    for name, m in manifest["layers"].items():
        block, rest = name.split(".layers.")[1].split(".", 1)
        gname = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}[rest]
        g = by_name[f"blk.{block}.{gname}.weight"]
        assert g.tensor_type.name == m["ggml_type"]
        mine = t[f"{name}.ggml"].numpy()
        if gname in ("attn_q", "attn_k"):  # rows permuted for llama.cpp's rotary layout: same multiset of rows
            assert sorted(map(bytes, np.asarray(g.data).reshape(mine.shape))) == sorted(map(bytes, mine))
        else:
            assert np.array_equal(np.asarray(g.data).reshape(mine.shape), mine)
    for fmt in ("gptq", "compressed-tensors"):
        one_line_error(invoke("export", staged / "ckpt", "--format", fmt, "-o", tmp_path / fmt, ok=False),
                       "--format gguf")


def test_run_formats_and_refusals(llama256, text_file, tmp_path):
    args = ["run", llama256, "--calib", text_file, "--data", text_file, *SMALL, "--sens-samples", 4,
            "--sens-seqlen", 32, "--max-probes", 4, "--eval-windows", 2, "--eval-seqlen", 64, "--json"]
    s = json.loads(invoke(*args, "--formats", "Q4_0,Q4_K,Q8_0", "--avg-bits", 6.0, "-o", tmp_path / "r").stdout)
    assert s["formats"] == ["Q4_0", "Q4_K", "Q8_0"] and s["mixed_avg_bits"] <= 6.0 + 1e-9
    assert s["uniform_bits"] in ("Q4_0", "Q4_K")  # the largest single types within 6 bits (both 4.5)
    u = json.loads((tmp_path / "r" / "plan_uniform.json").read_text())
    assert {lp["ggml_type"] for lp in u["layers"]} == {s["uniform_bits"]}
    assert np.isfinite(s["mixed_ppl"]) and np.isfinite(s["uniform_ppl"])
    # streamed: every stage runs block by block, the ggml checkpoints (no streamed form) are scored whole
    o = json.loads(invoke(*args, "--formats", "Q4_0,Q4_K,Q8_0", "--avg-bits", 6.0, "--offload", "-o",
                          tmp_path / "r_off").stdout)
    assert o["offload"] is True and o["mixed_ppl"] == pytest.approx(s["mixed_ppl"], rel=1e-5)
    one_line_error(invoke("run", llama256, "--formats", "gguf", "--embed-bits", 8, "-o", tmp_path / "r3", ok=False),
                   "--embed-bits")
    one_line_error(invoke("allocate", tmp_path / "r" / "sensitivity.json", "--formats", "Q4_K,Q8_0", "--sweep",
                          "--avg-bits", 5, "-o", tmp_path / "p.json", ok=False), "--sweep")
    assert not (tmp_path / "r3").exists() and not (tmp_path / "p.json").exists()
