"""Objectives: scalar losses of the weights whose Hessian the Hutchinson estimator measures.

An objective has a `prepare(model, batch) -> reference` step, run once per batch under no_grad
at the current weights, and a `loss(model, batch, reference) -> scalar` step that is
differentiated twice.

* ``self-kl``    KL(p_ref ‖ p_θ), p_ref = the model's own softmax at the current weights; summed
                 over the vocabulary, averaged over (attention-mask) positions. At the own point
                 its Hessian is the Fisher / Gauss-Newton matrix (PSD); no labels needed.
* ``labels``     cross-entropy against ``batch["labels"]`` (causal LMs: shifted next-token,
                 -100 ignored), computed here from the logits.
* ``output-mse`` ½ · mean over positions of ‖f(θ) − f(θ_ref)‖² (logits or last_hidden_state).
* ``pooled-cosine`` mean over windows of 1 − cos(e(θ), e(θ_ref)) = ½‖e(θ) − e(θ_ref)‖², e = the unit-length
                 mean over (attention-mask) positions of the output: an encoder's sentence embedding, the quantity
                 its evaluation scores. Errors that average out over positions or only rescale the embedding cost
                 nothing here, unlike in output-mse. At its own point the Hessian is JₑᵀJₑ/B (Gauss-Newton).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]

#: batch keys that are targets, never forwarded to the model
TARGET_KEYS = ("labels",)


def model_inputs(batch: Batch) -> Batch:
    """The batch without target keys (so HF models do not compute their own loss)."""
    return {k: v for k, v in batch.items() if k not in TARGET_KEYS}


def model_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """`model(**batch)` reduced to one tensor: `.logits`, else `.last_hidden_state`, else the first element."""
    out = model(**model_inputs(batch))
    if getattr(out, "logits", None) is not None:
        return out.logits
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out


def upcast(z: torch.Tensor) -> torch.Tensor:
    """At least float32 (half/bfloat16 → float32; float64 kept)."""
    return z if z.dtype == torch.float64 else z.float()


def masked_position_mean(per_position: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean over positions, restricted to `attention_mask == 1` when the mask matches their shape."""
    mask = batch.get("attention_mask")
    if mask is None or tuple(mask.shape) != tuple(per_position.shape):
        return per_position.mean()
    m = mask.to(device=per_position.device, dtype=per_position.dtype)
    return (per_position * m).sum() / m.sum().clamp_min(1)


@dataclass(frozen=True)
class Objective:
    """A named loss: `prepare` (once per batch, no_grad) and `loss` (differentiated twice)."""

    name: str
    prepare: Callable[[nn.Module, Batch], Any]
    loss: Callable[[nn.Module, Batch, Any], torch.Tensor]
    own_point: bool = False  # Hessian at the current weights is Gauss-Newton (see ggn.py)


def _self_kl_prepare(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Log-probabilities of the model's own predictions (≥ float32, detached)."""
    return torch.log_softmax(upcast(model_logits(model, batch).detach()), dim=-1)


def _self_kl_loss(model: nn.Module, batch: Batch, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) summed over the vocabulary, mean over (masked) positions."""
    logp = torch.log_softmax(upcast(model_logits(model, batch)), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return masked_position_mean(kl, batch)


def _labels_prepare(model: nn.Module, batch: Batch) -> None:
    """Checks that the batch carries labels; nothing to precompute."""
    if "labels" not in batch:
        raise ValueError("objective 'labels' needs batch['labels']")
    return None


def _labels_loss(model: nn.Module, batch: Batch, _ref: Any = None) -> torch.Tensor:
    """Cross-entropy against labels: shifted next-token for [B, T, V] logits, -100 ignored."""
    z = upcast(model_logits(model, batch))
    y = batch["labels"].to(z.device)
    if z.dim() == 3 and y.dim() == 2:  # causal LM, HF convention
        z, y = z[:, :-1], y[:, 1:]
    z, y = z.reshape(-1, z.shape[-1]), y.reshape(-1)
    n = (y != -100).sum().clamp_min(1)
    return F.cross_entropy(z, y, ignore_index=-100, reduction="sum") / n


def _mse_prepare(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's output at the current weights (≥ float32, detached)."""
    return upcast(model_logits(model, batch).detach())


def _mse_loss(model: nn.Module, batch: Batch, ref: torch.Tensor) -> torch.Tensor:
    """½ ‖f(θ) − f_ref‖² summed over the last dim, mean over (masked) positions."""
    z = upcast(model_logits(model, batch))
    return 0.5 * masked_position_mean((z - ref).pow(2).sum(-1), batch)


def pooled_embedding(z: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B, T, D] outputs → [B, D] unit-length means over (attention-mask) positions (sentence-transformers' mean
    pooling, then normalisation); [B, D] outputs are only normalised."""
    if z.dim() == 3:
        mask = batch.get("attention_mask")
        if mask is None or tuple(mask.shape) != tuple(z.shape[:2]):
            z = z.mean(dim=1)
        else:
            m = mask.to(device=z.device, dtype=z.dtype)[..., None]
            z = (z * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
    return F.normalize(z, dim=-1)


def _pooled_prepare(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The unit-length pooled embedding at the current weights (≥ float32, detached)."""
    return pooled_embedding(upcast(model_logits(model, batch).detach()), batch)


def _pooled_loss(model: nn.Module, batch: Batch, ref: torch.Tensor) -> torch.Tensor:
    """½ ‖e(θ) − e_ref‖² summed over the embedding, mean over windows (= mean of 1 − cos for unit vectors)."""
    e = pooled_embedding(upcast(model_logits(model, batch)), batch)
    return 0.5 * (e - ref).pow(2).sum(-1).mean()


OBJECTIVES: dict[str, Objective] = {
    "self-kl": Objective("self-kl", _self_kl_prepare, _self_kl_loss, own_point=True),
    "labels": Objective("labels", _labels_prepare, _labels_loss),
    "output-mse": Objective("output-mse", _mse_prepare, _mse_loss, own_point=True),
    "pooled-cosine": Objective("pooled-cosine", _pooled_prepare, _pooled_loss, own_point=True),
}


def get_objective(objective: str | Objective) -> Objective:
    """An Objective from its name (self-kl, labels, output-mse, pooled-cosine) or as given."""
    if isinstance(objective, Objective):
        return objective
    try:
        return OBJECTIVES[objective]
    except KeyError:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}") from None
