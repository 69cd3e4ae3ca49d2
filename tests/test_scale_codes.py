"""Two-level scales (quantize/scale_codes.py, `--scale-bits`): each group's scale a k-bit code times one fp16 step per
row. The quantizer reconstructs onto exactly what the checkpoint stores, the bytes are what storage_bits says, and
every stage (allocate, quantize in memory and streamed, resume, load, export) carries them."""
from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import invoke, one_line_error
from test_cli_e2e import SMALL

from hawqtool.quantize.gptq import gptq_quantize
from hawqtool.quantize.quantizer import QuantSpec, rtn
from hawqtool.quantize.scale_codes import expand, row_steps, scale_codes, snap


def _layer(rows=24, cols=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, cols, dtype=torch.float64)
    X = torch.randn(400, cols, generator=g, dtype=torch.float64) * torch.linspace(3.0, 0.1, cols, dtype=torch.float64)
    return W, 2 * X.t() @ X / X.shape[0]


def test_the_scales_are_codes_times_one_step_per_row():
    torch.manual_seed(0)
    scales = torch.rand(5, 7) + 0.01
    step = row_steps(scales, 6)
    c = scale_codes(scales, step, 6)
    assert int(c.min()) >= 1 and int(c.max()) == 63
    s = expand(c, step)
    assert (step * 63 >= scales.amax(1)).all()  # the step rounded up: the widest group's scale is reachable
    assert torch.equal(s, s.half().float())  # fp16-exact, as stored
    assert torch.equal(scale_codes(s, step, 6), c)  # codes are recovered exactly from the scales
    # an independent formula: the nearest code's scale, in float64 then rounded to fp16
    ref = (step.double()[:, None] * torch.clamp(torch.round(scales.double() / step.double()[:, None]), 1, 63)).half()
    assert torch.equal(s.half(), ref)


def test_snap_refits_the_zero_and_never_does_worse_than_keeping_it():
    W, H = _layer()
    d = torch.diagonal(H).float()
    spec = QuantSpec(3, 64)
    from hawqtool.quantize.quantizer import qparams

    s, z = qparams(W[:, :64].float(), spec, search=True, d=d[:64])
    step = row_steps(s[:, None] * torch.tensor([[1.0, 1.7]]), 5)
    s2, z2 = snap(W[:, :64].float(), d[:64], s, z, step, 5, spec.maxq, False)

    def err(sc, zc):
        q = torch.clamp(torch.round(W[:, :64].float() / sc[:, None]) + zc[:, None], 0, spec.maxq)
        return (d[None, :64] * (W[:, :64].float() - sc[:, None] * (q - zc[:, None])) ** 2).sum(1)

    assert torch.all(err(s2, z2) <= err(s2, z) + 1e-6)
    assert torch.all((z2 - z).abs() <= 1)


@pytest.mark.parametrize("static_groups, act_order", [(False, False), (True, False), (False, True), (True, True)])
def test_gptq_reconstructs_onto_the_stored_grid(static_groups, act_order):
    W, H = _layer()
    spec = QuantSpec(3, 64, False, scale_bits=6)
    res = gptq_quantize(W, H, spec, static_groups=static_groups, act_order=act_order, search=True)
    qw = res.weight
    assert qw.scale_step is not None and torch.equal(expand(scale_codes(qw.scales, qw.scale_step, 6), qw.scale_step),
                                                     qw.scales)
    # the float64 dequantized matmul from the stored pieces alone: step, codes, zeros, weight codes
    g = qw.group_index()
    ref = expand(scale_codes(qw.scales, qw.scale_step, 6), qw.scale_step).double()[:, g] * \
        (qw.q.double() - qw.zeros.double()[:, g])
    assert torch.equal(ref, res.dequantized.double())
    plain = gptq_quantize(W, H, QuantSpec(3, 64), static_groups=static_groups, act_order=act_order, search=True)
    e = lambda r: float(torch.trace((W - r.dequantized) @ H @ (W - r.dequantized).t()))  # noqa: E731
    assert e(res) < 1.15 * e(plain)  # 6-bit codes cost little against fp16 scales


