"""Sensitivity report: a Markdown summary and one self-contained HTML page with embedded plots.

Both are built from one list of sections so they always say the same thing; the HTML adds the
plots as base64 PNGs (no external files, no JavaScript) so it can be mailed or archived alone.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # Figure + savefig needs no pyplot, so no global backend state (Agg)

from .artifacts import LayerPlan, Plan, SensitivityReport, qerror_key, write_atomic
from .errors import UserError
from .render import SENSITIVITY_COLUMNS, most_sensitive, plan_size_lines, sensitivity_row
from .sensitivity.hutchinson import relative_se

TOP = 20
MAX_TICKS = 40
_QKEY = re.compile(r"^(\d+)/(-?\d+)/(sym|asym)(?:/s(\d+))?$")


@dataclass
class Section:
    """A titled block of paragraphs and an optional table, rendered to both Markdown and HTML."""

    title: str
    lines: list[str] = field(default_factory=list)
    header: tuple[str, ...] = ()
    rows: list[list[str]] = field(default_factory=list)


def short_names(names: list[str]) -> list[str]:
    """Layer names without their shared dotted prefix (e.g. `model.layers.`), so axis labels stay short."""
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    out = [".".join(p[common:]) for p in parts]
    return [s if len(s) <= 28 else "…" + s[-27:] for s in out]


def _layer_axis(ax: Axes, names: list[str]) -> None:
    """Label the x axis with every k-th short layer name so at most MAX_TICKS labels are drawn."""
    k = max(1, math.ceil(len(names) / MAX_TICKS))
    idx = list(range(0, len(names), k))
    ax.set_xticks(idx, [short_names(names)[i] for i in idx], rotation=90, fontsize=7)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_xlabel("layer (model order)" + (f", every {k}th labelled" if k > 1 else ""))
    ax.grid(True, axis="y", alpha=0.3)


def _figure(n_layers: int) -> tuple[Figure, Axes]:
    """One wide-enough figure for a per-layer plot."""
    fig = Figure(figsize=(min(max(8.0, 0.16 * n_layers + 3), 22.0), 4.6), layout="constrained")
    return fig, fig.add_subplot()


def _png(fig: Figure) -> str:
    """Base64 PNG of a figure, for a data: URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def estimate_plot(names: list[str], mean: np.ndarray, stderr: np.ndarray, title: str, ylabel: str) -> Figure:
    """Means with 95% bars (±1.96 s.e.): log y if all means > 0, else symlog with negatives marked red."""
    fig, ax = _figure(len(names))
    x, neg = np.arange(len(names)), mean <= 0
    half = np.where(np.isfinite(stderr), 1.96 * stderr, 0.0)  # s.e. is inf after a single probe: no bar
    if not neg.any():
        lo = mean - half  # a log axis cannot show an interval reaching 0: draw it to a floor below every point
        floor = min(mean.min(), lo[lo > 0].min() if (lo > 0).any() else mean.min()) / 3
        ax.errorbar(x, mean, yerr=[mean - np.maximum(lo, floor), half], fmt="o", ms=4, capsize=2, label="mean ± 95%")
        ax.set_yscale("log")
    else:
        nz = np.abs(mean[mean != 0])
        decade = 10.0 ** math.floor(math.log10(nz.min())) if nz.size else 1e-12  # clean ticks around 0
        ax.set_yscale("symlog", linthresh=decade)
        ax.axhline(0, color="grey", lw=0.8)
        ax.errorbar(x[~neg], mean[~neg], yerr=half[~neg], fmt="o", ms=4, capsize=2, label="mean ± 95%")
        ax.errorbar(x[neg], mean[neg], yerr=half[neg], fmt="v", ms=6, capsize=2, color="tab:red",
                    label=f"mean ≤ 0 ({int(neg.sum())} layers)")
        title += " (symlog y)"
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    _layer_axis(ax, names)
    return fig


def _family(group: int, sym: bool, scale_bits: int) -> str:
    """A format family's short name: "g128 asym", "g32 asym s6" (6-bit scale codes), "per-channel sym"."""
    return (f"g{group}" if group > 0 else "per-channel") + (" sym" if sym else " asym") + \
        (f" s{scale_bits}" if scale_bits != 16 else "")


def omega_setting(report: SensitivityReport, plan: Plan | None) -> tuple[int, bool, int, list[int]] | None:
    """(group size, symmetric, scale bits, widths) of the error entries every layer has: the format most of the
    plan's layers use if every layer has it, else the setting with the most widths."""
    found: dict[tuple[int, bool, int], set[int]] = {}
    for i, ls in enumerate(report.layers):
        here: dict[tuple[int, bool, int], set[int]] = {}
        for key in ls.qerror:
            if m := _QKEY.match(key):
                here.setdefault((int(m[2]), m[3] == "sym", int(m[4] or 16)), set()).add(int(m[1]))
        found = here if i == 0 else {k: v & here[k] for k, v in found.items() if k in here}
    found = {k: v for k, v in found.items() if v}
    if not found:
        return None
    used = Counter((lp.group_size, lp.symmetric, lp.scale_bits) for lp in plan.layers if not lp.ggml_type) \
        if plan is not None else Counter()
    key = next((k for k, _ in used.most_common() if k in found), None) or max(found, key=lambda k: len(found[k]))
    return key[0], key[1], key[2], sorted(found[key])


