"""ILP solve time of the allocator on large synthetic problems, against a textbook PuLP formulation.

    python scripts/bench_allocate.py [--layers 1000] [--repeats 5] [--append]

Each problem has `--layers` layers and the 4 widths 2/3/4/8 (plus, in the "all budgets" rows, a
BOPs and a latency table and q/k/v-style ties). Ω follows HAWQ-V2 (trace/n × an error falling ~4×
per bit); sizes follow the parameter counts. hawqtool's `solve_allocation` is timed end to end
(validation, tie merging, CBC); the baseline is the formulation HAWQ-V3's script uses (one binary
per cell, lpSum objective and budget rows, CBC), solved on the same problem in the same run. Both
optima are compared, so a fast wrong answer cannot pass.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import numpy as np
import pulp

from _record import cpu_name, load_now, record

BITS = np.array([2, 3, 4, 8])


def problem(n_layers: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Random HAWQ-V2-shaped Ω [L, 4] and bytes/BOPs/latency cost tables."""
    rng = np.random.default_rng(seed)
    n = rng.choice([576 * 576, 576 * 192, 576 * 1536], size=n_layers).astype(float)
    trace = rng.lognormal(0.0, 2.0, size=n_layers) * n
    err = n[:, None] * 4.0 ** (-BITS[None, :].astype(float)) * rng.uniform(0.8, 1.2, size=(n_layers, 4))
    omega = trace[:, None] / n[:, None] * err
    costs = {"bytes": n[:, None] * BITS[None, :] / 8 * 1.02,
             "bops": n[:, None] * BITS[None, :] * 16.0,
             "latency_ms": n[:, None] * 1e-7 * (0.6 + 0.1 * BITS[None, :]) * rng.uniform(0.9, 1.1, size=(n_layers, 4))}
    return omega, costs


def textbook(omega: np.ndarray, costs: dict[str, np.ndarray], budgets: dict[str, float],
             ties: list[list[int]]) -> tuple[float, float]:
    """One binary per (layer, width), lpSum rows, equality rows for ties; returns (objective, seconds)."""
    t0 = time.perf_counter()
    L, C = omega.shape
    prob = pulp.LpProblem("textbook", pulp.LpMinimize)
    x = [[pulp.LpVariable(f"x_{i}_{j}", cat=pulp.LpBinary) for j in range(C)] for i in range(L)]
    prob += pulp.lpSum(float(omega[i, j]) * x[i][j] for i in range(L) for j in range(C))
    for i in range(L):
        prob += pulp.lpSum(x[i]) == 1
    for k, b in budgets.items():
        prob += pulp.lpSum(float(costs[k][i, j]) * x[i][j] for i in range(L) for j in range(C)) <= b
    for g in ties:
        for i in g[1:]:
            for j in range(C):
                prob += x[i][j] == x[g[0]][j]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prob.solve(pulp.PULP_CBC_CMD(msg=False))
    choice = np.array([max(range(C), key=lambda j: x[i][j].varValue or 0.0) for i in range(L)])
    return float(omega[np.arange(L), choice].sum()), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5, help="Seeds per row (median over them).")
    ap.add_argument("--append", action="store_true", help="Append the table to benchmarks/RESULTS.md.")
    args = ap.parse_args()
    from hawqtool.allocate.ilp import solve_allocation

    rows = []
    for name, frac, all_budgets in [("size 3 bits/weight", 3.0, False), ("size 2.5 bits/weight", 2.5, False),
                                    ("size 3 + BOPs + latency, ties of 3", 3.0, True)]:
        ours, base, gaps = [], [], []
        for seed in range(args.repeats):
            omega, costs = problem(args.layers, seed)
            budgets = {"bytes": float(costs["bytes"][:, 0].sum() * frac / 2)}
            ties: list[list[int]] = []
            if all_budgets:
                budgets["bops"] = float(costs["bops"][:, 1].sum() * 1.05)
                budgets["latency_ms"] = float(costs["latency_ms"][:, 1].sum() * 1.02)
                ties = [[i, i + 1, i + 2] for i in range(0, args.layers - 2, 9)]
            use = {k: costs[k] for k in budgets}
            t0 = time.perf_counter()
            a = solve_allocation(omega, use, budgets, ties=ties)
            ours.append(time.perf_counter() - t0)
            obj, secs = textbook(omega, use, budgets, ties)
            base.append(secs)
            gaps.append(abs(a.objective - obj) / obj)
        row = {"problem": name, "ours": statistics.median(ours), "max_ours": max(ours),
               "base": statistics.median(base), "gap": max(gaps)}
        rows.append(row)
        print(row, flush=True)
    lines = ["| problem (L layers × 4 widths) | hawqtool median s (max) | textbook PuLP median s | ratio | "
             "max relative Ω difference |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['ours']:.3f} ({r['max_ours']:.3f}) | {r['base']:.3f} | "
                     f"{r['base'] / r['ours']:.1f}× | {r['gap']:.1e} |")
    record(f"Allocator ILP solve time, {args.layers} layers",
           f"machine: {cpu_name()}, Python {platform.python_version()}, PuLP {pulp.__version__} (bundled CBC); "
           f"median over {args.repeats} seeds; load at the end: `{load_now()}`", lines, args.append)

if __name__ == "__main__":
    main()
