"""Stage 3 (allocate): turn sensitivity into per-layer bits under a size budget.

Ω[l, b] = Tr(H_l)/n_l · ‖Q_b(W_l) − W_l‖² (HAWQ-V2), with Q_b the same RTN quantizer
the quantize stage starts from, forced non-increasing in b. A budget `avg_bits = B`
means "no larger than uniform B-bit at the same group size" (linear between integer
widths), so plans and their uniform comparison point use one overhead rule; reported
average bits count the fp16 scales and packed zeros.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from typing import Callable

from ..artifacts import LayerPlan, Plan, SensitivityReport, fingerprint, qerror_key
from ..errors import UserError
from ..quantize.quantizer import QuantSpec, quant_error
from .ilp import InfeasibleBudget, solve_allocation

log = logging.getLogger("hawqtool")


WeightSource = Callable[[], dict[str, torch.Tensor]]


def omega_table(report: SensitivityReport, weights: WeightSource, bit_choices: list[int],
                group_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ω [L, C] and storage bytes [L, C] for the report's layers (in report order).

    ‖Q_b(W)−W‖² comes from the report when it was measured there, else from `weights()`."""
    L, C = len(report.layers), len(bit_choices)
    omega, nbytes = np.zeros((L, C)), np.zeros((L, C))
    negative = []
    for i, ls in enumerate(report.layers):
        trace = ls.trace
        if trace < 0:
            negative.append(ls.name)
            trace = 0.0
        for j, b in enumerate(bit_choices):
            spec = QuantSpec(b, group_size, symmetric)
            err = ls.qerror.get(qerror_key(b, group_size, symmetric))
            if err is None:
                W = weights().get(ls.name)
                if W is None:
                    raise UserError(f"sensitivity report names layer {ls.name} that the model lacks; "
                                    "re-run `hawqtool sensitivity` on this model")
                err = quant_error(W, spec)
            omega[i, j] = trace / ls.n_params * err
            nbytes[i, j] = spec.storage_bits(*ls.shape) / 8
    if negative:
        log.warning("%d layers have a negative trace estimate, treated as 0: %s", len(negative), ", ".join(negative[:5]))
    order = np.argsort(bit_choices)
    omega[:, order] = np.minimum.accumulate(omega[:, order], axis=1)  # running min: non-increasing in bits
    return omega, nbytes


def uniform_bytes(nbytes: np.ndarray, bit_choices: list[int], bits: float) -> float:
    """Bytes of uniform `bits` quantization, linear between the neighbouring integer widths."""
    lo, hi = math.floor(bits), math.ceil(bits)
    size = {b: float(nbytes[:, j].sum()) for j, b in enumerate(bit_choices)}

    def at(b: int) -> float:
        if b in size:
            return size[b]
        per_bit = (size[max(bit_choices)] - size[min(bit_choices)]) / (max(bit_choices) - min(bit_choices))
        return size[min(bit_choices)] + per_bit * (b - min(bit_choices))

    return at(lo) + (bits - lo) * (at(hi) - at(lo))


def allocate_bits(report: SensitivityReport, weights: WeightSource, *, avg_bits: float | None = None,
                  max_bytes: float | None = None, bit_choices: tuple[int, ...] = (2, 3, 4, 8),
                  group_size: int = 128, symmetric: bool = False) -> Plan:
    """Solve the ILP for one budget and return the plan artifact."""
    if (avg_bits is None) == (max_bytes is None):
        raise UserError("give exactly one budget: --avg-bits B or --max-bytes N")
    bit_choices = sorted(set(int(b) for b in bit_choices))
    omega, nbytes = omega_table(report, weights, bit_choices, group_size, symmetric)
    budget = max_bytes if max_bytes is not None else uniform_bytes(nbytes, bit_choices, avg_bits)
    try:
        alloc = solve_allocation(omega, {"bytes": nbytes}, {"bytes": budget * (1 + 1e-9)})
    except InfeasibleBudget as e:
        smallest = e.minimum["bytes"]
        if avg_bits is not None:
            raise UserError(f"budget --avg-bits {avg_bits} is below the smallest possible plan; use at least "
                            f"--avg-bits {min(bit_choices)} ({smallest:.0f} bytes)") from e
        raise UserError(f"budget --max-bytes {max_bytes:.0f} is below the smallest possible plan; use at least "
                        f"--max-bytes {math.ceil(smallest)}") from e
    n_total = sum(ls.n_params for ls in report.layers)
    layers = []
    for i, ls in enumerate(report.layers):
        j = int(alloc.choice[i])
        layers.append(LayerPlan(name=ls.name, bits=bit_choices[j], group_size=group_size, symmetric=symmetric,
                                n_params=ls.n_params, storage_bytes=float(nbytes[i, j]), omega=float(omega[i, j]),
                                omega_by_bits={str(b): float(omega[i, k]) for k, b in enumerate(bit_choices)}))
    total = float(sum(lp.storage_bytes for lp in layers))
    plan = Plan(model=report.model,
                budget={"kind": "avg_bits" if avg_bits is not None else "bytes",
                        "value": avg_bits if avg_bits is not None else max_bytes, "max_bytes": budget},
                bit_choices=bit_choices, group_size=group_size, symmetric=symmetric, layers=layers,
                avg_bits=8 * total / n_total, total_bytes=total, predicted_omega=float(alloc.objective),
                solve_seconds=alloc.solve_seconds, sensitivity_fingerprint=report.fingerprint)
    plan.fingerprint = fingerprint("plan", report.fingerprint, plan.budget, bit_choices, group_size, symmetric)
    return plan


def uniform_plan(report: SensitivityReport, weights: WeightSource, bits: int, *,
                 group_size: int = 128, symmetric: bool = False) -> Plan:
    """Every layer at `bits` (the baseline a mixed plan is compared with)."""
    return allocate_bits(report, weights, avg_bits=float(bits), bit_choices=(bits,), group_size=group_size,
                         symmetric=symmetric)


def fixed_plan(shapes: dict[str, tuple[int, int]], bits: int, *, group_size: int = 128, symmetric: bool = False,
               model: str = "") -> Plan:
    """Every layer at `bits` without any sensitivity (uniform baselines, benchmarks)."""
    spec = QuantSpec(bits, group_size, symmetric)
    layers = [LayerPlan(name=n, bits=bits, group_size=group_size, symmetric=symmetric, n_params=o * i,
                        storage_bytes=spec.storage_bits(o, i) / 8, omega=float("nan")) for n, (o, i) in shapes.items()]
    total = sum(lp.storage_bytes for lp in layers)
    plan = Plan(model=model, budget={"kind": "uniform", "value": bits, "max_bytes": total}, bit_choices=[bits],
                group_size=group_size, symmetric=symmetric, layers=layers,
                avg_bits=8 * total / sum(lp.n_params for lp in layers), total_bytes=total,
                predicted_omega=float("nan"), solve_seconds=0.0)
    plan.fingerprint = fingerprint("fixed-plan", sorted(shapes.items()), bits, group_size, symmetric)
    return plan


def plan_specs(plan: Plan) -> dict[str, QuantSpec]:
    """Per-layer quantizer specs of a plan."""
    return {lp.name: QuantSpec(lp.bits, lp.group_size, lp.symmetric) for lp in plan.layers}
