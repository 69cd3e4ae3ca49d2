"""Per-input importance of each layer (diag of its input second-moment matrix) and the quantization
error weighted by it: the allocator's ΔW term, measured the way the quantizer minimises it.

For a Linear y = W x with loss curvature G on y, the loss change of ΔW is ½·E[xᵀΔWᵀ G ΔW x]; with
G ≈ (tr G / out)·I and Tr(F_W) = tr G · E‖x‖² (Kronecker factors) it is Tr(F_W)/n times
Σ_j d_j ‖ΔW[:, j]‖² / mean(d), d_j = E[x_j²]. With isotropic inputs this is HAWQ's ‖ΔW‖².
"""
from __future__ import annotations

import torch
from torch import nn

from . import quantizer
from .quantizer import QuantSpec, rtn


class ImportanceSums:
    """Running d = E[x_j²] per input column, from forward pre-hooks (`hook(name)`), position 0 of each sequence
    weighted by `first_weight`; `result()` gives d per layer."""

    def __init__(self, first_weight: float = 1.0):
        self.first_weight, self.sums, self.counts = first_weight, {}, {}

    def hook(self, n: str):
        def add(_m, a):
            x = a[0].detach().float()
            w = torch.ones(x.shape[:-1], device=x.device)
            if self.first_weight != 1.0 and x.dim() == 3:
                w[:, 0] = self.first_weight
            x2 = (x * x * w[..., None]).reshape(-1, x.shape[-1]).sum(0)
            self.sums[n] = self.sums.get(n, 0) + x2.double()
            self.counts[n] = self.counts.get(n, 0.0) + float(w.sum())
        return add

    def result(self) -> dict[str, torch.Tensor]:
        return {n: (self.sums[n] / self.counts[n]).float() for n in self.sums}


def weighted_layers(layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The layers whose inputs get an importance: Linear and HF Conv1D (convolutions' inputs are unfolded patches)."""
    from transformers.pytorch_utils import Conv1D

    return {n: m for n, m in layers.items() if isinstance(m, (nn.Linear, Conv1D))}


def input_importance(model: nn.Module, layers: dict[str, nn.Module], batches: list[dict],
                     first_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """d = E[x_j²] per input column of every Linear / HF Conv1D layer in `layers` over the batches
    (position 0 of each sequence weighted by `first_weight`, as the quantize stage weights H);
    convolutions are left out (their inputs are unfolded patches: equal weights)."""
    acc = ImportanceSums(first_weight)
    handles = [m.register_forward_pre_hook(acc.hook(n)) for n, m in weighted_layers(layers).items()]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b, **({"use_cache": False} if "input_ids" in b else {}))
    finally:
        for h in handles:
            h.remove()
    return acc.result()


def weighted_quant_error(W: torch.Tensor, spec: QuantSpec, d: torch.Tensor | None) -> float:
    """Σ_j d_j ‖Q(W)[:, j] − W[:, j]‖² / mean(d) for the searched RTN grid with importance d
    (plain ‖Q(W) − W‖² of the equal-weight search when d is None)."""
    W = W.detach().float()
    col = None
    for r in range(0, W.shape[0], quantizer.ROW_SLICE):  # a 49152-row head in slices, not 4 GB at once
        Wr = W[r:r + quantizer.ROW_SLICE]
        c = (rtn(Wr, spec, search=True, d=d).dequantize() - Wr).pow(2).sum(dim=0)
        col = c if col is None else col + c
    if d is None or float(d.mean()) <= 0:
        return float(col.sum())
    d = d.to(col.device).float()
    return float((d * col).sum() / d.mean())
