"""Budgets of the allocate stage: size (avg bits / bytes), BOPs and latency, as ILP cost tables and limits.

All given budgets hold at once. An infeasible combination is reported in one line naming, for
each budget, the smallest value it could have on its own, in the user's own flag.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from ..artifacts import SensitivityReport
from ..errors import UserError
from ..macs import LayerProfile
from .ilp import InfeasibleBudget, _fmt_up
from .options import FULL_ACT, Option

if TYPE_CHECKING:
    from ..latency import LatencyTable


_CLI_FLAG = {"bytes": "--max-bytes", "bops": "--max-bops", "latency_ms": "--max-latency-ms"}


@dataclass
class Budgets:
    """Limits on the plan's totals; any subset may be given and all given ones hold at once.

    avg_bits B: bytes of uniform B-bit at the first group size; bops_frac F: F × the BOPs of
    16-bit weights × 16-bit activations; latency_frac F: F × the table's fp32 latency."""

    avg_bits: float | None = None
    max_bytes: float | None = None
    max_bops: float | None = None
    bops_frac: float | None = None
    max_latency_ms: float | None = None
    latency_frac: float | None = None

    def any(self) -> bool:
        return any(v is not None for v in vars(self).values())


def _size_ref(options: Sequence[Option]) -> list[int]:
    """Columns of the weight-only options at the coarsest group size (per channel, -1, only when it is the only
    one): what --avg-bits B is measured against, uniform B-bit at that group size, so that offering finer groups
    (the default 32, 64, 128) leaves the budget "the bytes of uniform B-bit g128" and spends it on them."""
    weight_only = [j for j, o in enumerate(options) if o.act_bits == FULL_ACT and o.symmetric is None]
    ref = max((g for g in {options[j].group_size for j in weight_only} if g > 0), default=-1)
    return [j for j in weight_only if options[j].group_size == ref]


def bops_costs(report: SensitivityReport, options: Sequence[Option], profile: Mapping[str, LayerProfile]) -> np.ndarray:
    """BOPs per token [L, C]: measured MACs × weight bits × activation bits."""
    macs = np.array([profile[ls.name].macs for ls in report.layers])
    return macs[:, None] * np.array([[o.bits * o.act_bits for o in options]], dtype=float)


def available_costs(report: SensitivityReport, options: Sequence[Option], nbytes: np.ndarray,
                    profile: Mapping[str, LayerProfile] | None, latency: LatencyTable | None) -> dict[str, np.ndarray]:
    """Every cost table [L, C] the inputs allow: bytes always, BOPs with a profile, latency with a table."""
    costs = {"bytes": nbytes}
    if profile is not None:
        costs["bops"] = bops_costs(report, options, profile)
    if latency is not None:
        costs["latency_ms"] = latency.costs([ls.name for ls in report.layers], [o.timed_label for o in options])
    return costs


