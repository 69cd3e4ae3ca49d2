"""Exact Hessian-vector products for objectives measured at the model's own point.

For self-KL, KL(p_θ0 ‖ p_θ), and for output-MSE, ½‖f(θ) − f(θ0)‖², the gradient w.r.t.
the outputs vanishes at θ = θ0, so the Hessian there is exactly the Gauss-Newton matrix
H = Jᵀ H_out J. One product Hv = Jᵀ(H_out (J v)) costs a forward-mode jvp plus one
backward pass: 1.6× cheaper than double backward on SmolLM2 (benchmarks/RESULTS.md,
scripts/bench_sensitivity.py), and it never differentiates softmax twice.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp


def model_output(out) -> torch.Tensor:
    """Logits if the model returns an HF output with logits, else its first tensor."""
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def math_attention():
    """SDPA's math backend: the only CPU attention with forward-mode and double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # older torch
        return contextlib.nullcontext()


def position_mask(batch: dict, z: torch.Tensor) -> torch.Tensor:
    """[B, T] float mask of scored positions (attention_mask if given, else all ones)."""
    m = batch.get("attention_mask")
    if m is None or m.shape != z.shape[:2]:
        return torch.ones(z.shape[:2], dtype=z.dtype, device=z.device)
    return m.to(z.dtype)


GGN_OBJECTIVES = ("self-kl", "output-mse")  # the objectives output_hessian_product has a closed form for


def output_hessian_product(objective: str, z: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """H_out·u where H_out is the objective's Hessian w.r.t. the outputs at the own point.

    self-kl: mean over positions of KL(p0‖softmax(z)) → (diag(p) − ppᵀ)/N per position.
    output-mse: ½ mean over positions of ‖z − z0‖² → identity/N."""
    n = mask.sum().clamp_min(1)
    w = mask[..., None] / n
    if objective == "self-kl":
        p = torch.softmax(z.float(), dim=-1)
        return w * (p * u - p * (p * u).sum(-1, keepdim=True))
    if objective == "output-mse":
        return w * u
    raise ValueError(f"no Gauss-Newton form for objective {objective!r}")


def ggn_vector_product(model: nn.Module, params: dict[str, torch.Tensor], batch: dict,
                       v: dict[str, torch.Tensor], objective: str = "self-kl") -> dict[str, torch.Tensor]:
    """Hv for the objective's Hessian w.r.t. `params` at the current weights (exact, see module doc)."""
    primals = {n: p.detach() for n, p in params.items()}
    tangents = {n: v[n].to(primals[n].dtype) for n in primals}

    def f(ps):
        return model_output(functional_call(model, ps, args=(), kwargs=batch, strict=False)).float()

    with math_attention():
        _, Jv = jvp(f, (primals,), (tangents,))
        z, pullback = vjp(f, primals)
        u = output_hessian_product(objective, z.detach(), Jv, position_mask(batch, z))
        (Hv,) = pullback(u.to(z.dtype))
    return {n: h.detach() for n, h in Hv.items()}
