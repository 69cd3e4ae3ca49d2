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
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..artifacts import LayerPlan, Plan, SensitivityReport, fingerprint, qerror_key
from ..errors import UserError
from ..quantize.quantizer import QuantSpec, quant_error
from .ilp import InfeasibleBudget, _groups, solve_allocation

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


AUTO_TIES = (r"(q|k|v)_proj", r"(gate|up)_proj")  # fused at run time by most runtimes (qkv, gate_up)


@dataclass
class Constraints:
    """Per-layer allowed mask [L, C] (None = all), tie groups of layer indices, and what to record in the plan."""

    mask: np.ndarray | None = None
    groups: list[list[int]] = field(default_factory=list)
    record: dict = field(default_factory=dict)


def _regex(pattern: str, what: str) -> re.Pattern:
    """Compile a user regex; one-line UserError if it is not valid."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"{what} pattern {pattern!r} is not a valid regular expression ({e})") from e


def tie_groups(names: Sequence[str], patterns: Sequence[str], what: str = "--tie") -> list[list[int]]:
    """Layers whose names are equal after deleting the pattern's (first) match form one group (size >= 2)."""
    out: list[list[int]] = []
    for pat in patterns:
        rx, keyed = _regex(pat, what), {}
        for i, n in enumerate(names):
            m = rx.search(n)
            if m:
                keyed.setdefault(n[:m.start()] + n[m.end():], []).append(i)
        found = [g for g in keyed.values() if len(g) > 1]
        if not found and what == "--tie":
            log.warning("--tie %s ties no two layers (names differ outside the match)", pat)
        out += found
    return out


def build_constraints(names: Sequence[str], bit_choices: list[int], *, pins: Mapping[str, int] | None = None,
                      allowed: Mapping[str, Sequence[int]] | None = None, ties: Sequence[str] = (),
                      auto_ties: bool = False) -> Constraints:
    """Turn regex pins/allowed widths/ties into ILP masks and groups; first matching pattern wins per layer.

    A pin overrides an --allow on the same layer; a pinned or allowed width outside bit_choices is an error."""
    pins, allowed = dict(pins or {}), dict(allowed or {})
    mask = np.ones((len(names), len(bit_choices)), dtype=bool)
    for what, rules in (("--allow", allowed), ("--pin", pins)):  # pins last, so they override
        done = np.zeros(len(names), dtype=bool)
        for pat, widths in rules.items():
            widths = [int(widths)] if what == "--pin" else [int(b) for b in widths]
            bad = sorted(set(widths) - set(bit_choices))
            if bad:
                raise UserError(f"{what} {pat}={','.join(map(str, widths))} uses width {bad[0]} that is not in "
                                f"--bits {','.join(map(str, bit_choices))}; add it to --bits")
            rx = _regex(pat, what)
            found = np.array([bool(rx.search(n)) for n in names], dtype=bool)
            if not found.any():
                raise UserError(f"{what} pattern {pat!r} matches no layer name (e.g. {names[:1]})")
            hit = found & ~done
            if not hit.any():
                log.warning("%s %s only matches layers an earlier pattern already set; ignored", what, pat)
            mask[hit] = np.isin(bit_choices, widths)
            done |= hit
    groups = tie_groups(names, list(ties)) + (tie_groups(names, AUTO_TIES, "auto-tie") if auto_ties else [])
    for g in _groups(len(names), groups):  # union-find over overlapping tie lists, as the ILP merges them
        if len(g) > 1 and not mask[g].all(axis=0).any():
            raise UserError(f"tied layers {', '.join(names[i] for i in g[:4])} have no common allowed width "
                            "under the pins/--allow; drop a tie or make their pins agree")
    record = {k: v for k, v in (("pins", {p: int(b) for p, b in pins.items()}),
                                ("allowed", {p: [int(x) for x in b] for p, b in allowed.items()}),
                                ("ties", list(ties)), ("auto_ties", bool(auto_ties))) if v}
    if record:
        record["tie_groups"] = [[names[i] for i in g] for g in groups]
    return Constraints(mask=None if mask.all() else mask, groups=groups, record=record)


def parse_pins(items: Sequence[str]) -> dict[str, int]:
    """CLI `PATTERN=BITS` strings -> {pattern: bits}; one-line UserError on bad syntax."""
    out: dict[str, int] = {}
    for item in items:
        pat, eq, b = item.rpartition("=")
        if not eq or not pat or not b.strip().isdigit() or not 1 <= int(b) <= 8:
            raise UserError(f"--pin must look like PATTERN=BITS with BITS in 1..8, e.g. 'lm_head=8', got {item!r}")
        out[pat] = int(b)
    return out


