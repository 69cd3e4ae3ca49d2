"""Per-layer Hessian traces by Hutchinson's estimator, Tr(H_ll) = E[v_lᵀ H_ll v_l], v Rademacher.

One probe draws a Rademacher vector for every layer, computes one Hessian-vector product over all
layers at once (double backward through the objective), and records v_l·(Hv)_l per layer. Probes
continue until every major layer's standard error is below `target_rel_se`·|mean| (or, for traces
far below the model's typical size, that fraction of the typical size; see `adaptive_probes`) after
at least `min_probes`, or `max_probes`, or `max_seconds`.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .distributed import probe_seed, round_robin, world
from .ggn import GGN_OBJECTIVES, ggn_vector_product, math_attention
from .objectives import Batch, Objective, get_objective, model_inputs
from .resume import ProbeLog  # noqa: F401 - the stopping rule resumes from it (and callers import it here)

ProgressFn = Callable[[int, int, float], None]


@dataclass
class LayerTrace:
    """Hutchinson estimate of one layer's Hessian diagonal-block trace (not divided by n_params)."""

    name: str
    n_params: int
    mean: float
    stderr: float
    probes: int
    samples: list[float] = field(default_factory=list)


def mean_stderr(samples: list[float]) -> tuple[float, float]:
    """Sample mean and standard error (std with ddof=1 / √n; inf for fewer than 2 samples)."""
    n = len(samples)
    if n == 0:
        return math.nan, math.inf
    mean = math.fsum(samples) / n
    if n < 2:
        return mean, math.inf
    var = math.fsum((x - mean) ** 2 for x in samples) / (n - 1)
    return mean, math.sqrt(var / n)


def relative_se(mean: float, stderr: float) -> float:
    """stderr / |mean|, with 0/0 → 0 and x/0 → inf."""
    if stderr == 0:
        return 0.0
    if mean == 0 or math.isnan(mean):
        return math.inf
    return stderr / abs(mean)


def rademacher(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """±1 tensor shaped like `p` (drawn on CPU from `gen`, then moved to p's device/dtype)."""
    r = torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8, device="cpu")
    return (r * 2 - 1).to(device=p.device, dtype=p.dtype)


