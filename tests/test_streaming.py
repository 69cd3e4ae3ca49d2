"""Streamed models (--offload, issue 16): built on the meta device, one block read from the safetensors files at a
time. Every stage must give what the in-memory model gives: the same checkpoint bytes, the same perplexity and
the same sensitivity samples (float summation order aside)."""
from __future__ import annotations

import hashlib
import json

import pytest

from cli_helpers import invoke, one_line_error
from conftest import make_tiny_llama
from hawqtool.errors import UserError
from hawqtool.streaming import parse_memory, streamer_of


@pytest.fixture(scope="module")
def llama3(tmp_path_factory, corpus_text):
    """A 3-block tiny Llama (so the middle block's inputs come from a streamed block)."""
    return make_tiny_llama(tmp_path_factory.mktemp("llama3"), corpus_text, layers=3, seed=3)


@pytest.fixture(scope="module", params=["tied", "untied"])
def either(request, llama3, tmp_path_factory):
    """llama3, and a copy whose head is its own (a quantizable layer outside the blocks, resident when streamed)."""
    if request.param == "tied":
        return llama3
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama3)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 1.5)
    out = tmp_path_factory.mktemp("untied")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(llama3).save_pretrained(out)
    return out


def plan_specs_names(plan) -> list[str]:
    return [lp.name for lp in plan.layers]


def _load(path, **kw):
    from hawqtool.models import load_model

    return load_model(str(path), **kw)


def _ids(loaded, text_file, n=4, seqlen=32):
    from hawqtool.inputs import calibration_inputs

    return calibration_inputs(loaded, str(text_file), n, seqlen, seed=1)


def test_offload_builds_on_meta_and_loads_one_block(llama3):
    loaded = _load(llama3, offload=True)
    st = streamer_of(loaded.model)
    assert st is not None and len(st.blocks) == 3
    assert all(p.device.type == "meta" for b in st.blocks for p in b.parameters())
    assert loaded.model.model.embed_tokens.weight.device.type == "cpu"
    with st.resident(1) as block:
        assert all(p.device.type == "cpu" for p in block.parameters())
        assert all(p.device.type == "meta" for p in st.blocks[0].parameters())
    assert all(p.device.type == "meta" for p in st.blocks[1].parameters())
    assert streamer_of(_load(llama3).model) is None


def test_max_memory_below_the_weights_streams(llama3):
    assert streamer_of(_load(llama3, max_memory=1000).model) is not None
    assert streamer_of(_load(llama3, max_memory=10**9).model) is None


@pytest.mark.parametrize("act_order, tune", [(False, 0), (True, 0), (False, 4), (True, 4)])
def test_streamed_quantize_writes_the_same_checkpoint(tmp_path, either, text_file, act_order, tune, monkeypatch):
    """Streamed and in memory give the same bytes; the streamed run holds no finished block's codes in memory
    while later blocks run (they are read back from CKPT.partial/ at the end)."""
    from hawqtool.allocate.plan import fixed_plan
    from hawqtool.quantize import driver
    from hawqtool.checkpoint import PackedLayer
    from hawqtool.tensorfile import LazyTensor

    read_back, seen = driver._read_back, []

    def spy(state, layers, results, dropped):
        seen.append(sorted(dropped))
        assert all(results[n].weight is None for n in dropped)
        read_back(state, layers, results, dropped)
        # not even read back: the checkpoint writer reads each packed tensor from the saved blocks in turn
        assert all(isinstance(results[n].weight, PackedLayer) for n in dropped)
        assert all(isinstance(t, LazyTensor) for n in dropped for t in results[n].weight.tensors.values())

    monkeypatch.setattr(driver, "_read_back", spy)
    from hawqtool.models import quantizable_layers, weight_matrix
    from hawqtool.quantize.driver import QuantizeOptions
    from hawqtool.stages import quantize_stage

    llama3 = either
    mem = _load(llama3)
    assert ("lm_head" in quantizable_layers(mem.model)) == (llama3.name.startswith("untied"))
    ids = _ids(mem, text_file)
    plan = fixed_plan({n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(mem.model).items()}, 3,
                      group_size=16)
    opts = QuantizeOptions(batch_size=2, act_order=act_order, tune_iters=tune)
    quantize_stage(mem, plan, ids, opts, tmp_path / "mem")
    quantize_stage(_load(llama3, offload=True), plan, ids, opts, tmp_path / "streamed")
    digest = {k: hashlib.sha256((tmp_path / k / "model.safetensors").read_bytes()).hexdigest() for k in ("mem", "streamed")}
    assert digest["mem"] == digest["streamed"]
    assert seen == [sorted(n for n in plan_specs_names(plan) if n.startswith("model.layers."))]  # streamed run only
    manifests = [json.loads((tmp_path / k / "hawqtool_manifest.json").read_text()) for k in ("mem", "streamed")]
    assert manifests[0]["layers"] == manifests[1]["layers"]
    if tune:  # block tuning ran (and moved codes) in both
        assert any("block tuned" in note for m in manifests for l in m["layers"].values() for note in l["notes"])


