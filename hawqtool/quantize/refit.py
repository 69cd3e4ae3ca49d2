"""Scale refit: with a layer's integer codes and zeros fixed (from GPTQ), each output row's group scales are
re-chosen to minimise the layer's output error ‖(W − Q)X‖² = (w − Q)ᵀ H (w − Q) exactly. GPTQ picks each group's
scale before its columns are swept and then moves the later columns; the codes it ends with are rarely best served
by the scales it started with. Q_r = Σ_g s_rg · b_r ⊙ 1_g, b = q − z, so per row the scales solve the G × G normal
equations (Eᵀ B H B E) s = Eᵀ B H w (E: group indicator, B = diag(b)); the loss never rises (the old scales are a
feasible point and the solve is exact, the fp16 rounding of the result is kept only where it still helps)."""
from __future__ import annotations

import torch

from .quantizer import QuantizedWeight

def refit_scales(W: torch.Tensor, H: torch.Tensor, qw: QuantizedWeight) -> QuantizedWeight:
    """`qw` with its scales re-solved for the output error under H = (2/n) Σ x xᵀ (codes and zeros unchanged);
    a group whose new scale is not positive and finite keeps its old one; rows whose loss would rise keep theirs."""
    if qw.grid is not None:
        return qw
    g = qw.group_index()
    G = qw.scales.shape[1]
    order = torch.argsort(g, stable=True)  # groups contiguous (act-order's g_idx interleaves them)
    gi = g[order]
    Hs = H.double()[order][:, order]
    Wd = W.double()[:, order]
    b = (qw.q.double() - qw.zeros.double()[:, g])[:, order]
    E = torch.nn.functional.one_hot(gi, G).double()  # [in, G]
    starts = torch.searchsorted(gi, torch.arange(G + 1, device=gi.device)).tolist()
    M = torch.zeros(W.shape[0], G, G, dtype=torch.float64, device=W.device)
    for k in range(G):  # M[r, k, h] = Σ_{i∈k, j∈h} b_ri H_ij b_rj: one [rows, in] product per group
        cols = slice(starts[k], starts[k + 1])
        M[:, k, :] = ((b[:, cols] @ Hs[cols, :]) * b) @ E
    v = (b * (Wd @ Hs)) @ E  # [rows, G]
    ridge = 1e-9 * M.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
    M = M + ridge[:, None, None] * torch.eye(G, dtype=M.dtype, device=M.device)
    s = torch.linalg.solve(M, v.unsqueeze(-1)).squeeze(-1)
    new = torch.where(torch.isfinite(s) & (s > 0), s, qw.scales.double())
    new = new.to(torch.float16).double()  # stored as fp16
    new = torch.where(torch.isfinite(new) & (new > 0), new, qw.scales.double())
    old_loss = _row_losses(Wd, Hs, b, E, qw.scales.double())
    new_loss = _row_losses(Wd, Hs, b, E, new)
    keep = new_loss <= old_loss
    scales = torch.where(keep[:, None], new, qw.scales.double()).to(qw.scales.dtype)
    from dataclasses import replace

    return replace(qw, scales=scales)


def _row_losses(W: torch.Tensor, H: torch.Tensor, b: torch.Tensor, E: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(w_r − Q_r)ᵀ H (w_r − Q_r) per row, columns in the groups-contiguous order."""
    D = W - b * (scales @ E.t())
    return ((D @ H) * D).sum(dim=1)
