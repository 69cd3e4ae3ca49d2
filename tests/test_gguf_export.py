"""GGUF export (`hawqtool export CKPT --format gguf`): a checkpoint of ggml-typed layers becomes a llama.cpp file.

The checkpoints here are written directly in the decided layout (NAME.ggml uint8 [out, row bytes] in HF row
order, manifest layers[NAME]["ggml_type"]) from a tiny Llama (hidden 256, 4 heads of 64, 2 KV heads), with
blocks made by gguf.quants (32-wide types) or random valid K-quant blocks, so nothing depends on the
quantizer. Read back with gguf's own reader and dequantizer.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import invoke, one_line_error
from conftest import make_tiny_llama

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

from hawqtool.artifacts import SCHEMA_VERSION  # noqa: E402
from hawqtool.checkpoint import MANIFEST, WEIGHTS  # noqa: E402
from hawqtool.gguf_export import (export_gguf, pre_tokenizer_name, qk_row_order, tokenizer_vocab,  # noqa: E402
                                  write_gguf)
from hawqtool.integrity import sha256_file  # noqa: E402
from hawqtool.tensorfile import save_tensors  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 256, 4, 2, 64
# one ggml type per projection: every 32-wide type gguf can make, and two K-quants (random blocks)
TYPES = {"q_proj": "Q4_0", "k_proj": "Q8_0", "v_proj": "Q5_1", "o_proj": "Q4_K", "gate_proj": "Q4_1",
         "up_proj": "Q5_0", "down_proj": "Q6_K"}


def k_quant_blocks(rows: int, cols: int, qtype, seed: int) -> np.ndarray:
    """Random but valid K-quant blocks (gguf cannot quantize K types): random bytes with finite fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    offsets = {T.Q4_K: (0, 2), T.Q6_K: (size - 2,)}[qtype]  # d, dmin / d
    for off in offsets:
        raw[..., off:off + 2] = scale
    return raw.reshape(rows, -1)


def ggml_bytes(w: torch.Tensor, type_name: str, seed: int = 0) -> np.ndarray:
    qt = T[type_name]
    if type_name.endswith("_K"):
        return k_quant_blocks(*w.shape, qt, seed)
    return gguf.quants.quantize(w.float().numpy(), qt)


def write_ckpt(folder: Path, model_dir: Path, *, types: dict[str, str] = TYPES, untie: bool = False,
               packed_layer: bool = False, embedding: bool = False, config_patch: dict | None = None,
               source: str | None = None) -> Path:
    """A checkpoint folder in the decided ggml layout (what `hawqtool quantize --formats gguf` writes)."""
    folder.mkdir(parents=True)
    state = load_file(str(model_dir / "model.safetensors"))
    cfg = json.loads((model_dir / "config.json").read_text())
    tensors, layers = {}, {}
    names = [k[:-len(".weight")] for k in state if k.endswith("_proj.weight")]
    if untie:
        cfg["tie_word_embeddings"] = False
        state["lm_head.weight"] = state["model.embed_tokens.weight"].flip(0).clone()
        names.append("lm_head")
        types = {**types, "lm_head": "Q8_0"}
    for i, name in enumerate(names):
        w = state.pop(f"{name}.weight")
        t = types[name.rpartition(".")[2]]
        tensors[f"{name}.ggml"] = torch.from_numpy(ggml_bytes(w, t, seed=i))
        block, size = gguf.GGML_QUANT_SIZES[T[t]]
        layers[name] = {"ggml_type": t, "in_features": w.shape[1], "out_features": w.shape[0], "bits": 4,
                        "group_size": block, "symmetric": False}
    if packed_layer:  # one layer in hawqtool's own format
        name = "model.layers.1.mlp.down_proj"
        del tensors[f"{name}.ggml"]
        tensors[f"{name}.qweight"] = torch.zeros(4, dtype=torch.int32)
        tensors[f"{name}.scales"] = torch.zeros(4, dtype=torch.float16)
        layers[name] = {"bits": 4, "group_size": 128, "symmetric": True, "in_features": 1, "out_features": 1}
    tensors.update(state)
    save_tensors(tensors, folder / WEIGHTS, metadata={"format": "hawqtool"})
    cfg.update(config_patch or {})
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in model_dir.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copyfile(f, folder / f.name)
    manifest = {"kind": "checkpoint", "schema_version": SCHEMA_VERSION, "layers": layers, "tied": {},
                "source_model": source or str(model_dir),
                "files": {p.name: sha256_file(p) for p in sorted(folder.iterdir())}}
    if embedding:
        manifest["embedding"] = {"name": "model.embed_tokens", "bits": 8, "tied_head": "lm_head"}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus_text) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama256"), corpus_text, hidden=HIDDEN)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model_dir) -> Path:
    return write_ckpt(tmp_path_factory.mktemp("c") / "ckpt", model_dir)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ckpt) -> Path:
    return export_gguf(ckpt, tmp_path_factory.mktemp("g") / "model.gguf")