def test_streamed_quantize_of_layers_with_biases(tmp_path, text_file, corpus_text):
    """Qwen2-like projections with biases: the streamed checkpoint stores each bias as the in-memory one does."""
    from hawqtool.allocate.plan import fixed_plan
    from hawqtool.models import quantizable_layers, weight_matrix
    from hawqtool.quantize.driver import QuantizeOptions
    from hawqtool.stages import quantize_stage

    src = make_tiny_llama(tmp_path / "biased", corpus_text, layers=2, seed=5, bias=True)
    mem = _load(src)
    ids = _ids(mem, text_file)
    plan = fixed_plan({n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(mem.model).items()}, 4,
                      group_size=16)
    quantize_stage(mem, plan, ids, QuantizeOptions(batch_size=2, tune_iters=0), tmp_path / "mem")
    quantize_stage(_load(src, offload=True), plan, ids, QuantizeOptions(batch_size=2, tune_iters=0), tmp_path / "str")
    files = [(tmp_path / k / "model.safetensors").read_bytes() for k in ("mem", "str")]
    assert files[0] == files[1]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "str" / "model.safetensors"), framework="pt") as f:
        assert "model.layers.1.self_attn.q_proj.bias" in f.keys()
        assert float(f.get_tensor("model.layers.1.self_attn.q_proj.bias").abs().sum()) > 0
    from hawqtool.evaluate import perplexity
    from hawqtool.runtime import load_quantized

    windows = _ids(mem, text_file, n=3, seqlen=32)
    whole, streamed = (perplexity(load_quantized(tmp_path / "str", offload=o), windows, batch_size=2) for o in (False, True))
    assert streamed.nll == pytest.approx(whole.nll, rel=1e-6)


def test_streamed_perplexity_equals_in_memory(either, text_file):
    from hawqtool.evaluate import perplexity

    llama3 = either
    mem = _load(llama3)
    windows = _ids(mem, text_file, n=5, seqlen=48)
    a = perplexity(mem.model, windows, batch_size=2)
    b = perplexity(_load(llama3, offload=True).model, windows, batch_size=2)
    assert b.tokens == a.tokens and b.nll == pytest.approx(a.nll, rel=1e-6)


def test_streamed_sensitivity_equals_in_memory(either, text_file):
    from hawqtool.stages import compute_sensitivity

    llama3 = either
    mem = _load(llama3)
    ids = _ids(mem, text_file)
    kw = dict(max_probes=4, min_probes=4, batch_size=2, estimator="fisher", first_token_weight=64.0, qerror_bits=(3, 4))
    a = compute_sensitivity(mem, ids, **kw)
    b = compute_sensitivity(_load(llama3, offload=True), ids, **kw)
    assert a.fingerprint == b.fingerprint
    for la, lb in zip(a.layers, b.layers):
        assert la.name == lb.name
        assert lb.samples == pytest.approx(la.samples, rel=1e-4), la.name
        assert lb.qerror == pytest.approx(la.qerror, rel=1e-5), la.name


