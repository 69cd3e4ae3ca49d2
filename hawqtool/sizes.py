"""Sizes as users compare them: bits per linear weight and whole-file bits per parameter.

- bits per linear weight: over the quantized linear layers, codes + fp16 scales + b-bit zeros
  (QuantSpec.storage_bits, the allocator's own accounting and the measure of `--avg-bits`) / their weights.
- whole-file bits per parameter: 8 × the data bytes of every tensor the checkpoint stores (packed codes
  as int32 words, scales, packed zeros, g_idx, biases, norms, the embedding fp32 or packed; a tensor tied
  to another once) / the model's parameters (tied ones once; a packed matrix counts its out × in weights).
- file bytes: model.safetensors on disk, its JSON header included.

`predict_file` gives the whole-file figures of a plan before quantizing (exact for checkpoints without
act-order; act-order adds a g_idx of in × 4 bytes per layer); `checkpoint_sizes` reads them from a
checkpoint's header; `model_sizes` gives them for a model as it is in memory (the fp32 baseline: 32).
"""
from __future__ import annotations

import math

from torch import nn

from quant_kernels import n_words

from .artifacts import Plan
from .errors import UserError
from .models import weight_matrix
from .quantize.quantizer import QuantSpec

PACKED_TENSORS = ("qweight", "scales", "qscales", "scale_step", "qzeros", "g_idx", "ggml")  # a packed (or ggml) layer's tensors besides its bias


def packed_nbytes(out_f: int, in_f: int, bits: int, group_size: int, symmetric: bool, act_order: bool = False,
                  scale_bits: int = 16) -> int:
    """Bytes a packed layer stores (checkpoint.stored_layer): int32 code words per row, fp16 scales (or int32 words
    of scale codes and an fp16 step per row), packed int32 zeros (asymmetric), an int32 g_idx (act-order)."""
    groups = 1 if group_size == -1 else math.ceil(in_f / group_size)
    scales = out_f * groups * 2 if scale_bits == 16 else out_f * (n_words(groups, scale_bits) * 4 + 2)
    n = out_f * n_words(in_f, bits) * 4 + scales
    if not symmetric:
        n += out_f * n_words(groups, bits) * 4
    return n + (in_f * 4 if act_order else 0)


def _record(params: int, tensor_bytes: int, linear_params: int, linear_bytes: float, embedding_bits: int | None,
            file_bytes: int | None = None) -> dict:
    out = {"linear_bits_per_weight": 8 * linear_bytes / linear_params if linear_params else None,
           "file_bits_per_param": 8 * tensor_bytes / params, "params": params, "tensor_bytes": tensor_bytes,
           "linear_params": linear_params, "embedding_bits": embedding_bits}
    if file_bytes is not None:
        out["file_bytes"] = file_bytes
    return out


def _identity(v) -> object:
    """What makes two state tensors one stored tensor: their memory, or (meta tensors of a streamed model, which
    have none) the parameter object."""
    return ("meta", id(v)) if v.device.type == "meta" else v.data_ptr()


def predict_file(model: nn.Module, plan: Plan) -> dict:
    """The whole-file accounting of the checkpoint `plan` gives on `model` (a tied head the plan quantizes is
    untied by quantize: both matrices are then stored, and counted)."""
    state = model.state_dict(keep_vars=True)  # tied parameters: one object (also on the meta device: streamed)
    planned = {lp.name: lp for lp in plan.layers}
    emb = plan.embedding
    emb_ptr = _identity(state[f"{emb.name}.weight"]) if emb is not None else None
    seen: set[int] = set()
    params = nbytes = 0
    for key, v in state.items():
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight" and owner in planned:
            lp = planned[owner]
            o, i = weight_matrix(model.get_submodule(owner)).shape
            params += v.numel()
            nbytes += (QuantSpec.for_ggml(lp.ggml_type).storage_bits(o, i) // 8 if lp.ggml_type
                       else packed_nbytes(o, i, lp.bits, lp.group_size, lp.symmetric, scale_bits=lp.scale_bits))
            continue
        if _identity(v) in seen:
            continue
        seen.add(_identity(v))
        params += v.numel()
        if emb is not None and _identity(v) == emb_ptr:
            nbytes += packed_nbytes(*emb.shape, emb.bits, emb.group_size, emb.symmetric)
        else:
            nbytes += v.numel() * v.element_size()
    return _record(params, nbytes, sum(lp.n_params for lp in plan.layers), plan.total_bytes,
                   emb.bits if emb is not None else None)


def model_sizes(model: nn.Module) -> dict:
    """Whole-file accounting of a model as it is in memory (every state tensor once, at its dtype)."""
    seen: set = set()
    params = nbytes = 0
    for v in model.state_dict(keep_vars=True).values():
        if _identity(v) not in seen:
            seen.add(_identity(v))
            params += v.numel()
            nbytes += v.numel() * v.element_size()
    return _record(params, nbytes, 0, 0.0, None)


def checkpoint_sizes(path) -> dict:
    """Both figures and the file size of a hawqtool checkpoint, from its manifest and safetensors header."""
    from pathlib import Path

    from .checkpoint import WEIGHTS, read_manifest
    from .tensorfile import tensor_sizes

    path = Path(path)
    manifest = read_manifest(path, verify=False)
    try:
        sizes = tensor_sizes(path / WEIGHTS)
        emb = manifest.get("embedding")
        packed = {n: (m["out_features"], m["in_features"]) for n, m in manifest["layers"].items()}
        if emb is not None:
            packed[emb["name"]] = (emb["out_features"], emb["in_features"])
        params = sum(o * i for o, i in packed.values())
        nbytes = 0
        for name, (shape, nb) in sizes.items():
            nbytes += nb
            owner, _, leaf = name.rpartition(".")
            if not (owner in packed and leaf in PACKED_TENSORS):
                params += math.prod(shape)
        linear = {n: packed[n] for n in manifest["layers"]}
        linear_bytes = sum((QuantSpec.for_ggml(m["ggml_type"]) if "ggml_type" in m
                            else QuantSpec(m["bits"], m["group_size"], m["symmetric"], scale_bits=m.get("scale_bits", 16))
                            ).storage_bits(*linear[n]) / 8
                           for n, m in manifest["layers"].items())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {path} has a malformed manifest or weights header ({e}); re-create it") from e
    return _record(params, nbytes, sum(o * i for o, i in linear.values()), linear_bytes,
                   emb["bits"] if emb is not None else None, (path / WEIGHTS).stat().st_size)


def size_line(s: dict, prefix: str = "") -> str:
    """'3.161 bits per linear weight; whole file 5.02 bits per parameter (84.4 MB of tensors, embedding 8-bit)'."""
    lin = s.get("linear_bits_per_weight")
    emb = s.get("embedding_bits")
    parts = [f"{lin:.3f} bits per linear weight" if lin is not None else "no quantized linear layers",
             f"whole file {s['file_bits_per_param']:.3f} bits per parameter ({s['tensor_bytes'] / 1e6:.2f} MB of tensors"
             + (f", file {s['file_bytes'] / 1e6:.2f} MB" if "file_bytes" in s else "")
             + (f", embedding {emb}-bit" if emb is not None else ", embedding as the model had it") + ")"]
    return prefix + "; ".join(parts)
