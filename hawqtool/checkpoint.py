"""Stage 4's artifact: a quantized checkpoint folder, written atomically and verified on read.

Layout of CKPT/:
  model.safetensors     for each quantized layer NAME: NAME.qweight (int32, codes packed
                        along the input dim, quant_kernels layout), NAME.scales (fp16
                        [out, groups]; or, with scale codes (manifest "scale_bits" k < 16),
                        NAME.qscales: k-bit codes c packed like qzeros and NAME.scale_step: fp16
                        [out], scale = fp16(step · c)), NAME.qzeros (int32 packed, asymmetric only),
                        NAME.g_idx (int32 [in], act-order only), NAME.bias; a quantized
                        input embedding EMB the same way (EMB.qweight/.scales/.qzeros, rows =
                        tokens), its tied head then storing nothing of its own; a layer in a
                        ggml block type (manifest "ggml_type", e.g. Q4_K): NAME.ggml (uint8
                        [out, row bytes], ggml's block layout, HF row order); every other
                        tensor of the state dict unchanged (tied weights stored once)
  config.json, tokenizer files   as the source model had them
  hawqtool_manifest.json         plan, per-layer bits/group/error, the quantized embedding (only
                                 when there is one: "embedding" with its tied head), sha256 of every file
The folder holds nothing else: no file the manifest does not list, no symlink (integrity.py), and
the same inputs give the same bytes (no timestamps; safetensors metadata in a fixed order).
Zero-point convention: w = scale * (q - zero), q and zero unsigned b-bit integers;
symmetric layers store no zeros and use zero = 2^(b-1).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quant_kernels import PackedWeight

from .artifacts import SCHEMA_VERSION, tool_version
from .errors import UserError
from .integrity import MIB, check_folder, check_listed_names, read_json, sha256_file
from .outputs import staged_output
from .streaming import streamer_of
from .quantize.quantizer import SCALE_BITS, QuantizedWeight, ggml_bytes
from .tensorfile import LazyTensor, save_tensors, tensors_nbytes

MANIFEST = "hawqtool_manifest.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MANIFEST_CAP = 64 * MIB  # a manifest lists a few hundred bytes per layer
CONFIG_CAP = 16 * MIB  # HF configs are kilobytes (a 22k-class label map is about 1 MiB)
ZERO_POINT_CONVENTION = "w = scale * (q - zero); q, zero in [0, 2^bits-1]; symmetric: zero = 2^(bits-1), not stored"


def pack_layer(qw: QuantizedWeight) -> PackedWeight:
    """QuantizedWeight (unpacked codes) -> quant_kernels' packed layout."""
    s = qw.spec
    return PackedWeight.from_codes(qw.q, qw.scales.to(torch.float16), qw.zeros, bits=s.bits,
                                   group_size=s.group_size, symmetric=s.symmetric, g_idx=qw.g_idx)


def packed_tensors(name: str, pw: PackedWeight) -> dict[str, torch.Tensor]:
    out = {f"{name}.qweight": pw.qweight, f"{name}.scales": pw.scales}
    if pw.qzeros is not None:
        out[f"{name}.qzeros"] = pw.qzeros
    if pw.g_idx is not None:
        out[f"{name}.g_idx"] = pw.g_idx
    return out


@dataclass
class PackedLayer:
    """One quantized layer as the checkpoint stores it: its format and its tensors (NAME.qweight, NAME.scales or,
    with scale codes, NAME.qscales + NAME.scale_step, ...), real ones or LazyTensors read when the file is written."""

    name: str
    bits: int
    group_size: int
    symmetric: bool
    in_features: int
    out_features: int
    tensors: dict[str, torch.Tensor | LazyTensor]
    scale_bits: int = SCALE_BITS

    @property
    def g_idx(self) -> torch.Tensor | LazyTensor | None:
        return self.tensors.get(f"{self.name}.g_idx")

    def meta(self) -> dict:
        """The manifest's description of the format (what loader.packed_from_tensors reads back)."""
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "in_features": self.in_features, "out_features": self.out_features, "act_order": self.g_idx is not None,
                **({"scale_bits": self.scale_bits} if self.scale_bits != SCALE_BITS else {})}


def stored_layer(name: str, qw: QuantizedWeight | PackedWeight) -> PackedLayer:
    """The layer in the checkpoint's form: packed codes and zeros, and fp16 scales or (spec.scale_bits < 16)
    the packed scale codes with each row's fp16 step."""
    pw = qw if isinstance(qw, PackedWeight) else pack_layer(qw)
    tensors = packed_tensors(name, pw)
    k = qw.spec.scale_bits if isinstance(qw, QuantizedWeight) else SCALE_BITS
    if k != SCALE_BITS:
        from quant_kernels import pack

        from .quantize.scale_codes import scale_codes

        del tensors[f"{name}.scales"]
        tensors[f"{name}.qscales"] = pack(scale_codes(qw.scales, qw.scale_step, k), k)
        tensors[f"{name}.scale_step"] = qw.scale_step.to(torch.float16)
    return PackedLayer(name, pw.bits, pw.group_size, pw.symmetric, pw.in_features, pw.out_features, tensors, k)


