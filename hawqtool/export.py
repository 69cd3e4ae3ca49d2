"""Export a hawqtool checkpoint to formats other runtimes load: compressed-tensors, GPTQ and GGUF.

GGUF (llama.cpp; one file, checkpoints of ggml-typed layers only) is written by gguf_export.export_gguf.

compressed-tensors ("pack-quantized"): per quantized layer NAME.weight_packed (int32
[out, ceil(in*b/32)], signed codes q - 2^(b-1) offset back to unsigned and packed as one
dense little-endian bit stream per row, the library's own `pack_to_int32`), NAME.weight_scale
[out, groups] and NAME.weight_shape; config.json gets a `quantization_config` with one config
group per (bits, group_size) whose `targets` list the module names, written by the library's
`ModelCompressor.update_config`. It needs in % group_size == 0, so a partial last group is
re-expressed losslessly with a smaller group (gcd) and repeated scales. Symmetric layers only: transformers' loader fails on packed
zero points, so asymmetric layers are refused; act-order (g_idx) layers are refused too.

GPTQ (v1 checkpoint format, AutoGPTQ / GPTQModel): NAME.qweight int32 [in*b/32, out] packed
along the input dim, NAME.qzeros int32 [groups, out*b/32] packed along the output dim holding
zero - 1 (the v1 convention; readers add 1 back), NAME.scales fp16 [groups, out], NAME.g_idx
int32 [in]; quantize_config.json with the most common (bits, group_size, sym) as defaults and
GPTQModel-style `dynamic` overrides ("+:^name$" -> {"bits", "group_size", "sym"}) for the rest.

A checkpoint whose input embedding is quantized (`--embed-bits` 4/6/8) is refused by both formats with one
line: they hold quantized Linear layers only (transformers' GPTQ and compressed-tensors loaders build
the embedding and a tied head in full precision), and a silently dequantized table would make the
exported file larger than the checkpoint it came from.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from quant_kernels import PackedWeight, unpack

from .checkpoint import WEIGHTS, read_manifest
from .errors import UserError
from .outputs import EXPORT_MARKER, staged_output
from .loader import packed_from_tensors
from .tensorfile import save_tensors

FORMATS = ("compressed-tensors", "gptq", "gguf")
OUTPUT_KIND = {"compressed-tensors": "export", "gptq": "export", "gguf": "gguf"}  # outputs.claim_output kind
_U32 = 0xFFFFFFFF


def export_checkpoint(ckpt: Path, out: Path, fmt: str, *, embed_type: str | None = None) -> Path:
    """Write CKPT as an OUT folder in format `fmt`, atomically (outputs.staged_output). The checkpoint is
    verified first (no symlinks, nothing unlisted); of its files exactly the listed ones are copied.
    gguf: OUT is one file (gguf_export.export_gguf), `embed_type` its embedding's type (default Q8_0);
    the other formats take no embed_type."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    ckpt, out = Path(ckpt), Path(out)
    if out.resolve() == ckpt.resolve():
        raise UserError(f"export output {out} is the checkpoint itself; pass another folder with -o")
    if fmt == "gguf":
        from .gguf_export import export_gguf

        return export_gguf(ckpt, out, embed_type=embed_type or "Q8_0")
    if embed_type is not None:
        raise UserError(f"--embed-type applies to --format gguf only; the {fmt} export keeps the embedding as the "
                        "checkpoint stores it: drop --embed-type")
    manifest = read_manifest(ckpt)
    if manifest.get("task") == "image-classification":  # no config.json: the layouts describe HF models
        raise UserError(f"{ckpt} holds a timm image classifier, which the {fmt} layout (a Hugging Face model's "
                        "config and tensors) cannot describe; load it with hawqtool.runtime.load_quantized")
    _refuse_quantized_embedding(manifest, ckpt, fmt)
    ggml = next((n for n, m in manifest["layers"].items() if isinstance(m, dict) and "ggml_type" in m), None)
    if ggml is not None:
        raise UserError(f"layer {ggml} of {ckpt} is stored in ggml type {manifest['layers'][ggml]['ggml_type']}, "
                        f"which the {fmt} layout cannot hold; export it with --format gguf")
    tensors = load_file(str(ckpt / WEIGHTS))
    layers = {name: packed_from_tensors(tensors, name, meta) for name, meta in manifest["layers"].items()}
    rest = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in layers}
    writer = _write_compressed_tensors if fmt == "compressed-tensors" else _write_gptq
    _refuse_unsupported(layers, fmt)  # before anything is written
    listed = sorted(n for n in manifest["files"] if n != WEIGHTS)  # config, tokenizer, generation config ...
    need = sum((ckpt / n).stat().st_size for n in (WEIGHTS, *listed)) + (1 << 16)  # the tensors change little
    with staged_output(out, "export", need) as tmp:
        for name in listed:
            shutil.copyfile(ckpt / name, tmp / name, follow_symlinks=False)
        writer(tmp, layers, rest, ckpt)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": fmt, "source": str(ckpt), "tool": "hawqtool"}))
    return out