def field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def tensor_values(t) -> np.ndarray:
    """A read-back tensor as float32 [rows, cols] via gguf's own dequantize."""
    rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(rows, -1)


def test_types_weights_and_qk_permutation_exact(exported, ckpt):
    """Every quantized layer keeps its planned type, and gguf's dequantize of the file's tensor, with the Q/K
    row permutation undone, equals the dequantized checkpoint weight exactly; norms are F32 and exact."""
    reader = gguf.GGUFReader(str(exported))
    by_name = {t.name: t for t in reader.tensors}
    stored = load_file(str(ckpt / WEIGHTS))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    hf_to_gguf = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for name, meta in manifest["layers"].items():
        bid, proj = int(name.split(".")[2]), name.rpartition(".")[2]
        t = by_name[f"blk.{bid}.{hf_to_gguf[proj]}.weight"]
        assert t.tensor_type == T[meta["ggml_type"]]
        assert [int(x) for x in t.shape] == [meta["in_features"], meta["out_features"]]  # ggml order
        got = tensor_values(t)
        want = gguf.quants.dequantize(stored[f"{name}.ggml"].numpy(), T[meta["ggml_type"]])
        if proj in ("q_proj", "k_proj"):
            order = qk_row_order(want.shape[0], HEADS if proj == "q_proj" else KV_HEADS)
            assert not np.array_equal(order, np.arange(len(order)))
            undone = np.empty_like(got)
            undone[order] = got
            got = undone
        np.testing.assert_array_equal(got, want)
    for bid in range(2):
        for hf, gg in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            t = by_name[f"blk.{bid}.{gg}.weight"]
            assert t.tensor_type == T.F32
            np.testing.assert_array_equal(np.asarray(t.data), stored[f"model.layers.{bid}.{hf}.weight"].numpy())
    assert by_name["output_norm.weight"].tensor_type == T.F32
    assert "output.weight" not in by_name  # tied head: llama.cpp uses token_embd
    emb = stored["model.embed_tokens.weight"].numpy()
    t = by_name["token_embd.weight"]
    assert t.tensor_type == T.Q8_0
    got = tensor_values(t)
    np.testing.assert_array_equal(got, gguf.quants.dequantize(gguf.quants.quantize(emb, T.Q8_0), T.Q8_0))
    scale = np.abs(emb.reshape(emb.shape[0], -1, 32)).max(-1, keepdims=True) / 127  # Q8_0's per-block step
    # half a step, plus 127 steps of the fp16 rounding of the step (2^-11 relative)
    assert (np.abs(got - emb).reshape(scale.shape[0], -1, 32) <= scale * (0.5 + 127 * 2**-11) + 1e-7).all()
    assert len(reader.tensors) == 1 + 2 * 9 + 1


