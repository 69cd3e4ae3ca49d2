"""A quantize run's finished blocks on disk (CKPT.partial/, through resume_state.BlockState: sealed and verified):
each block's quantized layers, in the form the checkpoint will hold them, written when the block is committed and
read back when a killed run resumes, or (streamed models) at the end of the block walk, so that host memory does
not hold every finished block's codes while the later blocks run (≈ 40 MB per block of a 3B model at 3.5 bits).
A streamed run's packed layers (checkpoint.PackedLayer) are not even read back: `saved_layers` gives the checkpoint
writer LazyTensors that read each one from its block file in turn, so it holds one tensor of them at a time."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models import weight_matrix
from ..tensorfile import TORCH_DTYPE, LazyTensor
from .quantizer import QuantizedWeight, QuantSpec, ggml_bytes, ggml_from_bytes
from .resume_state import BlockState

Layer = tuple[str, "QuantizedWeight | PackedLayer", QuantSpec, dict]  # (name, weight, spec, meta as saved)


def save_block(state: BlockState, i: int, layers: dict[str, tuple], hidden: list[torch.Tensor],
               floats: list[torch.Tensor] | None = None) -> None:
    """Commit block i: `layers` = {name: (weight, meta)} (meta: the layer's manifest summary and seconds), the
    next block's inputs and (--float-target) the float chain's."""
    from ..checkpoint import PackedLayer

    tensors, meta = {}, {}
    for n, (w, m) in layers.items():
        meta[n] = dict(m)
        if isinstance(w, PackedLayer):  # kept packed (streamed model): stored as the checkpoint will hold it
            tensors.update(w.tensors)
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
        if w.scale_step is not None:
            tensors[f"{n}.scale_step"] = w.scale_step
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
            qw = _packed_layer(n, spec, m, {k: v for k, v in t.items() if k.rsplit(".", 1)[0] == n})
        elif spec.fmt:
            qw = ggml_from_bytes(t[f"{n}.ggml"], spec, weight_matrix(layers[n]).shape[1])
        else:
            qw = QuantizedWeight(t[f"{n}.q"].to(torch.int32), t[f"{n}.scales"], t[f"{n}.zeros"].to(torch.int32),
                                 spec, t.get(f"{n}.g_idx"), scale_step=t.get(f"{n}.scale_step"))
        out.append((n, qw, spec, m))
    return out


def _packed_layer(n: str, spec: QuantSpec, m: dict, tensors: dict):
    from ..checkpoint import PackedLayer

    return PackedLayer(n, spec.bits, spec.group_size, spec.symmetric, m["in_features"], m["out_features"], tensors,
                       spec.scale_bits)


def saved_layers(state: BlockState, layers: dict[str, nn.Module]) -> dict[str, Layer] | None:
    """{name: layer} of the verified finished blocks, the packed ones as PackedLayers of LazyTensors (nothing read
    yet), the others read now; None when a block is damaged (or missing)."""
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
            mine = {k: LazyTensor(TORCH_DTYPE[shapes[k][0]], shapes[k][1], _reader(path, k))
                    for k in shapes if k.rsplit(".", 1)[0] == n}
            out[n] = (n, _packed_layer(n, spec, m, mine), spec, m)
    return out


def _reader(path: Path, key: str):
    def read() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)
    return read


def dequantize_packed(layer) -> torch.Tensor:
    """The float32 weight of a checkpoint.PackedLayer (its tensors in memory)."""
    from quant_kernels import dequantize

    from ..loader import packed_from_tensors

    return dequantize(packed_from_tensors(layer.tensors, layer.name, layer.meta()), torch.float32)
