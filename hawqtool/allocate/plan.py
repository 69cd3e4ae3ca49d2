"""Stage 3 (allocate): turn sensitivity into per-layer bits under a size budget.

Ω[l, b] = Tr(H_l)/n_l · ‖Q_b(W_l) − W_l‖² (HAWQ-V2), with Q_b the same searched grid the
quantize stage uses and ‖·‖² weighted by the layer's input importance where the sensitivity
report measured it (quantize/importance.py), forced non-increasing in b. A budget `avg_bits = B`
means "no larger than uniform B-bit at the coarsest group size offered, fp16 scales" (linear between
integer widths), so plans and their uniform comparison point use one overhead rule; reported
average bits count the fp16 scales and packed zeros.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch

from ..artifacts import EmbeddingPlan, LayerPlan, Plan, SensitivityReport, fingerprint
from ..options import SensitivityOptions
from ..errors import UserError
from ..macs import LayerProfile
from ..quantize.importance import weighted_quant_error
from ..quantize.scale_codes import added_error
from ..quantize.quantizer import QuantSpec
from .ilp import InfeasibleBudget, _groups, solve_allocation
from .budgets import Budgets, budget_record, cost_tables, infeasible_message
from .options import FULL_ACT, Option, ggml_options, make_options

if TYPE_CHECKING:
    from ..latency import LatencyTable

log = logging.getLogger("hawqtool")


WeightSource = Callable[[], dict[str, torch.Tensor]]


def act_noise_ratio(act_bits: int, crest: float) -> float:
    """E‖δx‖²/E‖x‖² of symmetric dynamic per-row quantization at `act_bits`: step max|x|/(2^(a−1)−1),
    noise step²/12 per element, so the ratio is crest/(12·(2^(a−1)−1)²) with crest = max(x²)/mean(x²)."""
    return crest / (12.0 * (2 ** (act_bits - 1) - 1) ** 2)


def layer_tables(report: SensitivityReport, weights: WeightSource, options: Sequence[Option], symmetric: bool,
                 profile: Mapping[str, LayerProfile] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ω [L, C] and storage bytes [L, C] for the report's layers (in report order) and the options.

    Weight term: Tr/n·‖Q(W)−W‖², with ‖Q(W)−W‖² from the report when measured there, else from
    `weights()`. Activation term (options with act_bits < 16), a first-order proxy: input noise δx
    acts like a weight error of energy ‖W‖²·E‖δx‖²/E‖x‖² (isotropic inputs), so it adds
    Tr/n·‖W‖²·act_noise_ratio(a, crest), with ‖W‖² and the crest factor from the measured profile.
    Ω is made non-increasing in bits within each (group size, activation bits, symmetry, scales) family."""
    L, C = len(report.layers), len(options)
    omega, nbytes = np.zeros((L, C)), np.zeros((L, C))
    negative = []
    for i, ls in enumerate(report.layers):
        trace = ls.trace
        if trace < 0:
            negative.append(ls.name)
            trace = 0.0
        for j, opt in enumerate(options):
            spec = opt.spec(symmetric).for_rows(ls.shape[1])
            if spec.fmt and not spec.ggml.fits(ls.shape[1]):  # the type's blocks do not tile this layer's rows
                omega[i, j], nbytes[i, j] = np.inf, np.inf
                continue
            err = ls.qerror.get(spec.key)
            if err is None:  # not in the report: measured on the weights (the model is loaded for it)
                W = weights().get(ls.name)
                if W is None:
                    raise UserError(f"sensitivity report names layer {ls.name} that the model lacks; "
                                    "re-run `hawqtool sensitivity` on this model")
                fp16 = ls.qerror.get(dataclasses.replace(spec, scale_bits=16).key)  # × what codes add, as sensitivity
                err = weighted_quant_error(W, spec, None) if fp16 is None else fp16 * added_error(W, spec)
            if opt.act_bits < FULL_ACT:
                if profile is None or ls.name not in profile:
                    raise UserError("activation bits need the layers' measured input statistics; pass --model "
                                    "(or run allocate where the model can be loaded)")
                err += profile[ls.name].weight_sq * act_noise_ratio(opt.act_bits, profile[ls.name].crest)
            omega[i, j] = trace / ls.n_params * err
            nbytes[i, j] = spec.storage_bits(*ls.shape) / 8
    if negative:
        log.warning("%d layers have a negative trace estimate, treated as 0: %s", len(negative), ", ".join(negative[:5]))
    families: dict[tuple, list[int]] = {}
    for j, opt in enumerate(options):
        families.setdefault((opt.group_size, opt.act_bits, opt.symmetric, opt.scale_bits) if not opt.fmt
                            else ("ggml", j), []).append(j)
    for cols in families.values():
        cols = sorted(cols, key=lambda j: options[j].bits)
        omega[:, cols] = np.minimum.accumulate(omega[:, cols], axis=1)  # running min: non-increasing in bits
    return omega, nbytes


