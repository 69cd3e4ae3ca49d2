"""Encoders (BERT-style, like all-MiniLM-L6-v2) go through every stage; eval scores embedding cosine."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli_helpers import invoke, one_line_error

from hawqtool.cli import main
from hawqtool.data import with_special_tokens
from hawqtool.evaluate import embedding_fidelity
from hawqtool.models import load_model


def make_tiny_bert(folder: Path, corpus: str, *, vocab: int = 300, hidden: int = 32, layers: int = 2) -> Path:
    """Randomly initialised tiny BertModel + a WordPiece tokenizer with [CLS]/[SEP], trained on `corpus`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([corpus[i:i + 2000] for i in range(0, len(corpus), 2000)],
                           trainers.WordPieceTrainer(vocab_size=vocab,
                                                     special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=4, max_position_embeddings=128, architectures=["BertModel"])
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, corpus_text) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), corpus_text)


def test_encoder_loads_as_encoder(tiny_bert):
    loaded = load_model(str(tiny_bert))
    assert loaded.task == "encoder"
    assert type(loaded.model).__name__ == "BertModel"
    assert type(load_model(tiny_bert).model).__name__ == "BertModel"  # a pathlib.Path works too


def test_special_tokens_wrap_windows(tiny_bert):
    tok = load_model(str(tiny_bert)).tokenizer
    w = torch.arange(20).view(2, 10) + 10
    out = with_special_tokens(w, tok)
    assert out.shape == w.shape
    assert (out[:, 0] == tok.cls_token_id).all() and (out[:, -1] == tok.sep_token_id).all()
    assert torch.equal(out[:, 1:-1], w[:, :-2])


def test_fidelity_is_one_against_itself_and_drops_with_noise(tiny_bert):
    model = load_model(str(tiny_bert)).model
    ids = torch.randint(5, 200, (6, 16), generator=torch.Generator().manual_seed(0))
    assert embedding_fidelity(model, model, ids, batch_size=4).cosine == pytest.approx(1.0, abs=1e-9)
    noisy = load_model(str(tiny_bert)).model
    with torch.no_grad():
        for p in noisy.encoder.parameters():
            p.add_(0.5 * torch.randn_like(p))
    r = embedding_fidelity(model, noisy, ids, batch_size=4)
    assert r.cosine < 0.999 and r.cosine_min <= r.cosine and r.windows == 6


