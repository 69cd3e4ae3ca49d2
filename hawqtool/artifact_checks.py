"""Field checks for artifacts read from disk (plan.json, sensitivity.json).

A file that parses as the right kind can still carry values no stage can use: bits 13, group
size 0, a NaN trace, a layer listed twice. Each is refused when the file is loaded, with one line
naming the file, the layer and the field, instead of surfacing later as a crash inside the quantizer
or the integer program (exit 2) or as a silently wrong checkpoint.
"""
from __future__ import annotations

import math
from pathlib import Path

from .errors import UserError

_STAGE = {"sensitivity": "sensitivity", "plan": "allocate"}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _group_ok(g) -> bool:
    return _is_int(g) and (g == -1 or g >= 1)


class _Checker:
    """Collects nothing: the first bad field raises a UserError naming file, layer and field."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind

    def fail(self, where: str, what: str) -> None:
        raise UserError(f"{self.path}: {where} {what}; re-create it with `hawqtool {_STAGE[self.kind]}`")

    def require(self, ok: bool, where: str, what: str) -> None:
        if not ok:
            self.fail(where, what)

    def names(self, layers) -> None:
        self.require(len(layers) > 0, "the file", "lists no layers")
        seen: set[str] = set()
        for i, layer in enumerate(layers):
            name = layer.name
            self.require(isinstance(name, str) and bool(name.strip()), f"layer {i}", f"has no name ({name!r})")
            self.require(name not in seen, f"layer {name}", "is listed twice")
            seen.add(name)


def check_plan(plan, path: Path) -> None:
    """Every layer: a name (once), bits 1..8, group size -1 or ≥1, symmetric a boolean, activation bits
    2..8 or 16, a positive parameter count; the plan's own group size and bit choices likewise."""
    c = _Checker(path, "plan")
    c.require(_group_ok(plan.group_size), "the plan", f"has group_size {plan.group_size!r} (use -1 or a positive size)")
    c.require(isinstance(plan.bit_choices, list) and all(_is_int(b) and 1 <= b <= 8 for b in plan.bit_choices),
              "the plan", f"has bit_choices {plan.bit_choices!r} (widths are 1..8)")
    c.names(plan.layers)
    for lp in plan.layers:
        where = f"layer {lp.name}"
        c.require(_is_int(lp.bits) and 1 <= lp.bits <= 8, where, f"has bits {lp.bits!r} (widths are 1..8)")
        c.require(_group_ok(lp.group_size), where, f"has group_size {lp.group_size!r} (use -1 or a positive size)")
        c.require(isinstance(lp.symmetric, bool), where, f"has symmetric {lp.symmetric!r} (true or false)")
        c.require(_is_int(lp.act_bits) and (2 <= lp.act_bits <= 8 or lp.act_bits == 16), where,
                  f"has act_bits {lp.act_bits!r} (2..8, or 16 for weight-only)")
        c.require(_is_int(lp.n_params) and lp.n_params >= 1, where, f"has n_params {lp.n_params!r}")
        c.require(isinstance(lp.ggml_type, str) and (not lp.ggml_type or _ggml_ok(lp)), where,
                  f"has ggml_type {lp.ggml_type!r} with bits {lp.bits!r} and group_size {lp.group_size!r} "
                  "(a ggml type such as Q4_K, with its own bits and group size)")
        c.require(lp.scale_bits == 16 or (_is_int(lp.scale_bits) and 4 <= lp.scale_bits <= 8 and lp.group_size != -1
                                           and not lp.ggml_type), where,
                  f"has scale_bits {lp.scale_bits!r} (16 for fp16 scales, or 4..8 scale codes on a grouped layer)")
    if plan.embedding is not None:
        _check_embedding(c, plan.embedding)
    c.require(plan.file is None or isinstance(plan.file, dict), "the plan", f"has file {plan.file!r} (a mapping)")


def _ggml_ok(lp) -> bool:
    """A plan layer's ggml type exists and agrees with its bits and group size."""
    from .quantize.ggml_types import TYPES

    t = TYPES.get(lp.ggml_type)
    return t is not None and (lp.bits, lp.group_size, lp.symmetric) == (t.bits, t.group, False)


def _check_embedding(c: _Checker, e) -> None:
    """The plan's embedding entry: a name, bits 1..8, group size, symmetry, a [vocab, hidden] shape, a tied head
    name or null, and a byte count ≥ 0."""
    where = "the embedding entry"
    c.require(isinstance(e.name, str) and bool(e.name.strip()), where, f"has name {e.name!r}")
    c.require(_is_int(e.bits) and 1 <= e.bits <= 8, where, f"has bits {e.bits!r} (widths are 1..8)")
    c.require(_group_ok(e.group_size), where, f"has group_size {e.group_size!r} (use -1 or a positive size)")
    c.require(isinstance(e.symmetric, bool), where, f"has symmetric {e.symmetric!r} (true or false)")
    c.require(isinstance(e.shape, list) and len(e.shape) == 2 and all(_is_int(d) and d >= 1 for d in e.shape),
              where, f"has shape {e.shape!r} (two positive sizes [vocab, hidden])")
    c.require(_is_int(e.n_params) and e.n_params >= 1, where, f"has n_params {e.n_params!r}")
    c.require(_is_num(e.storage_bytes) and math.isfinite(e.storage_bytes) and e.storage_bytes >= 0, where,
              f"has storage_bytes {e.storage_bytes!r}")
    c.require(e.tied_head is None or (isinstance(e.tied_head, str) and bool(e.tied_head.strip())), where,
              f"has tied_head {e.tied_head!r} (a module name or null)")
    c.require(isinstance(e.in_budget, bool), where, f"has in_budget {e.in_budget!r} (true or false)")


def check_sensitivity(report, path: Path) -> None:
    """Every layer: a name (once), a [out, in] shape of positive sizes, a positive parameter count, a finite
    trace, a standard error that is ≥ 0 (inf after a single probe) and not NaN, a probe count ≥ 0, and
    finite non-negative quantization errors."""
    c = _Checker(path, "sensitivity")
    c.names(report.layers)
    for ls in report.layers:
        where = f"layer {ls.name}"
        c.require(isinstance(ls.shape, list) and len(ls.shape) == 2 and all(_is_int(d) and d >= 1 for d in ls.shape),
                  where, f"has shape {ls.shape!r} (two positive sizes [out, in])")
        c.require(_is_int(ls.n_params) and ls.n_params >= 1, where, f"has n_params {ls.n_params!r}")
        c.require(_is_num(ls.trace) and math.isfinite(ls.trace), where, f"has trace {ls.trace!r} (a finite number)")
        c.require(_is_num(ls.stderr) and ls.stderr >= 0, where, f"has stderr {ls.stderr!r} (a number ≥ 0)")
        c.require(_is_int(ls.probes) and ls.probes >= 0, where, f"has probes {ls.probes!r}")
        c.require(isinstance(ls.qerror, dict), where, f"has qerror {ls.qerror!r} (a mapping)")
        for key, v in ls.qerror.items():
            c.require(_is_num(v) and math.isfinite(v) and v >= 0, where, f"has qerror[{key!r}] = {v!r} "
                      "(a finite number ≥ 0)")


CHECKS = {"plan": check_plan, "sensitivity": check_sensitivity}