def save_checkpoint(out_dir: Path, model: nn.Module, weights: dict[str, QuantizedWeight | PackedWeight | PackedLayer], *,
                    layer_info: dict[str, dict], extra: dict, tokenizer=None, embedding=None) -> Path:
    """Write CKPT atomically (outputs.staged_output: built in OUT.tmp-PID, renamed over OUT when complete,
    removed on failure). `layer_info` and `extra` must not hold timings: the same inputs give the same bytes.
    `embedding` (quantize.embedding.EmbeddingResult) stores the input embedding packed, once for it and the
    head tied to it."""
    out_dir = Path(out_dir)
    state = _state_of(model)
    tensors: dict[str, torch.Tensor | LazyTensor] = {}
    if embedding is not None:
        tensors.update(packed_tensors(embedding.name, pack_layer(embedding.weight)))
        ptr = state[f"{embedding.name}.weight"].data_ptr()
        for k in [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.data_ptr() == ptr]:
            state.pop(k)  # the table and a head tied to it
        extra = {**extra, "embedding": embedding.summary()}
    layers_meta = {}
    for name, qw in weights.items():
        if getattr(qw, "grid", None) is not None:
            tensors[f"{name}.ggml"] = ggml_bytes(qw)
            state.pop(f"{name}.weight")
            if f"{name}.bias" in state:
                tensors[f"{name}.bias"] = state.pop(f"{name}.bias")
            out_f, in_f = qw.q.shape
            layers_meta[name] = {"ggml_type": qw.spec.fmt, "bits": qw.spec.bits, "group_size": qw.spec.group_size,
                                 "symmetric": False, "in_features": in_f, "out_features": out_f, "act_order": False,
                                 **layer_info.get(name, {})}
            continue
        layer = qw if isinstance(qw, PackedLayer) else stored_layer(name, qw)  # PackedLayer: may be on disk still
        tensors.update(layer.tensors)
        state.pop(f"{name}.weight")
        if f"{name}.bias" in state:
            tensors[f"{name}.bias"] = state.pop(f"{name}.bias")
        layers_meta[name] = {**layer.meta(), **layer_info.get(name, {})}
    seen: dict[int, str] = {}
    tied = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            if v.data_ptr() in seen:
                tied[k] = seen[v.data_ptr()]
                continue
            seen[v.data_ptr()] = k
        tensors[k] = v
    need = tensors_nbytes(tensors) + MIB  # + config, tokenizer, manifest: about (a full disk is still caught)
    with staged_output(out_dir, "checkpoint", need) as tmp:
        save_tensors(tensors, tmp / WEIGHTS, metadata={"format": "hawqtool", "zero_point": ZERO_POINT_CONVENTION})
        if hasattr(getattr(model, "config", None), "save_pretrained"):  # HF models; timm ones are rebuilt by arch
            model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"kind": "checkpoint", "schema_version": SCHEMA_VERSION, "tool_version": tool_version(),
                    "zero_point": ZERO_POINT_CONVENTION,
                    "packing": "per output row, little-endian bit stream of b-bit codes in int32 words",
                    "layers": layers_meta, "tied": tied, "files": files, **extra}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out_dir


def _state_of(model: nn.Module) -> dict[str, torch.Tensor | LazyTensor]:
    """The model's state dict; a streamed model's block tensors (on the meta device) as LazyTensors read from
    its weights file when the checkpoint writes them, in the model's dtype."""
    state: dict = model.state_dict()
    streamer = streamer_of(model)
    for k, v in state.items():
        if v.device.type == "meta":
            state[k] = LazyTensor(v.dtype, tuple(v.shape), lambda k=k, dtype=v.dtype: streamer.tensor(k).to(dtype))
    return state


def required_files(manifest: dict) -> tuple[str, ...]:
    """Files every checkpoint of this kind must list: the weights, and config.json unless the model is
    rebuilt from its timm architecture name (vision checkpoints)."""
    return (WEIGHTS,) if manifest.get("task") == "image-classification" else (WEIGHTS, CONFIG)


def read_manifest(path: Path, verify: bool = True) -> dict:
    """Manifest of a checkpoint; UserError if absent, malformed or too large. With `verify`, the folder
    is checked too (verify_folder); without, only the manifest itself is read."""
    path = Path(path)
    mf = path / MANIFEST
    fix = "re-create the checkpoint with `hawqtool quantize`"
    if mf.is_symlink():
        raise UserError(f"{mf} is a symbolic link; a checkpoint holds only its own files: {fix}")
    if not mf.is_file():
        raise UserError(f"{path} is not a hawqtool checkpoint (no {MANIFEST}); pass a folder written by "
                        "`hawqtool quantize`")
    manifest = read_json(mf, cap=MANIFEST_CAP, what="checkpoint manifest", fix=fix)
    if not isinstance(manifest, dict) or "files" not in manifest or "layers" not in manifest:
        raise UserError(f"{mf} is corrupt (not a manifest object with 'files' and 'layers'); {fix}")
    if manifest.get("schema_version") != SCHEMA_VERSION or not isinstance(manifest["layers"], dict):
        raise UserError(f"{mf} has an unsupported schema; {fix}")
    check_listed_names(manifest["files"], mf)
    if verify:
        verify_folder(path, manifest)
    return manifest


def verify_folder(path: Path, manifest: dict, hashes: bool = True) -> None:
    """The checkpoint folder holds exactly the manifest's listed files (weights and config among them), no
    symlinks, none above its size cap, and (with `hashes`) each with its listed sha256."""
    check_folder(Path(path), manifest["files"], manifest=MANIFEST, required=required_files(manifest),
                 caps={CONFIG: CONFIG_CAP}, hashes=hashes)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()
