"""Export a checkpoint of ggml-typed layers as one GGUF file that llama.cpp runs (`export --format gguf`).

Architectures: the Llama family with a gpt2-style byte-level BPE tokenizer.json, i.e. config.json
`model_type: llama` (SmolLM / SmolLM2, Llama 3.x without "llama3" rope scaling, TinyLlama-style configs with
such a tokenizer). Anything else (other model types, SentencePiece/byte-fallback tokenizers such as Llama 1/2,
rope scaling other than linear) is refused in one line.

The file is written with the `gguf` package's GGUFWriter as llama.cpp's convert_hf_to_gguf.py writes a Llama:
the same metadata keys, gguf's own HF -> GGUF tensor name map (token_embd, blk.N.attn_q ..., output_norm,
output when the head is untied), and its Q/K row permutation: HF's rotate-half RoPE pairs row j of a head with
row j + d/2, llama.cpp's kernel pairs rows 2j and 2j+1, so the rows of each head (of n_head heads for attn_q,
n_head_kv for attn_k) are reordered (2, d/2) -> (d/2, 2). ggml blocks run along the input dimension, so the
permutation moves whole rows of packed bytes and the quantized values are untouched. Quantized layers keep
their planned ggml type byte for byte; the embedding is quantized here with gguf.quants (`embed_type`), norms
and 1-D tensors are F32, other dense matrices `dense_type`.

tokenizer.ggml.pre, which selects llama.cpp's pre-tokenizer regex, is taken from (1) the GGUF the model came
from when there is one with the same tokens (the embedded SmolLM2 was converted from one: "smollm"), else
(2) the tokenizer.json pre-tokenizer matched against the few known configurations in `_PRE_TOKENIZERS`, else
"default" with a one-line warning. The output holds no time stamp: the same inputs give the same bytes; the
key `hawqtool.kind` marks it as our own output (outputs.is_own_output).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

log = logging.getLogger("hawqtool")

MARKER_KEY = "hawqtool.kind"
MARKER_VALUE = "gguf-export"
EMBED_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F16", "BF16", "F32")  # what gguf.quants can quantize
DENSE_TYPES = ("F32", "F16", "BF16", "Q8_0")
SUPPORTED_MODEL_TYPES = ("llama",)

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
# tokenizer.json pre_tokenizer (reduced by _pre_key) -> llama.cpp's name for the same splitting; normalizer none
_PRE_TOKENIZERS = {
    "gpt-2": [_BYTE_LEVEL],  # GPT-2's regex inside ByteLevel
    "smollm": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],  # SmolLM / SmolLM2's own tokenizer
    "llama-bpe": [{"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
                  {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}],  # Llama 3
}
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0",
               "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0",
               "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S",
               "Q6_K": "MOSTLY_Q6_K"}


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise UserError("exporting to GGUF needs the gguf package; pip install gguf") from e
    return gguf


def qk_row_order(n_rows: int, n_head: int) -> np.ndarray:
    """Row indices that reorder a Q (n_head heads) or K (n_head_kv heads) projection from HF's rotate-half layout
    to llama.cpp's interleaved one: new row h*d + 2j + i is old row h*d + i*d/2 + j (d = head dim)."""
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def _qtype(name: str, what: str, allowed: tuple[str, ...] | None = None):
    gguf = _gguf()
    key = str(name).upper()
    if key not in gguf.GGMLQuantizationType.__members__ or (allowed is not None and key not in allowed):
        choices = ", ".join(allowed) if allowed else "a ggml type name"
        raise UserError(f"{what} {name!r} is not a ggml type the GGUF export can produce here; choose one of {choices}")
    return gguf.GGMLQuantizationType[key]