def omega_table(report: SensitivityReport, weights: WeightSource, bit_choices: list[int],
                group_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ω [L, C] and bytes [L, C] for weight-only widths at one group size (columns in bit_choices order)."""
    return layer_tables(report, weights, [Option(b, group_size) for b in bit_choices], symmetric)


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


def allocate_bits(report: SensitivityReport, weights: WeightSource, *, avg_bits: float | None = None,
                  max_bytes: float | None = None, bit_choices: tuple[int, ...] = SensitivityOptions.bits,
                  group_size: int = 128, symmetric: bool = False, pins: Mapping[str, int] | None = None,
                  allowed: Mapping[str, Sequence[int]] | None = None, ties: Sequence[str] = (),
                  auto_ties: bool = False, group_sizes: Sequence[int] | None = None,
                  act_bits: Sequence[int] = (FULL_ACT,), pairs: Sequence[tuple[int, int]] = (),
                  budgets: Budgets | None = None,
                  profile: Mapping[str, LayerProfile] | None = None, latency: LatencyTable | None = None,
                  trace_ucb: float = 0.0, embedding: EmbeddingPlan | None = None,
                  formats: Sequence[str] = (), scale_bits: int = 16) -> Plan:
    """Solve the ILP under every given budget (plus optional pins/allowed widths/ties) and return the plan.

    Options are (bits, group size, activation bits) triples from `make_options`; `trace_ucb` z > 0 uses
    the pessimistic trace max(Tr, 0) + z·s.e. for every layer (noisy near-zero traces then cannot buy
    a layer 2 bits for free). `embedding` (embedding.embedding_plan) quantizes the input embedding at its
    fixed width: its bytes count in a --max-bytes budget (the layers get the rest) but not in --avg-bits,
    which stays "no larger than uniform B-bit linear layers"; plan.avg_bits/total_bytes are linear only.
    `formats` (ggml type names) makes the options those block types instead (each only where its blocks tile
    a layer's rows); --avg-bits B then means B bits per linear weight, everything stored counted. `scale_bits` 4..8:
    grouped options store scale codes; --avg-bits B still means uniform B-bit's bytes with fp16 scales."""
    budgets = budgets or Budgets()
    budgets.avg_bits = avg_bits if avg_bits is not None else budgets.avg_bits
    budgets.max_bytes = max_bytes if max_bytes is not None else budgets.max_bytes
    fixed = 0.0  # bytes outside the ILP counted in --max-bytes
    if embedding is not None and budgets.max_bytes is not None:
        embedding = dataclasses.replace(embedding, in_budget=True)
        fixed = embedding.storage_bytes
    if formats:
        if pairs or any(a != FULL_ACT for a in act_bits) or group_sizes or scale_bits != 16:
            raise UserError("--formats chooses among ggml types, which fix their own group sizes and scales and "
                            "quantize weights only; drop --group-sizes/--act-bits/--pairs/--scale-bits")
        options = ggml_options(formats)
    else:
        options = make_options(bit_choices, group_sizes or [group_size], act_bits, pairs, scale_bits)
    if trace_ucb:
        report = ucb_report(report, trace_ucb)
    names = [ls.name for ls in report.layers]
    cons = build_constraints(names, [o.bits for o in options], pins=pins, allowed=allowed, ties=ties,
                             auto_ties=auto_ties)
    omega, nbytes = layer_tables(report, weights, options, symmetric, profile)
    if formats:
        cons.mask = _ggml_mask(report, options, nbytes, cons.mask)
        nbytes = np.where(np.isfinite(nbytes), nbytes, 0.0)
        omega = np.where(np.isfinite(omega), omega, 0.0)
    _check_some_option(report, options, cons)
    ref_bytes = None
    if scale_bits != 16:  # --avg-bits is measured against fp16 scales
        ref_bytes = np.array([[dataclasses.replace(o, scale_bits=16).spec(symmetric).storage_bits(*ls.shape) / 8
                               for o in options] for ls in report.layers])
    costs, limits = cost_tables(report, options, nbytes, profile, latency, budgets, ref_bytes)
    if fixed:
        limits["bytes"] -= fixed
    try:
        alloc = solve_allocation(omega, costs, {k: v * (1 + 1e-9) for k, v in limits.items()}, allowed=cons.mask,
                                 ties=cons.groups)
    except InfeasibleBudget as e:
        under = " under these pins/allowed widths/ties" if cons.record else ""
        raise UserError(infeasible_message(e, budgets, under, nbytes if ref_bytes is None else ref_bytes, options,
                                           fixed)) from e
    n_total = sum(ls.n_params for ls in report.layers)
    one_per_width = len({o.bits for o in options}) == len(options) and not formats
    keys = [str(o.bits) if one_per_width else o.label for o in options]  # Ω per option, as recorded
    layers = []
    for i, ls in enumerate(report.layers):
        j = int(alloc.choice[i])
        o = options[j]
        layers.append(LayerPlan(name=ls.name, bits=o.bits, group_size=o.group_size,
                                symmetric=symmetric if o.symmetric is None else o.symmetric,
                                n_params=ls.n_params, storage_bytes=float(nbytes[i, j]), omega=float(omega[i, j]),
                                omega_by_bits={key: float(omega[i, k]) for k, key in enumerate(keys)
                                               if cons.mask is None or cons.mask[i, k]},
                                act_bits=o.act_bits, ggml_type=o.fmt,
                                scale_bits=o.spec(symmetric).for_rows(ls.shape[1]).scale_bits))
    total = float(sum(lp.storage_bytes for lp in layers))
    plan_budget = budget_record(budgets, limits)  # max_bytes: the linear layers' share
    if cons.record:  # only when constrained, so unconstrained plans keep today's budget and fingerprint
        plan_budget["constraints"] = cons.record
    extra = {}
    if formats or len(options) != len(bit_choices) or trace_ucb or scale_bits != 16:
        extra = {"options": [o.label for o in options], "trace_ucb": trace_ucb}
    plan = Plan(model=report.model, budget=plan_budget, bit_choices=sorted({o.bits for o in options}),
                group_size=group_size if group_sizes is None else int(group_sizes[0]), symmetric=symmetric,
                layers=layers, avg_bits=8 * total / n_total, total_bytes=total, predicted_omega=float(alloc.objective),
                solve_seconds=alloc.solve_seconds, sensitivity_fingerprint=report.fingerprint,
                costs={k: float(v) for k, v in alloc.costs.items()}, embedding=embedding, **extra)
    plan.fingerprint = fingerprint("plan", report.fingerprint, plan.budget, plan.bit_choices, plan.group_size,
                                   symmetric, *([extra] if extra else []),
                                   *([dataclasses.asdict(embedding)] if embedding is not None else []))
    return plan


def _check_some_option(report: SensitivityReport, options: Sequence[Option], cons: Constraints) -> None:
    """A layer (or tie group) that the pins, allowed widths and the types that fit its rows leave without any
    option is a one-line UserError naming it (the solver would only say "layer 7")."""
    if cons.mask is None:
        return
    for g in [[i] for i in range(len(report.layers))] + [list(g) for g in cons.groups]:
        if not cons.mask[g].all(axis=0).any():
            names = ", ".join(report.layers[i].name for i in g[:3]) + (" ..." if len(g) > 3 else "")
            kinds = ", ".join(dict.fromkeys(o.label for o in options))
            raise UserError(f"no option is left for {names}: the pins / allowed widths / ties exclude every one of "
                            f"{kinds} that fits its rows; relax --pin/--allow/--tie or add options")


def _ggml_mask(report: SensitivityReport, options: Sequence[Option], nbytes: np.ndarray,
               mask: np.ndarray | None) -> np.ndarray:
    """The constraint mask with every ggml type removed where its blocks do not tile the layer's rows; a layer
    no given type fits is a one-line UserError."""
    fits = np.isfinite(nbytes)
    for i, ls in enumerate(report.layers):
        if not fits[i].any():
            raise UserError(f"layer {ls.name} has rows of {ls.shape[1]}, which none of the ggml types "
                            f"{', '.join(o.fmt for o in options)} can hold; add Q8_0/Q4_0 (blocks of 32) to --formats")
    return fits if mask is None else mask & fits


def ucb_report(report: SensitivityReport, z: float) -> SensitivityReport:
    """Copy of the report with each trace replaced by max(trace, 0) + z·stderr."""
    import copy

    out = copy.deepcopy(report)
    for ls in out.layers:
        ls.trace = max(ls.trace, 0.0) + z * ls.stderr
    return out


def uniform_plan(report: SensitivityReport, weights: WeightSource, bits: int, *,
                 group_size: int = 128, symmetric: bool = False, embedding: EmbeddingPlan | None = None,
                 scale_bits: int = 16) -> Plan:
    """Every layer at `bits` (the baseline a mixed plan is compared with), the embedding as `embedding` says."""
    return allocate_bits(report, weights, avg_bits=float(bits), bit_choices=(bits,), group_size=group_size,
                         symmetric=symmetric, embedding=embedding, scale_bits=scale_bits)


def uniform_ggml_plan(report: SensitivityReport, weights: WeightSource, formats: Sequence[str],
                      max_bytes: float) -> Plan | None:
    """Every layer in one ggml type: the largest of `formats` that tiles every layer's rows within `max_bytes`
    (of equally large ones, the smallest predicted Ω): the mixed plan's comparison point; None when no single
    type fits."""
    from ..quantize.ggml_types import ggml_type

    fitting = [t for t in map(ggml_type, formats) if all(t.fits(ls.shape[1]) for ls in report.layers)
               and sum(t.storage_bits(*ls.shape) for ls in report.layers) / 8 <= max_bytes * (1 + 1e-9)]
    if not fitting:
        return None
    top = max(t.bits_per_weight for t in fitting)
    plans = [allocate_bits(report, weights, max_bytes=max_bytes, formats=[t.name])
             for t in fitting if t.bits_per_weight == top]
    return min(plans, key=lambda p: p.predicted_omega)


def fixed_plan(shapes: dict[str, tuple[int, int]], bits: int, *, group_size: int = 128, symmetric: bool = False,
               model: str = "", scale_bits: int = 16) -> Plan:
    """Every layer at `bits` without any sensitivity (uniform baselines, benchmarks)."""
    spec = QuantSpec(bits, group_size, symmetric, scale_bits=scale_bits)
    layers = [LayerPlan(name=n, bits=bits, group_size=group_size, symmetric=symmetric, n_params=o * i,
                        storage_bytes=spec.for_rows(i).storage_bits(o, i) / 8, omega=float("nan"),
                        scale_bits=spec.for_rows(i).scale_bits) for n, (o, i) in shapes.items()]
    total = sum(lp.storage_bytes for lp in layers)
    plan = Plan(model=model, budget={"kind": "uniform", "value": bits, "max_bytes": total}, bit_choices=[bits],
                group_size=group_size, symmetric=symmetric, layers=layers,
                avg_bits=8 * total / sum(lp.n_params for lp in layers), total_bytes=total,
                predicted_omega=float("nan"), solve_seconds=0.0)
    plan.fingerprint = fingerprint("fixed-plan", sorted(shapes.items()), bits, group_size, symmetric,
                                   *([scale_bits] if scale_bits != 16 else []))
    return plan


def plan_specs(plan: Plan) -> dict[str, QuantSpec]:
    """Per-layer quantizer specs of a plan."""
    return {lp.name: QuantSpec.for_ggml(lp.ggml_type) if lp.ggml_type else
            QuantSpec(lp.bits, lp.group_size, lp.symmetric, scale_bits=lp.scale_bits) for lp in plan.layers}