def _refuse_quantized_embedding(manifest: dict, ckpt: Path, fmt: str) -> None:
    """One-line UserError for a checkpoint whose input embedding is stored quantized."""
    emb = manifest.get("embedding")
    if emb is None:
        return
    bits = emb.get("bits") if isinstance(emb, dict) else None
    head = emb.get("tied_head") if isinstance(emb, dict) else None
    raise UserError(f"checkpoint {ckpt} stores its input embedding quantized ({bits}-bit"
                    f"{f', shared with the tied head {head}' if head else ''}), which the {fmt} export cannot express "
                    "(it holds quantized Linear layers only); re-quantize with --embed-bits 16 to export it")


GPTQ_BITS = (2, 3, 4, 8)  # the widths GPTQ's int32 packing (and its loaders) take


def _refuse_unsupported(layers: dict[str, PackedWeight], fmt: str) -> None:
    """One-line UserError naming what the target format (or its loader) cannot hold, and the re-quantization that
    removes it: for GPTQ every obstacle at once, so one new run suffices."""
    for name, pw in layers.items():
        if fmt == "compressed-tensors":
            if not pw.symmetric:
                raise UserError(f"layer {name} is asymmetric, which transformers cannot load from a packed "
                                "compressed-tensors checkpoint; re-quantize with `hawqtool allocate --sym`")
            if pw.g_idx is not None:
                raise UserError(f"layer {name} uses act-order (g_idx), which the compressed-tensors export does "
                                "not support; re-quantize without --act-order")
    if fmt != "gptq":
        return
    wide = next((n for n, pw in layers.items() if pw.bits not in GPTQ_BITS), None)
    zero0 = next((n for n, pw in layers.items() if not pw.symmetric
                  and bool((unpack(pw.qzeros, pw.bits, pw.n_groups) == 0).any())), None)
    problems, fixes = [], []
    if wide is not None:
        problems.append(f"layer {wide} has {layers[wide].bits} bits (GPTQ packs 2, 3, 4 and 8)")
        fixes.append("--bits 2,3,4,8")
    if zero0 is not None:
        problems.append(f"layer {zero0} has a zero point of 0, which GPTQ v1 (stores zero-1) cannot represent")
        fixes.append("--sym")
    if problems:
        raise UserError(f"{'; '.join(problems)}; re-quantize with {' '.join(fixes)} (`run`, or `allocate` then "
                        "`quantize`)")


def _save(folder: Path, tensors: dict[str, torch.Tensor], fmt: str) -> None:
    """Write model.safetensors (contiguous tensors) with a provenance note in its metadata."""
    save_tensors(tensors, folder / WEIGHTS, metadata={"format": "pt", "exported_by": f"hawqtool ({fmt})"})


# ---------------------------------------------------------------- compressed-tensors


