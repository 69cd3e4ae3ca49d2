"""CPU backend: tiled dequantize-then-matmul in fp32.

The weight is processed TILE_ROWS output rows at a time: each tile is unpacked and
dequantized to fp32 and multiplied with the (fp32) input, so a large layer never has its
whole dequantized matrix in memory. fp32 dequantization is exact: an fp16 scale times an
integer in [-255, 255] needs at most 20 mantissa bits.

Extension point: a faster kernel (fused unpack+GEMM, int8 dot products, ...) should keep
the signature of `matmul_cpu` and be registered in `dispatch._BACKENDS["cpu"]`; the tests
in tests/test_kernels_cpu.py compare any backend against `reference.matmul_reference`.
"""
from __future__ import annotations

import math

import torch

from .layout import PackedWeight
from .packing import unpack

__all__ = ["matmul_cpu", "dequantize_rows", "dequantize_gather", "TILE_ROWS"]

TILE_ROWS = 512  # output rows dequantized at once
_SUPPORTED_X = (torch.float32, torch.bfloat16)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer (a seam: tests replace it to fill with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def dequantize_rows(pw: PackedWeight, start: int, stop: int,
                    group_index: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 dequantized rows [start, stop) of the weight, shape [stop-start, in]; pure torch, any device."""
    q = unpack(pw.qweight[start:stop], pw.bits, pw.in_features)
    gidx = pw.group_index() if group_index is None else group_index
    scales = pw.scales[start:stop].to(torch.float32)
    if pw.symmetric:
        w = q.to(torch.float32).sub_(float(pw.implicit_zero))
    else:
        zeros = unpack(pw.qzeros[start:stop], pw.bits, pw.n_groups)
        if pw.n_groups == 1:
            w = (q - zeros).to(torch.float32)
        else:
            w = (q - zeros.index_select(1, gidx)).to(torch.float32)
    if pw.n_groups == 1:
        return w.mul_(scales)
    return w.mul_(scales.index_select(1, gidx))


def dequantize_gather(pw: PackedWeight, index: torch.Tensor) -> torch.Tensor:
    """fp32 dequantized rows `index` (integer row ids of any shape) of the weight, shape [*index.shape, in]:
    an embedding lookup that unpacks only the rows it reads; pure torch, any device. Ids outside
    [0, out_features) raise IndexError, as nn.Embedding does."""
    flat = index.reshape(-1).to(torch.int64)
    if flat.numel() == 0:
        return torch.empty(*index.shape, pw.in_features, dtype=torch.float32, device=pw.device)
    rows = PackedWeight(qweight=pw.qweight.index_select(0, flat), scales=pw.scales.index_select(0, flat),
                        qzeros=None if pw.qzeros is None else pw.qzeros.index_select(0, flat), bits=pw.bits,
                        group_size=pw.group_size, in_features=pw.in_features, out_features=int(flat.numel()),
                        symmetric=pw.symmetric, g_idx=pw.g_idx)
    return dequantize_rows(rows, 0, rows.out_features).reshape(*index.shape, pw.in_features)


def matmul_cpu(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
               *, tile_rows: int = TILE_ROWS) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x (..., in) in float32/bfloat16; result (..., out) in x's dtype."""
    if x.dtype not in _SUPPORTED_X:
        raise ValueError(f"matmul_cpu supports float32 and bfloat16 inputs, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != pw.in_features:
        raise ValueError(f"input's last dimension must be in_features={pw.in_features}, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (pw.out_features,):
        raise ValueError(f"bias must have shape [{pw.out_features}], got {tuple(bias.shape)}")
    if tile_rows < 1:
        raise ValueError(f"tile_rows must be positive, got {tile_rows}")
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), pw.in_features).to(torch.float32)
    y = _alloc((x2.shape[0], pw.out_features), torch.float32, x.device)
    gidx = pw.group_index()
    for start in range(0, pw.out_features, tile_rows):
        stop = min(start + tile_rows, pw.out_features)
        w_tile = dequantize_rows(pw, start, stop, gidx)
        y[:, start:stop] = x2 @ w_tile.T
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y.to(x.dtype).reshape(*lead, pw.out_features)
