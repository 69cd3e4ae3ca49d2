"""Stage 4's artifact: a quantized checkpoint folder, written atomically and verified on read.

Layout of CKPT/:
  model.safetensors     for each quantized layer NAME: NAME.qweight (int32, codes packed
                        along the input dim, quant_kernels layout), NAME.scales (fp16
                        [out, groups]), NAME.qzeros (int32 packed, asymmetric only),
                        NAME.g_idx (int32 [in], act-order only), NAME.bias; every other
                        tensor of the state dict unchanged (tied weights stored once)
  config.json, tokenizer files   as the source model had them
  hawqtool_manifest.json         plan, per-layer bits/group/error, sha256 of every file
Zero-point convention: w = scale * (q - zero), q and zero unsigned b-bit integers;
symmetric layers store no zeros and use zero = 2^(b-1).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from quant_kernels import PackedWeight

from .artifacts import SCHEMA_VERSION, tool_version
from .outputs import replace_dir
from .errors import UserError
from .quantize.quantizer import QuantizedWeight

MANIFEST = "hawqtool_manifest.json"
WEIGHTS = "model.safetensors"
ZERO_POINT_CONVENTION = "w = scale * (q - zero); q, zero in [0, 2^bits-1]; symmetric: zero = 2^(bits-1), not stored"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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


def save_checkpoint(out_dir: Path, model: nn.Module, weights: dict[str, QuantizedWeight], *,
                    layer_info: dict[str, dict], extra: dict, tokenizer=None) -> Path:
    """Write CKPT atomically: build in OUT.tmp-PID, rename over OUT when complete."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    layers_meta = {}
    for name, qw in weights.items():
        pw = pack_layer(qw)
        tensors.update(packed_tensors(name, pw))
        state.pop(f"{name}.weight")
        if f"{name}.bias" in state:
            tensors[f"{name}.bias"] = state.pop(f"{name}.bias")
        layers_meta[name] = {"bits": pw.bits, "group_size": pw.group_size, "symmetric": pw.symmetric,
                             "in_features": pw.in_features, "out_features": pw.out_features,
                             "act_order": pw.g_idx is not None, **layer_info.get(name, {})}
    seen: dict[int, str] = {}
    tied = {}
    for k, v in state.items():
        if v.data_ptr() in seen:
            tied[k] = seen[v.data_ptr()]
            continue
        seen[v.data_ptr()] = k
        tensors[k] = v
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS),
              metadata={"format": "hawqtool", "zero_point": ZERO_POINT_CONVENTION})
    if hasattr(getattr(model, "config", None), "save_pretrained"):  # HF models; timm ones are rebuilt by arch
        model.config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {"kind": "checkpoint", "schema_version": SCHEMA_VERSION, "tool_version": tool_version(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "zero_point": ZERO_POINT_CONVENTION,
                "packing": "per output row, little-endian bit stream of b-bit codes in int32 words",
                "layers": layers_meta, "tied": tied, "files": files, **extra}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return replace_dir(tmp, out_dir)


def read_manifest(path: Path, verify: bool = True) -> dict:
    """Manifest of a checkpoint; UserError if absent, malformed, or a file's sha256 differs."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise UserError(f"{path} is not a hawqtool checkpoint (no {MANIFEST}); pass a folder written by "
                        "`hawqtool quantize`")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
        layers = manifest["layers"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{mf} is corrupt ({e.__class__.__name__}); re-create the checkpoint with "
                        "`hawqtool quantize`") from e
    if manifest.get("schema_version") != SCHEMA_VERSION or not isinstance(layers, dict):
        raise UserError(f"{mf} has an unsupported schema; re-create the checkpoint with `hawqtool quantize`")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise UserError(f"{mf} has a malformed 'files' list; re-create the checkpoint with `hawqtool quantize`")
    if verify:
        for name, digest in files.items():
            f = path / name
            if Path(name).name != name or name in ("", ".", ".."):
                raise UserError(f"{mf} lists a file outside the checkpoint ({name!r}); re-create the checkpoint")
            if not f.is_file():
                raise UserError(f"checkpoint file {f} is missing; re-create the checkpoint with `hawqtool quantize`")
            if sha256_file(f) != digest:
                raise UserError(f"checkpoint file {f} is corrupt (sha256 mismatch); re-create it with "
                                "`hawqtool quantize`")
    return manifest


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()