@pytest.mark.parametrize("objective", ["self-kl", "output-mse"])
def test_streamed_hutchinson_equals_in_memory(either, text_file, objective):
    """Hutchinson with the Gauss-Newton product, streamed (jvp forward, backward in reverse, one block resident)
    against hutchinson_traces(hvp="ggn") in memory: the same Rademacher draws, so the same samples; they are
    signed (not all ≥ 0, unlike Fisher's), so an equality here is no accident of magnitudes."""
    from hawqtool.stages import compute_sensitivity

    llama3 = either  # untied: the head is a layer outside the blocks, its v drawn last
    mem = _load(llama3)
    ids = _ids(mem, text_file)
    kw = dict(max_probes=3, min_probes=3, batch_size=2, estimator="hutchinson", objective=objective, qerror_bits=(4,))
    a = compute_sensitivity(mem, ids, **kw)
    b = compute_sensitivity(_load(llama3, offload=True), ids, **kw)
    assert "streamed" in b.estimator and "ggn" in b.estimator
    heads = [la for la in b.layers if la.name == "lm_head"]
    untied = json.loads((either / "config.json").read_text()).get("tie_word_embeddings") is False
    assert len(heads) == int(untied) and all(x != 0 for la in heads for x in la.samples)
    samples = [x for la in a.layers for x in la.samples]
    assert any(x < 0 for x in samples) or len({round(x, 3) for x in samples}) > 3
    for la, lb in zip(a.layers, b.layers):
        assert la.name == lb.name
        assert lb.samples == pytest.approx(la.samples, rel=1e-4, abs=1e-6 * max(map(abs, samples))), la.name


def test_streamed_sensitivity_refuses_labels_objective(llama3, text_file):
    from hawqtool.stages import compute_sensitivity

    loaded = _load(llama3, offload=True)
    with pytest.raises(UserError, match="self-kl or output-mse"):
        compute_sensitivity(loaded, _ids(loaded, text_file), estimator="hutchinson", objective="labels", max_probes=2)


def test_parse_memory():
    assert parse_memory("3GiB") == 3 << 30 and parse_memory("512MiB") == 512 << 20 and parse_memory("8GB") == 8 * 10**9
    for bad in ("lots", "-1GiB", "0"):
        with pytest.raises(UserError, match="--max-memory"):
            parse_memory(bad)


def test_run_offload_end_to_end(tmp_path, llama3, text_file, monkeypatch):
    """`run --offload` completes and gives the in-memory run's plan and perplexities."""
    from hawqtool.streaming import Streamer

    parked, folders = Streamer.parked, []

    def spy(self, folder):
        folders.append(folder.name)
        return parked(self, folder)

    monkeypatch.setattr(Streamer, "parked", spy)
    small = ["--calib", text_file, "--data", text_file, "--avg-bits", 3.5, "--nsamples", 4, "--seqlen", 32,
             "--sens-samples", 4, "--sens-seqlen", 32, "--max-probes", 4, "--eval-windows", 3, "--eval-seqlen", 32, "-q"]
    invoke("run", llama3, "-o", tmp_path / "mem", *small)
    invoke("run", llama3, "-o", tmp_path / "streamed", "--offload", *small)
    a, b = (json.loads((tmp_path / k / "summary.json").read_text()) for k in ("mem", "streamed"))
    assert b["offload"] is True and a["offload"] is False
    assert json.loads((tmp_path / "mem" / "plan.json").read_text())["layers"] == \
        json.loads((tmp_path / "streamed" / "plan.json").read_text())["layers"]
    for k in ("baseline_ppl", "mixed_ppl", "uniform_ppl"):
        assert b[k] == pytest.approx(a[k], rel=1e-5), k
    # the baseline model's embedding and head waited on disk during the quantizes and evaluations, and came back
    assert ".hawqtool-parked" in folders and not (tmp_path / "streamed" / ".hawqtool-parked").exists()
    assert b["baseline_file_bits_per_param"] == a["baseline_file_bits_per_param"]


def test_offload_bad_memory_is_one_line(tmp_path, llama3, text_file):
    res = invoke("run", llama3, "--calib", text_file, "-o", tmp_path / "r", "--max-memory", "lots", ok=False)
    one_line_error(res, "--max-memory")
    assert not (tmp_path / "r").exists()


def _checkpoint(model_dir, text_file, out, act_order=False, sym=False):
    """An RTN (or, with act_order, GPTQ) checkpoint of every quantizable layer at 4 bits, groups of 16."""
    from hawqtool.allocate.plan import fixed_plan
    from hawqtool.models import quantizable_layers, weight_matrix
    from hawqtool.quantize.driver import QuantizeOptions
    from hawqtool.stages import quantize_stage

    mem = _load(model_dir)
    plan = fixed_plan({n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(mem.model).items()}, 4,
                      group_size=16, symmetric=sym)
    opts = QuantizeOptions(method="gptq" if act_order else "rtn", act_order=act_order, tune_iters=0)
    quantize_stage(mem, plan, _ids(mem, text_file), opts, out)
    return out