@contextlib.contextmanager
def estimating(model: nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """Eval mode and requires_grad only on `params`; both restored on exit."""
    wanted = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    owned = {id(p) for p, _ in saved}
    extra = [(p, p.requires_grad) for p in params if id(p) not in owned]
    try:
        model.eval()
        for p, _ in saved:
            p.requires_grad_(id(p) in wanted)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved + extra:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def autograd_hvp(model: nn.Module, params: list[torch.Tensor], batch: Batch, reference: Any,
                 objective: Objective, vs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hv for all params at once: g = ∂loss/∂θ (create_graph), then Hv = ∂(Σ g_l·v_l)/∂θ."""
    with torch.enable_grad(), math_attention():
        loss = objective.loss(model, batch, reference)
        gs = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(gs) if g is not None and g.requires_grad]
        hv: list[torch.Tensor | None] = [None] * len(params)
        if live:
            hv = list(torch.autograd.grad([gs[i] for i in live], params, grad_outputs=[vs[i] for i in live],
                                          allow_unused=True))
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]


def _ggn_hvp(model: nn.Module, params: list[torch.Tensor], names: list[str], batch: Batch,
             objective: Objective, vs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hv via the exact Gauss-Newton product of ggn.py (self-kl / output-mse at the own point)."""
    ps = dict(zip(names, params))
    Hv = ggn_vector_product(model, ps, model_inputs(batch), dict(zip(names, vs)), objective.name)
    return [Hv[n].detach() for n in names]


def _model_names(model: nn.Module, params: list[torch.Tensor]) -> list[str]:
    """Each param's name inside `model` (needed by functional_call)."""
    by_id = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ValueError("hvp='ggn' needs parameters that belong to the model")
    return [by_id[id(p)] for p in params]


def _to_device(batch: Batch, device: torch.device) -> Batch:
    """Tensors of the batch moved to `device`."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def hutchinson_traces(model: nn.Module, params: dict[str, torch.nn.Parameter], batches: list[Batch],
                      objective: str | Objective = "self-kl", *, target_rel_se: float = 0.10, min_probes: int = 8,
                      max_probes: int = 64, max_seconds: float | None = None, major_fraction: float = 0.01,
                      seed: int = 0, progress: ProgressFn | None = None,
                      hvp: str = "autograd", info: dict | None = None,
                      resume: ProbeLog | None = None) -> dict[str, LayerTrace]:
    """Hutchinson estimates of Tr(H_ll) for every named parameter, with an adaptive stopping rule.

    Major layers: see `major_layers`; `info` receives the stop reason and unconverged layers. At least 2 probes are run even under `max_seconds` so that a standard error exists.
    `hvp="ggn"` uses ggn.py's cheaper exact product (self-kl / output-mse, [B, T, ·] outputs only)."""
    obj = get_objective(objective)
    check_probe_args(params, batches, max_probes)
    if hvp not in ("autograd", "ggn"):
        raise ValueError(f"unknown hvp method {hvp!r}; use 'autograd' or 'ggn'")
    if hvp == "ggn" and obj.name not in GGN_OBJECTIVES:
        raise ValueError(f"hvp='ggn' is exact only for {' / '.join(GGN_OBJECTIVES)}, not {obj.name!r}")
    names = list(params)
    plist = [params[n] for n in names]
    model_names = _model_names(model, plist) if hvp == "ggn" else names
    device = plist[0].device
    dev_batches: dict[int, Batch] = {}
    refs: dict[int, Any] = {}

    def probe(k: int) -> list[float]:
        bi = k % len(batches)
        if bi not in dev_batches:
            dev_batches[bi] = _to_device(batches[bi], device)
            with torch.no_grad():
                refs[bi] = obj.prepare(model, dev_batches[bi])
        batch = dev_batches[bi]
        gen = torch.Generator(device="cpu").manual_seed(probe_seed(seed, k))
        vs = [rademacher(p, gen) for p in plist]
        if hvp == "ggn":
            hv = _ggn_hvp(model, plist, model_names, batch, obj, vs)
        else:
            hv = autograd_hvp(model, plist, batch, refs[bi], obj, vs)
        return [float((v.double() * h.double()).sum()) for v, h in zip(vs, hv)]

    with estimating(model, plist):
        return adaptive_probes(params, round_robin(probe, *world()), target_rel_se=target_rel_se, min_probes=min_probes,
                               max_probes=max_probes, max_seconds=max_seconds, major_fraction=major_fraction,
                               progress=progress, info=info, resume=resume)


def check_probe_args(params: dict, batches: list, max_probes: int) -> None:
    """The checks every trace estimator makes before its first probe."""
    if not params:
        raise ValueError("no parameters to estimate")
    if not batches:
        raise ValueError("no calibration batches")
    if max_probes < 1:
        raise ValueError("max_probes must be ≥ 1")


def major_layers(sizes: dict[str, int], fraction: float) -> tuple[list[str], str]:
    """Layers the stopping rule waits for, and the rule that chose them: those holding ≥ `fraction`
    of all parameters; if none does (e.g. SmolLM2-135M, 210 layers of < 1% each), the largest layers
    that together hold half of the parameters."""
    total = sum(sizes.values())
    major = [n for n in sizes if sizes[n] >= fraction * total]
    if major:
        return major, f"layers holding ≥ {fraction:.0%} of the parameters"
    out, covered = [], 0
    for n in sorted(sizes, key=lambda n: -sizes[n]):
        if covered >= total / 2:
            break
        out.append(n)
        covered += sizes[n]
    return out, f"no layer holds {fraction:.0%} of the parameters: the largest layers holding half of them"


def convergence_error(mean: float, stderr: float, floor: float) -> float:
    """stderr / max(|mean|, floor): the relative s.e., except that a trace far below the model's typical
    size is judged against that size (`floor`), since allocation weighs Tr/n·‖ΔW‖² and a near-zero trace
    known to ±10% of a typical layer's trace can never change a plan."""
    scale = max(abs(mean), floor)
    if stderr == 0:
        return 0.0
    return stderr / scale if scale > 0 and not math.isnan(mean) else math.inf


def adaptive_probes(params: dict[str, torch.Tensor], probe: Callable[[int], list[float]], *,
                    target_rel_se: float, min_probes: int, max_probes: int, max_seconds: float | None,
                    major_fraction: float, progress: ProgressFn | None,
                    info: dict | None = None, resume: "ProbeLog | None" = None) -> dict[str, LayerTrace]:
    """The stopping rule: call `probe(k)` (one value per param, in `params` order) for k = 0, 1, …
    until every major layer (see `major_layers`) has convergence_error ≤ `target_rel_se` (after
    `min_probes`), or `max_probes`, or `max_seconds` (never before 2 probes). The floor of a layer is
    its size times the mean |trace| per parameter over all layers. `info` receives why it stopped."""
    min_probes = min(max(min_probes, 1), max_probes)
    names = list(params)
    sizes = {n: params[n].numel() for n in names}
    total = sum(sizes.values())
    major, rule = major_layers(sizes, major_fraction)
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = 0
    if resume is not None:
        done_before = resume.load(names)
        start = min(len(done_before[names[0]]), max_probes) if done_before else 0
        for n in names:
            samples[n] = list(done_before[n][:start]) if done_before else []
    t0 = time.perf_counter()
    reason = "max_probes"

    def errors() -> dict[str, float]:
        stats = {n: mean_stderr(samples[n]) for n in names}
        per_param = sum(abs(m) for m, _ in stats.values() if not math.isnan(m)) / total
        return {n: convergence_error(*stats[n], per_param * sizes[n]) for n in major}

    for k in range(start, max_probes):
        for n, x in zip(names, probe(k)):
            samples[n].append(x)
        done = k + 1
        if resume is not None:
            resume.save(samples)
        worst = max(errors().values())
        if progress is not None:
            progress(done, max_probes, worst)
        if done >= min_probes and worst <= target_rel_se:
            reason = "converged"
            break
        if max_seconds is not None and done >= 2 and time.perf_counter() - t0 >= max_seconds:
            reason = "max_seconds"
            break
    if info is not None:
        errs = errors()
        info.update(stop_reason=reason, probes=len(samples[names[0]]), target_rel_se=target_rel_se,
                    major_rule=rule, major_layers=len(major),
                    not_converged={n: e for n, e in errs.items() if not e <= target_rel_se})
    out: dict[str, LayerTrace] = {}
    for n in names:
        mean, se = mean_stderr(samples[n])
        out[n] = LayerTrace(n, sizes[n], mean, se, len(samples[n]), samples[n])
    return out