def ct_layer_tensors(name: str, pw: PackedWeight) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized tensors of one symmetric layer (library packing)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = unpack(pw.qweight, pw.bits, pw.in_features)  # unsigned codes, zero 2^(b-1)
    signed = (q - pw.implicit_zero).to(torch.int8)  # compressed-tensors: w = scale * q_signed
    gs = ct_group_size(pw)
    scales = pw.scales if gs in (-1, pw.group_size) else pw.scales[:, torch.arange(pw.in_features // gs) * gs
                                                                      // pw.group_size]
    return {f"{name}.weight_packed": pack_to_int32(signed, pw.bits),
            f"{name}.weight_scale": scales.contiguous(),
            f"{name}.weight_shape": torch.tensor([pw.out_features, pw.in_features], dtype=torch.int64)}


def ct_group_size(pw: PackedWeight) -> int:
    """Group size for compressed-tensors, which needs in % group == 0: a partial last group is
    re-expressed losslessly with group gcd(group, in) and each scale repeated (576/128 -> 64)."""
    if pw.group_size == -1 or pw.group_size >= pw.in_features:
        return -1
    return math.gcd(pw.group_size, pw.in_features)


def ct_quantization_config(layers: dict[str, PackedWeight]):
    """QuantizationConfig with one config group per (bits, group_size), targets = module names."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_key: dict[tuple[int, int], list[str]] = {}
    for name, pw in layers.items():
        by_key.setdefault((pw.bits, ct_group_size(pw)), []).append(name)
    groups = {}
    for i, ((bits, gs), names) in enumerate(sorted(by_key.items())):
        args = (QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel") if gs == -1 else
                QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=gs))
        groups[f"group_{i}"] = QuantizationScheme(targets=names, weights=args, format="pack-quantized")
    return QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                              ignore=[])


def _write_compressed_tensors(tmp: Path, layers: dict[str, PackedWeight], rest: dict[str, torch.Tensor],
                              ckpt: Path) -> None:
    """Packed tensors + config.json's quantization_config, via the compressed-tensors library."""
    try:
        from compressed_tensors.compressors import ModelCompressor
    except ImportError as e:
        raise UserError("exporting to compressed-tensors needs the compressed-tensors package; "
                        "pip install 'hawqtool[export]'") from e
    tensors = dict(rest)
    for name, pw in layers.items():
        tensors.update(ct_layer_tensors(name, pw))
    _save(tmp, tensors, "compressed-tensors")
    ModelCompressor(quantization_config=ct_quantization_config(layers)).update_config(str(tmp))


# ---------------------------------------------------------------- GPTQ


def gptq_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [n, cols] along dim 0 into int32 [ceil(n*bits/32), cols], AutoGPTQ's layout.

    Follows AutoGPTQ's `QuantLinear.pack` (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py):
    for 2/4/8 bits word r holds rows r*(32/b)+i at bits [i*b, (i+1)*b); for 3 bits each block
    of 32 rows fills 3 words: rows 0-9 at bits 3i, row 10 split (low 2 bits at 30-31 of word 0,
    bit 2 at bit 0 of word 1), rows 11-20 at bits 3i+1, row 21 split (low bit at bit 31 of word
    1, bits 1-2 at bits 0-1 of word 2), rows 22-31 at bits 3i+2. Rows are zero-padded to a
    multiple of 32 and the words truncated to ceil(n*bits/32).
    """
    n, cols = values.shape
    v = values.to(torch.int64) & (2**bits - 1)
    pad = (-n) % 32
    if pad:
        v = torch.cat([v, v.new_zeros(pad, cols)])
    blocks = v.reshape(-1, 32, cols)  # [n_blocks, 32, cols]
    if bits in (2, 4, 8):
        per = 32 // bits
        shifts = (torch.arange(per) * bits).view(1, 1, per, 1)
        words = (blocks.reshape(blocks.shape[0], bits, per, cols) << shifts).sum(2)  # disjoint fields
    elif bits == 3:
        sh = (torch.arange(10) * 3).view(1, 10, 1)
        w0 = (blocks[:, 0:10] << sh).sum(1) | ((blocks[:, 10] << 30) & _U32)
        w1 = ((blocks[:, 10] >> 2) & 1) | (blocks[:, 11:21] << (sh + 1)).sum(1) | ((blocks[:, 21] << 31) & _U32)
        w2 = ((blocks[:, 21] >> 1) & 3) | (blocks[:, 22:32] << (sh + 2)).sum(1)
        words = torch.stack([w0, w1, w2], 1)
    else:
        raise ValueError(f"GPTQ packs 2, 3, 4 or 8 bits, got {bits}")
    words = words.reshape(-1, cols)[: (n * bits + 31) // 32]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_layer_tensors(name: str, pw: PackedWeight) -> dict[str, torch.Tensor]:
    """GPTQ v1 tensors of one layer: qweight, qzeros (zero - 1), scales, g_idx (all transposed)."""
    q = unpack(pw.qweight, pw.bits, pw.in_features)  # [out, in]
    zeros = (torch.full((pw.out_features, pw.n_groups), pw.implicit_zero, dtype=torch.int32) if pw.symmetric
             else unpack(pw.qzeros, pw.bits, pw.n_groups))  # [out, groups]
    return {f"{name}.qweight": gptq_pack(q.T, pw.bits),
            f"{name}.qzeros": gptq_pack(zeros - 1, pw.bits).T.contiguous(),  # v1: stored = zero - 1
            f"{name}.scales": pw.scales.T.contiguous(),
            f"{name}.g_idx": pw.group_index().to(torch.int32)}


def gptq_quantize_config(layers: dict[str, PackedWeight], unquantized: list[str]) -> dict:
    """quantize_config.json: the most common (bits, group, sym) as default, `dynamic` for the rest."""
    keys = {n: (pw.bits, pw.group_size, pw.symmetric) for n, pw in layers.items()}
    weight = Counter()
    for n, k in keys.items():
        weight[k] += layers[n].in_features * layers[n].out_features
    bits, group, sym = weight.most_common(1)[0][0] if weight else (4, 128, True)
    dynamic: dict[str, dict] = {f"-:^{re.escape(n)}$": {} for n in unquantized}
    for n, (b, g, s) in keys.items():
        if (b, g, s) != (bits, group, sym):
            dynamic[f"+:^{re.escape(n)}$"] = {"bits": b, "group_size": g, "sym": s}
    return {"bits": bits, "group_size": group, "sym": sym,
            "desc_act": any(pw.g_idx is not None for pw in layers.values()),
            "dynamic": dynamic, "quant_method": "gptq", "checkpoint_format": "gptq", "true_sequential": True,
            "zero_point": "v1: qzeros store zero - 1; w = scale * (q - (stored + 1))"}


def _unquantized_block_linears(ckpt: Path, layers: dict[str, PackedWeight]) -> list[str]:
    """Linear layers inside decoder blocks that the plan left in full precision (GPTQ must skip them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import quantizable_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(ckpt)))
    out_emb = model.get_output_embeddings()
    return [n for n, m in quantizable_layers(model).items() if n not in layers and m is not out_emb]


def _write_gptq(tmp: Path, layers: dict[str, PackedWeight], rest: dict[str, torch.Tensor], ckpt: Path) -> None:
    """GPTQ tensors, quantize_config.json, and the same dict as config.json's quantization_config."""
    tensors = dict(rest)
    for name, pw in layers.items():
        tensors.update(gptq_layer_tensors(name, pw))
    _save(tmp, tensors, "gptq")
    qcfg = gptq_quantize_config(layers, _unquantized_block_linears(ckpt, layers))
    (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg["quantization_config"] = qcfg
    cfg_path.write_text(json.dumps(cfg, indent=2))
