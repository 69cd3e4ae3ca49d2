"""The allocate stage as one library call, (sensitivity report, AllocateOptions) → plan, used by `hawqtool allocate`
and `run`: the integer program under the size budget and the options' other budgets (BOPs, latency) and
constraints, with the model profile and latency table those need, and the Pareto sweep."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .artifacts import EmbeddingPlan, Plan, SensitivityReport
from .options import AllocateOptions, SensitivityOptions


@dataclass
class BudgetInputs:
    """What the options' budgets need besides the report: the model's MACs/activation profile (BOPs budgets and
    W8A8 options), the latency table, the extra weight:activation pairs."""

    profile: dict | None = None
    latency: object | None = None
    pairs: list = field(default_factory=list)


def budget_inputs(report: SensitivityReport, opts: AllocateOptions, *, model: str | None = None, calib: str = "wiki",
                  profile_cache: Path | None = None) -> BudgetInputs:
    """Load (or measure, on `model` with `calib` text, cached in `profile_cache`) what `opts` needs."""
    from .allocate.options import parse_pairs
    from .latency import load_latency_table

    profile = None
    if opts.needs_profile():
        from .macs import load_or_measure_profile

        profile = load_or_measure_profile(report, model, calib, profile_cache)
    latency = load_latency_table(Path(opts.latency_table)) if opts.latency_table is not None else None
    return BudgetInputs(profile, latency, parse_pairs(opts.pairs or None))


def offered_formats(report: SensitivityReport, opts: AllocateOptions, group_size: int | None,
                    formats: tuple[str, ...] = ()) -> tuple[tuple[int, ...], int]:
    """(group sizes, scale bits) the allocator offers: opts.group_sizes, else the one `group_size` asked for, else
    every group size the report measured; scale codes as opts.scale_bits says, else as the report measured them (ggml
    types fix their own scales, and per-channel layers have one scale per row)."""
    groups = tuple(opts.group_sizes) or ((group_size,) if group_size is not None else
                                         tuple(report.settings.get("qerror_groups") or (SensitivityOptions.group_size,)))
    groups = tuple(int(g) for g in groups)
    codes = opts.scale_bits if opts.scale_bits is not None else int(report.settings.get("qerror_scale_bits", 16))
    return groups, (16 if formats or all(g == -1 for g in groups) else codes)


def allocate_stage(report: SensitivityReport, weights: Callable[[], dict], opts: AllocateOptions, *,
                   avg_bits: float | None, bit_choices: tuple[int, ...], group_size: int | None, symmetric: bool,
                   embedding: EmbeddingPlan | None = None, formats: tuple[str, ...] = (),
                   inputs: BudgetInputs | None = None) -> Plan:
    """The plan: the integer program under the size budget and the options' budgets and constraints. `inputs`:
    budget_inputs(report, opts, ...), needed when the options have a BOPs or latency budget, W8A8 options or
    pairs (ValueError otherwise). `group_size` None: the group sizes of offered_formats."""
    from .allocate.budgets import Budgets
    from .allocate.plan import allocate_bits

    inputs = inputs or BudgetInputs()
    if (opts.needs_profile() and inputs.profile is None) or (opts.latency_table and inputs.latency is None) \
            or (opts.pairs and not inputs.pairs):
        raise ValueError("these AllocateOptions need a profile, latency table or pairs: pass "
                         "inputs=budget_inputs(report, opts, ...)")
    budgets = Budgets(max_bops=opts.max_bops, bops_frac=opts.bops_frac, max_latency_ms=opts.max_latency_ms,
                      latency_frac=opts.latency_frac)
    groups, scale_bits = offered_formats(report, opts, group_size, formats)
    cons = {k: v for k, v in opts.kwargs().items() if k not in ("group_sizes", "scale_bits")}
    # ggml types fix their groups: allocate_bits refuses group sizes given with them
    several = (tuple(opts.group_sizes) if formats else groups if len(groups) > 1 else ()) or None
    return allocate_bits(report, weights, avg_bits=avg_bits, max_bytes=opts.max_bytes, bit_choices=bit_choices,
                         group_size=groups[0], symmetric=symmetric, pairs=inputs.pairs, budgets=budgets,
                         profile=inputs.profile, latency=inputs.latency, embedding=embedding, formats=formats,
                         group_sizes=several, scale_bits=scale_bits, **cons)


def write_sweep_of(report: SensitivityReport, weights, plan: Plan, opts: AllocateOptions, inputs: BudgetInputs, *,
                   bit_choices: tuple[int, ...], group_size: int | None, symmetric: bool, output: Path) -> dict:
    """The Pareto sweep around `plan` (frontiers of Ω vs size, BOPs and latency when given), written beside
    `output` as OUTPUT.sweep.json/.png; returns the written paths."""
    from .allocate.sweep import sweep_plans
    from .report import write_sweep

    cons = {k: v for k, v in opts.kwargs().items() if k not in ("group_sizes", "scale_bits", "trace_ucb")}
    groups, scale_bits = offered_formats(report, opts, group_size)  # trace_ucb: the sweep plans on the estimate
    acts = cons.pop("act_bits", opts.act_bits)
    res = sweep_plans(report, weights, bit_choices, groups[0], symmetric,
                      group_sizes=None if len(groups) == 1 else list(groups), scale_bits=scale_bits,
                      act_bits=list(acts), pairs=inputs.pairs, profile=inputs.profile, latency=inputs.latency,
                      extra={k: [v] for k, v in plan.costs.items()}, **cons)
    base = output.with_suffix("") if output.suffix == ".json" else output
    return write_sweep(res, base.with_name(base.name + ".sweep.json"), base.with_name(base.name + ".sweep.png"), plan)
