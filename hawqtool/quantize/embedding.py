"""Quantize the input embedding (and with it a head tied to it) on the searched grid.

The table [vocab, hidden] is rounded to b-bit codes, one fp16 scale (and integer zero, asymmetric) per row
or per group along the hidden size, each chosen by grid.py's importance-weighted search. For a tied head
the weighting is the head's input second moments d_j = E[h_j²] (importance.input_importance on the
calibration windows): the logit error of token i is Σ_j ΔE_ij h_j, whose mean square is ≈ Σ_j d_j ΔE_ij²
for weakly correlated inputs. Without a tied head (the head is a Linear of its own, or there is none) the
table is only looked up, and every column gets equal weight. Position 0 is not up-weighted here (the
attention-sink weighting of GPTQ's H is about the value vectors every later token reads, not logits).

It runs before the linear layers are quantized, so GPTQ calibrates the blocks on the quantized lookup,
as the checkpoint will run; it is deterministic, so a resumed quantize recomputes it identically.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..artifacts import EmbeddingPlan
from ..embedding import embedding_spec, input_embedding
from ..models import tied_head_name
from .importance import input_importance
from .quantizer import QuantizedWeight, rtn


@dataclass
class EmbeddingResult:
    """The quantized table and what the manifest records of it."""

    name: str
    weight: QuantizedWeight
    tied_head: str | None
    importance: str  # "tied-head inputs" or "equal"
    rel_error: float  # Σ d ΔE² / Σ d E² over the table (d the weighting used)

    def summary(self) -> dict:
        s = self.weight.spec
        return {"name": self.name, "bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric,
                "in_features": int(self.weight.q.shape[1]), "out_features": int(self.weight.q.shape[0]),
                "tied_head": self.tied_head, "method": "rtn-search", "importance": self.importance,
                "rel_error": self.rel_error}


def head_importance(model: nn.Module, head: str, batches: list[dict]) -> torch.Tensor:
    """d = E[h_j²] of the head's inputs over the batches (equal weight for every position)."""
    return input_importance(model, {head: model.get_submodule(head)}, batches, first_weight=1.0)[head]


def quantize_embedding(model: nn.Module, ep: EmbeddingPlan, batches: list[dict],
                       importance: torch.Tensor | None = None) -> EmbeddingResult:
    """Quantize the model's input embedding in place per the plan's entry (its weight becomes the dequantized
    table, which a tied head shares) and return the codes. `batches` feed the head-importance pass;
    `importance` is that pass's result when already computed (a benchmark trying several widths)."""
    name, emb = input_embedding(model)
    head = tied_head_name(model)
    d = None
    if head is not None:
        d = importance if importance is not None else head_importance(model, head, batches)
    W = emb.weight.detach().float()
    qw = rtn(W, embedding_spec(ep), search=True, d=d)
    deq = qw.dequantize()
    w = torch.ones(W.shape[1], dtype=torch.float64, device=W.device) if d is None else d.double().to(W.device)
    rel = float(((deq - W).double().pow(2).sum(0) * w).sum() / (W.double().pow(2).sum(0) * w).sum().clamp(min=1e-300))
    with torch.no_grad():
        emb.weight.copy_(deq.to(emb.weight.dtype))
    return EmbeddingResult(name=name, weight=qw, tied_head=head, importance="equal" if d is None else "tied-head inputs",
                           rel_error=rel)
