"""`hawqtool export`: compressed-tensors checkpoints load in plain transformers with our logits;
GPTQ tensors decode, through a reader written here from the published layout, to our weights."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hawqtool.cli import main
from quant_kernels import PackedWeight, dequantize

MIXED = [(2, 24), (3, 16), (4, -1), (8, 24), (3, 24), (4, 16), (2, -1)]  # (bits, group), cycled over layers


def _need_compressed_tensors() -> None:
    """Skip when compressed-tensors is missing, except in CI (env CI set) where that is a failure."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("compressed-tensors is not installed (pip install -e '.[test]')")
        pytest.skip("compressed-tensors is not installed; pip install 'hawqtool[export]' to run this test")


def _checkpoint(folder: Path, tiny_llama: Path, text_file: Path, symmetric: bool) -> Path:
    """RTN checkpoint of the tiny Llama with a mixed 2/3/4/8-bit plan (partial last groups included)."""
    from hawqtool.allocate.plan import fixed_plan
    from hawqtool.data import calibration_windows
    from hawqtool.models import load_model, quantizable_layers, weight_matrix
    from hawqtool.quantize.driver import QuantizeOptions
    from hawqtool.stages import quantize_stage

    loaded = load_model(str(tiny_llama))
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(loaded.model).items()}
    plan = fixed_plan(shapes, 4, group_size=24, symmetric=symmetric)
    for i, lp in enumerate(plan.layers):
        lp.bits, lp.group_size = MIXED[i % len(MIXED)]
    ids = calibration_windows(loaded.tokenizer, str(text_file), 2, 16)
    return quantize_stage(loaded, plan, ids, QuantizeOptions(method="rtn"), folder)


