"""Integer program choosing one option per layer: min sum(omega) under linear budgets, ties and masks."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pulp

from ..errors import UserError

_REL_TOL = 1e-9  # budgets are met up to this relative slack, so float-summation order never flips feasibility


@dataclass
class Allocation:
    """One chosen plan: option column per layer, its objective and achieved cost totals."""

    choice: np.ndarray
    objective: float
    costs: dict[str, float] = field(default_factory=dict)
    solve_seconds: float = 0.0
    status: str = "Optimal"


class InfeasibleBudget(UserError, ValueError):
    """No plan meets the budgets; `.minimum[k]` is the smallest achievable total of budget k alone."""

    def __init__(self, message: str, minimum: dict[str, float], budgets: dict[str, float]) -> None:
        super().__init__(message)
        self.minimum = minimum
        self.budgets = budgets


def _fmt_up(x: float) -> str:
    """Shortest decimal >= x, so 'raise the budget to at least <this>' is always enough."""
    for p in range(4, 18):
        s = f"{x:.{p}g}"
        if float(s) >= x:
            return s
    return repr(float(x))


def _groups(n_layers: int, ties: Sequence[Sequence[int]]) -> list[list[int]]:
    """Union-find the tie lists into disjoint layer groups (every layer in exactly one group)."""
    parent = list(range(n_layers))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for gi, group in enumerate(ties):
        idx = [int(i) for i in group]
        for i in idx:
            if not 0 <= i < n_layers:
                raise ValueError(f"ties[{gi}] names layer {i}, outside 0..{n_layers - 1}")
        for i in idx[1:]:
            parent[root(i)] = root(idx[0])
    out: dict[int, list[int]] = {}
    for i in range(n_layers):
        out.setdefault(root(i), []).append(i)
    return list(out.values())


def _prepare(omega: np.ndarray, costs: Mapping[str, np.ndarray], budgets: Mapping[str, float],
             allowed: np.ndarray | None, ties: Sequence[Sequence[int]]):
    """Validate inputs and collapse tied layers into groups (summed omega/costs, AND-ed masks)."""
    om = np.asarray(omega, dtype=float)
    if om.ndim != 2 or om.shape[0] < 1 or om.shape[1] < 1:
        raise ValueError(f"omega must be a non-empty 2-D [layers, options] array, got shape {om.shape}")
    mask = np.isfinite(om)
    if allowed is not None:
        al = np.asarray(allowed)
        if al.shape != om.shape or al.dtype != bool:
            raise ValueError(f"allowed must be a bool array of shape {om.shape}, got {al.dtype} {al.shape}")
        mask &= al
    cs: dict[str, np.ndarray] = {}
    for k, c in costs.items():
        c = np.asarray(c, dtype=float)
        if c.shape != om.shape:
            raise ValueError(f"costs[{k!r}] has shape {c.shape}, expected {om.shape} like omega")
        bad = np.argwhere(mask & ~np.isfinite(c))
        if len(bad):
            raise ValueError(f"costs[{k!r}] is NaN/inf at allowed [layer, option] {bad[0].tolist()}")
        cs[k] = np.where(mask, c, 0.0)
    bs: dict[str, float] = {}
    for k, b in budgets.items():
        if k not in cs:
            raise ValueError(f"budget {k!r} has no cost table; cost keys are {sorted(cs)}")
        if not np.isfinite(float(b)):
            raise ValueError(f"budget {k!r} must be a finite number, got {b}")
        bs[k] = float(b)
    groups = _groups(om.shape[0], ties)
    gmask = np.stack([mask[g].all(axis=0) for g in groups])
    for g, m in zip(groups, gmask):
        if not m.any():
            what = f"layer {g[0]}" if len(g) == 1 else f"tied layers {g}"
            raise ValueError(f"{what} has no allowed option (masked out or non-finite omega in every column)")
    gom = np.stack([np.where(mask[g], om[g], 0.0).sum(axis=0) for g in groups])
    gcs = {k: np.stack([c[g].sum(axis=0) for g in groups]) for k, c in cs.items()}
    return om, cs, bs, groups, gmask, gom, gcs


def _min_totals(gmask: np.ndarray, gcs: dict[str, np.ndarray]) -> dict[str, float]:
    """Exact smallest total of each cost alone: per group, cheapest allowed column."""
    return {k: float(np.where(gmask, c, np.inf).min(axis=1).sum()) for k, c in gcs.items()}


def _infeasible(bs: dict[str, float], mins: dict[str, float], joint: bool) -> InfeasibleBudget:
    """Build the one-line error naming the smallest feasible value of every budget."""
    mins = {k: mins[k] for k in bs}
    if joint:
        parts = ", ".join(f"{k} ≤ {bs[k]:.6g} (alone needs ≥ {_fmt_up(mins[k])})" for k in bs)
        msg = f"budget infeasible: {parts} cannot all be met together; relax at least one of them"
    else:
        parts = [f"{k} ≤ {bs[k]:.6g} is below the smallest possible plan ({_fmt_up(mins[k])} {k}); "
                 f"raise the budget to at least {_fmt_up(mins[k])}" if mins[k] > bs[k] + _tol(bs[k], mins[k])
                 else f"{k} ≤ {bs[k]:.6g} is fine (smallest possible {_fmt_up(mins[k])})" for k in bs]
        msg = "budget infeasible: " + "; ".join(parts)
    return InfeasibleBudget(msg, mins, dict(bs))


def _tol(budget: float, scale: float) -> float:
    """Absolute slack used when comparing a total against a budget."""
    return _REL_TOL * max(1.0, abs(budget), abs(scale))


def _result(om: np.ndarray, cs: dict[str, np.ndarray], groups: list[list[int]], gchoice: np.ndarray,
            seconds: float, status: str) -> Allocation:
    """Expand group choices back to layers and total up objective and costs."""
    choice = np.empty(om.shape[0], dtype=np.int64)
    for g, c in zip(groups, gchoice):
        choice[g] = c
    rows = np.arange(om.shape[0])
    return Allocation(choice=choice, objective=float(om[rows, choice].sum()),
                      costs={k: float(c[rows, choice].sum()) for k, c in cs.items()},
                      solve_seconds=seconds, status=status)


def solve_allocation(omega: np.ndarray, costs: Mapping[str, np.ndarray], budgets: Mapping[str, float], *,
                     allowed: np.ndarray | None = None, ties: Sequence[Sequence[int]] = (),
                     time_limit: float | None = None) -> Allocation:
    """Pick one column per layer minimising sum(omega) with sum(costs[k]) <= budgets[k]; CBC via PuLP."""
    t0 = time.perf_counter()
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be positive seconds or None, got {time_limit}")
    om, cs, bs, groups, gmask, gom, gcs = _prepare(omega, costs, budgets, allowed, ties)
    mins = _min_totals(gmask, gcs)
    if any(mins[k] > b + _tol(b, mins[k]) for k, b in bs.items()):
        raise _infeasible(bs, mins, joint=False)
    G, C = gmask.shape
    # Shift each row by its cheapest allowed entry (same optimum, better conditioned), scale rows to O(1).
    rows = []
    for k, b in bs.items():
        c = np.where(gmask, gcs[k], np.inf)
        lo = c.min(axis=1, keepdims=True)
        shifted = np.where(gmask, c - lo, 0.0)
        rhs = b - float(lo.sum()) + _tol(b, mins[k])
        if shifted.max(axis=1).sum() <= rhs:
            continue  # even the most expensive plan fits: constraint is redundant
        scale = float(shifted.max())
        rows.append((shifted / scale, rhs / scale))
    gbest = np.where(gmask, gom, np.inf).argmin(axis=1)
    if not rows:  # no binding budget: the per-group argmin is optimal
        return _result(om, cs, groups, gbest, time.perf_counter() - t0, "Optimal")
    obj = np.where(gmask, gom - np.where(gmask, gom, np.inf).min(axis=1, keepdims=True), 0.0)
    prob = pulp.LpProblem("allocation", pulp.LpMinimize)
    cells = [(g, c) for g in range(G) for c in range(C) if gmask[g, c]]
    new_var = getattr(prob, "add_variable", None)  # PuLP >= 3.3 attaches variables to the model
    if new_var is None:
        def new_var(name: str, lowBound=None, upBound=None, cat=pulp.LpContinuous) -> pulp.LpVariable:
            return pulp.LpVariable(name, lowBound, upBound, cat)
    xs = {gc: new_var(f"x_{gc[0]}_{gc[1]}", cat=pulp.LpBinary) for gc in cells}
    prob.setObjective(pulp.LpAffineExpression([(xs[gc], float(obj[gc])) for gc in cells]))
    by_group: list[list[pulp.LpVariable]] = [[] for _ in range(G)]
    for gc in cells:
        by_group[gc[0]].append(xs[gc])
    for g, vs in enumerate(by_group):
        prob.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression([(v, 1.0) for v in vs]),
                                             sense=pulp.LpConstraintEQ, rhs=1.0), f"onehot_{g}")
    for i, (coef, rhs) in enumerate(rows):
        expr = pulp.LpAffineExpression([(xs[gc], float(coef[gc])) for gc in cells if coef[gc] != 0.0])
        prob.addConstraint(pulp.LpConstraint(expr, sense=pulp.LpConstraintLE, rhs=rhs), f"budget_{i}")
    with warnings.catch_warnings():  # PuLP 3.3 deprecates PULP_CBC_CMD, but it is the bundled CBC we want
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit)
    prob.solve(solver)
    status = pulp.LpStatus[prob.status]
    if prob.status == pulp.LpStatusInfeasible or prob.sol_status == pulp.LpSolutionInfeasible:
        raise _infeasible(bs, mins, joint=True)
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        raise RuntimeError(f"ILP solver returned no solution (status {status}); increase time_limit")
    vals = np.zeros((G, C))
    for gc in cells:
        vals[gc] = xs[gc].varValue or 0.0
    gchoice = vals.argmax(axis=1)
    for k, b in bs.items():  # the solver's tolerances apply to scaled rows: check the plan in the budget's own units
        total = float(gcs[k][np.arange(G), gchoice].sum())
        if total > b + _tol(b, mins[k]):
            raise RuntimeError(f"the ILP solver's plan is over the {k} budget ({total:.6g} > {b:.6g}); "
                               "please report this with the sensitivity file")
    status = "Optimal" if prob.sol_status == pulp.LpSolutionOptimal else "Feasible"
    return _result(om, cs, groups, gchoice, time.perf_counter() - t0, status)


def pareto_sweep(omega: np.ndarray, cost: np.ndarray, *, n_points: int = 20, allowed: np.ndarray | None = None,
                 ties: Sequence[Sequence[int]] = (), other_costs: Mapping[str, np.ndarray] | None = None,
                 other_budgets: Mapping[str, float] | None = None, name: str = "cost") -> list[Allocation]:
    """Sweep the budget on `cost` from its minimum to the unconstrained optimum; return the Pareto front."""
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    others = dict(other_costs or {})
    if name in others:
        raise ValueError(f"other_costs already has a key {name!r}; pass a different name=")
    ob = dict(other_budgets or {})
    costs = {name: np.asarray(cost, dtype=float), **others}
    kw = dict(allowed=allowed, ties=ties)
    if ob:  # smallest `cost` reachable under the other budgets is itself an ILP
        lo = solve_allocation(np.asarray(cost, dtype=float), costs, ob, **kw).costs[name]
    else:
        _, _, _, _, gmask, _, gcs = _prepare(omega, costs, {}, allowed, ties)
        lo = _min_totals(gmask, gcs)[name]
    hi = solve_allocation(omega, costs, ob, **kw).costs[name]
    found: list[Allocation] = []
    for b in (np.linspace(lo, hi, n_points) if hi > lo else [lo]):
        try:
            found.append(solve_allocation(omega, costs, {name: float(b), **ob}, **kw))
        except InfeasibleBudget:
            continue
    found.sort(key=lambda a: (a.costs[name], a.objective))
    front: list[Allocation] = []
    for a in found:
        if not front or a.objective < front[-1].objective - 1e-12 * max(1.0, abs(front[-1].objective)):
            front.append(a)
    return front