def test_spec_bytes_and_validation():
    assert QuantSpec(3, 64, scale_bits=6).storage_bits(10, 256) == 10 * 256 * 3 + 10 * 4 * (6 + 3) + 10 * 16
    assert QuantSpec(3, 64, True, scale_bits=8).storage_bits(10, 256) == 10 * 256 * 3 + 10 * 4 * 8 + 10 * 16
    for bad in (dict(scale_bits=3), dict(scale_bits=12), dict(group_size=-1, scale_bits=6)):
        with pytest.raises(ValueError, match="scale_bits"):
            QuantSpec(4, **{"group_size": 64, **bad})
    assert "scale_bits" not in QuantSpec(4, 64).to_dict() and QuantSpec(4, 64, scale_bits=6).to_dict()["scale_bits"] == 6
    r = rtn(_layer()[0], QuantSpec(4, 64, scale_bits=6), search=True)
    assert torch.equal(expand(scale_codes(r.scales, r.scale_step, 6), r.scale_step), r.scales)


@pytest.fixture(scope="module")
def sens(tmp_path_factory, tiny_llama, text_file):
    d = tmp_path_factory.mktemp("scodes")
    invoke("sensitivity", tiny_llama, "--calib", text_file, "-o", d / "sens.json", "--nsamples", 4, "--seqlen", 32,
           "--max-probes", 8, "-q")
    return d


