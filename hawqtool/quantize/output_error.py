"""The output error a quantized weight leaves on its calibration inputs, from their H = (2/n) Σ x xᵀ: what each
layer's record in the manifest reports (mean ‖(W−Q)x‖²), for GPTQ and for round-to-nearest alike."""
from __future__ import annotations

import torch

COLS = 2048  # output_error takes H in float64 column slices of this width (every SmolLM2 layer is one slice)


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """Mean ‖(W−Q)x‖² over the samples behind H = (2/n) Σ x xᵀ, in float64 (H converted a column slice at a time:
    an 8192-wide H is 537 MB in float64)."""
    D = (W - Q).double()
    if H.shape[1] <= COLS:
        return float(torch.einsum("oi,ij,oj->", D, H.double(), D) / 2)
    total = 0.0
    for c in range(0, H.shape[1], COLS):
        total += float(torch.einsum("oi,ij,oj->", D, H[:, c:c + COLS].double(), D[:, c:c + COLS]))
    return total / 2


def conv_output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """output_error for a conv's flattened [out, d] weight with per-group patch Hessians H [groups, d, d]."""
    G = H.shape[0]
    Wg, Qg = W.reshape(G, -1, W.shape[1]), Q.reshape(G, -1, W.shape[1])
    return sum(output_error(Wg[g], Qg[g], H[g]) for g in range(G))