def test_metadata_as_llama_cpp_writes_it(exported, model_dir):
    reader = gguf.GGUFReader(str(exported))
    cfg = json.loads((model_dir / "config.json").read_text())
    want = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": HIDDEN,
            "llama.feed_forward_length": 2 * HIDDEN, "llama.attention.head_count": HEADS,
            "llama.attention.head_count_kv": KV_HEADS, "llama.rope.dimension_count": HEAD_DIM,
            "llama.context_length": 256, "llama.vocab_size": cfg["vocab_size"],
            "general.quantized_by": "hawqtool", "hawqtool.kind": "gguf-export",
            "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q6_K)}  # down_proj holds the most bytes
    for key, value in want.items():
        assert field(reader, key) == value, key
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta")
    assert field(reader, "llama.rope.freq_base") == pytest.approx(theta)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])


def test_tokenizer_keys(exported, model_dir):
    reader = gguf.GGUFReader(str(exported))
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = {i: t for t, i in tj["model"]["vocab"].items()} | {a["id"]: a["content"] for a in tj["added_tokens"]}
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"  # a plain ByteLevel pre-tokenizer
    assert field(reader, "tokenizer.ggml.tokens") == [vocab[i] for i in range(len(vocab))]
    types = field(reader, "tokenizer.ggml.token_type")
    eos = tj["added_tokens"][0]["id"]
    assert types[eos] == gguf.TokenType.CONTROL and types[eos + 1] == gguf.TokenType.NORMAL
    assert len(field(reader, "tokenizer.ggml.merges")) == len(tj["model"]["merges"])
    assert field(reader, "tokenizer.ggml.eos_token_id") == eos
    assert field(reader, "tokenizer.ggml.add_bos_token") is False