def test_allocate_quantize_load_and_export(sens, tiny_llama, text_file, tmp_path):
    from safetensors import safe_open

    from hawqtool.runtime import QuantLinear, load_quantized
    from hawqtool.sizes import checkpoint_sizes, packed_nbytes

    plan16, plan6 = tmp_path / "p16.json", tmp_path / "p6.json"
    gptq = ("--bits", "2,3,4,8")  # the widths the GPTQ export below can pack
    invoke("allocate", sens / "sens.json", "--avg-bits", 3, "--group-sizes", "16,32", "--scale-bits", 16, *gptq,
           "-o", plan16, "-q")
    invoke("allocate", sens / "sens.json", "--avg-bits", 3, "--group-sizes", "16,32", "--scale-bits", 6, *gptq,
           "-o", plan6, "-q")
    p16, p6 = (json.loads(p.read_text()) for p in (plan16, plan6))
    assert p6["budget"]["max_bytes"] == pytest.approx(p16["budget"]["max_bytes"])  # --avg-bits: the same bytes
    assert all(lp["scale_bits"] == 16 for lp in p16["layers"]) and any(lp["scale_bits"] == 6 for lp in p6["layers"])
    assert p6["total_bytes"] <= p6["budget"]["max_bytes"] * (1 + 1e-9)
    for lp in p6["layers"]:  # each layer's bytes: k-bit codes per group and an fp16 step per row
        o, i = next(ls["shape"] for ls in json.loads((sens / "sens.json").read_text())["layers"] if ls["name"] == lp["name"])
        spec = QuantSpec(lp["bits"], lp["group_size"], lp["symmetric"], scale_bits=6).for_rows(i)
        # codes only where they save bytes: more than 16 / (16 - 6) groups per row
        assert lp["scale_bits"] == (6 if -(-i // lp["group_size"]) * 10 > 16 else 16)
        assert lp["storage_bytes"] == spec.storage_bits(o, i) / 8 <= QuantSpec(lp["bits"], lp["group_size"]).storage_bits(o, i) / 8
    ck = tmp_path / "ck"
    invoke("quantize", tiny_llama, "--plan", plan6, "--calib", text_file, "-o", ck, *SMALL, "-q")
    manifest = json.loads((ck / "hawqtool_manifest.json").read_text())
    with safe_open(str(ck / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        coded = {lp["name"] for lp in p6["layers"] if lp["scale_bits"] == 6}
        assert coded
        for n, m in manifest["layers"].items():
            k = 6 if n in coded else 16
            assert m.get("scale_bits", 16) == k and (f"{n}.qscales" in keys) == (n in coded)
            assert (f"{n}.scales" not in keys) == (n in coded)
            stored = sum(f.get_tensor(t).numel() * f.get_tensor(t).element_size() for t in keys
                         if t.rsplit(".", 1)[0] == n and not t.endswith(".bias"))
            assert stored == packed_nbytes(m["out_features"], m["in_features"], m["bits"], m["group_size"],
                                           m["symmetric"], m["act_order"], scale_bits=k)
    sizes = checkpoint_sizes(ck)
    assert sizes["linear_bits_per_weight"] == pytest.approx(p6["avg_bits"], rel=1e-12)
    # the loaded layers' scales are the quantizer's: what the checkpoint's codes and steps give
    model = load_quantized(ck)
    from hawqtool.loader import packed_from_tensors
    from safetensors.torch import load_file

    t = load_file(str(ck / "model.safetensors"))
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            pw = packed_from_tensors(t, name, manifest["layers"][name])
            assert torch.equal(m.scales, pw.scales) and m.scales.dtype == torch.float16
    ppl = json.loads(invoke("eval", ck, "--data", text_file, "--seqlen", 32, "--windows", 2, "--json").stdout)["ppl"]
    assert ppl > 1
    # the GPTQ-layout export stores fp16 scales: the same dequantized weights
    invoke("export", ck, "--format", "gptq", "-o", tmp_path / "ex", "-q")
    ex = load_file(str(tmp_path / "ex" / "model.safetensors"))
    name = sorted(coded)[0]
    assert torch.equal(ex[f"{name}.scales"].T.contiguous(), packed_from_tensors(t, name, manifest["layers"][name]).scales)
    # streamed: each block's scales formed from its codes when the block is read; the whole load's figures
    streamed = json.loads(invoke("eval", ck, "--data", text_file, "--seqlen", 32, "--windows", 2, "--offload",
                                 "--json").stdout)
    assert streamed["offload"] is True and streamed["ppl"] == pytest.approx(ppl, rel=1e-6)
    from hawqtool.streaming import streamer_of

    st = streamer_of(load_quantized(ck, offload=True))
    with st.resident(1) as block:
        got = {f"{st.prefixes[1]}{n}": m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
        assert got and all(torch.equal(m.scales, model.get_submodule(n).scales) for n, m in got.items())


def test_the_allocator_prices_what_the_codes_add(sens, tiny_llama):
    """A coded option's Ω is the report's fp16-scale error times what the codes add on the layer's weights: more
    at 8 bits with 4-bit codes than at 3 bits with 8-bit codes."""
    from hawqtool import artifacts
    from hawqtool.allocate.options import Option
    from hawqtool.allocate.plan import layer_tables
    from hawqtool.models import load_model
    from hawqtool.stages import layer_weights

    report = artifacts.load(sens / "sens.json", "sensitivity")
    w = layer_weights(load_model(str(tiny_llama)))
    opts = [Option(8, 16), Option(8, 16, scale_bits=4), Option(3, 16), Option(3, 16, scale_bits=8)]
    omega, nbytes = layer_tables(report, lambda: w, opts, False)
    assert (nbytes[:, 1] < nbytes[:, 0]).all() and (nbytes[:, 3] <= nbytes[:, 2]).all()  # 32-wide rows: 2 groups
    r8, r3 = omega[:, 1] / omega[:, 0], omega[:, 3] / omega[:, 2]
    assert (r8 > 1.05).all() and (abs(r3 - 1) < 0.05).all() and r8.min() > r3.max()
    # with the report's own (activation-weighted) fp16 figure: that figure times the codes' ratio
    from hawqtool.quantize.importance import weighted_quant_error

    for ls in report.layers:
        ls.qerror["8/16/asym"] = 2.0
    omega2, _ = layer_tables(report, lambda: w, opts[:2], False)
    ls = report.layers[0]
    W = w[ls.name]
    ratio = weighted_quant_error(W, QuantSpec(8, 16, scale_bits=4), None) / weighted_quant_error(W, QuantSpec(8, 16), None)
    assert omega2[0, 0] == pytest.approx(ls.trace / ls.n_params * 2.0)
    assert omega2[0, 1] == pytest.approx(ls.trace / ls.n_params * 2.0 * ratio, rel=1e-9)


def test_streamed_quantize_gives_the_same_bytes(tiny_llama, text_file, tmp_path):
    from hawqtool.allocate.plan import fixed_plan
    from hawqtool.inputs import calibration_inputs
    from hawqtool.models import load_model, quantizable_layers, weight_matrix
    from hawqtool.quantize.driver import QuantizeOptions
    from hawqtool.stages import quantize_stage

    mem = load_model(str(tiny_llama))
    ids = calibration_inputs(mem, str(text_file), 4, 32, seed=1)
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(mem.model).items()}
    plan = fixed_plan(shapes, 3, group_size=16, scale_bits=5)
    opts = QuantizeOptions(batch_size=2, tune_iters=2)
    quantize_stage(mem, plan, ids, opts, tmp_path / "mem")
    quantize_stage(load_model(str(tiny_llama), offload=True), plan, ids, opts, tmp_path / "str")
    a, b = ((tmp_path / k / "model.safetensors").read_bytes() for k in ("mem", "str"))
    assert a == b


def test_tuned_scales_stay_on_the_stored_grid(tiny_llama, text_file, tmp_path):
    """Block tuning moves the scales too: what it leaves in the model is what the checkpoint's codes give."""
    from hawqtool.allocate.plan import fixed_plan
    from hawqtool.inputs import calibration_inputs
    from hawqtool.models import load_model, quantizable_layers, weight_matrix
    from hawqtool.quantize.driver import QuantizeOptions
    from hawqtool.runtime import QuantLinear, load_quantized
    from hawqtool.stages import quantize_stage

    mem = load_model(str(tiny_llama))
    ids = calibration_inputs(mem, str(text_file), 4, 32, seed=1)
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(mem.model).items()}
    quantize_stage(mem, fixed_plan(shapes, 3, group_size=16, scale_bits=4), ids, QuantizeOptions(batch_size=2,
                   tune_iters=8, tune_scale_lr=1.0), tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "hawqtool_manifest.json").read_text())
    assert any("block tuned" in note for m in manifest["layers"].values() for note in m["notes"])
    layers = quantizable_layers(mem.model)
    for name, m in load_quantized(tmp_path / "ck").named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.dequantized_weight(), weight_matrix(layers[name]).float()), name


def test_malformed_stored_codes_are_refused():
    from quant_kernels import pack

    from hawqtool.quantize.scale_codes import stored_scales

    codes, step = pack(torch.tensor([[1, 63, 7]]), 6), torch.tensor([0.01], dtype=torch.float16)
    assert torch.equal(stored_scales(codes, step, 6, 1, 3).float(), expand(torch.tensor([[1, 63, 7]]), step))
    for args, what in (((codes, step, 6, 2, 3), "qscales"), ((codes, step.float(), 6, 1, 3), "scale_step"),
                       ((codes, None, 6, 1, 3), "scale_step"), ((codes, step, 3, 1, 3), "scale_bits"),
                       ((pack(torch.tensor([[0, 1, 2]]), 6), step, 6, 1, 3), "code is 0")):
        with pytest.raises(ValueError, match=what):
            stored_scales(*args)


def test_a_resumed_block_keeps_its_steps(tmp_path):
    """What a killed run left in CK.partial/ reads back with each row's step (in memory and packed)."""
    from hawqtool.checkpoint import stored_layer
    from hawqtool.quantize.resume_state import BlockState
    from hawqtool.quantize.saved_blocks import load_blocks, save_block

    W, H = _layer()
    qw = gptq_quantize(W, H, QuantSpec(4, 64, scale_bits=7), search=True).weight
    meta = {"spec": qw.spec.to_dict()}
    state = BlockState(tmp_path / "st", "key")
    save_block(state, 0, {"a": (qw, dict(meta)), "b": (stored_layer("b", qw), dict(meta))}, [torch.zeros(2, 3)])
    (block,), _ = load_blocks(state, {})
    got = {n: w for n, w, _spec, _m in block}
    assert torch.equal(got["a"].scale_step, qw.scale_step) and torch.equal(got["a"].dequantize(), qw.dequantize())
    assert got["b"].scale_bits == 7 and set(got["b"].tensors) == set(stored_layer("b", qw).tensors)
    from hawqtool.quantize.saved_blocks import dequantize_packed

    assert torch.equal(dequantize_packed(got["b"]), qw.dequantize())


def test_codes_only_where_they_save_bytes():
    assert QuantSpec(3, 64, scale_bits=6).for_rows(64).scale_bits == 16  # one group: 6 + 16 bits > 16
    assert QuantSpec(3, 64, scale_bits=6).for_rows(128).scale_bits == 6  # two: 2·6 + 16 < 2·16
    assert QuantSpec(3, 64, scale_bits=8).for_rows(128).scale_bits == 16  # 2·8 + 16 = 2·16: no saving
    assert QuantSpec(3, 64).for_rows(64).scale_bits == 16


def test_options_time_as_fp16_and_need_groups():
    from hawqtool.allocate.options import Option, make_options

    o = Option(3, 64, scale_bits=6)
    assert o.label == "w3g64a16s6" and o.timed_label == "w3g64a16"  # codes run as the fp16 scales they give
    assert {x.scale_bits for x in make_options([3, 4], [-1], scale_bits=6)} == {16}  # one scale per row: fp16
    assert {x.scale_bits for x in make_options([3], [-1, 64], scale_bits=6)} == {16, 6}


def test_bad_scale_bits_are_one_line(sens, tiny_llama, text_file, tmp_path):
    res = invoke("allocate", sens / "sens.json", "--avg-bits", 3, "--scale-bits", 3, "-o", tmp_path / "p.json", ok=False)
    one_line_error(res, "--scale-bits")  # a value not offered
    one_line_error(invoke("allocate", sens / "sens.json", "--avg-bits", 4.6, "--formats", "gguf", "--scale-bits", 6,
                          "-o", tmp_path / "p.json", ok=False), "--scale-bits")
    for cmd in (["allocate", sens / "sens.json", "--avg-bits", 3], ["run", tiny_llama], ["sensitivity", tiny_llama]):
        # given on the command line where it would change nothing: per-channel layers have one scale per row
        one_line_error(invoke(*cmd, "--group-size", -1, "--scale-bits", 6, "-o", tmp_path / "x", ok=False),
                       "per-channel")
    invoke("allocate", sens / "sens.json", "--avg-bits", 3, "--scale-bits", 6, "-o", tmp_path / "p.json", "-q")
    plan = json.loads((tmp_path / "p.json").read_text())  # edited by hand: a width scale codes do not have
    plan["layers"][0]["scale_bits"] = 3
    (tmp_path / "p.json").write_text(json.dumps(plan))
    one_line_error(invoke("quantize", tiny_llama, "--plan", tmp_path / "p.json", "--calib", text_file, "-o",
                          tmp_path / "ck", *SMALL, ok=False), "scale_bits")


def test_the_plan_table_names_group_sizes_and_scale_codes():
    from rich.console import Console

    from hawqtool.allocate.plan import fixed_plan
    from hawqtool.render import plan_table

    console = Console(width=120, record=True)
    console.print(plan_table(fixed_plan({"a": (8, 64), "b": (8, 64)}, 3, group_size=32, scale_bits=6)))
    console.print(plan_table(fixed_plan({"a": (8, 64)}, 4, group_size=32)))
    text = console.export_text()
    assert "6-bit codes" in text and text.count("groups") == 1  # the plain plan keeps the plain table