def omega_plot(report: SensitivityReport, plan: Plan | None) -> Figure | None:
    """Ω = max(Tr, 0)/n · ‖Q_b(W)−W‖² per bit width per layer at one format (the one most of the plan's layers
    use), from the report's own measured errors; the plan's choices marked at their own formats."""
    setting = omega_setting(report, plan)
    if setting is None:
        return None
    group, sym, sbits, bits = setting
    names = [ls.name for ls in report.layers]
    # raw Ω as measured, not omega_table's post-processed copy: the plot should show the data the ILP starts from
    omega = np.array([[max(ls.trace, 0.0) / ls.n_params * ls.qerror[qerror_key(b, group, sym, sbits)] for b in bits]
                      for ls in report.layers])
    fig, ax = _figure(len(names))
    x = np.arange(len(names))
    for j, b in enumerate(bits):
        ax.plot(x, np.where(omega[:, j] > 0, omega[:, j], np.nan), "o-", ms=3, lw=1, label=f"{b}-bit")
    if plan is not None:  # each layer's chosen Ω, one marker per format the plan uses
        where = {n: i for i, n in enumerate(names)}
        fams: dict[str, list[LayerPlan]] = {}
        for lp in plan.layers:
            if lp.name in where and lp.omega:
                fams.setdefault(lp.ggml_type or _family(lp.group_size, lp.symmetric, lp.scale_bits), []).append(lp)
        for (fam, lps), marker in zip(sorted(fams.items()), "sDv^<>ph*"):
            label = "plan's choice" + (f" ({fam})" if len(fams) > 1 else "")
            ax.plot([where[lp.name] for lp in lps], [lp.omega for lp in lps], marker, color="k", ms=7, mfc="none",
                    ls="none", label=label)
    zero = np.flatnonzero((omega <= 0).all(axis=1))
    if zero.size:  # a log axis cannot show Ω = 0: mark those layers along the bottom edge
        ax.plot(zero, np.full(zero.size, 0.03), "x", color="tab:red", ms=8, transform=ax.get_xaxis_transform(),
                label=f"trace ≤ 0 → Ω = 0 ({zero.size})")
    ax.set_yscale("log")
    ax.set_title(f"Ω = max(Tr, 0)/n · ‖Q_b(W)−W‖² per bit width ({_family(group, sym, sbits)})")
    ax.set_ylabel("Ω (predicted perturbation)")
    ax.legend(fontsize=8, ncol=min(len(bits) + 2, 6))
    _layer_axis(ax, names)
    return fig


def probes_plot(report: SensitivityReport) -> Figure:
    """Probes per layer, against the run's min/max probe settings."""
    names = [ls.name for ls in report.layers]
    fig, ax = _figure(len(names))
    ax.bar(np.arange(len(names)), [ls.probes for ls in report.layers], color="tab:blue")
    for key, style in (("min_probes", ":"), ("max_probes", "--")):
        if key in report.settings:
            ax.axhline(report.settings[key], color="grey", ls=style, label=f"{key} = {report.settings[key]}")
    ax.set_title("Hutchinson probes per layer")
    ax.set_ylabel("probes")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _layer_axis(ax, names)
    return fig


def bits_plot(plan: Plan) -> Figure:
    """Bit width the plan chose for each layer."""
    names = [lp.name for lp in plan.layers]
    fig, ax = _figure(len(names))
    ax.bar(np.arange(len(names)), [lp.bits for lp in plan.layers], color="tab:green")
    ax.set_yticks(plan.bit_choices)
    ax.set_title(f"plan: bits per layer ({plan.avg_bits:.3f} avg bits incl. scales, "
                 f"group {plan.group_size}, {'sym' if plan.symmetric else 'asym'})")
    ax.set_ylabel("bits")
    _layer_axis(ax, names)
    return fig