def rope_hf(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """transformers' Llama RoPE on [seq, heads, d]: rotate-half, dim j paired with j + d/2."""
    d = x.shape[-1]
    ang = pos[:, None, None] * (10000.0 ** (-np.arange(d // 2) * 2 / d))
    a, b = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1)


def rope_ggml(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """ggml's normal RoPE (llama.cpp's LLAMA_ROPE_TYPE_NORM): dims 2j and 2j+1 rotated together."""
    d = x.shape[-1]
    ang = pos[:, None, None] * (10000.0 ** (-np.arange(d // 2) * 2 / d))
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)
    return out


def test_qk_permutation_gives_llama_cpp_the_same_attention_scores():
    """With Q/K rows reordered by qk_row_order, ggml's interleaved RoPE gives the attention scores transformers'
    rotate-half RoPE gives on the original weights (grouped-query heads included)."""
    rng = np.random.default_rng(0)
    n_head, n_kv, d, hidden, seq = 6, 2, 16, 24, 5
    wq, wk = rng.standard_normal((n_head * d, hidden)), rng.standard_normal((n_kv * d, hidden))
    x, pos = rng.standard_normal((seq, hidden)), np.arange(seq, dtype=np.float64) * 3

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).reshape(seq, n_head, d), pos)
        k = np.repeat(rope((x @ wk.T).reshape(seq, n_kv, d), pos), n_head // n_kv, axis=1)
        return np.einsum("shd,thd->hst", q, k)

    ref = scores(wq, wk, rope_hf)
    ours = scores(wq[qk_row_order(n_head * d, n_head)], wk[qk_row_order(n_kv * d, n_kv)], rope_ggml)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-9)
    assert not np.allclose(scores(wq, wk, rope_ggml), ref)  # without the permutation they differ


def test_cli_untied_head_embed_type_and_determinism(tmp_path, model_dir):
    """An untied quantized head becomes `output`; --embed-type F16; two exports are byte-identical, the second
    replacing our own file, and no temporary is left."""
    ck = write_ckpt(tmp_path / "ck", model_dir, untie=True)
    out = tmp_path / "m.gguf"
    res = invoke("export", ck, "--format", "gguf", "--embed-type", "f16", "-o", out, "--json")
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"export": str(out), "format": "gguf"}
    first = hashlib.sha256(out.read_bytes()).hexdigest()
    reader = gguf.GGUFReader(str(out))
    by_name = {t.name: t for t in reader.tensors}
    assert by_name["token_embd.weight"].tensor_type == T.F16
    assert by_name["output.weight"].tensor_type == T.Q8_0
    head = load_file(str(ck / WEIGHTS))["lm_head.ggml"].numpy()
    np.testing.assert_array_equal(tensor_values(by_name["output.weight"]), gguf.quants.dequantize(head, T.Q8_0))
    del reader, by_name
    invoke("export", ck, "--format", "gguf", "--embed-type", "F16", "-o", out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "m.gguf"]


@pytest.mark.parametrize("case, args, words", [
    ("llama", ("--embed-type", "Q4_K"), ("--embed-type", "Q4_K", "Q8_0")),
    ("llama", ("--embed-type", "nope"), ("--embed-type", "nope")),
    ("llama", ("--format", "gptq", "--embed-type", "Q8_0"), ("--embed-type", "gguf only")),
    ("qwen2", (), ("'qwen2'", "Llama family", "--format gptq")),
    ("packed", (), ("layers.1.mlp.down_proj", "--formats gguf")),
    ("embedding", (), ("embedding", "--embed-bits 16", "--embed-type")),
    ("foreign", (), ("exists", "--overwrite")),
    ("folder", (), ("is a folder", "model.gguf")),
])
def test_refusals_are_one_line(tmp_path, model_dir, case, args, words):
    ck = write_ckpt(tmp_path / "ck", model_dir, packed_layer=case == "packed", embedding=case == "embedding",
                    config_patch={"model_type": "qwen2"} if case == "qwen2" else None)
    out = tmp_path / "m.gguf"
    if case == "foreign":
        out.write_text("not ours")
    if case == "folder":
        out.mkdir()
    fmt = () if "--format" in args else ("--format", "gguf")
    one_line_error(invoke("export", ck, *fmt, *args, "-o", out, ok=False), *words)
    if case == "foreign":
        assert out.read_text() == "not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck"] + (["m.gguf"] if out.exists() else []))


def test_pre_tokenizer_table():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level, "normalizer": None}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": smollm, "normalizer": None}) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": smollm, "normalizer": {"type": "NFC"}}) is None
    assert pre_tokenizer_name({"pre_tokenizer": {**byte_level, "add_prefix_space": True}}) is None
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}}) is None


