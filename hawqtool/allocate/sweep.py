"""Size/quality trade-off of the allocate stage: Pareto frontier of predicted Ω vs bytes, with uniform baselines.

The frontier comes from `ilp.pareto_sweep` plus one extra solve at each uniform width's size (and any
extra budgets, e.g. the chosen plan's), so every uniform point that meets the constraints has a frontier
point with no more bytes and no more Ω: the plot can never show a uniform plan beating the "optimum".
"""
from __future__ import annotations

import base64
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure  # no pyplot: no global backend state

from ..artifacts import Plan, SensitivityReport, write_atomic
from ..report import _png
from .ilp import Allocation, InfeasibleBudget, pareto_sweep, solve_allocation
from .plan import WeightSource, build_constraints, omega_table


def _front(allocs: list[Allocation]) -> list[Allocation]:
    """Keep the allocations no other one beats on both bytes and Ω, sorted by bytes (Ω strictly falling)."""
    front: list[Allocation] = []
    for a in sorted(allocs, key=lambda a: (a.costs["bytes"], a.objective)):
        if not front or a.objective < front[-1].objective - 1e-12 * max(1.0, abs(front[-1].objective)):
            front.append(a)
    return front


def _point(alloc: Allocation, bit_choices: list[int], n_total: int) -> dict[str, Any]:
    """JSON summary of one frontier plan: size, average bits, predicted Ω and how many layers get each width."""
    total = float(alloc.costs["bytes"])
    hist = Counter(bit_choices[int(j)] for j in alloc.choice)
    return {"total_bytes": total, "avg_bits": 8 * total / n_total, "predicted_omega": float(alloc.objective),
            "bits_histogram": {str(b): int(hist.get(b, 0)) for b in bit_choices}}


def sweep_plans(report: SensitivityReport, weights: WeightSource, bit_choices: Sequence[int], group_size: int,
                symmetric: bool, n_points: int = 12, extra_budgets: Sequence[float] = (),
                **constraints: Any) -> dict[str, Any]:
    """Pareto frontier (Ω vs bytes) under the same pins/allowed/ties as `allocate_bits`, plus uniform points."""
    bit_choices = sorted(set(int(b) for b in bit_choices))
    names = [ls.name for ls in report.layers]
    cons = build_constraints(names, bit_choices, **constraints)
    omega, nbytes = omega_table(report, weights, bit_choices, group_size, symmetric)
    n_total = sum(ls.n_params for ls in report.layers)
    kw: dict[str, Any] = {"allowed": cons.mask, "ties": cons.groups}
    found = pareto_sweep(omega, nbytes, n_points=n_points, name="bytes", **kw)
    uniform = []
    for j, b in enumerate(bit_choices):
        total = float(nbytes[:, j].sum())
        uniform.append({"bits": b, "label": f"uniform {b}-bit", "total_bytes": total, "avg_bits": 8 * total / n_total,
                        "predicted_omega": float(omega[:, j].sum()),
                        "feasible": bool(cons.mask is None or cons.mask[:, j].all())})
    lo, hi = min(a.costs["bytes"] for a in found), max(a.costs["bytes"] for a in found)
    for budget in [u["total_bytes"] for u in uniform] + [float(b) for b in extra_budgets]:
        if lo < budget < hi:  # outside [lo, hi] the sweep's end points already dominate
            try:
                found.append(solve_allocation(omega, {"bytes": nbytes}, {"bytes": budget}, **kw))
            except InfeasibleBudget:
                continue
    return {"kind": "sweep", "model": report.model, "sensitivity_fingerprint": report.fingerprint,
            "bit_choices": bit_choices, "group_size": group_size, "symmetric": symmetric,
            "constraints": cons.record, "frontier": [_point(a, bit_choices, n_total) for a in _front(found)],
            "uniform": uniform}


def chosen_point(plan: Plan) -> dict[str, Any]:
    """The plan's own point for the sweep JSON/plot."""
    return {"total_bytes": plan.total_bytes, "avg_bits": plan.avg_bits, "predicted_omega": plan.predicted_omega,
            "budget": plan.budget, "fingerprint": plan.fingerprint}


def sweep_figure(data: dict[str, Any]) -> Figure:
    """Ω vs MB: frontier line, labelled uniform points (hollow if they break the constraints), chosen plan star."""
    fig = Figure(figsize=(8.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    fr = data["frontier"]
    ys = [p["predicted_omega"] for p in fr] + [u["predicted_omega"] for u in data["uniform"]]
    ax.plot([p["total_bytes"] / 1e6 for p in fr], [p["predicted_omega"] for p in fr], "o-", ms=4,
            color="tab:blue", label="Pareto frontier (ILP)")
    for k, u in enumerate(data["uniform"]):
        x, y = u["total_bytes"] / 1e6, u["predicted_omega"]
        ax.scatter([x], [y], marker="s", s=40, zorder=4, edgecolors="tab:orange",
                   facecolors="tab:orange" if u["feasible"] else "none",
                   label="uniform widths" if k == 0 else None)
        note = "" if u["feasible"] else " (breaks constraints)"
        ax.annotate(f"uniform {u['bits']}-bit{note}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ch = data.get("chosen")
    if ch is not None:
        ys.append(ch["predicted_omega"])
        ax.scatter([ch["total_bytes"] / 1e6], [ch["predicted_omega"]], marker="*", s=220, color="tab:red", zorder=5,
                   label=f"chosen plan ({ch['avg_bits']:.2f} bits/weight)")
    if ys and min(ys) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("quantized layer size (MB, scales and zeros included)")
    ax.set_ylabel("predicted Ω = Σ Tr(H)/n · ‖Q(W)−W‖²")
    ax.set_title(f"Size vs predicted perturbation — {data.get('model', '')}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _write_bytes_atomic(path: Path, blob: bytes) -> None:
    """Binary twin of artifacts.write_atomic (temporary name in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def write_sweep(result: dict[str, Any], out_json: Path, out_png: Path, chosen: Plan | None = None) -> dict[str, Path]:
    """Write the sweep as JSON and a PNG plot (both atomically); returns their paths."""
    data = dict(result)
    if chosen is not None:
        data["chosen"] = chosen_point(chosen)
    out_json, out_png = Path(out_json), Path(out_png)
    write_atomic(out_json, json.dumps(data, indent=1))
    _write_bytes_atomic(out_png, base64.b64decode(_png(sweep_figure(data))))
    return {"json": out_json, "png": out_png}
