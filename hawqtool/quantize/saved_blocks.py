"""A quantize run's finished blocks on disk (CKPT.partial/, through resume_state.BlockState: sealed and verified):
each block's quantized layers, in the form the checkpoint will hold them, written when the block is committed and
read back when a killed run resumes, or (streamed models) at the end of the block walk, so that host memory does
not hold every finished block's codes while the later blocks run (≈ 40 MB per block of a 3B model at 3.5 bits).
A streamed run's packed layers are not even read back: `saved_layers` hands the checkpoint writer LazyTensors that
read each one from its block file in turn, so writing the checkpoint holds one tensor of them at a time."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quant_kernels import PackedWeight

from ..models import weight_matrix
from .quantizer import QuantizedWeight, QuantSpec, ggml_bytes, ggml_from_bytes
from ..tensorfile import LazyTensor
from .resume_state import BlockState

Layer = tuple[str, "QuantizedWeight | PackedWeight", QuantSpec, dict]  # (name, weight, spec, meta as saved)


def save_block(state: BlockState, i: int, layers: dict[str, tuple], hidden: list[torch.Tensor],
               floats: list[torch.Tensor] | None = None) -> None:
    """Commit block i: `layers` = {name: (weight, meta)} (meta: the layer's manifest summary and seconds), the
    next block's inputs and (--float-target) the float chain's."""
    tensors, meta = {}, {}
    for n, (w, m) in layers.items():
        meta[n] = dict(m)
        if isinstance(w, PackedWeight):  # kept packed (streamed model): stored as the checkpoint will hold it
            from ..checkpoint import packed_tensors

            tensors.update(packed_tensors(n, w))
            meta[n].update(packed=True, in_features=w.in_features, out_features=w.out_features)
            continue
        if w.grid is not None:  # a ggml layer: its exact block bytes
            tensors[f"{n}.ggml"] = ggml_bytes(w)
            continue
        tensors[f"{n}.q"] = w.q.to(torch.uint8)
        tensors[f"{n}.scales"] = w.scales
        tensors[f"{n}.zeros"] = w.zeros.to(torch.uint8)
        if w.g_idx is not None:
            tensors[f"{n}.g_idx"] = w.g_idx.to(torch.int32)
    boundary = {f"h{j}": h for j, h in enumerate(hidden)}
    boundary.update({f"f{j}": h.cpu() for j, h in enumerate(floats or [])})  # the float chain (--float-target)
    state.save(i, tensors, boundary, {"layers": meta})


def load_blocks(state: BlockState, layers: dict[str, nn.Module]) -> tuple[list[list[Layer]], dict | None]:
    """The verified finished blocks in order, each a list of its layers, and the next block's saved inputs
    ({h0, h1, ..., f0, ...}); ([], None) when there are none (a damaged block and those after it are dropped)."""
    done, hidden = state.resume()
    return [_layers_of(meta, t, layers) for meta, t in done], hidden


def _layers_of(meta: dict, t: dict[str, torch.Tensor], layers: dict[str, nn.Module]) -> list[Layer]:
    """One saved block's layers, from its record's metadata and its file's tensors."""
    out = []
    for n, m in meta["layers"].items():
        spec = QuantSpec(**m["spec"])
        if m.get("packed"):
            from ..loader import packed_from_tensors

            qw = packed_from_tensors(t, n, {"bits": spec.bits, "group_size": spec.group_size,
                                            "symmetric": spec.symmetric, "in_features": m["in_features"],
                                            "out_features": m["out_features"]})
        elif spec.fmt:
            qw = ggml_from_bytes(t[f"{n}.ggml"], spec, weight_matrix(layers[n]).shape[1])
        else:
            qw = QuantizedWeight(t[f"{n}.q"].to(torch.int32), t[f"{n}.scales"], t[f"{n}.zeros"].to(torch.int32),
                                 spec, t.get(f"{n}.g_idx"))
        out.append((n, qw, spec, m))
    return out


@dataclass
class SavedPacked:
    """A finished layer's packed tensors, left in its block file: what the checkpoint needs of a PackedWeight (its
    format, and `tensors` named as checkpoint.packed_tensors names them, read when written)."""

    bits: int
    group_size: int
    symmetric: bool
    in_features: int
    out_features: int
    tensors: dict[str, LazyTensor]

    @property
    def g_idx(self) -> LazyTensor | None:
        return next((t for k, t in self.tensors.items() if k.endswith(".g_idx")), None)


def saved_layers(state: BlockState, layers: dict[str, nn.Module]) -> dict[str, Layer] | None:
    """{name: layer} of the verified finished blocks, the packed ones as SavedPacked (nothing read yet), the
    others read now; None when a block is damaged (or missing)."""
    from safetensors import safe_open

    done, hidden = state.resume(load=False)
    if hidden is None:
        return None
    out: dict[str, Layer] = {}
    for meta, path in done:
        if not all(m.get("packed") for m in meta["layers"].values()):  # ggml / unpacked layers: read now
            from safetensors.torch import load_file

            out.update({layer[0]: layer for layer in _layers_of(meta, load_file(str(path)), layers)})
            continue
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
        for n, m in meta["layers"].items():
            spec = QuantSpec(**m["spec"])
            mine = {k: LazyTensor(_DTYPE[shapes[k][0]], shapes[k][1], _reader(path, k))
                    for k in shapes if k.rsplit(".", 1)[0] == n}
            out[n] = (n, SavedPacked(spec.bits, spec.group_size, spec.symmetric, m["in_features"], m["out_features"],
                                     mine), spec, m)
    return out


_DTYPE = {"I32": torch.int32, "F16": torch.float16, "U8": torch.uint8, "F32": torch.float32, "BF16": torch.bfloat16}


def _reader(path: Path, key: str):
    def read() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)
    return read


def dequantize_packed(pw: PackedWeight) -> torch.Tensor:
    from quant_kernels import dequantize

    return dequantize(pw, torch.float32)