def test_encoder_pipeline_through_cli(tiny_bert, text_file, tmp_path, caplog):
    run = CliRunner().invoke
    sens, plan, ckpt = tmp_path / "s.json", tmp_path / "p.json", tmp_path / "ckpt"
    r = run(main, ["sensitivity", str(tiny_bert), "--calib", str(text_file), "--objective", "output-mse",
                   "--nsamples", "4", "--seqlen", "32", "--max-probes", "8", "-q", "-o", str(sens)])
    assert r.exit_code == 0, r.output
    r = run(main, ["allocate", str(sens), "--avg-bits", "4", "-q", "-o", str(plan), "--group-size", "32"])
    assert r.exit_code == 0, r.output
    r = run(main, ["quantize", str(tiny_bert), "--plan", str(plan), "--calib", str(text_file), "--nsamples", "4",
                   "--seqlen", "32", "-q", "-o", str(ckpt)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((ckpt / "hawqtool_manifest.json").read_text())
    assert manifest["options"]["first_token_weight"] == 1.0  # no attention-sink weighting for encoders
    r = run(main, ["eval", str(ckpt), "--data", str(text_file), "--seqlen", "32", "--windows", "8", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["task"] == "encoder" and res["windows"] == 8
    assert 0.5 < res["cosine"] < 1.0  # 4-bit changes the embeddings a little, not completely
    # an encoder checkpoint has no streamed form: --offload is refused in one line; a memory limit that would
    # stream it loads it whole, saying so, and scores the same
    args = ("eval", ckpt, "--data", text_file, "--seqlen", 32, "--windows", 8, "--json")
    one_line_error(invoke(*args, "--offload", ok=False), "encoder", "--offload")
    limited = invoke(*args, "--max-memory", 1000)
    assert json.loads(limited.stdout)["cosine"] == res["cosine"] and "loaded whole" in caplog.text  # CLI: stderr


def test_run_on_an_encoder(tiny_bert, text_file, tmp_path):
    """`run` on an encoder: pooled-cosine sensitivity, no attention-sink weighting, and the mixed and uniform checkpoints
    scored by embedding cosine; the run's score equals `hawqtool eval` of its checkpoint on the same windows."""
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["run", str(tiny_bert), "--calib", str(text_file), "--data", str(text_file),
                                  "--avg-bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "32",
                                  "--sens-samples", "4", "--sens-seqlen", "32", "--max-probes", "4",
                                  "--eval-windows", "6", "--eval-seqlen", "32", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["task"] == "encoder" and "baseline_ppl" not in s
    assert 0.5 < s["mixed_cosine"] < 1.0 and 0.5 < s["uniform_cosine"] < 1.0
    assert s["mixed_cosine_min"] <= s["mixed_cosine"]
    assert json.loads((out / "sensitivity.json").read_text())["objective"] == "pooled-cosine"
    assert json.loads((out / "mixed" / "hawqtool_manifest.json").read_text())["options"]["first_token_weight"] == 1.0
    e = CliRunner().invoke(main, ["eval", str(out / "mixed"), "--data", str(text_file), "--seqlen", "32",
                                  "--windows", "6", "--json"])
    assert e.exit_code == 0, e.output
    assert json.loads(e.output)["cosine"] == s["mixed_cosine"]
    again = CliRunner().invoke(main, ["run", str(tiny_bert), "--calib", str(text_file), "--data", str(text_file),
                                      "--avg-bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "32",
                                      "--sens-samples", "4", "--sens-seqlen", "32", "--max-probes", "4",
                                      "--eval-windows", "6", "--eval-seqlen", "32", "-o", str(out)])
    assert again.exit_code == 0, again.output  # every stage current: the table is printed from the kept results
    assert "cosine" in again.output and f"{s['mixed_cosine']:.4f}" in again.output
    manifest = out / "mixed" / "hawqtool_manifest.json"
    assert json.loads(manifest.read_text())["calibration"]["samples"] == 4
    # another calibration count makes the checkpoints stale (they were kept before the count entered the fingerprint)
    more = CliRunner().invoke(main, ["run", str(tiny_bert), "--calib", str(text_file), "--data", str(text_file),
                                     "--avg-bits", "4", "--group-size", "32", "--nsamples", "6", "--seqlen", "32",
                                     "--sens-samples", "4", "--sens-seqlen", "32", "--max-probes", "4",
                                     "--eval-windows", "6", "--eval-seqlen", "32", "-o", str(out), "--json"])
    assert more.exit_code == 0, more.output
    assert json.loads(more.stdout)["calib_samples"] == 6
    assert json.loads(manifest.read_text())["calibration"]["samples"] == 6
    assert json.loads((out / "uniform" / "hawqtool_manifest.json").read_text())["calibration"]["samples"] == 6


def test_an_encoder_calibrates_on_more_windows_by_default(tiny_bert, tiny_llama, text_file, tmp_path):
    """Without --nsamples an encoder under GPTQ gets QuantizeOptions.encoder_nsamples windows (`quantize` and `run`),
    a causal LM (and APHQ) QuantizeOptions.nsamples."""
    from hawqtool.models import load_model
    from hawqtool.options import QuantizeOptions
    from hawqtool.quantize.driver import nsamples_for

    assert QuantizeOptions.encoder_nsamples > QuantizeOptions.nsamples
    bert, llama = load_model(str(tiny_bert)), load_model(str(tiny_llama))
    assert nsamples_for(bert) == QuantizeOptions.encoder_nsamples
    assert nsamples_for(bert, "aphq") == nsamples_for(llama) == QuantizeOptions.nsamples
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["run", str(tiny_bert), "--calib", str(text_file), "--data", str(text_file),
                                  "--avg-bits", "4", "--group-size", "32", "--seqlen", "8", "--no-uniform",
                                  "--sens-samples", "4", "--sens-seqlen", "32", "--max-probes", "4",
                                  "--eval-windows", "2", "--eval-seqlen", "32", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["calib_samples"] == QuantizeOptions.encoder_nsamples
    manifest = json.loads((out / "mixed" / "hawqtool_manifest.json").read_text())
    assert manifest["calibration"] == {**manifest["calibration"], "samples": QuantizeOptions.encoder_nsamples,
                                       "seqlen": 8}


def test_pooled_cosine_objective_through_the_cli(tiny_bert, tiny_llama, text_file, tmp_path):
    """`sensitivity --objective pooled-cosine` measures an encoder (traces ≥ 0, recorded as that objective; with
    its own values, not output-mse's), streamed (--offload) to the in-memory traces; a causal LM, or Hutchinson on a
    streamed model (no closed-form Gauss-Newton product for it), is refused in one line."""
    common = ("--calib", text_file, "--nsamples", 4, "--seqlen", 32, "--max-probes", 8, "--group-size", 32, "-q")
    reports = {}
    for objective in ("pooled-cosine", "output-mse"):
        invoke("sensitivity", tiny_bert, *common, "--objective", objective, "-o", tmp_path / f"{objective}.json")
        reports[objective] = json.loads((tmp_path / f"{objective}.json").read_text())
    rep = reports["pooled-cosine"]
    assert rep["objective"] == "pooled-cosine" and rep["estimator"].startswith("fisher")
    traces = {lay["name"]: lay["trace"] for lay in rep["layers"]}
    assert all(t >= 0 for t in traces.values()) and sum(traces.values()) > 0
    assert traces != {lay["name"]: lay["trace"] for lay in reports["output-mse"]["layers"]}
    for objective, estimator in (("pooled-cosine", "fisher"), ("output-mse", "fisher"), ("output-mse", "hutchinson")):
        # streamed: the same traces; BERT's pooler is after the blocks and unused by either objective (trace 0)
        if estimator == "hutchinson":
            invoke("sensitivity", tiny_bert, *common, "--objective", objective, "--estimator", estimator, "-o",
                   tmp_path / "mem.json")
        want = reports[objective] if estimator == "fisher" else json.loads((tmp_path / "mem.json").read_text())
        invoke("sensitivity", tiny_bert, *common, "--objective", objective, "--estimator", estimator, "--offload",
               "-o", tmp_path / "st.json")
        streamed = {lay["name"]: lay["trace"] for lay in json.loads((tmp_path / "st.json").read_text())["layers"]}
        assert streamed.keys() == {lay["name"] for lay in want["layers"]} and streamed["pooler.dense"] == 0.0
        assert all(streamed[lay["name"]] == pytest.approx(lay["trace"], rel=1e-4, abs=1e-12) for lay in want["layers"])
    one_line_error(invoke("sensitivity", tiny_bert, *common, "--objective", "pooled-cosine", "--offload",
                          "--estimator", "hutchinson", "-o", tmp_path / "h.json", ok=False), "pooled-cosine", "fisher")
    one_line_error(invoke("sensitivity", tiny_llama, *common, "--objective", "pooled-cosine", "-o",
                          tmp_path / "lm.json", ok=False), "pooled-cosine", "self-kl")
    # the default objective (self-kl) would take a softmax over an encoder's hidden state: refused, naming the fix
    one_line_error(invoke("sensitivity", tiny_bert, *common, "-o", tmp_path / "kl.json", ok=False), "self-kl",
                   "--objective pooled-cosine")
    assert not (tmp_path / "kl.json").exists()
