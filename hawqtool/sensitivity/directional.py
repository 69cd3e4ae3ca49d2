"""The Fisher quadratic form along each layer's real quantization error: ΔWᵀ F_ll ΔW per option.

HAWQ's Ω = Tr(F_ll)/n · ‖ΔW‖² assumes the error is isotropic; the error a quantizer leaves is not
(it follows the weights' groups and outliers). With sampled labels, g = ∇_l of the mean sampled
loss over N positions satisfies E[N·g gᵀ] = F_ll (fisher.py), so N·⟨g, ΔW⟩² is an unbiased sample of
ΔWᵀ F_ll ΔW, for every ΔW at once from the same backward. On an isotropic F it equals HAWQ's Ω, so
both live on one scale.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .distributed import probe_seed
from .fisher import sampled_loss, scored_mask
from .hutchinson import _to_device, estimating
from .objectives import Batch, model_logits, upcast


def directional_fisher(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], batches: list[Batch],
                       directions: dict[str, dict[str, torch.Tensor]], objective: str = "self-kl", *,
                       probes: int = 16, seed: int = 0,
                       progress: Callable[[int], None] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    """(mean, standard error) of N·⟨g_l, ΔW⟩² over `probes` sampled-label backwards, for every layer l
    and every direction ΔW in directions[l] (each shaped like params[l]). Probe k uses batch
    k mod len(batches) and the label draws of the trace estimator's probe k (same seeds)."""
    names = [n for n in params if n in directions]
    plist = [params[n] for n in names]
    device = plist[0].device
    sums = {n: {key: [] for key in directions[n]} for n in names}
    with estimating(model, plist):
        for k in range(probes):
            batch = _to_device(batches[k % len(batches)], device)
            gen = torch.Generator().manual_seed(probe_seed(seed, k))
            with torch.enable_grad():
                z = upcast(model_logits(model, batch))
                mask = scored_mask(batch, z)
                n_pos = float(mask.sum().clamp_min(1))
                grads = torch.autograd.grad(sampled_loss(objective, z, mask, gen), plist, allow_unused=True)
            for n, g in zip(names, grads):
                for key, d in directions[n].items():
                    dot = 0.0 if g is None else float((g.double() * d.to(g.device).double()).sum())
                    sums[n][key].append(n_pos * dot * dot)
            if progress:
                progress(1)
    out = {}
    for n in names:
        out[n] = {}
        for key, xs in sums[n].items():
            m = sum(xs) / len(xs)
            var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else float("nan")
            out[n][key] = (m, math.sqrt(var / len(xs)) if var == var else float("nan"))
    return out
