"""End-to-end CLI on a tiny config-built Llama: every stage, resume, and bad input."""
from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import invoke, one_line_error
from hawqtool.options import SensitivityOptions

SMALL = ["--nsamples", "8", "--seqlen", "64"]


@pytest.fixture(scope="module")
def staged(tmp_path_factory, tiny_llama, text_file):
    """sensitivity -> allocate -> quantize through the CLI, once for the module."""
    d = tmp_path_factory.mktemp("stages")
    invoke("sensitivity", tiny_llama, "--calib", text_file, "-o", d / "sens.json", "--nsamples", 4,
           "--seqlen", 32, "--max-probes", 12, "-q")
    invoke("allocate", d / "sens.json", "--avg-bits", 3.0, "-o", d / "plan.json", "-q")
    invoke("quantize", tiny_llama, "--plan", d / "plan.json", "--calib", text_file, "-o", d / "ckpt", *SMALL, "-q")
    return d


def test_stages_write_their_artifacts(staged):
    sens = json.loads((staged / "sens.json").read_text())
    assert sens["kind"] == "sensitivity" and len(sens["layers"]) == 14  # 2 blocks x 7 linears
    assert all(ls["probes"] >= 8 and ls["stderr"] >= 0 for ls in sens["layers"])
    plan = json.loads((staged / "plan.json").read_text())
    assert plan["total_bytes"] <= plan["budget"]["max_bytes"] * (1 + 1e-9)
    manifest = json.loads((staged / "ckpt" / "hawqtool_manifest.json").read_text())
    assert set(manifest["layers"]) == {lp["name"] for lp in plan["layers"]}
    assert {lp["bits"] for lp in plan["layers"]} <= set(SensitivityOptions.bits)  # the widths offered by default
    assert all(m["method"] == "gptq" for m in manifest["layers"].values())
    assert not (staged / "ckpt.partial").exists()


