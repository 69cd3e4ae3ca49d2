"""Adapter from HAWQ-V3's published ResNet18 ILP inputs (peer JSON) to solve_allocation tables."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HAWQ_BITS = (4, 8)  # option columns: 0 -> INT4, 1 -> INT8
HAWQ_CONSTRAINTS = ("size", "bops", "latency")


@dataclass
class PeerProblem:
    """omega/costs/ties for the 19-layer ResNet18 problem, in solve_allocation's layout."""

    layer_names: list[str]
    omega: np.ndarray
    costs: dict[str, np.ndarray]
    ties: list[list[int]]

    def budget(self, constraint: str, fraction: float) -> dict[str, float]:
        """HAWQ's limit: all-INT4 total + fraction * (all-INT8 total - all-INT4 total), on one cost."""
        if constraint not in self.costs:
            raise ValueError(f"unknown constraint {constraint!r}; expected one of {sorted(self.costs)}")
        c = self.costs[constraint]
        lo, hi = float(c[:, 0].sum()), float(c[:, 1].sum())
        return {constraint: lo + (hi - lo) * fraction}


def hawq_resnet18_problem(data: dict | str | Path) -> PeerProblem:
    """Build omega[l, b] = trace_l * ||dW_b||^2 and size/BOPs/latency costs, as in HAWQ's ILP.ipynb."""
    if not isinstance(data, dict):
        data = json.loads(Path(data).read_text())
    trace = np.asarray(data["hutchinson_trace_per_param"], dtype=float)
    d4 = np.asarray(data["delta_weights_4bit_square"], dtype=float)
    d8 = np.asarray(data["delta_weights_8bit_square"], dtype=float)
    params = np.asarray(data["parameters"], dtype=float)
    bops = np.asarray(data["bops_fp"], dtype=float)
    costs = {
        "size": np.stack([params * 4 / 8, params * 8 / 8], axis=1),  # bytes of weights
        "bops": np.stack([bops / 64, bops / 16], axis=1),  # bops_fp * (b/32)^2
        "latency": np.stack([data["latency_int4_ms"], data["latency_int8_ms"]], axis=1).astype(float),
    }
    return PeerProblem(layer_names=list(data["layer_names"]), omega=np.stack([trace * d4, trace * d8], axis=1),
                       costs=costs, ties=[list(map(int, t)) for t in data["ties"]])