@pytest.fixture(scope="module")
def sym_ckpt(tmp_path_factory, tiny_llama, text_file) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("sym") / "ckpt", tiny_llama, text_file, True)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_compressed_tensors_loads_in_plain_transformers(sym_ckpt, tmp_path):
    _need_compressed_tensors()
    from transformers import AutoModelForCausalLM

    from hawqtool.runtime import load_quantized

    manifest = json.loads((sym_ckpt / "hawqtool_manifest.json").read_text())
    assert {m["bits"] for m in manifest["layers"].values()} == {2, 3, 4, 8}
    out = tmp_path / "ct"
    res = invoke("export", sym_ckpt, "--format", "compressed-tensors", "-o", out)
    assert res.exit_code == 0, res.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(manifest["layers"])
    assert (out / "tokenizer.json").is_file() and not (out / "hawqtool_manifest.json").exists()

    ours = load_quantized(sym_ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()  # plain: no hawqtool code involved
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert ((a - b).norm() / a.norm()).item() < 1e-4
    # the dense weights transformers decompressed are exactly our dequantized weights
    dense = dict(theirs.named_modules())
    for name, m in ours.named_modules():
        if hasattr(m, "dequantized_weight"):
            assert torch.equal(dense[name].weight.float(), m.dequantized_weight()), name


def test_asymmetric_refused_for_compressed_tensors(tmp_path, tiny_llama, text_file):
    ckpt = _checkpoint(tmp_path / "asym", tiny_llama, text_file, False)
    res = invoke("export", ckpt, "--format", "compressed-tensors", "-o", tmp_path / "ct")
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: layer ") and "--sym" in lines[0], res.stderr
    assert not list(tmp_path.glob("ct*"))  # nothing written


# ------------------------------------------------------------------ GPTQ: independent reader


def _words_u32(t: torch.Tensor) -> list[list[int]]:
    """int32 tensor -> nested lists of unsigned 32-bit ints."""
    return [[int(x) & 0xFFFFFFFF for x in row] for row in t.tolist()]


def read_gptq_packed(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack GPTQ words [W, cols] into codes [n, cols], read bit by bit from AutoGPTQ's layout:
    2/4/8 bits: value i of word r is row r*(32/b)+i at bits [i*b, (i+1)*b); 3 bits: per 3 words,
    rows 0-9 at 3i, row 10 at bits 30-31 + bit 0 of the next word, rows 11-20 at 3i+1, row 21 at
    bit 31 + bits 0-1 of the next word, rows 22-31 at 3i+2."""
    words = _words_u32(packed)
    cols = packed.shape[1]
    out = torch.zeros(n, cols, dtype=torch.int64)
    if bits in (2, 4, 8):
        per = 32 // bits
        for r in range(n):
            w, i = divmod(r, per)
            for c in range(cols):
                out[r, c] = (words[w][c] >> (i * bits)) & (2**bits - 1)
        return out
    assert bits == 3
    for r in range(n):
        blk, k = divmod(r, 32)
        w0, w1, w2 = 3 * blk, 3 * blk + 1, 3 * blk + 2
        for c in range(cols):
            def word(j: int) -> int:
                return words[j][c] if j < len(words) else 0
            if k < 10:
                v = word(w0) >> (3 * k)
            elif k == 10:
                v = (word(w0) >> 30) | ((word(w1) & 1) << 2)
            elif k < 21:
                v = word(w1) >> (3 * (k - 11) + 1)
            elif k == 21:
                v = (word(w1) >> 31) | ((word(w2) & 3) << 1)
            else:
                v = word(w2) >> (3 * (k - 22) + 2)
            out[r, c] = v & 7
    return out


def gptq_dense(t: dict[str, torch.Tensor], name: str, bits: int, in_f: int, out_f: int) -> torch.Tensor:
    """Dense W [out, in] from GPTQ v1 tensors: W[o, i] = scales[g, o] * (q[i, o] - (qzeros[g, o] + 1))."""
    g_idx = t[f"{name}.g_idx"].to(torch.int64)
    n_groups = t[f"{name}.scales"].shape[0]
    q = read_gptq_packed(t[f"{name}.qweight"], bits, in_f)  # [in, out]
    z = read_gptq_packed(t[f"{name}.qzeros"].T.contiguous(), bits, out_f).T + 1  # [groups, out]
    assert z.shape == (n_groups, out_f)
    s = t[f"{name}.scales"].float()
    return (s[g_idx] * (q - z[g_idx]).float()).T


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_layer_roundtrip(bits, symmetric):
    from hawqtool.export import gptq_layer_tensors

    out_f, in_f, gs = 40, 96, 40  # 3 groups, the last holding 16 columns; out not a multiple of 32
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    scales = torch.rand(out_f, 3, generator=g) + 0.01
    zeros = None if symmetric else torch.randint(1, 2**bits, (out_f, 3), generator=g)
    pw = PackedWeight.from_codes(q, scales, zeros, bits=bits, group_size=gs, symmetric=symmetric)
    t = gptq_layer_tensors("layer", pw)
    assert t["layer.qweight"].shape == (in_f * bits // 32, out_f) and t["layer.qweight"].dtype == torch.int32
    assert t["layer.qzeros"].shape == (3, (out_f * bits + 31) // 32) and t["layer.scales"].dtype == torch.float16
    assert t["layer.g_idx"].tolist() == [j // gs for j in range(in_f)]
    assert torch.equal(gptq_dense(t, "layer", bits, in_f, out_f), dequantize(pw))
    if symmetric and bits == 4:  # v1 stores zero-1: 8-1 = 7 in every nibble
        assert (t["layer.qzeros"] == 0x77777777).all()


def test_gptq_export_cli(sym_ckpt, tmp_path):
    from safetensors.torch import load_file

    from hawqtool.runtime import QuantLinear, load_quantized

    out = tmp_path / "gptq"
    res = invoke("export", sym_ckpt, "--format", "gptq", "-o", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gptq"]  # renamed into place, no temp left
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["sym"] is True and qc["desc_act"] is False and qc["bits"] in (2, 3, 4, 8)
    t = load_file(str(out / "model.safetensors"))
    ours = load_quantized(sym_ckpt)
    import re

    n = 0
    for name, m in ours.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        over = [v for k, v in qc["dynamic"].items() if k.startswith("+:") and re.match(k[2:], name)]
        bits, gs = (over[0]["bits"], over[0]["group_size"]) if over else (qc["bits"], qc["group_size"])
        assert (bits, gs) == (m.bits, m.group_size), name
        assert torch.equal(gptq_dense(t, name, bits, m.in_features, m.out_features), m.dequantized_weight()), name
        n += 1
    assert n == 14
    # writing again replaces the folder atomically
    assert invoke("export", sym_ckpt, "--format", "gptq", "-o", out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gptq"]


def test_gptq_act_order_and_refusals():
    """g_idx (act-order) layers export with desc_act; unrepresentable layers are refused in one line."""
    from hawqtool.errors import UserError
    from hawqtool.export import _refuse_unsupported, gptq_layer_tensors, gptq_quantize_config

    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 8, (32, 64), generator=g)
    g_idx = torch.randperm(64, generator=g) // 16
    pw = PackedWeight.from_codes(q, torch.rand(32, 4, generator=g) + 0.1, None, bits=3, group_size=16,
                                 symmetric=True, g_idx=g_idx)
    t = gptq_layer_tensors("l", pw)
    assert torch.equal(t["l.g_idx"], g_idx.to(torch.int32))
    assert torch.equal(gptq_dense(t, "l", 3, 64, 32), dequantize(pw))
    assert gptq_quantize_config({"l": pw}, [])["desc_act"] is True
    with pytest.raises(UserError, match="layer l uses act-order"):
        _refuse_unsupported({"l": pw}, "compressed-tensors")
    zeros = torch.ones(32, 4, dtype=torch.int64)
    zeros[3, 2] = 0
    asym = PackedWeight.from_codes(q, torch.rand(32, 4, generator=g) + 0.1, zeros, bits=3, group_size=16,
                                   symmetric=False)
    with pytest.raises(UserError, match="layer l has a zero point of 0.*re-quantize with --sym \\("):
        _refuse_unsupported({"l": asym}, "gptq")
    six = PackedWeight.from_codes(torch.randint(0, 64, (32, 64), generator=g), torch.rand(32, 4, generator=g) + 0.1,
                                  torch.full((32, 4), 31, dtype=torch.int64), bits=6, group_size=16, symmetric=False)
    with pytest.raises(UserError, match="layer w has 6 bits.*re-quantize with --bits 2,3,4,8 \\("):
        _refuse_unsupported({"w": six}, "gptq")
    # both at once: one line names both fixes, so one re-quantization is enough
    with pytest.raises(UserError, match=r"layer w has 6 bits .*; layer l has a zero point of 0.*"
                                        r"re-quantize with --bits 2,3,4,8 --sym \("):
        _refuse_unsupported({"w": six, "l": asym}, "gptq")
    _refuse_unsupported({"l": pw}, "gptq")  # symmetric 3-bit: nothing to refuse
