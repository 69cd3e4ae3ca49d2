"""The allocate stage as one library call, (sensitivity report, AllocateOptions) → plan, used by `hawqtool allocate`
and `run`: the integer program under the size budget and the options' other budgets (BOPs, latency) and
constraints, with the model profile and latency table those need, and the Pareto sweep."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .artifacts import EmbeddingPlan, Plan, SensitivityReport
from .options import AllocateOptions


def allocate_stage(report: SensitivityReport, weights: Callable[[], dict], opts: AllocateOptions, *,
                   avg_bits: float | None, bit_choices: tuple[int, ...], group_size: int, symmetric: bool,
                   embedding: EmbeddingPlan | None = None, formats: tuple[str, ...] = (), model: str | None = None,
                   calib: str = "wiki", profile_cache: Path | None = None) -> tuple[Plan, dict]:
    """The plan, and what a sweep needs (`sweep_inputs`: profile, latency, pairs, constraints). `model`/`calib`:
    where the MACs/activation profile is measured when a BOPs budget or W8A8 options need it (cached in
    `profile_cache`, default beside nothing: measured each time)."""
    from .allocate.budgets import Budgets
    from .allocate.options import parse_pairs
    from .allocate.plan import allocate_bits
    from .latency import load_latency_table

    profile = None
    if opts.needs_profile():
        from .macs import load_or_measure_profile

        profile = load_or_measure_profile(report, model, calib, profile_cache)
    latency = load_latency_table(Path(opts.latency_table)) if opts.latency_table is not None else None
    budgets = Budgets(max_bops=opts.max_bops, bops_frac=opts.bops_frac, max_latency_ms=opts.max_latency_ms,
                      latency_frac=opts.latency_frac)
    pairs = parse_pairs(opts.pairs or None)
    cons = opts.kwargs()
    plan = allocate_bits(report, weights, avg_bits=avg_bits, max_bytes=opts.max_bytes, bit_choices=bit_choices,
                         group_size=group_size, symmetric=symmetric, pairs=pairs, budgets=budgets, profile=profile,
                         latency=latency, embedding=embedding, formats=formats, **cons)
    return plan, dict(profile=profile, latency=latency, pairs=pairs, cons=cons)


def write_sweep_of(report: SensitivityReport, weights, plan: Plan, opts: AllocateOptions, inputs: dict, *,
                   bit_choices: tuple[int, ...], group_size: int, symmetric: bool, output: Path) -> dict:
    """The Pareto sweep around `plan` (frontiers of Ω vs size, BOPs and latency when given), written beside
    `output` as OUTPUT.sweep.json/.png; returns the written paths."""
    from .allocate.sweep import sweep_plans
    from .report import write_sweep

    cons = dict(inputs["cons"])
    groups = cons.pop("group_sizes", None)
    acts = cons.pop("act_bits", opts.act_bits)
    cons.pop("trace_ucb", None)  # the sweep plans on the estimate itself
    res = sweep_plans(report, weights, bit_choices, group_size, symmetric, group_sizes=list(groups) if groups else None,
                      act_bits=list(acts), pairs=inputs["pairs"], profile=inputs["profile"], latency=inputs["latency"],
                      extra={k: [v] for k, v in plan.costs.items()}, **cons)
    base = output.with_suffix("") if output.suffix == ".json" else output
    return write_sweep(res, base.with_name(base.name + ".sweep.json"), base.with_name(base.name + ".sweep.png"), plan)