class _Llama:
    """The hyper-parameters of a supported config.json, and the shape each GGUF tensor must have."""

    def __init__(self, cfg: dict, where: Path):
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"{where} is a {mt!r} model; the GGUF export supports the Llama family only "
                            f"(model_type {', '.join(SUPPORTED_MODEL_TYPES)}); for other models plan without "
                            "--formats gguf and export with --format gptq")
        try:
            self.hidden, self.ff = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
            self.n_layer, self.n_head = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
            self.n_kv = int(cfg.get("num_key_value_heads") or self.n_head)
            self.vocab, self.ctx = int(cfg["vocab_size"]), int(cfg.get("max_position_embeddings") or 2048)
            self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}/config.json lacks or mistypes {e} for a Llama; use the source model's "
                            "config") from e
        self.head_dim = int(cfg.get("head_dim") or self.hidden // self.n_head)
        self.has_head_dim = cfg.get("head_dim") is not None
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # transformers 5 / 4
        self.theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
        self.rope_type = rope.get("rope_type") or rope.get("type") or "default"
        self.rope_factor = rope.get("factor")
        if self.rope_type not in ("default", "linear"):
            raise UserError(f"{where} uses {self.rope_type!r} rope scaling, which the GGUF export does not write yet "
                            "(default and linear only); run the model through transformers instead")

    def shape(self, kind) -> tuple[int, ...]:
        T = _gguf().MODEL_TENSOR
        h, q, kv = self.hidden, self.n_head * self.head_dim, self.n_kv * self.head_dim
        return {T.TOKEN_EMBD: (self.vocab, h), T.OUTPUT: (self.vocab, h), T.ATTN_Q: (q, h), T.ATTN_K: (kv, h),
                T.ATTN_V: (kv, h), T.ATTN_OUT: (h, q), T.FFN_GATE: (self.ff, h), T.FFN_UP: (self.ff, h),
                T.FFN_DOWN: (h, self.ff)}.get(kind, (h,))

    def heads(self, kind) -> int | None:
        """Heads whose rows the Q/K permutation reorders, None for other tensors."""
        T = _gguf().MODEL_TENSOR
        return {T.ATTN_Q: self.n_head, T.ATTN_K: self.n_kv}.get(kind)


def write_gguf(out_file: Path, model_dir: Path, quantized: dict[str, tuple[str, np.ndarray]],
               dense: dict[str, torch.Tensor], *, embed_type: str = "Q8_0", dense_type: str = "F32",
               name: str | None = None, pre: str | None = None, extra_kv: dict[str, str] | None = None) -> None:
    """Write the GGUF `out_file` (directly; export_gguf stages it) of a Llama whose config.json and tokenizer
    files are in `model_dir`. `quantized`: HF module name -> (ggml type name, uint8 blocks [out, row bytes] in
    HF row order); `dense`: HF state-dict name -> float tensor (embedding, norms, biases, unquantized matrices).
    `pre` overrides the tokenizer.ggml.pre choice, `extra_kv` adds string keys (provenance)."""
    gguf = _gguf()
    model_dir, T = Path(model_dir), gguf.MODEL_TENSOR
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    hp = _Llama(cfg, model_dir)
    etype = _qtype(embed_type, "--embed-type", EMBED_TYPES)
    dtype = _qtype(dense_type, "dense type", DENSE_TYPES)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp.n_layer)
    tensors: dict[str, tuple[np.ndarray, object]] = {}  # gguf name -> (data, ggml type)

    def place(hf_name: str):
        kind_name = tmap.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if kind_name is None or kind_name[0] not in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]:
            raise UserError(f"tensor {hf_name} has no place in llama.cpp's Llama layout; the GGUF export supports "
                            "plain Llama checkpoints only")
        return kind_name

    for mod, (tname, raw) in quantized.items():
        kind, gname = place(f"{mod}.weight")
        qt = _qtype(tname, f"layer {mod}'s ggml type")
        block, tsize = gguf.GGML_QUANT_SIZES[qt]
        raw = np.ascontiguousarray(raw)
        out_f, in_f = hp.shape(kind)
        if raw.dtype != np.uint8 or raw.shape != (out_f, in_f // block * tsize) or in_f % block:
            raise UserError(f"layer {mod} holds {tname} bytes of shape {list(raw.shape)}, not the rows of a "
                            f"[{out_f}, {in_f}] weight; re-quantize the checkpoint")
        if (n := hp.heads(kind)) is not None:
            raw = raw[qk_row_order(out_f, n)]  # whole rows: a row's blocks move together
        tensors[gname] = (raw, qt)
    for key, t in dense.items():
        if key.endswith(".rotary_emb.inv_freq"):
            continue
        kind, gname = place(key)
        a = t.detach().to(torch.float32).cpu().numpy()
        want = hp.shape(kind) if key.endswith(".weight") else (hp.shape(kind)[0],)
        if a.shape != want:
            raise UserError(f"tensor {key} has shape {list(a.shape)}, expected {list(want)} from config.json")
        if (n := hp.heads(kind)) is not None:
            a = a[qk_row_order(a.shape[0], n)]
        qt = etype if kind == T.TOKEN_EMBD else dtype if a.ndim == 2 and kind not in (
            T.ATTN_NORM, T.FFN_NORM, T.OUTPUT_NORM) else gguf.GGMLQuantizationType.F32
        block = gguf.GGML_QUANT_SIZES[qt][0]
        if a.shape[-1] % block:
            what = "--embed-type" if kind == T.TOKEN_EMBD else "the dense type"
            raise UserError(f"{what} {qt.name} packs blocks of {block} and {key} has rows of {a.shape[-1]}; choose "
                            "a type with 32-wide blocks (Q8_0, Q4_0, ...) or F16")
        tensors[gname] = (gguf.quants.quantize(a, qt), qt)
    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in tensors]
    if missing:
        raise UserError(f"the checkpoint has no {missing[0]} tensor (HF model.embed_tokens / model.norm); "
                        "re-quantize it")

    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or str(cfg.get("_name_or_path") or model_dir.name))
    w.add_quantized_by("hawqtool")
    for k, v in {MARKER_KEY: MARKER_VALUE, **(extra_kv or {})}.items():
        w.add_string(k, v)
    for add, value in (("block_count", hp.n_layer), ("context_length", hp.ctx), ("embedding_length", hp.hidden),
                       ("feed_forward_length", hp.ff), ("head_count", hp.n_head), ("head_count_kv", hp.n_kv),
                       ("rope_freq_base", hp.theta), ("layer_norm_rms_eps", hp.eps),
                       *((("key_length", hp.head_dim), ("value_length", hp.head_dim)) if hp.has_head_dim else ()),
                       ("file_type", _file_type(quantized)), ("vocab_size", hp.vocab),
                       ("rope_dimension_count", hp.head_dim)):  # the keys and order of llama.cpp's converter
        getattr(w, f"add_{add}")(value)
    if hp.rope_type == "linear" and hp.rope_factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp.rope_factor))
    _add_tokenizer(w, model_dir, hp.vocab, pre)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def order(gname: str):  # token_embd, blocks in order, output_norm, output
        parts = gname.split(".")
        return (int(parts[1]) if parts[0] == "blk" else -1 if gname.startswith("token_embd") else 1 << 30, gname)

    for gname in sorted(tensors, key=order):
        data, qt = tensors[gname]
        w.add_tensor(gname, data, raw_dtype=qt)
    try:
        w.write_header_to_file(path=Path(out_file))
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def _file_type(quantized: dict[str, tuple[str, np.ndarray]]) -> int:
    """general.file_type: llama.cpp's file type of the ggml type holding most linear-weight bytes."""
    gguf = _gguf()
    by_type = Counter()
    for tname, raw in quantized.values():
        by_type[str(tname).upper()] += int(np.asarray(raw).size)
    top = by_type.most_common(1)[0][0] if by_type else "F32"
    return int(gguf.LlamaFileType[_FILE_TYPES.get(top, "GUESSED")])


