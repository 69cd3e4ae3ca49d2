"""torch.compile of quantized models: quant_kernels' registered ops trace into whole graphs, give the eager
results exactly, and `hawqtool bench --compile` times both models compiled."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hawqtool.bench import _Decoder
from hawqtool.checkpoint import pack_layer
from hawqtool.compiled import compile_model, graph_breaks
from hawqtool.quantize.quantizer import QuantSpec, rtn
from hawqtool.runtime import QuantConv2d, QuantLinear, load_quantized
from quant_kernels.fast_cpu import extension

from test_cli_budgets import invoke
from test_int8_ops import _conv_case

pytestmark = pytest.mark.skipif(extension() is None, reason="needs the AVX2 extension")


@pytest.mark.parametrize("bits, act_bits, static", [(4, 16, None), (3, 16, None), (8, 16, None), (3, 8, None),
                                                     (8, 8, None), (2, 4, None), (4, 4, (0.05, 7.0))])
def test_quant_linear_compiles_whole_and_matches_eager_exactly(bits, act_bits, static):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(bits * 100 + act_bits)
    W = torch.randn(40, 72, generator=g)
    pw = pack_layer(rtn(W, QuantSpec(bits, -1 if bits == 8 else 32, bits == 8)))
    layer = QuantLinear(pw, torch.randn(40, generator=g), act_bits=act_bits, act_static=static)
    compiled = compile_model(layer, fullgraph=True)  # a graph break is an error
    for shape in ((1, 1, 72), (1, 5, 72), (3, 72)):  # decode, prompt, flat rows
        x = torch.randn(*shape, generator=g)
        with torch.inference_mode():
            assert torch.equal(compiled(x), layer(x)), shape


@pytest.mark.parametrize("groups, k, granularity, static", [
    (12, 3, "channel", None),  # depthwise: dw_a8, per (image, channel) scales
    (1, 1, "pixel", None),  # 1×1 strided: gemm_vert_a8 over pixels, per-pixel scales
    (1, 5, "image", None),  # 5×5 stride 3: unfolded patches
    (1, 3, "image", (0.05, 140.0)),  # static asymmetric range
])
def test_quant_conv_compiles_whole_and_matches_eager_exactly(groups, k, granularity, static):
    torch._dynamo.reset()
    conv, pw = _conv_case(groups, False, 8, True, 7, k)
    layer = QuantConv2d(pw, conv, torch.randn(pw.out_features), act_bits=8, act_static=static,
                        act_granularity=granularity)
    assert layer.int8
    compiled = compile_model(layer, fullgraph=True)
    x = torch.randn(2, conv.in_channels, 11, 13)
    with torch.inference_mode():
        assert torch.equal(compiled(x), layer(x))


class _Parent(nn.Module):
    def __init__(self, child: nn.Module):
        super().__init__()
        self.child = child

    def forward(self, x):
        return self.child(x)


def test_two_compiled_models_of_one_class_do_not_share_code():
    """Module guards are skipped for speed; a quantized and an fp32 model of one class (as `bench --compile`
    runs) must still each run their own graph. Plain torch.compile with every module guard skipped reuses
    the first graph for the second model here."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=g)
    models = [_Parent(QuantLinear(pack_layer(rtn(W, QuantSpec(4, 16, False))), None, act_bits=8)),
              _Parent(nn.Linear(32, 16))]
    compiled = [compile_model(m, fullgraph=True) for m in models]
    x = torch.randn(1, 1, 32, generator=g)
    with torch.inference_mode():
        for m, c in zip(models, compiled):
            assert torch.equal(c(x), m(x))


@pytest.fixture(scope="module")
def mixed_ckpt(tiny_llama, text_file, tmp_path_factory):
    """A tiny Llama with weight-only and int8-activation layers (2/4-bit A8, 8-bit A16)."""
    d = tmp_path_factory.mktemp("compiled")
    invoke("sensitivity", tiny_llama, "--calib", text_file, "--nsamples", 2, "--seqlen", 32, "--max-probes", 8,
           "-q", "-o", d / "s.json")
    invoke("allocate", d / "s.json", "--bits", "2,4,8", "--act-bits", "8,16", "--pairs", "2:8,4:8", "--bops-frac", 0.2,
           "--avg-bits", 5, "-q", "-o", d / "p.json")
    invoke("quantize", tiny_llama, "--plan", d / "p.json", "--calib", text_file, "--method", "rtn", "-q",
           "-o", d / "ckpt")
    return d / "ckpt"


def test_compiled_decode_gives_the_eager_tokens(mixed_ckpt):
    torch._dynamo.reset()
    model = load_quantized(mixed_ckpt, attn_implementation="sdpa")
    acts = {m.act_bits for m in model.modules() if isinstance(m, QuantLinear)}
    assert acts == {8, 16}, acts  # both kinds of layer are in the compiled graph
    n, steps = 8, 4  # the shapes `bench --compile --prompt-tokens 8 --decode-tokens 4` compiles (cached graphs)
    prompt = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    before = graph_breaks()
    tokens = []
    for compiled in (False, True):
        run, out = _Decoder(model, compiled, n + steps + 1), []
        with torch.inference_mode():
            cache, nxt = run.prefill(prompt)
            for i in range(steps):
                cache, nxt = run.step(nxt, cache, n + i)
                out.append(int(nxt))
        tokens.append(out)
    assert tokens[0] == tokens[1]
    assert graph_breaks() == before


def test_bench_compile_reports_whole_graphs(mixed_ckpt):
    torch._dynamo.reset()
    res = json.loads(invoke("bench", mixed_ckpt, "--compile", "--no-layers", "--prompt-tokens", 8,
                            "--decode-tokens", 4, "--repeats", 1, "--json").stdout)
    assert res["compiled"] is True and res["graph_breaks"] == 0
    assert res["quantized"]["decode_tokens_per_s"] > 0 and res["full_precision"]["decode_tokens_per_s"] > 0


def test_bench_compile_failure_is_one_line(mixed_ckpt, monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("no C++ compiler found\nlong details")
    monkeypatch.setattr(torch, "compile", broken)
    r = invoke("bench", mixed_ckpt, "--compile", "--no-layers", "--prompt-tokens", 8, "--decode-tokens", 2,
               "--repeats", 1, code=1)
    assert "torch.compile failed (RuntimeError: no C++ compiler found)" in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith("without --compile"), r.output
