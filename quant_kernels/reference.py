"""Plain float64 reference implementations, the ground truth the fast kernels are tested against.

Deliberately simple and independent of `cpu.py`: unpack everything, build the weight
group by group in float64, multiply in float64. Slow and memory-hungry; tests only.
"""
from __future__ import annotations

import torch

from .layout import PackedWeight
from .packing import unpack

__all__ = ["dequantize_reference", "matmul_reference"]


def dequantize_reference(pw: PackedWeight) -> torch.Tensor:
    """Dequantized weight W [out, in] in float64: W = scale * (q - zero), group by group."""
    pw.validate()
    out_f, in_f, n_g = pw.out_features, pw.in_features, pw.n_groups
    q = unpack(pw.qweight, pw.bits, in_f).to(torch.float64)
    if pw.symmetric:
        zeros = torch.full((out_f, n_g), float(2 ** (pw.bits - 1)), dtype=torch.float64, device=q.device)
    else:
        zeros = unpack(pw.qzeros, pw.bits, n_g).to(torch.float64)
    scales = pw.scales.to(torch.float64)
    if pw.g_idx is not None:
        group_of_col = [int(g) for g in pw.g_idx.tolist()]
    elif pw.group_size == -1:
        group_of_col = [0] * in_f
    else:
        group_of_col = [j // pw.group_size for j in range(in_f)]
    W = torch.full((out_f, in_f), float("nan"), dtype=torch.float64, device=q.device)
    for g in range(n_g):
        cols = torch.tensor([j for j in range(in_f) if group_of_col[j] == g], dtype=torch.int64, device=q.device)
        if cols.numel() == 0:
            continue
        W[:, cols] = scales[:, g:g + 1] * (q[:, cols] - zeros[:, g:g + 1])
    return W


def matmul_reference(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) entirely in float64; x has shape (..., in), result (..., out)."""
    W = dequantize_reference(pw)
    y = x.to(torch.float64) @ W.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y
