"""Cost/quality trade-off of the allocate stage: Pareto frontiers of predicted Ω vs bytes, BOPs and latency.

The frontier comes from `ilp.pareto_sweep` plus one extra solve at each uniform width's size (and any
extra budgets, e.g. the chosen plan's), so every uniform point that meets the constraints has a frontier
point with no more bytes and no more Ω: the plot can never show a uniform plan beating the "optimum".
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..artifacts import Plan, SensitivityReport
from ..macs import LayerProfile
from .budgets import available_costs
from .ilp import Allocation, InfeasibleBudget, pareto_sweep, solve_allocation
from .options import FULL_ACT, Option, make_options
from .plan import WeightSource, build_constraints, layer_tables

if TYPE_CHECKING:
    from ..latency import LatencyTable


def _front(allocs: list[Allocation], axis: str) -> list[Allocation]:
    """Keep the allocations no other one beats on both `axis` and Ω, sorted by `axis` (Ω strictly falling)."""
    front: list[Allocation] = []
    for a in sorted(allocs, key=lambda a: (a.costs[axis], a.objective)):
        if not front or a.objective < front[-1].objective - 1e-12 * max(1.0, abs(front[-1].objective)):
            front.append(a)
    return front


def _point(alloc: Allocation, options: list[Option], keys: list[str], n_total: int) -> dict[str, Any]:
    """JSON summary of one frontier plan: its totals on every axis, predicted Ω, layers per option."""
    total = float(alloc.costs["bytes"])
    hist = Counter(keys[int(j)] for j in alloc.choice)
    return {"total_bytes": total, "avg_bits": 8 * total / n_total, "predicted_omega": float(alloc.objective),
            "costs": {k: float(v) for k, v in alloc.costs.items()},
            "bits_histogram": {k: int(hist.get(k, 0)) for k in dict.fromkeys(keys)}}


def sweep_plans(report: SensitivityReport, weights: WeightSource, bit_choices: Sequence[int], group_size: int,
                symmetric: bool, n_points: int = 12, extra_budgets: Sequence[float] = (), *,
                group_sizes: Sequence[int] | None = None, act_bits: Sequence[int] = (FULL_ACT,),
                pairs: Sequence[tuple[int, int]] = (),
                profile: Mapping[str, LayerProfile] | None = None, latency: LatencyTable | None = None,
                extra: Mapping[str, Sequence[float]] | None = None, scale_bits: int = 16,
                **constraints: Any) -> dict[str, Any]:
    """Pareto frontiers of Ω against bytes, and against BOPs (with a MACs profile) and latency (with a
    table), under the same options, pins/allowed/ties as `allocate_bits`; plus the uniform points.

    Each frontier sweeps one axis alone; every point records its totals on all axes. `extra` adds
    solves at given budgets per axis (`extra_budgets` is the bytes shorthand), e.g. the chosen plan's."""
    options = make_options(bit_choices, group_sizes or [group_size], act_bits, pairs, scale_bits)
    one_per_width = len({o.bits for o in options}) == len(options)
    keys = [str(o.bits) if one_per_width else o.label for o in options]
    names = [ls.name for ls in report.layers]
    cons = build_constraints(names, [o.bits for o in options], **constraints)
    omega, nbytes = layer_tables(report, weights, options, symmetric, profile)
    costs = available_costs(report, options, nbytes, profile, latency)
    n_total = sum(ls.n_params for ls in report.layers)
    kw: dict[str, Any] = {"allowed": cons.mask, "ties": cons.groups}
    uniform = []
    for j, o in enumerate(options):
        totals = {k: float(c[:, j].sum()) for k, c in costs.items()}
        uniform.append({"bits": o.bits, "option": o.label, "label": f"uniform {keys[j]}" + ("-bit" * one_per_width),
                        "total_bytes": totals["bytes"], "avg_bits": 8 * totals["bytes"] / n_total, "costs": totals,
                        "predicted_omega": float(omega[:, j].sum()),
                        "feasible": bool(cons.mask is None or cons.mask[:, j].all())})
    extra = {k: list(v) for k, v in (extra or {}).items()}
    extra.setdefault("bytes", []).extend(float(b) for b in extra_budgets)
    frontiers = {}
    for axis in costs:
        others = {k: c for k, c in costs.items() if k != axis}
        found = pareto_sweep(omega, costs[axis], n_points=n_points, name=axis, other_costs=others, **kw)
        lo, hi = min(a.costs[axis] for a in found), max(a.costs[axis] for a in found)
        for budget in [u["costs"][axis] for u in uniform] + [float(b) for b in extra.get(axis, [])]:
            if lo < budget < hi:  # outside [lo, hi] the sweep's end points already dominate
                try:
                    found.append(solve_allocation(omega, costs, {axis: budget}, **kw))
                except InfeasibleBudget:
                    continue
        frontiers[axis] = [_point(a, options, keys, n_total) for a in _front(found, axis)]
    return {"kind": "sweep", "model": report.model, "sensitivity_fingerprint": report.fingerprint,
            "bit_choices": sorted({o.bits for o in options}), "group_size": group_size, "symmetric": symmetric,
            "options": [o.label for o in options], "axes": list(costs), "constraints": cons.record,
            "frontier": frontiers["bytes"], "frontiers": frontiers, "uniform": uniform,
            "_costs": costs, "_options": options}


def chosen_point(plan: Plan, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan's own point for the sweep JSON/plot, with its totals on every axis of `result`."""
    point = {"total_bytes": plan.total_bytes, "avg_bits": plan.avg_bits, "predicted_omega": plan.predicted_omega,
             "budget": plan.budget, "fingerprint": plan.fingerprint, "costs": dict(plan.costs or {})}
    if result is not None and "_costs" in result:
        col = {o.label: j for j, o in enumerate(result["_options"])}
        js = [col.get(Option(lp.bits, lp.group_size, lp.act_bits, scale_bits=lp.scale_bits).label,
                      col.get(Option(lp.bits, lp.group_size, lp.act_bits, True).label)) for lp in plan.layers]
        if None not in js and len(js) == len(next(iter(result["_costs"].values()))):
            for k, c in result["_costs"].items():
                point["costs"].setdefault(k, float(sum(c[i, j] for i, j in enumerate(js))))
    point["costs"].setdefault("bytes", plan.total_bytes)
    return point