def cost_tables(report: SensitivityReport, options: Sequence[Option], nbytes: np.ndarray,
                 profile: Mapping[str, LayerProfile] | None, latency: LatencyTable | None,
                 budgets: Budgets, ref_bytes: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Cost tables [L, C] and limits for every budget given; `ref_bytes` [L, C]: the bytes --avg-bits is measured
    against, where they are not the options' own (scale codes: against fp16 scales)."""
    costs, limits = {"bytes": nbytes}, {}
    if budgets.avg_bits is not None and budgets.max_bytes is not None:
        raise UserError("give --avg-bits or --max-bytes, not both (they are the same budget)")
    if budgets.avg_bits is not None and options[0].fmt:  # ggml types: bits per linear weight, all bytes counted
        limits["bytes"] = budgets.avg_bits * sum(ls.n_params for ls in report.layers) / 8
    elif budgets.avg_bits is not None:
        ref = _size_ref(options)
        if not ref:
            raise UserError("--avg-bits is measured against weight-only layers; add 16 to --act-bits or use --max-bytes")
        ref_table = nbytes if ref_bytes is None else ref_bytes
        limits["bytes"] = uniform_bytes(ref_table[:, ref], [options[j].bits for j in ref], budgets.avg_bits)
    elif budgets.max_bytes is not None:
        limits["bytes"] = budgets.max_bytes
    if budgets.max_bops is not None or budgets.bops_frac is not None:
        if budgets.max_bops is not None and budgets.bops_frac is not None:
            raise UserError("give --max-bops or --bops-frac, not both")
        if profile is None:
            raise UserError("a BOPs budget needs the layers' MACs; pass --model so they can be measured")
        costs["bops"] = bops_costs(report, options, profile)
        macs = sum(profile[ls.name].macs for ls in report.layers)
        limits["bops"] = budgets.max_bops if budgets.max_bops is not None else budgets.bops_frac * 256.0 * macs
    if budgets.max_latency_ms is not None or budgets.latency_frac is not None:
        if latency is None:
            raise UserError("a latency budget needs a table: pass --latency-table FILE "
                            "(write one with `hawqtool bench --latency-table FILE MODEL`)")
        if budgets.max_latency_ms is not None and budgets.latency_frac is not None:
            raise UserError("give --max-latency-ms or --latency-frac, not both")
        names = [ls.name for ls in report.layers]
        costs["latency_ms"] = latency.costs(names, [o.timed_label for o in options])
        limits["latency_ms"] = (budgets.max_latency_ms if budgets.max_latency_ms is not None
                                else budgets.latency_frac * latency.fp32_total(names))
    if not limits:
        raise UserError("give a budget: --avg-bits/--max-bytes, --max-bops/--bops-frac, or "
                        "--max-latency-ms/--latency-frac with --latency-table")
    return costs, limits


def infeasible_message(e: InfeasibleBudget, budgets: Budgets, under: str, nbytes: np.ndarray,
                       options: Sequence[Option], fixed_bytes: float = 0.0) -> str:
    """One line naming the smallest feasible value of every budget given, in the user's own flags.
    `fixed_bytes` (a quantized embedding) were taken from --max-bytes before the layers got the rest."""
    parts, too_low = [], []
    for k, limit in e.budgets.items():
        need = e.minimum[k]
        if k == "bytes" and budgets.max_bytes is not None:
            limit, need = limit + fixed_bytes, need + fixed_bytes
        if k == "bytes" and budgets.avg_bits is not None and options[0].fmt:
            flag, given = "--avg-bits", f"{budgets.avg_bits:g}"
            n = limit * 8 / budgets.avg_bits
            least = f"{math.ceil(need * 8 / n * 1000) / 1000:g} ({need:.0f} bytes)"
        elif k == "bytes" and budgets.avg_bits is not None:
            ref = _size_ref(options)
            flag, given = "--avg-bits", f"{budgets.avg_bits:g}"
            least = f"{avg_bits_for_bytes(nbytes[:, ref], [options[j].bits for j in ref], need):g} ({need:.0f} bytes)"
        elif k == "bytes":
            flag, given, least = "--max-bytes", f"{limit:.0f}", f"{math.ceil(need)}"
        elif k == "bops" and budgets.bops_frac is not None:
            flag, given, least = "--bops-frac", f"{budgets.bops_frac:g}", _fmt_up(need / (limit / budgets.bops_frac))
        elif k == "latency_ms" and budgets.latency_frac is not None:
            flag, given = "--latency-frac", f"{budgets.latency_frac:g}"
            least = _fmt_up(need / (limit / budgets.latency_frac))
        else:
            flag, given, least = _CLI_FLAG[k], f"{limit:.6g}", _fmt_up(need)
        if need > limit * (1 + 1e-9):
            too_low.append(f"{flag} {given} is below the smallest possible plan{under}; use at least {flag} {least}")
        parts.append(f"{flag} {given} (alone it needs at least {flag} {least})")
    if too_low:
        return "; ".join(too_low)
    return f"the budgets cannot all be met together{under}: " + ", ".join(parts) + "; relax at least one of them"


def budget_record(budgets: Budgets, limits: dict[str, float]) -> dict:
    """The plan's `budget` field: kind/value of the size budget as before, plus any other limits."""
    rec: dict = {}
    if budgets.avg_bits is not None:
        rec = {"kind": "avg_bits", "value": budgets.avg_bits, "max_bytes": limits["bytes"]}
    elif budgets.max_bytes is not None:
        rec = {"kind": "bytes", "value": budgets.max_bytes, "max_bytes": limits["bytes"]}
    for k in ("bops", "latency_ms"):
        if k in limits:
            rec[f"max_{k}"] = limits[k]
            rec.setdefault("kind", k)
    for k in ("bops_frac", "latency_frac"):
        if getattr(budgets, k) is not None:
            rec[k] = getattr(budgets, k)
    return rec


def uniform_bytes(nbytes: np.ndarray, bit_choices: list[int], bits: float) -> float:
    """Bytes of uniform `bits` quantization, linear between the neighbouring integer widths."""
    lo, hi = math.floor(bits), math.ceil(bits)
    size = {b: float(nbytes[:, j].sum()) for j, b in enumerate(bit_choices)}

    def at(b: int) -> float:
        if b in size:
            return size[b]
        if len(size) == 1:  # one width: no other size to interpolate between
            raise UserError(f"--avg-bits {bits:g} needs uniform {b}-bit layers' size, but the only width is {bit_choices[0]}; "
                            f"give --avg-bits {bit_choices[0]}, add widths to --bits, or give bytes (--max-bytes)")
        per_bit = (size[max(bit_choices)] - size[min(bit_choices)]) / (max(bit_choices) - min(bit_choices))
        return size[min(bit_choices)] + per_bit * (b - min(bit_choices))

    return at(lo) + (bits - lo) * (at(hi) - at(lo))


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
