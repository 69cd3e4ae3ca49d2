"""Per-layer Fisher traces by sampled labels: one forward + one backward per probe, no second-order pass.

For models where Hessian-vector products are too expensive or unsupported (no double backward, no
forward mode). Same stopping rule and `LayerTrace` output as `hutchinson_traces`.

``self-kl`` (default). At the model's own point the self-KL Hessian is the Fisher / Gauss-Newton
matrix H = (1/N) Σ_t F_t, F_t = E_{y~p_θ(·|x_t)}[∇log p(y)∇log p(y)ᵀ], N scored positions (mean
over positions, as in the objective). One probe draws y_t ~ p_θ(·|x_t) independently at every scored
position (seeded generator), backpropagates L = −(1/N) Σ_t log p_θ(y_t|x_t) once, and records per
layer N·‖∇_l L‖². With g = (1/N) Σ_t ∇log p(y_t): E[g gᵀ] = (1/N²) Σ_t F_t, because the score has
zero mean and positions are sampled independently given x (labels are never fed back as inputs),
so E[N·‖g_l‖²] = (1/N) Σ_t Tr F_t,ll = Tr(H_ll). Samples are ≥ 0 (unlike Hutchinson's).

``output-mse``. Its Hessian at the own point is (1/N) Σ_t J_tᵀJ_t, the Fisher of a unit-variance
Gaussian on the outputs: sampling ε_t ~ N(0, I) and backpropagating (1/N) Σ_t ε_t·f_t gives the
same N·‖g_l‖² estimate.

``pooled-cosine``. The same Gaussian Fisher on the B unit-length pooled embeddings e_b instead of the N positions'
outputs (its Hessian at the own point is (1/B) Σ_b J_bᵀJ_b): ε_b ~ N(0, I), backpropagate (1/B) Σ_b ε_b·e_b, record
B·‖g_l‖².

``labels`` is not supported: its empirical Fisher trace is (1/N) Σ_t ‖∇_l log p(y_t)‖² with the true
labels, which needs one gradient per position; one backward gives only the batch-mean gradient ḡ,
and N·‖ḡ_l‖² is not that trace (nor the Hessian's). Use `hutchinson_traces(objective="labels")`.
"""
from __future__ import annotations

import torch
from torch import nn

from .distributed import probe_seed, round_robin, world
from .hutchinson import LayerTrace, ProgressFn, _to_device, adaptive_probes, check_probe_args, estimating
from .objectives import Batch, Objective, get_objective, model_logits, pooled_embedding, upcast

SUPPORTED = ("self-kl", "output-mse", "pooled-cosine")
DRAW_CHUNK = 1 << 22  # probabilities per label-draw call (sampled_loss)


def scored_mask(batch: Batch, z: torch.Tensor) -> torch.Tensor:
    """Float mask over z's positions (z.shape[:-1]): attention_mask when its shape matches, else ones
    (the same rule as objectives.masked_position_mean)."""
    m = batch.get("attention_mask")
    if m is None or tuple(m.shape) != tuple(z.shape[:-1]):
        return torch.ones(z.shape[:-1], dtype=z.dtype, device=z.device)
    return m.to(device=z.device, dtype=z.dtype)


