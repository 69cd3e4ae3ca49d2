"""The input embedding (and the head tied to it) in the plan: --embed-bits on the tiny tied Llama.

Float64 reference of the quantized lookup and the head's logits against the runtime; checkpoint round trip
and byte identity; whole-file bits from the file's own tensors; budgets; bad values; export refusal.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import invoke, one_line_error

SMALL = ["--nsamples", "4", "--seqlen", "32"]


@pytest.fixture(scope="module")
def staged(tmp_path_factory, tiny_llama, text_file):
    """sensitivity once; plans with and without --embed-bits; one checkpoint with a 6-bit per-row embedding."""
    d = tmp_path_factory.mktemp("embed")
    invoke("sensitivity", tiny_llama, "--calib", text_file, "-o", d / "sens.json", "--nsamples", 2, "--seqlen", 32,
           "--max-probes", 4, "-q")
    invoke("allocate", d / "sens.json", "--avg-bits", 4, "-o", d / "plan16.json", "-q")
    invoke("allocate", d / "sens.json", "--avg-bits", 4, "--embed-bits", 6, "-o", d / "plan6.json", "-q")
    invoke("quantize", tiny_llama, "--plan", d / "plan6.json", "--calib", text_file, "-o", d / "ckpt", *SMALL, "-q")
    return d


def _reference_table(ckpt) -> torch.Tensor:
    """The embedding table in float64 from the checkpoint's own codes, scales and zeros (no quant_kernels)."""
    manifest = json.loads((ckpt / "hawqtool_manifest.json").read_text())
    e = manifest["embedding"]
    t = load_file(str(ckpt / "model.safetensors"))
    bits, V, H = e["bits"], e["out_features"], e["in_features"]

    def unpack(words, n):  # little-endian bit stream of b-bit codes per row, in int32 words
        w = words.to(torch.int64) & 0xFFFFFFFF
        bitpos = torch.arange(n) * bits
        out = torch.zeros(words.shape[0], n, dtype=torch.int64)
        for k in range(bits):
            p = bitpos + k
            out |= ((w[:, p // 32] >> (p % 32)) & 1) << k
        return out

    q = unpack(t[f"{e['name']}.qweight"], H).double()
    groups = t[f"{e['name']}.scales"].shape[1]
    z = unpack(t[f"{e['name']}.qzeros"], groups).double() if not e["symmetric"] else torch.full((V, groups), 2.0 ** (bits - 1))
    g = torch.zeros(H, dtype=torch.long) if e["group_size"] == -1 else torch.arange(H) // e["group_size"]
    return t[f"{e['name']}.scales"].double()[:, g] * (q - z[:, g])


def test_plan_records_the_embedding_and_keeps_the_default(staged, tiny_llama):
    p16 = json.loads((staged / "plan16.json").read_text())
    p6 = json.loads((staged / "plan6.json").read_text())
    assert "embedding" not in p16 and "file" not in p16  # default plans are what they were
    e = p6["embedding"]
    V, H = e["shape"]
    assert (e["bits"], e["group_size"], e["tied_head"], e["in_budget"]) == (6, -1, "lm_head", False)
    assert e["storage_bytes"] == (V * H * 6 + V * (16 + 6)) / 8  # codes + one fp16 scale and a 6-bit zero per row
    assert p6["fingerprint"] != p16["fingerprint"]
    assert [lp["bits"] for lp in p6["layers"]] == [lp["bits"] for lp in p16["layers"]]  # --avg-bits: linear only
    assert p6["avg_bits"] == p16["avg_bits"] and p6["file"]["embedding_bits"] == 6


def test_lookup_and_logits_equal_a_float64_reference(staged):
    from hawqtool.runtime import QuantEmbedding, QuantLinear, load_quantized

    model = load_quantized(staged / "ckpt")
    emb, head = model.get_input_embeddings(), model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear) and head.pw is emb.pw  # one copy
    E = _reference_table(staged / "ckpt")
    ids = torch.randint(0, E.shape[0], (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        looked = emb(ids)
    assert looked.dtype == torch.float32 and torch.equal(looked, E[ids].float())  # fp32 dequantization is exact
    h = torch.randn(5, E.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = head(h)
    ref = h.double() @ E.T
    assert ((logits.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6
    # the whole model: its logits are the final hidden state times the same table
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    last = out.hidden_states[-1].double()
    full = last @ E.T
    assert ((out.logits.double() - full).abs().max() / full.abs().max()).item() < 1e-5


def test_checkpoint_round_trips_and_is_reproducible(staged, tiny_llama, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    manifest = json.loads((staged / "ckpt" / "hawqtool_manifest.json").read_text())
    t = load_file(str(staged / "ckpt" / "model.safetensors"))
    name = manifest["embedding"]["name"]
    assert f"{name}.weight" not in t and "lm_head.weight" not in t and not manifest["tied"]
    assert manifest["embedding"]["importance"] == "tied-head inputs" and manifest["embedding"]["rel_error"] < 0.01
    src = AutoModelForCausalLM.from_pretrained(tiny_llama).get_input_embeddings().weight.double()
    E = _reference_table(staged / "ckpt")
    assert 0 < ((E - src).norm() / src.norm()).item() < 0.05  # 6-bit per row: close, not equal
    again = tmp_path / "again"
    invoke("quantize", tiny_llama, "--plan", staged / "plan6.json", "--calib", text_file, "-o", again, *SMALL, "-q")
    assert (again / "model.safetensors").read_bytes() == (staged / "ckpt" / "model.safetensors").read_bytes()
    assert (again / "hawqtool_manifest.json").read_bytes() == (staged / "ckpt" / "hawqtool_manifest.json").read_bytes()
    res = json.loads(invoke("eval", staged / "ckpt", "--data", text_file, "--seqlen", 32, "--windows", 2,
                            "--json").stdout)
    assert res["ppl"] > 1 and res["sizes"]["embedding_bits"] == 6


def test_whole_file_bits_from_the_file_itself(staged, tiny_llama):
    """8 × the bytes of every tensor in model.safetensors / the source model's parameters (tied once)."""
    from transformers import AutoModelForCausalLM

    from hawqtool.sizes import checkpoint_sizes

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())  # tied once
    t = load_file(str(staged / "ckpt" / "model.safetensors"))
    nbytes = sum(v.numel() * v.element_size() for v in t.values())
    s = checkpoint_sizes(staged / "ckpt")
    assert s["params"] == params and s["tensor_bytes"] == nbytes
    assert s["file_bits_per_param"] == pytest.approx(8 * nbytes / params, rel=1e-12)
    assert s["file_bytes"] == (staged / "ckpt" / "model.safetensors").stat().st_size
    plan = json.loads((staged / "plan6.json").read_text())
    assert plan["file"]["tensor_bytes"] == nbytes and plan["file"]["params"] == params  # the prediction is exact
    assert s["linear_bits_per_weight"] == pytest.approx(plan["avg_bits"], rel=1e-12)


def test_max_bytes_counts_the_embedding(staged):
    plan16 = json.loads((staged / "plan16.json").read_text())
    emb = json.loads((staged / "plan6.json").read_text())["embedding"]["storage_bytes"]
    budget = plan16["total_bytes"] + emb
    invoke("allocate", staged / "sens.json", "--max-bytes", budget, "--embed-bits", 6, "-o", staged / "pmb.json", "-q")
    p = json.loads((staged / "pmb.json").read_text())
    assert p["embedding"]["in_budget"] and p["total_bytes"] + emb <= budget * (1 + 1e-9)
    assert p["budget"]["max_bytes"] == pytest.approx(budget - emb)
    res = invoke("allocate", staged / "sens.json", "--max-bytes", emb / 2, "--embed-bits", 6, "-o",
                 staged / "pbad.json", ok=False)
    one_line_error(res, "--max-bytes")
    least = int(res.stderr.split("use at least --max-bytes ")[1].split()[0].rstrip(";"))
    assert least > emb  # the smallest budget named includes the embedding's own bytes


@pytest.mark.parametrize("value", ["5", "32", "0", "abc", ""])
def test_bad_embed_bits_is_one_line(staged, value, tmp_path):
    one_line_error(invoke("allocate", staged / "sens.json", "--avg-bits", 4, f"--embed-bits={value}", "-o",
                          tmp_path / "p.json", ok=False), "--embed-bits")
    assert not (tmp_path / "p.json").exists()


def test_embed_group_size_without_embed_bits_is_refused(staged, tmp_path):
    one_line_error(invoke("allocate", staged / "sens.json", "--avg-bits", 4, "--embed-group-size", 64, "-o",
                          tmp_path / "p.json", ok=False), "--embed-group-size", "--embed-bits")


def test_plan_embedding_must_match_the_model(staged, tiny_llama, text_file, tmp_path, corpus_text):
    from conftest import make_tiny_llama

    other = make_tiny_llama(tmp_path / "wide", corpus_text, vocab=300)
    one_line_error(invoke("quantize", other, "--plan", staged / "plan6.json", "--calib", text_file, "-o",
                          tmp_path / "ck", *SMALL, ok=False), "embedding")
    bad = json.loads((staged / "plan6.json").read_text())
    bad["embedding"]["bits"] = 13
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    one_line_error(invoke("quantize", tiny_llama, "--plan", tmp_path / "bad.json", "-o", tmp_path / "ck2", ok=False),
                   "embedding", "bits")


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_export_refuses_a_quantized_embedding(staged, fmt, tmp_path):
    one_line_error(invoke("export", staged / "ckpt", "--format", fmt, "-o", tmp_path / "ex", ok=False),
                   "embedding", "--embed-bits 16")
    assert not (tmp_path / "ex").exists()


def test_gather_kernel_matches_whole_dequantization():
    from quant_kernels import PackedWeight, dequantize, dequantize_gather

    g = torch.Generator().manual_seed(0)
    for bits, gs, sym in ((4, -1, False), (6, 16, True), (8, -1, True)):
        q = torch.randint(0, 2 ** bits, (40, 48), generator=g)
        scales = torch.rand(40, 1 if gs == -1 else 3, generator=g) + 0.1
        zeros = None if sym else torch.randint(0, 2 ** bits, scales.shape, generator=g)
        pw = PackedWeight.from_codes(q, scales, zeros, bits=bits, group_size=gs, symmetric=sym)
        ids = torch.tensor([[3, 0, 39], [3, 7, 7]])
        assert torch.equal(dequantize_gather(pw, ids), dequantize(pw)[ids])
        assert dequantize_gather(pw, torch.zeros(0, dtype=torch.long)).shape == (0, 48)
        with pytest.raises(IndexError):
            dequantize_gather(pw, torch.tensor([40]))


def test_a_head_planned_on_its_own_keeps_its_own_codes(tmp_path, tiny_llama, text_file):
    """sensitivity --quantize-head puts the head in the plan (untied, GPTQ like the others): the embedding entry
    then names no tied head, its grid weights every column equally, and the file holds both matrices."""
    from transformers import AutoModelForCausalLM

    from hawqtool.runtime import QuantEmbedding, QuantLinear, load_quantized
    from hawqtool.sizes import checkpoint_sizes

    sens, plan, ckpt = tmp_path / "s.json", tmp_path / "p.json", tmp_path / "ck"
    invoke("sensitivity", tiny_llama, "--calib", text_file, "--quantize-head", "--nsamples", 2, "--seqlen", 32,
           "--max-probes", 4, "-q", "-o", sens)
    invoke("allocate", sens, "--avg-bits", 5, "--pin", "lm_head=4", "--embed-bits", 8, "-q", "-o", plan)
    assert json.loads(plan.read_text())["embedding"]["tied_head"] is None
    invoke("quantize", tiny_llama, "--plan", plan, "--calib", text_file, "-o", ckpt, *SMALL, "-q")
    model = load_quantized(ckpt)
    emb, head = model.get_input_embeddings(), model.lm_head
    assert isinstance(emb, QuantEmbedding) and emb.bits == 8 and isinstance(head, QuantLinear) and head.bits == 4
    manifest = json.loads((ckpt / "hawqtool_manifest.json").read_text())
    assert manifest["embedding"]["importance"] == "equal" and manifest["layers"]["lm_head"]["method"] == "gptq"
    src = AutoModelForCausalLM.from_pretrained(tiny_llama)
    V, H = src.get_input_embeddings().weight.shape
    assert checkpoint_sizes(ckpt)["params"] == sum(p.numel() for p in src.parameters()) + V * H
    assert torch.equal(emb(torch.arange(V)), emb.dequantized_weight())


def test_run_reports_both_sizes(tmp_path, tiny_llama, text_file):
    """`run --embed-bits 8`: both checkpoints carry the embedding; summary.json gives bits per linear weight,
    whole-file bits per parameter and the file sizes, equal to what the checkpoints hold; the table renders."""
    from hawqtool.render import summary_table
    from hawqtool.sizes import checkpoint_sizes

    out = tmp_path / "out"
    s = json.loads(invoke("run", tiny_llama, "--calib", text_file, "--data", text_file, "--avg-bits", 3.0, "-o", out,
                          *SMALL, "--sens-samples", 2, "--sens-seqlen", 32, "--max-probes", 4, "--eval-windows", 2,
                          "--eval-seqlen", 32, "--embed-bits", 8, "--json").stdout)
    assert s["embed_bits"] == 8 and s["baseline_file_bits_per_param"] == 32.0
    for key in ("mixed", "uniform"):
        c = checkpoint_sizes(out / key)
        assert c["embedding_bits"] == 8 and s[f"{key}_file_bits_per_param"] == c["file_bits_per_param"]
        assert s[f"{key}_file_bytes"] == (out / key / "model.safetensors").stat().st_size
        assert c["linear_bits_per_weight"] == pytest.approx(s[f"{key}_avg_bits"], rel=1e-12)
        plan = json.loads((out / ("plan.json" if key == "mixed" else "plan_uniform.json")).read_text())
        assert plan["embedding"]["bits"] == 8 and plan["file"]["tensor_bytes"] == c["tensor_bytes"]
    assert summary_table(s).columns[4].header == "file bits/param"


def test_streamed_eval_of_a_quantized_embedding_equals_whole(staged, text_file):
    """--offload on a checkpoint whose tied head shares the embedding's packed codes (stored once, under the
    embedding's name): the streamed model's head reads those codes and scores what the whole load scores."""
    from hawqtool.runtime import QuantEmbedding, QuantLinear, load_quantized

    model = load_quantized(staged / "ckpt", offload=True)
    table, head = model.model.embed_tokens, model.lm_head
    assert isinstance(table, QuantEmbedding) and isinstance(head, QuantLinear)
    assert head.qweight is table.qweight and head.pw.qweight is table.qweight and table.qweight.device.type == "cpu"
    args = ["eval", staged / "ckpt", "--data", text_file, "--seqlen", 32, "--windows", 3, "--json"]
    whole, streamed = (json.loads(invoke(*args, *flag).stdout) for flag in ([], ["--offload"]))
    assert streamed["offload"] is True and streamed["ppl"] == pytest.approx(whole["ppl"], rel=1e-6)


def test_tied_codes_stay_shared_after_a_move(staged):
    """Module.to moves buffers one module at a time, which would give the embedding and its tied head copies of
    their own (twice the codes in GPU memory); the loader re-points the head. The meta device stands in for CUDA."""
    from hawqtool.runtime import load_quantized

    model = load_quantized(staged / "ckpt", device="meta")
    table, head = model.model.embed_tokens, model.lm_head
    assert table.qweight.device.type == "meta"
    assert head.qweight is table.qweight and head.scales is table.scales and head.pw.qweight is table.qweight