def sections(report: SensitivityReport, plan: Plan | None) -> list[Section]:
    """The report's text: summary, most sensitive layers, non-converged layers, negative traces."""
    probes = sorted({ls.probes for ls in report.layers})
    settings = ", ".join(f"{k}={v}" for k, v in report.settings.items())
    summary = Section("Summary", [
        f"model: `{report.model}`", f"objective: {report.objective}", f"estimator: {report.estimator}",
        f"settings: {settings}",
        f"probes: {probes[-1] if len(probes) == 1 else f'{probes[0]}–{probes[-1]}'} "
        "(one Hessian-vector product per probe, shared by all layers)" if probes else "probes: none",
        f"layers: {len(report.layers)}, parameters: {sum(ls.n_params for ls in report.layers):,}"])
    c = report.convergence
    if c:
        summary.lines.append(
            f"stopped: {c.get('stop_reason')} after {c.get('probes')} probes; rule: every major layer's s.e. ≤ "
            f"{c.get('target_rel_se', 0):.0%} of max(|trace|, its size × the mean |trace| per parameter); "
            f"major layers: {c.get('major_layers')} ({c.get('major_rule')}); "
            f"{len(c.get('not_converged', {}))} of them above the target")
    if plan is not None:
        hist = Counter(lp.bits for lp in plan.layers)
        summary.lines.append(f"plan: {plan.avg_bits:.3f} bits per linear weight, {plan.total_bytes / 1e6:.2f} MB of "
                             f"linear layers, predicted Ω {plan.predicted_omega:.4g}; layers per width: "
                             + ", ".join(f"{b}-bit {hist[b]}" for b in plan.bit_choices))
        per = Counter((lp.bits, lp.ggml_type or "", lp.group_size, lp.symmetric, lp.scale_bits) for lp in plan.layers)
        if len({k[1:] for k in per}) > 1:  # several group sizes, scale formats or types: say which widths use which
            summary.lines.append("layers per format: " + ", ".join(
                f"{b}-bit {t or _family(g, sym, sb)} {n}" for (b, t, g, sym, sb), n in sorted(per.items())))
        summary.lines += plan_size_lines(plan)
    rel = {ls.name: relative_se(ls.trace, ls.stderr) for ls in report.layers}
    top = Section(f"Most sensitive layers (top {min(TOP, len(report.layers))} by trace per parameter)",
                  header=(*SENSITIVITY_COLUMNS, "rel. s.e."),
                  rows=[[f"`{r[0]}`", *r[1:], f"{rel[ls.name]:.1%}"]
                        for ls in most_sensitive(report.layers, TOP) for r in [sensitivity_row(ls)]])
    target = report.settings.get("target_rel_se")
    if target is None:
        conv = Section("Did not converge", ["the settings record no `target_rel_se`; convergence not checked"])
    else:
        bad = [ls for ls in report.layers if rel[ls.name] > target]
        conv = Section("Did not converge", [f"{len(bad)} layers have relative s.e. above the target {target:.0%}"
                                            + (":" if bad else "")],
                       header=("layer", "rel. s.e.", "probes") if bad else (),
                       rows=[[f"`{ls.name}`", f"{rel[ls.name]:.1%}", str(ls.probes)] for ls in bad])
    neg = [ls for ls in report.layers if ls.trace < 0]
    negs = Section("Negative mean trace", [f"{len(neg)} layers have a negative mean trace"
                                           + (" (`allocate` treats them as 0):" if neg else "")],
                   header=("layer", "trace", "95% interval") if neg else (),
                   rows=[[f"`{ls.name}`", f"{ls.trace:.4g}",
                          f"[{ls.trace - 1.96 * ls.stderr:.4g}, {ls.trace + 1.96 * ls.stderr:.4g}]"] for ls in neg])
    return [summary, top, conv, negs]