def scored_output(objective: str, z: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """What the objective scores and its mask: the outputs and scored_mask, or (pooled-cosine) the [B, D] unit-length
    pooled embeddings with a mask of ones."""
    if objective == "pooled-cosine":
        e = pooled_embedding(z, batch)
        return e, torch.ones(e.shape[:-1], dtype=e.dtype, device=e.device)
    return z, scored_mask(batch, z)


def sampled_loss(objective: str, z: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The scalar whose gradient g is one Fisher sample: −(1/N) Σ_t log p(y_t), y_t ~ softmax(z_t)
    (self-kl), or (1/N) Σ_t ε_t·z_t, ε_t ~ N(0, I) (output-mse). Draws on CPU from `gen`."""
    n = mask.sum().clamp_min(1)
    if objective == "self-kl":
        logp = torch.log_softmax(z, dim=-1)
        # drawn a few million probabilities at a time: the same draws as one call (the generator advances row by
        # row), without a float64 copy of every position's distribution (8 × 256 × 49152 doubles are 0.8 GB)
        rows = logp.detach().reshape(-1, z.shape[-1]).split(max(1, DRAW_CHUNK // z.shape[-1]))
        y = torch.cat([torch.multinomial(r.exp().cpu().double(), 1, generator=gen) for r in rows])
        y = y.to(z.device).view(z.shape[:-1] + (1,))
        return -(logp.gather(-1, y).squeeze(-1) * mask).sum() / n
    if objective in ("output-mse", "pooled-cosine"):  # pooled-cosine: z is already scored_output's embedding
        eps = torch.randn(z.shape, generator=gen, dtype=torch.float64, device="cpu").to(device=z.device, dtype=z.dtype)
        return ((z * eps).sum(-1) * mask).sum() / n
    raise ValueError(f"no sampled Fisher for objective {objective!r}")


def squared_norm(g: torch.Tensor, chunk: int = 1 << 22) -> float:
    """Σ g² in float64, a few million elements at a time (a 49152 × 3072 head's gradient in float64 is 1.2 GB)."""
    flat = g.detach().reshape(-1)
    return float(sum(c.double().pow(2).sum() for c in flat.split(chunk)))


def fisher_probe(model: nn.Module, params: list[torch.Tensor], batch: Batch, objective: str,
                 gen: torch.Generator, draws: int = 1) -> list[float]:
    """One probe: one forward, `draws` label draws each with one backward; per layer the mean of N·‖g_l‖²."""
    with torch.enable_grad():
        z, mask = scored_output(objective, upcast(model_logits(model, batch)), batch)
        n = float(mask.sum().clamp_min(1))
        acc = [0.0] * len(params)
        for d in range(draws):
            loss = sampled_loss(objective, z, mask, gen)
            gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=d < draws - 1)
            for i, g in enumerate(gs):
                if g is not None:
                    acc[i] += n * squared_norm(g)
    return [a / draws for a in acc]


def fisher_traces(model: nn.Module, params: dict[str, torch.nn.Parameter], batches: list[Batch],
                  objective: str | Objective = "self-kl", *, samples_per_batch: int = 1,
                  target_rel_se: float = 0.10, min_probes: int = 8, max_probes: int = 64,
                  max_seconds: float | None = None, major_fraction: float = 0.01, seed: int = 0,
                  progress: ProgressFn | None = None, info: dict | None = None,
                  resume=None) -> dict[str, LayerTrace]:
    """Sampled-label Fisher estimates of Tr(H_ll) (= the objective's Hessian block trace at the own
    point) for every named parameter, with hutchinson_traces' adaptive stopping rule.

    Probe k uses batch k mod len(batches): one forward, then `samples_per_batch` independent label
    draws (one backward each, forward graph reused); the probe's sample is their mean, so probes,
    min/max_probes and the standard error count probes, not draws. Major layers hold ≥
    `major_fraction` of all parameters (all layers if none does); at least 2 probes run even
    under `max_seconds`. self-kl, output-mse and pooled-cosine (see the module doc for labels)."""
    obj = get_objective(objective)
    if obj.name not in SUPPORTED:
        raise ValueError(f"fisher estimator supports {', '.join(SUPPORTED)}, not {obj.name!r}: the empirical "
                         "Fisher needs per-position gradients; use hutchinson_traces for this objective")
    check_probe_args(params, batches, max_probes)
    if samples_per_batch < 1:
        raise ValueError("samples_per_batch must be ≥ 1")
    plist = list(params.values())
    device = plist[0].device
    dev_batches: dict[int, Batch] = {}

    def probe(k: int) -> list[float]:
        bi = k % len(batches)
        if bi not in dev_batches:
            dev_batches[bi] = _to_device(batches[bi], device)
        gen = torch.Generator(device="cpu").manual_seed(probe_seed(seed, k))
        return fisher_probe(model, plist, dev_batches[bi], obj.name, gen, samples_per_batch)

    with estimating(model, plist):
        return adaptive_probes(params, round_robin(probe, *world()), target_rel_se=target_rel_se, min_probes=min_probes,
                               max_probes=max_probes, max_seconds=max_seconds, major_fraction=major_fraction,
                               progress=progress, info=info, resume=resume)
