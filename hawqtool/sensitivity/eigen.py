"""Top Hessian eigenvalue per layer block by power iteration (HAWQ-V1's sensitivity).

For a block b (one layer's weight, or several layers' weights together), iterate
v ← H_bb v / ‖H_bb v‖ where H_bb v is the Hessian-vector product with v zero outside the
block, restricted to the block. H is the objective's Hessian averaged over all calibration
batches, so each iteration costs one HVP per batch. Power iteration converges to the
eigenvalue of largest magnitude: the top eigenvalue for PSD objectives (self-kl, output-mse),
possibly a negative one for `labels` away from a minimum (reported with its sign).
Stops when the Rayleigh quotient changes by less than `tol` relatively, or after `max_iters`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .ggn import ggn_vector_product
from .hutchinson import _model_names, _to_device, autograd_hvp, estimating
from .objectives import Batch, get_objective, model_inputs


@dataclass
class BlockEigen:
    """Top eigenvalue estimate of one block's Hessian and how it was reached."""

    name: str
    eigenvalue: float
    iterations: int
    converged: bool


def top_eigenvalues(model: nn.Module, params: dict[str, torch.nn.Parameter], batches: list[Batch],
                    objective: str = "self-kl", *, blocks: dict[str, list[str]] | None = None, max_iters: int = 20,
                    tol: float = 1e-3, seed: int = 0, hvp: str = "autograd",
                    progress: Callable[[int], None] | None = None) -> dict[str, BlockEigen]:
    """Power iteration for each block of `params` (default: one block per parameter)."""
    obj = get_objective(objective)
    if not params or not batches:
        raise ValueError("need parameters and calibration batches")
    if max_iters < 1 or not tol > 0:
        raise ValueError("max_iters must be ≥ 1 and tol > 0")
    blocks = blocks or {n: [n] for n in params}
    names = list(params)
    plist = [params[n] for n in names]
    model_names = _model_names(model, plist) if hvp == "ggn" else names
    device = plist[0].device
    dev = [_to_device(b, device) for b in batches]
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def block_hvp(members: list[str], v: dict[str, torch.Tensor], refs: list[Any]) -> dict[str, torch.Tensor]:
        """(H v) on the block, H averaged over the batches, v zero outside the block."""
        idx = [names.index(m) for m in members]
        vs = [v[n] if n in v else torch.zeros_like(p) for n, p in zip(names, plist)]
        acc = {m: torch.zeros_like(params[m], dtype=torch.float64) for m in members}
        for batch, ref in zip(dev, refs):
            if hvp == "ggn":
                ps = dict(zip(model_names, plist))
                out = ggn_vector_product(model, ps, model_inputs(batch), dict(zip(model_names, vs)), obj.name)
                hv = [out[n].detach() for n in model_names]
            else:
                hv = autograd_hvp(model, plist, batch, ref, obj, vs)
            for i in idx:
                acc[names[i]] += hv[i].double()
        return {m: (a / len(dev)).to(params[m].dtype) for m, a in acc.items()}

    out: dict[str, BlockEigen] = {}
    with estimating(model, plist):
        with torch.no_grad():
            refs = [obj.prepare(model, b) for b in dev]
        for bname, members in blocks.items():
            v = {m: torch.randn(params[m].shape, generator=gen, device="cpu").to(params[m]) for m in members}
            norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in v.values()))
            v = {m: t / norm for m, t in v.items()}
            lam, converged, it = math.nan, False, 0
            for it in range(1, max_iters + 1):
                hv = block_hvp(members, v, refs)
                new = sum(float((v[m].double() * hv[m].double()).sum()) for m in members)  # Rayleigh quotient
                norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in hv.values()))
                if norm == 0:
                    lam, converged = 0.0, True
                    break
                v = {m: t / norm for m, t in hv.items()}
                if not math.isnan(lam) and abs(new - lam) <= tol * max(abs(new), 1e-30):
                    lam, converged = new, True
                    break
                lam = new
            out[bname] = BlockEigen(bname, lam, it, converged)
            if progress:
                progress(1)
    return out