def parse_allowed(items: Sequence[str]) -> dict[str, list[int]]:
    """CLI `PATTERN=B1,B2` strings -> {pattern: [widths]}; one-line UserError on bad syntax."""
    out: dict[str, list[int]] = {}
    for item in items:
        pat, eq, bs = item.rpartition("=")
        widths = [x.strip() for x in bs.split(",")]
        if not eq or not pat or not all(w.isdigit() and 1 <= int(w) <= 8 for w in widths):
            raise UserError(f"--allow must look like PATTERN=B1,B2 with widths in 1..8, e.g. 'mlp=3,4', got {item!r}")
        out[pat] = sorted({int(w) for w in widths})
    return out


def avg_bits_for_bytes(nbytes: np.ndarray, bit_choices: list[int], target: float) -> float:
    """Smallest --avg-bits (3 decimals, rounded up) whose uniform size is >= target bytes, for error hints."""
    lo_b, hi_b = min(bit_choices), max(bit_choices)
    if target <= uniform_bytes(nbytes, bit_choices, lo_b):
        return float(lo_b)
    for b in range(lo_b, hi_b):
        lo, hi = uniform_bytes(nbytes, bit_choices, b), uniform_bytes(nbytes, bit_choices, b + 1)
        if target <= hi:
            exact = b + (target - lo) / (hi - lo)
            return math.ceil(exact * 1000 - 1e-6) / 1000
    return float(hi_b)


def allocate_bits(report: SensitivityReport, weights: WeightSource, *, avg_bits: float | None = None,
                  max_bytes: float | None = None, bit_choices: tuple[int, ...] = (2, 3, 4, 8),
                  group_size: int = 128, symmetric: bool = False, pins: Mapping[str, int] | None = None,
                  allowed: Mapping[str, Sequence[int]] | None = None, ties: Sequence[str] = (),
                  auto_ties: bool = False) -> Plan:
    """Solve the ILP for one budget (plus optional pins/allowed widths/ties) and return the plan artifact."""
    if (avg_bits is None) == (max_bytes is None):
        raise UserError("give exactly one budget: --avg-bits B or --max-bytes N")
    bit_choices = sorted(set(int(b) for b in bit_choices))
    cons = build_constraints([ls.name for ls in report.layers], bit_choices, pins=pins, allowed=allowed,
                             ties=ties, auto_ties=auto_ties)
    omega, nbytes = omega_table(report, weights, bit_choices, group_size, symmetric)
    budget = max_bytes if max_bytes is not None else uniform_bytes(nbytes, bit_choices, avg_bits)
    try:
        alloc = solve_allocation(omega, {"bytes": nbytes}, {"bytes": budget * (1 + 1e-9)}, allowed=cons.mask,
                                 ties=cons.groups)
    except InfeasibleBudget as e:
        smallest = e.minimum["bytes"]
        under = " under these pins/allowed widths/ties" if cons.record else ""
        if avg_bits is not None:
            need = avg_bits_for_bytes(nbytes, bit_choices, smallest)
            raise UserError(f"budget --avg-bits {avg_bits} is below the smallest possible plan{under}; use at least "
                            f"--avg-bits {need:g} ({smallest:.0f} bytes)") from e
        raise UserError(f"budget --max-bytes {max_bytes:.0f} is below the smallest possible plan{under}; use at "
                        f"least --max-bytes {math.ceil(smallest)}") from e
    n_total = sum(ls.n_params for ls in report.layers)
    layers = []
    for i, ls in enumerate(report.layers):
        j = int(alloc.choice[i])
        layers.append(LayerPlan(name=ls.name, bits=bit_choices[j], group_size=group_size, symmetric=symmetric,
                                n_params=ls.n_params, storage_bytes=float(nbytes[i, j]), omega=float(omega[i, j]),
                                omega_by_bits={str(b): float(omega[i, k]) for k, b in enumerate(bit_choices)}))
    total = float(sum(lp.storage_bytes for lp in layers))
    plan_budget = {"kind": "avg_bits" if avg_bits is not None else "bytes",
                   "value": avg_bits if avg_bits is not None else max_bytes, "max_bytes": budget}
    if cons.record:  # only when constrained, so unconstrained plans keep today's budget and fingerprint
        plan_budget["constraints"] = cons.record
    plan = Plan(model=report.model, budget=plan_budget,
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