def tokenizer_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], dict]:
    """Tokens in id order and their llama.cpp types from tokenizer.json (added special tokens CONTROL, other
    added tokens USER_DEFINED, ids the tokenizer lacks "[PADi]" UNUSED), and the parsed tokenizer.json."""
    gguf = _gguf()
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json; the GGUF export needs the model's fast tokenizer files")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{path} is not a byte-level BPE tokenizer (SentencePiece-style, as in Llama 1/2); the GGUF "
                        "export writes gpt2-style BPE tokenizers only")
    by_id: dict[int, tuple[str, int]] = {i: (tok, int(gguf.TokenType.NORMAL)) for tok, i in model["vocab"].items()}
    for at in tj.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if at.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(at["id"])] = (at["content"], int(kind))
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"{path} has token id {max(by_id)} beyond the model's vocab_size {vocab_size}; use the "
                        "source model's tokenizer")
    tokens = [by_id.get(i, (f"[PAD{i}]", int(gguf.TokenType.UNUSED))) for i in range(vocab_size)]
    return [t for t, _ in tokens], [k for _, k in tokens], tj


def _pre_key(pre) -> list[dict] | None:
    """A tokenizer.json pre_tokenizer reduced to the fields that decide how text is split."""
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    keep = {"ByteLevel": ("add_prefix_space", "use_regex"), "Digits": ("individual_digits",),
            "Split": ("pattern", "behavior", "invert")}
    out = []
    for s in steps or []:
        if not isinstance(s, dict) or s.get("type") not in keep:
            return None
        out.append({"type": s["type"], **{k: s.get(k) for k in keep[s["type"]]}})
    return out