@pytest.mark.parametrize("act_order, sym", [(False, False), (True, True)])
def test_streamed_checkpoint_equals_whole(tmp_path, either, text_file, act_order, sym):
    """`eval CKPT --offload` reads each block's packed tensors only while it runs, and scores what the whole
    checkpoint scores (asymmetric, and symmetric with act-order's g_idx; tied and untied quantized heads)."""
    import torch

    from hawqtool.evaluate import perplexity
    from hawqtool.runtime import QuantLinear, load_quantized

    ck = _checkpoint(either, text_file, tmp_path / "ck", act_order, sym)
    model = load_quantized(ck, offload=True)
    st = streamer_of(model)
    assert st is not None and len(st.blocks) == 3
    packed = [m for b in st.blocks for m in b.modules() if isinstance(m, QuantLinear)]
    assert packed and all(m.qweight.device.type == "meta" for m in packed)
    with st.resident(1) as block:
        assert all(t.device.type == "cpu" for t in block.state_dict().values())
        assert all(m.scales.dtype == torch.float16 for m in block.modules() if isinstance(m, QuantLinear))
        assert all(t.device.type == "meta" for t in st.blocks[0].state_dict().values())
    assert all(m.qweight.device.type == "meta" for m in packed)
    windows = _ids(_load(either), text_file, n=5, seqlen=48)
    a = perplexity(load_quantized(ck), windows, batch_size=2)
    b = perplexity(model, windows, batch_size=2)
    assert b.tokens == a.tokens and b.nll == pytest.approx(a.nll, rel=1e-6)
    # the CLI: --offload, and --max-memory below what a whole load needs, stream; all report the whole load's figures
    whole = json.loads(invoke("eval", ck, "--data", text_file, "--seqlen", 32, "--windows", 3, "--json").stdout)
    # a whole load on the CPU needs the file twice (the kernels' layout beside it): 1.5× the file streams too
    limit = str(int(1.5 * (ck / "model.safetensors").stat().st_size))
    for flag in (["--offload"], ["--max-memory", "1000"], ["--max-memory", limit]):
        res = json.loads(invoke("eval", ck, "--data", text_file, "--seqlen", 32, "--windows", 3, "--json", *flag).stdout)
        assert res["ppl"] == pytest.approx(whole["ppl"], rel=1e-6) and res["tokens"] == whole["tokens"]
        assert res["sizes"] == whole["sizes"] and res["offload"] is True and whole["offload"] is False


def test_streamed_checkpoint_takes_the_compute_dtype(tmp_path, either, text_file):
    """With --dtype bfloat16 a streamed checkpoint's float parts (embedding, norms, head, biases, rotary buffers)
    are bf16 as in a whole load, packed scales stay fp16, and the two score the same. accelerate's placement
    casts to its placeholder's dtype unless told: this failed when the skeleton was float32."""
    import torch

    from hawqtool.evaluate import perplexity
    from hawqtool.runtime import load_quantized

    ck = _checkpoint(either, text_file, tmp_path / "ck")
    whole = load_quantized(ck, dtype=torch.bfloat16)
    model = load_quantized(ck, offload=True, dtype=torch.bfloat16)
    st = streamer_of(model)

    def dtypes(m, prefix=""):
        return {prefix + n: t.dtype for n, t in m.state_dict().items()}

    from safetensors.torch import load_file

    stored = load_file(str(ck / "model.safetensors"))
    scales = {n: t for n, t in whole.state_dict().items() if n.endswith(".scales")}
    assert scales and all(torch.equal(t, stored[n]) for n, t in scales.items())  # bf16 never rounds the scales
    want = dtypes(whole)
    assert {n: d for n, d in dtypes(model).items() if not n.startswith(st.block_prefix)} == \
        {n: d for n, d in want.items() if not n.startswith(st.block_prefix)}
    with st.resident(1) as block:
        assert dtypes(block, st.prefixes[1]) == {n: d for n, d in want.items() if n.startswith(st.prefixes[1])}
    assert torch.bfloat16 in want.values() and torch.float16 in want.values()
    bufs = {n: b.dtype for n, b in model.named_buffers() if "inv_freq" in n}
    assert bufs and bufs == {n: b.dtype for n, b in whole.named_buffers() if "inv_freq" in n}
    windows = _ids(_load(either), text_file, n=5, seqlen=48)
    a, b = perplexity(whole, windows, batch_size=2), perplexity(model, windows, batch_size=2)
    assert b.tokens == a.tokens and b.nll == pytest.approx(a.nll, rel=1e-5)