def test_unknown_pre_tokenizer_warns_and_writes_default(tmp_path, model_dir, caplog):
    md = tmp_path / "md"
    shutil.copytree(model_dir, md)
    tj = json.loads((md / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Punctuation"}, tj["pre_tokenizer"]]}
    (md / "tokenizer.json").write_text(json.dumps(tj))
    state = load_file(str(md / "model.safetensors"))
    with caplog.at_level("WARNING", logger="hawqtool"):
        write_gguf(tmp_path / "x.gguf", md, {}, state)
    assert sum("unknown pre-tokenizer" in r.getMessage() for r in caplog.records) == 1
    reader = gguf.GGUFReader(str(tmp_path / "x.gguf"))
    assert field(reader, "tokenizer.ggml.pre") == "default"
    assert {t.name: t.tensor_type for t in reader.tensors}["blk.0.attn_q.weight"] == T.F32  # dense_type


def fake_source_gguf(path: Path, tokens: list[str], pre: str) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_pre_tokenizer_from_the_source_gguf(tmp_path, model_dir):
    """A model converted from a GGUF keeps that GGUF's pre-tokenizer (transformers' conversion drops e.g.
    SmolLM's digit splitting), but only when its tokens are the checkpoint's."""
    cfg = json.loads((model_dir / "config.json").read_text())
    tokens = tokenizer_vocab(model_dir, cfg["vocab_size"])[0]
    for toks, want in ((tokens, "smollm"), (tokens[:-1] + ["zz"], "gpt-2")):
        src = fake_source_gguf(tmp_path / f"src{want}.gguf", toks, "smollm")
        ck = write_ckpt(tmp_path / f"ck{want}", model_dir, source=str(src))
        out = export_gguf(ck, tmp_path / f"{want}.gguf")
        assert field(gguf.GGUFReader(str(out)), "tokenizer.ggml.pre") == want


@pytest.mark.slow
def test_real_smollm2_export_keeps_its_gguf_pre_tokenizer(tmp_path):
    """The embedded SmolLM2 (converted from a GGUF whose tokenizer.json lost SmolLM's digit splitting) exports
    with the source GGUF's "smollm" pre-tokenizer and every layer Q8_0. (llama.cpp's llama-perplexity on this
    file: 21.04 on 20 chunks of the wiki text at ctx 512, the source Q4_1 GGUF 20.95.)"""
    from hawqtool.models import default_model_path

    ck = write_ckpt(tmp_path / "ck", default_model_path(), types=dict.fromkeys(TYPES, "Q8_0"))
    reader = gguf.GGUFReader(str(export_gguf(ck, tmp_path / "smol.gguf")))
    assert field(reader, "tokenizer.ggml.pre") == "smollm"
    assert field(reader, "llama.attention.head_count_kv") == 3
    types = Counter(t.tensor_type for t in reader.tensors)
    assert types == {T.Q8_0: 30 * 7 + 1, T.F32: 30 * 2 + 1}


def test_full_disk_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, ckpt, monkeypatch):
    import errno
    from collections import namedtuple

    out = tmp_path / "m.gguf"
    invoke("export", ckpt, "--format", "gguf", "-o", out, "-q")
    before = out.read_bytes()

    def full(self, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    one_line_error(invoke("export", ckpt, "--format", "gguf", "-o", out, ok=False), "no space left", str(out))
    monkeypatch.undo()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("hawqtool.outputs.shutil.disk_usage", lambda p: usage(10 ** 6, 10 ** 6 - 4096, 4096))
    one_line_error(invoke("export", ckpt, "--format", "gguf", "-o", out, ok=False), "not enough free space", "4096")
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_hawqtool_dequantize_equals_gguf_of_the_exported_tensors(exported, ckpt):
    """The issue's check: gguf-py's dequantize of every exported layer (Q/K permutation undone) equals
    hawqtool's own dequantized weight of the checkpoint's bytes (quantize/ggml_grid.py) exactly."""
    grid_mod = pytest.importorskip("hawqtool.quantize.ggml_grid")
    if not all(hasattr(grid_mod, f) for f in ("unpack_grid", "dequantize_grid")):
        pytest.skip("hawqtool.quantize.ggml_grid has no unpack_grid/dequantize_grid yet")
    from hawqtool.quantize.ggml_types import ggml_type

    by_name = {t.name: t for t in gguf.GGUFReader(str(exported)).tensors}
    stored = load_file(str(ckpt / WEIGHTS))
    for name, meta in json.loads((ckpt / MANIFEST).read_text())["layers"].items():
        bid, proj = int(name.split(".")[2]), name.rpartition(".")[2]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[proj]
        got = tensor_values(by_name[f"blk.{bid}.{gname}.weight"])
        if proj in ("q_proj", "k_proj"):
            undone = np.empty_like(got)
            undone[qk_row_order(got.shape[0], HEADS if proj == "q_proj" else KV_HEADS)] = got
            got = undone
        q, grid = grid_mod.unpack_grid(stored[f"{name}.ggml"].numpy(), ggml_type(meta["ggml_type"]),
                                       meta["in_features"])
        ours = grid_mod.dequantize_grid(q, grid).float().numpy()
        np.testing.assert_array_equal(got, ours, err_msg=f"{name} ({meta['ggml_type']})")