def pre_tokenizer_name(tj: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a parsed tokenizer.json, from `_PRE_TOKENIZERS`; None if unknown."""
    if tj.get("normalizer") is not None:
        return None
    key = _pre_key(tj.get("pre_tokenizer"))
    return next((name for name, known in _PRE_TOKENIZERS.items() if key == known), None)


def gguf_pre_tokenizer(path: Path, tokens: list[str]) -> str | None:
    """tokenizer.ggml.pre of the GGUF at `path` when its token list equals `tokens`, else None."""
    gguf = _gguf()
    try:
        r = gguf.GGUFReader(str(path))
        pre, toks = r.fields.get("tokenizer.ggml.pre"), r.fields.get("tokenizer.ggml.tokens")
        if pre is None or toks is None or toks.contents() != tokens:
            return None
        return str(pre.contents())
    except (OSError, ValueError, KeyError, IndexError) as e:
        log.debug("could not read the tokenizer of %s: %s", path, e)
        return None


def _add_tokenizer(w, model_dir: Path, vocab_size: int, pre: str | None) -> None:
    gguf = _gguf()
    tokens, types, tj = tokenizer_vocab(model_dir, vocab_size)
    if pre is None:
        pre = pre_tokenizer_name(tj)
    if pre is None:
        log.warning("unknown pre-tokenizer in %s/tokenizer.json: GGUF tokenizer.ggml.pre set to 'default', so "
                    "llama.cpp may split text differently than transformers", model_dir)
        pre = "default"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_special_token.setdefault("bos", False)  # the HF tokenizer adds none unless its template says so
    special.add_to_gguf(w, quiet=True)
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file() and "add_prefix_space" in (cfg := json.loads(tc.read_text(encoding="utf-8"))):
        w.add_add_space_prefix(bool(cfg["add_prefix_space"]))


def export_gguf(ckpt: Path, out_file: Path, *, embed_type: str = "Q8_0") -> Path:
    """Write checkpoint CKPT (verified first) as the GGUF file OUT_FILE, atomically: built in OUT.tmp-PID beside
    it and renamed into place (outputs.staged_output), nothing left behind on failure."""
    from safetensors.torch import load_file

    from .checkpoint import MANIFEST, WEIGHTS, read_manifest
    from .integrity import sha256_file
    from .models import origin_gguf
    from .outputs import staged_output

    ckpt, out_file = Path(ckpt), Path(out_file)
    _qtype(embed_type, "--embed-type", EMBED_TYPES)
    manifest = read_manifest(ckpt)
    _refuse(manifest, ckpt)
    _Llama(json.loads((ckpt / "config.json").read_text(encoding="utf-8")), ckpt)
    tensors = load_file(str(ckpt / WEIGHTS))
    quantized, dense = {}, dict(tensors)
    for name, meta in manifest["layers"].items():
        if f"{name}.ggml" not in tensors:
            raise UserError(f"checkpoint {ckpt} lists ggml layer {name} without its {name}.ggml tensor; re-create "
                            "the checkpoint with `hawqtool quantize`")
        quantized[name] = (meta["ggml_type"], dense.pop(f"{name}.ggml").numpy())
    src = manifest.get("source_model")
    pre = None
    if (origin := origin_gguf(src)) is not None:
        cfg = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        pre = gguf_pre_tokenizer(origin, tokenizer_vocab(ckpt, int(cfg["vocab_size"]))[0])
    name = Path(str(src)).name.removesuffix(".gguf") if src else None
    extra = {"hawqtool.checkpoint_manifest_sha256": sha256_file(ckpt / MANIFEST)}
    need = sum(r.nbytes for _, r in quantized.values()) + sum(t.numel() * 4 for t in dense.values()) + (64 << 20)
    with staged_output(out_file, "gguf", need, file=True) as tmp:  # dense at most F32, + vocab and metadata
        write_gguf(tmp, ckpt, quantized, dense, embed_type=embed_type, name=name, pre=pre, extra_kv=extra)
    return out_file


def _refuse(manifest: dict, ckpt: Path) -> None:
    """One-line UserError for what a GGUF cannot hold: a layer in hawqtool's own packed format, a quantized
    embedding."""
    fix = "plan it with `hawqtool allocate --formats gguf` (or `run --formats gguf`) and re-quantize"
    for name, meta in manifest["layers"].items():
        if not isinstance(meta, dict) or not meta.get("ggml_type"):
            raise UserError(f"layer {name} of {ckpt} is in hawqtool's own packed format, which llama.cpp cannot "
                            f"load; {fix}")
    if manifest.get("embedding") is not None:
        raise UserError(f"checkpoint {ckpt} stores its input embedding in hawqtool's packed format, which the GGUF "
                        "export cannot write; allocate with --embed-bits 16 (the default) and re-quantize: the export "
                        "quantizes the embedding itself (--embed-type)")


def is_gguf_export(path: Path) -> bool:
    """True if `path` is a GGUF file this module wrote (its header carries MARKER_KEY)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        field = _gguf().GGUFReader(str(path)).fields.get(MARKER_KEY)
        return field is not None and field.contents() == MARKER_VALUE
    except Exception:  # noqa: BLE001 - any unreadable or foreign file is not ours
        return False
