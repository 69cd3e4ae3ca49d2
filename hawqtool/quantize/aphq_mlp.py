"""APHQ's MLP reconstruction: the GELU is replaced by a ReLU clamped at a percentile of its outputs, and fc1/fc2
are refitted so the block's MLP output stays what the GELU MLP gave, under the APH-weighted error (aphq.py)."""
from __future__ import annotations

import torch
from torch import nn

from .aphq import aph_error


def relu_clamp(gelu_out: list[torch.Tensor], percentile: float, gen: torch.Generator | None = None) -> float:
    """The `percentile` of the positive GELU outputs: the clamp of the replacing ReLU (fc2's input range)."""
    v = torch.cat([g.detach().reshape(-1).float() for g in gelu_out])
    v = v[v > 0]
    if v.numel() == 0:
        return 1.0
    if v.numel() > 1 << 22:
        v = v[torch.randperm(v.numel(), generator=gen, device=gen.device)[:1 << 22]]
    return float(torch.quantile(v, percentile / 100.0))


def refit_relu_mlp(fc1: nn.Module, fc2: nn.Module, u: list[torch.Tensor], y: list[torch.Tensor], clamp: float,
                   h: torch.Tensor | None, masks: list[torch.Tensor | None], *, iters: int, lr: float,
                   batch_size: int, gen: torch.Generator | None = None) -> tuple[float, float]:
    """Fit fc1, fc2 in place so fc2(clamp(fc1 u, 0, c)) ≈ y (the GELU MLP's output) under the APH-weighted error
    (Adam, cosine lr); returns (error of the plain GELU→clamped-ReLU swap, error after the refit)."""
    params = [p for m in (fc1, fc2) for p in m.parameters()]

    def mlp(x: torch.Tensor) -> torch.Tensor:
        return fc2(torch.clamp(fc1(x), 0.0, clamp))

    def total() -> float:
        num, den = 0.0, 0.0
        with torch.no_grad():
            for j in range(len(u)):
                e, n = aph_error(mlp(u[j]), y[j], h, masks[j])
                num, den = num + float(e), den + n
        return num / max(den, 1.0)

    swap = total()
    was = [p.requires_grad for p in params]  # loaded models are frozen (requires_grad False): thaw fc1/fc2 here
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iters, 1), eta_min=0.0)
    sizes = torch.tensor([float(x.shape[0]) for x in u], device="cpu")
    for _ in range(iters):
        j = int(torch.multinomial(sizes / sizes.sum(), 1, generator=gen))
        rows = torch.randperm(int(sizes[j]), generator=gen, device=gen.device)[:batch_size]
        with torch.enable_grad():
            e, n = aph_error(mlp(u[j][rows]), y[j][rows], h, masks[j][rows] if masks[j] is not None else None)
            grads = torch.autograd.grad(e / n / max(swap, 1e-30), params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        sched.step()
    for p, w in zip(params, was):
        p.grad = None
        p.requires_grad_(w)
    return swap, total()