def to_markdown(title: str, secs: list[Section]) -> str:
    """Markdown text of the sections (lists of lines become bullet lists)."""
    out = [f"# {title}", ""]
    for s in secs:
        out += [f"## {s.title}", ""] + [f"- {line}" for line in s.lines] + ([""] if s.lines else [])
        if s.header:
            out += ["| " + " | ".join(s.header) + " |", "|" + "---|" * len(s.header)]
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in s.rows] + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def _inline(text: str) -> str:
    """HTML for one line of the report's Markdown subset (only `code` spans)."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text, quote=False))


def to_html(title: str, secs: list[Section], plots: list[tuple[str, str]]) -> str:
    """One self-contained HTML page: summary, embedded PNG plots, then the remaining sections."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for i, s in enumerate(secs):
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in s.lines) + "</ul>" if s.lines else "")
        if s.header:
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in s.header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in s.rows)
                        + "</table>")
        if i == 0:
            body.append("<h2>Plots</h2>")
            body += [f'<figure><img alt="{html.escape(cap)}" src="data:image/png;base64,{b64}">'
                     f"<figcaption>{html.escape(cap)}</figcaption></figure>" for cap, b64 in plots]
    style = ("body{font-family:sans-serif;max-width:1500px;margin:1em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
             "td:not(:first-child){text-align:right}img{max-width:100%}figcaption{color:#555}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_sensitivity_report(report: SensitivityReport, out_dir: Path, plan: Plan | None = None) -> dict[str, Path]:
    """Write `sensitivity.md` and a self-contained `sensitivity.html` into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} is a file, not a folder; pass a folder with -o")
    if not report.layers:
        raise UserError("the sensitivity report has no layers; re-create it with `hawqtool sensitivity`")
    title = f"Hessian sensitivity — {report.model}"
    secs = sections(report, plan)
    names = [ls.name for ls in report.layers]
    trace = np.array([ls.trace for ls in report.layers])
    se = np.array([ls.stderr for ls in report.layers])
    n = np.array([ls.n_params for ls in report.layers], dtype=float)
    figs = [("Hessian trace per layer (mean ± 95%)",
             estimate_plot(names, trace, se, "Hessian trace per layer", "Tr(H_l)")),
            ("Hessian trace per parameter per layer (mean ± 95%)",
             estimate_plot(names, trace / n, se / n, "Hessian trace per parameter", "Tr(H_l) / n_l")),
            ("Ω per bit width per layer", omega_plot(report, plan)),
            ("Hutchinson probes per layer", probes_plot(report))]
    if plan is not None:
        figs.append(("Bits per layer in the plan", bits_plot(plan)))
    plots = [(cap, _png(fig)) for cap, fig in figs if fig is not None]
    paths = {"markdown": out_dir / "sensitivity.md", "html": out_dir / "sensitivity.html"}
    write_atomic(paths["markdown"], to_markdown(title, secs))
    write_atomic(paths["html"], to_html(title, secs, plots))
    return paths


# ---- the allocate stage's Pareto sweep (allocate/sweep.py computes it; drawing and writing it are here) ----

# axis -> (x label, scale to the plotted unit)
AXES = {"bytes": ("quantized layer size (MB, scales and zeros included)", 1e-6),
        "latency_ms": ("latency of the quantized layers (ms, sum of the latency table)", 1.0),
        "bops": ("GBOPs per token (MACs × weight bits × activation bits)", 1e-9)}


def sweep_figure(data: dict[str, Any]) -> Figure:
    """Ω vs each axis (one panel each): frontier line, labelled uniform points (hollow if they break the
    constraints), chosen plan star."""
    axes = data.get("axes", ["bytes"])
    fig = Figure(figsize=(8.0 * len(axes) ** 0.5 + 2.5 * (len(axes) - 1), 5.0), layout="constrained")
    for n, axis in enumerate(axes):
        ax = fig.add_subplot(1, len(axes), n + 1)
        label, scale = AXES[axis]
        fr = data.get("frontiers", {}).get(axis, data["frontier"])

        def x_of(p: dict[str, Any]) -> float:
            return p.get("costs", {}).get(axis, p["total_bytes"] if axis == "bytes" else float("nan")) * scale

        ys = [p["predicted_omega"] for p in fr] + [u["predicted_omega"] for u in data["uniform"]]
        ax.plot([x_of(p) for p in fr], [p["predicted_omega"] for p in fr], "o-", ms=4,
                color="tab:blue", label="Pareto frontier (ILP)")
        for k, u in enumerate(data["uniform"]):
            x, y = x_of(u), u["predicted_omega"]
            ax.scatter([x], [y], marker="s", s=40, zorder=4, edgecolors="tab:orange",
                       facecolors="tab:orange" if u["feasible"] else "none",
                       label="uniform" if k == 0 else None)
            note = "" if u["feasible"] else " (breaks constraints)"
            ax.annotate(u["label"] + note, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
        ch = data.get("chosen")
        if ch is not None and axis in ch.get("costs", {"bytes": 0}):
            ys.append(ch["predicted_omega"])
            ax.scatter([x_of(ch)], [ch["predicted_omega"]], marker="*", s=220, color="tab:red", zorder=5,
                       label=f"chosen plan ({ch['avg_bits']:.2f} bits/weight)")
        if ys and min(ys) > 0:
            ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("predicted Ω = Σ Tr(H)/n · ‖Q(W)−W‖²")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Predicted perturbation vs cost — {data.get('model', '')}")
    return fig


def _write_bytes_atomic(path: Path, blob: bytes) -> None:
    """Binary twin of artifacts.write_atomic (temporary name in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def write_sweep(result: dict[str, Any], out_json: Path, out_png: Path, chosen: Plan | None = None) -> dict[str, Path]:
    """Write the sweep as JSON and a PNG plot (both atomically); returns their paths."""
    data = {k: v for k, v in result.items() if not k.startswith("_")}
    if chosen is not None:
        from .allocate.sweep import chosen_point

        data["chosen"] = chosen_point(chosen, result)
    out_json, out_png = Path(out_json), Path(out_png)
    write_atomic(out_json, json.dumps(data, indent=1))
    _write_bytes_atomic(out_png, base64.b64decode(_png(sweep_figure(data))))
    return {"json": out_json, "png": out_png}