def test_quantized_checkpoint_matches_fake_quantized_model(staged, tiny_llama):
    """load_quantized (packed weights through quant_kernels) == dequantized weights in a dense model."""
    from transformers import AutoModelForCausalLM

    from hawqtool.runtime import QuantLinear, load_quantized

    q = load_quantized(staged / "ckpt")
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager").eval()
    mods = dict(dense.named_modules())
    n = 0
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear):
            mods[name].weight.data.copy_(m.dequantized_weight())
            n += 1
    assert n == 14
    ids = torch.randint(0, dense.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = q(input_ids=ids).logits, dense(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_eval_reports_protocol(staged, text_file):
    res = invoke("eval", staged / "ckpt", "--data", text_file, "--seqlen", 64, "--windows", 3, "--json")
    d = json.loads(res.stdout)
    assert d["windows"] == 3 and d["tokens"] == 3 * 63 and d["ppl"] > 1


def test_run_chains_and_skips_current_stages(tmp_path, tiny_llama, text_file):
    args = ["run", tiny_llama, "--calib", text_file, "--data", text_file, "--avg-bits", 3.0, "-o", tmp_path / "out",
            *SMALL, "--sens-samples", 4, "--sens-seqlen", 32, "--max-probes", 8, "--eval-windows", 3,
            "--eval-seqlen", 64, "--json"]
    s = json.loads(invoke(*args).stdout)
    for key in ("baseline_ppl", "uniform_bits", "uniform_ppl", "uniform_bytes", "mixed_avg_bits", "mixed_ppl",
                "mixed_bytes", "eval_tokens", "stage_seconds", "peak_rss_bytes"):
        assert key in s
    assert s["uniform_bits"] == 3 and s["mixed_bytes"] <= s["uniform_bytes"] * (1 + 1e-9)
    assert s["eval_tokens"] == 3 * 63
    assert {"sensitivity", "quantize", "eval"} <= set(s["stage_seconds"])
    again = json.loads(invoke(*args).stdout)
    assert "sensitivity" not in again["stage_seconds"] and "quantize" not in again["stage_seconds"]
    assert again["mixed_ppl"] == s["mixed_ppl"]


def test_run_killed_in_its_first_stage_resumes_in_its_folder(tmp_path, tiny_llama, text_file, monkeypatch):
    """A run stopped during sensitivity (only the baseline's eval and the probes written) is still a hawqtool run
    folder: the re-run resumes there instead of refusing it as someone else's."""
    import hawqtool.run as run_mod

    args = ["run", tiny_llama, "--calib", text_file, "--data", text_file, "--avg-bits", 3.0, "-o", tmp_path / "out",
            *SMALL, "--sens-samples", 4, "--sens-seqlen", 32, "--max-probes", 4, "--eval-windows", 2,
            "--eval-seqlen", 64, "--no-uniform", "-q"]
    real = run_mod.compute_sensitivity

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "compute_sensitivity", killed)
    assert invoke(*args, ok=False).exit_code == 130
    assert (tmp_path / "out" / "eval_baseline.json").is_file() and not (tmp_path / "out" / "sensitivity.json").exists()
    monkeypatch.setattr(run_mod, "compute_sensitivity", real)
    invoke(*args)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["mixed_ppl"] > 1


def test_run_no_uniform_quantizes_once(tmp_path, tiny_llama, text_file):
    """--no-uniform (recipe `uniform: false`): only the mixed checkpoint is made and scored; the table and the
    summary say there is no uniform figure instead of failing or inventing one."""
    out = tmp_path / "out"
    res = invoke("run", tiny_llama, "--calib", text_file, "--data", text_file, "--avg-bits", 3.0, "-o", out, *SMALL,
                 "--sens-samples", 4, "--sens-seqlen", 32, "--max-probes", 8, "--eval-windows", 3,
                 "--eval-seqlen", 64, "--no-uniform")
    s = json.loads((out / "summary.json").read_text())
    assert s["uniform_ppl"] is None and s["mixed_ppl"] > 1 and s["seconds"]["uniform_quantize"] == 0.0
    assert (out / "mixed").is_dir() and not (out / "uniform").exists() and (out / "plan_uniform.json").is_file()
    rows = [ln for ln in res.output.splitlines() if ln.startswith("│")]  # the summary table: one quantized row
    assert any("(HAWQ)" in r for r in rows) and not any("uniform" in r for r in rows)


# ---- bad input: one line, exit code 1 ----

def test_labels_objective_and_batch_size_from_the_cli(tmp_path, tiny_llama, text_file):
    """Classic HAWQ (cross-entropy on the text's next tokens) runs from the CLI; --batch-size is recorded."""
    out = tmp_path / "s.json"
    invoke("sensitivity", tiny_llama, "--calib", text_file, "--objective", "labels", "--batch-size", 1,
           "--nsamples", 2, "--seqlen", 32, "--max-probes", 4, "-q", "-o", out)
    rep = json.loads(out.read_text())
    assert rep["objective"] == "labels" and rep["settings"]["batch_size"] == 1
    assert all(l["probes"] >= 2 for l in rep["layers"])
    one_line_error(invoke("sensitivity", tiny_llama, "--calib", text_file, "--batch-size", 0, ok=False),
                   "--batch-size")


def test_quantize_head_unties_it_and_keeps_the_embedding(tmp_path, tiny_llama, text_file):
    """--quantize-head: the tied lm_head gets its own quantized weight; the embedding stays the source's."""
    from transformers import AutoModelForCausalLM

    from hawqtool.runtime import QuantLinear, load_quantized

    sens, plan, ckpt = tmp_path / "s.json", tmp_path / "p.json", tmp_path / "ck"
    invoke("sensitivity", tiny_llama, "--calib", text_file, "--quantize-head", "--nsamples", 2, "--seqlen", 32,
           "--max-probes", 4, "-q", "-o", sens)
    rep = json.loads(sens.read_text())
    assert "lm_head" in [l["name"] for l in rep["layers"]] and rep["settings"]["untied_head"] == "lm_head"
    invoke("allocate", sens, "--avg-bits", 5, "--pin", "lm_head=8", "-q", "-o", plan)
    invoke("quantize", tiny_llama, "--plan", plan, "--calib", text_file, "-o", ckpt, *SMALL, "-q")
    model = load_quantized(ckpt)
    src = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8
    assert torch.equal(model.get_input_embeddings().weight, src.get_input_embeddings().weight)
    W = src.lm_head.weight
    assert (model.lm_head.dequantized_weight() - W).abs().max() <= W.abs().max() / 100  # 8-bit: close, not equal
    res = json.loads(invoke("eval", ckpt, "--data", text_file, "--seqlen", 32, "--windows", 2, "--json").stdout)
    assert res["ppl"] > 1


def test_missing_model_path(tmp_path, text_file):
    one_line_error(invoke("sensitivity", tmp_path / "nope", "--calib", text_file, ok=False), "does not exist")


def test_hub_id_while_offline(text_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(invoke("sensitivity", "no-such-org/no-such-model", "--calib", text_file, ok=False), "hub")


def test_empty_and_short_calibration(tmp_path, tiny_llama):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(invoke("sensitivity", tiny_llama, "--calib", empty, ok=False), "empty")
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    one_line_error(invoke("sensitivity", tiny_llama, "--calib", short, ok=False), "fewer than one window")


def test_budget_below_smallest_plan(staged, tmp_path):
    one_line_error(invoke("allocate", staged / "sens.json", "--avg-bits", 1.5, "-o", tmp_path / "p.json", ok=False),
                   "--avg-bits 2")
    res = invoke("allocate", staged / "sens.json", "--max-bytes", 10, "-o", tmp_path / "p.json", ok=False)
    one_line_error(res, "--max-bytes")
    assert not (tmp_path / "p.json").exists()


def test_plan_that_does_not_match_model(staged, tmp_path, tiny_llama, text_file):
    plan = json.loads((staged / "plan.json").read_text())
    plan["layers"][0]["name"] = "model.layers.9.mlp.nothing"
    bad = tmp_path / "bad_plan.json"
    bad.write_text(json.dumps(plan))
    res = invoke("quantize", tiny_llama, "--plan", bad, "--calib", text_file, "-o", tmp_path / "c", *SMALL, ok=False)
    one_line_error(res, "plan does not match")


def test_corrupted_checkpoint(staged, tmp_path, text_file):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(staged / "ckpt", ck)
    raw = bytearray((ck / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (ck / "model.safetensors").write_bytes(bytes(raw))
    one_line_error(invoke("eval", ck, "--data", text_file, "--seqlen", 64, ok=False), "corrupt")


def test_interrupted_quantize_leaves_no_checkpoint_and_resumes(staged, tmp_path, tiny_llama, text_file):
    """Ctrl-C after the first block: nothing under the output name; the re-run resumes and
    produces the same packed tensors as an uninterrupted run."""
    from safetensors.torch import load_file

    from hawqtool import artifacts
    from hawqtool.data import calibration_windows
    from hawqtool.models import load_model
    from hawqtool.quantize.driver import QuantizeOptions
    from hawqtool.stages import quantize_stage

    plan = artifacts.load(staged / "plan.json", "plan")
    out = tmp_path / "ckpt"
    calls = {"n": 0}

    def interrupt_in_block_two(_name):
        calls["n"] += 1
        if calls["n"] == 9:  # 7 layers per block: the first block is finished and saved
            raise KeyboardInterrupt

    loaded = load_model(str(tiny_llama))
    ids = calibration_windows(loaded.tokenizer, str(text_file), 8, 64)
    with pytest.raises(KeyboardInterrupt):
        quantize_stage(loaded, plan, ids, QuantizeOptions(), out, progress=interrupt_in_block_two)
    assert not out.exists() and (tmp_path / "ckpt.partial" / "block_0000.json").exists()
    resumed = []
    quantize_stage(load_model(str(tiny_llama)), plan, ids, QuantizeOptions(), out, progress=resumed.append)
    assert len(resumed) == 7  # only the second block was quantized again
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(staged / "ckpt" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sensitivity_with_fisher_estimator(tmp_path, tiny_llama, text_file):
    res = invoke("sensitivity", tiny_llama, "--calib", text_file, "-o", tmp_path / "s.json", "--nsamples", 2,
                 "--seqlen", 32, "--estimator", "fisher", "--min-probes", 2, "--max-probes", 4)
    assert "sensitivity probe 1/4" in res.stderr  # not a terminal: plain progress lines for batch logs
    sens = json.loads((tmp_path / "s.json").read_text())
    assert sens["estimator"].startswith("fisher") and all(ls["trace"] >= 0 for ls in sens["layers"])