def test_streamed_checkpoint_missing_file_is_one_line(tmp_path, llama3, text_file):
    ck = _checkpoint(llama3, text_file, tmp_path / "ck")
    (ck / "model.safetensors").unlink()
    for flag in ([], ["--offload"], ["--max-memory", "1000"]):
        one_line_error(invoke("eval", ck, "--data", text_file, *flag, ok=False), "model.safetensors")


def test_streamed_checkpoint_checks_each_block_as_it_is_read(tmp_path, llama3, text_file):
    """A block's packed tensors are checked when the streamer reads them: a NaN scale (sha256 check off) is one
    line naming the problem, not a NaN perplexity."""
    import torch
    from safetensors.torch import load_file, save_file

    from hawqtool.evaluate import perplexity
    from hawqtool.runtime import load_quantized

    ck = _checkpoint(llama3, text_file, tmp_path / "ck")
    t = load_file(str(ck / "model.safetensors"))
    t["model.layers.2.mlp.up_proj.scales"][0, 0] = float("nan")
    save_file(t, str(ck / "model.safetensors"), metadata={"format": "pt"})
    model = load_quantized(ck, offload=True, verify=False)  # only the header is read up front
    with pytest.raises(UserError, match="scales contain inf or NaN"):
        perplexity(model, _ids(_load(llama3), text_file, n=2, seqlen=16), batch_size=2)
    assert torch.isnan(load_file(str(ck / "model.safetensors"))["model.layers.2.mlp.up_proj.scales"][0, 0])


def test_size_accounting_of_a_streamed_model(llama3):
    """Meta tensors have no memory to tell them apart: the file accounting must still count each once."""
    from hawqtool.allocate.plan import fixed_plan
    from hawqtool.models import quantizable_layers, weight_matrix
    from hawqtool.sizes import model_sizes, predict_file

    mem, streamed = _load(llama3).model, _load(llama3, offload=True).model
    plan = fixed_plan({n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(mem).items()}, 3)
    assert predict_file(streamed, plan) == predict_file(mem, plan)
    assert model_sizes(streamed) == model_sizes(mem)


def test_gptq_parks_the_embedding_and_head_on_disk(either, text_file, tmp_path):
    """While a streamed model's blocks are quantized, the parameters outside them (embedding, head, norm) are on
    the meta device; after, they are back exactly as they were, changed values included, a tied head still tied."""
    import torch

    from hawqtool.allocate.plan import fixed_plan, plan_specs
    from hawqtool.models import quantizable_layers, weight_matrix
    from hawqtool.quantize.driver import QuantizeOptions, quantize_model

    loaded = _load(either, offload=True)
    model = loaded.model
    emb = model.get_input_embeddings()
    with torch.no_grad():
        emb.weight[3] += 1.0  # a value the files do not hold (as a quantized embedding would be)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.device.type != "meta"}
    tied = model.get_output_embeddings().weight is emb.weight
    seen = []
    layers = {n: m for n, m in quantizable_layers(model).items() if n.startswith("model.layers.")}
    specs = plan_specs(fixed_plan({n: tuple(weight_matrix(m).shape) for n, m in layers.items()}, 4, group_size=-1))
    quantize_model(model, specs, _ids(loaded, text_file), QuantizeOptions(batch_size=2), state_dir=tmp_path / "s",
                   progress=lambda _n: seen.append(model.get_input_embeddings().weight.device.type))
    assert seen and set(seen) == {"meta"}
    after = dict(model.named_parameters())
    for n, t in before.items():
        assert after[n].device.type == "cpu" and torch.equal(after[n], t), n
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert not list((tmp_path / "s").glob("outside-blocks*"))
