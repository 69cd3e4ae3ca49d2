"""Measured perplexity along the allocator's frontier vs uniform GPTQ, appended to benchmarks/RESULTS.md.

    python scripts/bench_frontier.py --sens out/sensitivity.json --avg-bits 2.5,3,3.5,4 --uniform 2,3,4
    python scripts/bench_frontier.py --sens S.json --seeds 0,1,2 --quantize-args '--tune-iters 0 --nsamples 32'
    python scripts/bench_frontier.py --sens S.json --uniform 2g32,3g128,3g32,4g128,4g32   # one format per point

Every point goes through the public CLI (`hawqtool allocate`, `quantize`, `eval`), so the
figures are what a user gets. Each mixed point is compared with the uniform curve
interpolated at its size: log-perplexity linear in bytes between the two neighbouring
uniform points (stricter than interpolating perplexity itself, since ppl is convex in size).
With several calibration seeds (`--seeds`, `hawqtool quantize --seed`), every point is quantized once
per seed and each mixed point is compared with the uniform curve of the same seed.

Objective variants (`--variants`), all at the same byte budgets:
  trace   Ω = Tr(H)/n·‖Q_b(W)−W‖²  (HAWQ-V2, hawqtool's default), from --sens
  fisher  the same Ω with the Fisher trace, from --fisher-sens
  trace-only  Ω = Tr(H)·4^(−b): the trace alone ranks layers, no measured weight error
              (written as a modified report whose ‖ΔW‖² entries are n·4^(−b))
  ucb     Ω with a pessimistic trace, max(Tr, 0) + 2·s.e. (upper 97.5% bound), from --sens
Finished points are cached as JSON in --workdir, so a killed run resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAWQ = [sys.executable, "-m", "hawqtool"]
EVAL_ARGS: list[str] = []  # extra `hawqtool eval` options (--seqlen/--windows), set from the command line
QUANT_ARGS: list[str] = []  # extra `hawqtool quantize` options (--quantize-args)


def sh(args: list[str]) -> str:
    """Run a hawqtool command; stop the benchmark with its stderr if it fails."""
    r = subprocess.run(HAWQ + args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: hawqtool {' '.join(args)}\n{r.stderr}")
    return r.stdout


def trace_only_report(src: Path, dst: Path) -> Path:
    """Copy of a sensitivity report whose ‖Q_b(W)−W‖² entries are n·4^(−b) (trace-alone objective)."""
    d = json.loads(src.read_text())
    for layer in d["layers"]:
        layer["qerror"] = {k: layer["n_params"] * 4.0 ** -int(k.split("/")[0]) for k in layer["qerror"]}
    dst.write_text(json.dumps(d))
    return dst


def ucb_report(src: Path, dst: Path, z: float = 2.0) -> Path:
    """Copy of a sensitivity report whose traces are replaced by max(trace, 0) + z·stderr."""
    d = json.loads(src.read_text())
    for layer in d["layers"]:
        layer["trace"] = max(layer["trace"], 0.0) + z * layer["stderr"]
    dst.write_text(json.dumps(d))
    return dst


def point(work: Path, name: str, sens: Path, alloc_args: list[str], model: str | None, seed: int = 0) -> dict:
    """Allocate → quantize (calibration seed `seed`) → eval one configuration (cached in work/NAME[-sSEED].json;
    the plan does not depend on the seed and is made once)."""
    cache = work / (f"{name}.json" if seed == 0 else f"{name}-s{seed}.json")
    if cache.exists():
        res = json.loads(cache.read_text())
        if res.get("quantize_args", []) != QUANT_ARGS:  # a workdir holds one quantize setting's points
            sys.exit(f"{cache} was made with --quantize-args {shlex.join(res.get('quantize_args', []))!r}; "
                     "use another --workdir for other quantize options")
        return res
    plan_path, ckpt = work / f"{name}.plan.json", work / (f"{name}.ckpt" if seed == 0 else f"{name}-s{seed}.ckpt")
    if not plan_path.exists():
        sh(["allocate", str(sens), "-q", "-o", str(plan_path), *alloc_args])
    plan = json.loads(plan_path.read_text())
    t0, qs = time.perf_counter(), None
    if not ckpt.exists():  # a checkpoint appears complete or not at all: one left by a killed run is reused
        sh(["quantize", *([model] if model else []), "--plan", str(plan_path), "--seed", str(seed), "-q", "-o",
            str(ckpt), *QUANT_ARGS])
        qs = time.perf_counter() - t0
    ev = json.loads(sh(["eval", str(ckpt), "--json", "-q", *EVAL_ARGS]))
    hist: dict[str, int] = {}
    for lp in plan["layers"]:
        hist[str(lp["bits"])] = hist.get(str(lp["bits"]), 0) + 1
    # one lower-is-better score: perplexity for causal LMs, 1 − embedding cosine for encoders
    score = ev["ppl"] if ev["task"] == "causal-lm" else 1.0 - ev["cosine"]
    res = dict(name=name, seed=seed, bytes=plan["total_bytes"], avg_bits=plan["avg_bits"], omega=plan["predicted_omega"],
               ppl=score, task=ev["task"], quantize_s=qs, bits=hist, quantize_args=QUANT_ARGS)
    cache.write_text(json.dumps(res))
    print(json.dumps(res), flush=True)
    return res


def uniform_alloc_args(token: str) -> list[str]:
    """`allocate` options of one uniform point: "3" = every layer 3 bits at the report's group sizes within the
    3-bit budget (the old curve); "3g32" = every layer exactly 3 bits in groups of 32 (one format, whatever its bytes)."""
    bits, _, group = token.partition("g")
    if not group:
        return ["--bits", bits, "--avg-bits", bits]
    return ["--bits", bits, "--group-sizes", group, "--max-bytes", "1e15"]


def median_point(pts: list[dict]) -> dict:
    """One configuration's point with the median score over its seeds (bytes do not depend on the seed)."""
    return {**pts[0], "ppl": statistics.median(p["ppl"] for p in pts)}


def interp_uniform(uniform: list[dict], nbytes: float) -> float | None:
    """Uniform curve at nbytes: log-ppl linear in bytes between neighbouring uniform points."""
    pts = sorted(uniform, key=lambda r: r["bytes"])
    for a, b in zip(pts, pts[1:]):
        if a["bytes"] <= nbytes <= b["bytes"]:
            t = (nbytes - a["bytes"]) / (b["bytes"] - a["bytes"])
            return math.exp((1 - t) * math.log(a["ppl"]) + t * math.log(b["ppl"]))
    return None


def plot(rows: dict[str, list[dict]], uniform: list[dict], baseline: float, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    u = sorted(uniform, key=lambda r: r["bytes"])
    ax.plot([r["bytes"] / 1e6 for r in u], [r["ppl"] for r in u], "s--", color="grey", label="uniform GPTQ")
    for r in u:
        ax.annotate(r["name"].replace("uniform-", "") + "-bit", (r["bytes"] / 1e6, r["ppl"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    for variant, pts in rows.items():
        pts = sorted(pts, key=lambda r: r["bytes"])
        ax.plot([r["bytes"] / 1e6 for r in pts], [r["ppl"] for r in pts], "o-", label=f"mixed ({variant})")
    if baseline > 0:
        ax.axhline(baseline, color="k", lw=0.8, label="full precision")
    ax.set_yscale("log")
    ax.set_xlabel("quantized layers, MB (scales/zeros included)")
    ax.set_ylabel("score (perplexity, or 1 − cosine for encoders)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sens", type=Path, required=True, help="Sensitivity report (Hutchinson trace).")
    ap.add_argument("--fisher-sens", type=Path, default=None, help="Sensitivity report from --estimator fisher.")
    ap.add_argument("--model", default=None, help="Model reference (default: the embedded SmolLM2).")
    ap.add_argument("--avg-bits", default="2.5,3,3.5,4")
    ap.add_argument("--uniform", default="2,3,4", help="uniform points: widths (2,3,4) or one format each "
                    "(2g32,3g128: every layer that width in groups of that size)")
    ap.add_argument("--variants", default="trace", help="Comma list of trace, fisher, trace-only.")
    ap.add_argument("--workdir", type=Path, default=Path("bench-frontier"))
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "frontier_smollm2.png")
    ap.add_argument("--alloc-args", default="", help="Extra `hawqtool allocate` options for the mixed points, "
                    "e.g. '--group-sizes 128,32'.")
    ap.add_argument("--tag", default="", help="Suffix for the mixed points' names (cache keys) when --alloc-args is used.")
    ap.add_argument("--seeds", default="0", help="calibration seeds, comma-separated (each point quantized per seed)")
    ap.add_argument("--quantize-args", default="", help="Extra `hawqtool quantize` options for every point, "
                    "e.g. '--tune-iters 0 --nsamples 32' for a quicker sweep.")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    args = ap.parse_args()
    EVAL_ARGS.extend(["--seqlen", str(args.eval_seqlen), "--windows", str(args.eval_windows)])
    QUANT_ARGS.extend(shlex.split(args.quantize_args))
    seeds = [int(x) for x in args.seeds.split(",")]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = [args.model] if args.model else []
    base_cache = work / "baseline.json"
    if not base_cache.exists():
        base_cache.write_text(sh(["eval", *model, "--json", "-q", *EVAL_ARGS]))
    base = json.loads(base_cache.read_text())
    baseline = base.get("ppl", 0.0)  # encoders: 1 − cos(fp, fp) = 0
    uniform = {s: [point(work, f"uniform-{b}", args.sens, uniform_alloc_args(b), args.model, s)
                   for b in args.uniform.split(",")] for s in seeds}
    reports = {"trace": args.sens, "fisher": args.fisher_sens,
               "trace-only": trace_only_report(args.sens, work / "trace_only.sensitivity.json"),
               "ucb": ucb_report(args.sens, work / "ucb.sensitivity.json")}
    rows: dict[str, list[list[dict]]] = {}
    for variant in args.variants.split(","):
        if reports.get(variant) is None:
            sys.exit(f"variant {variant!r} needs its report (--fisher-sens for fisher)")
        rows[variant + args.tag] = [[point(work, f"{variant}{args.tag}-{b}", reports[variant],
                                           ["--avg-bits", b, *args.alloc_args.split()], args.model, s) for s in seeds]
                                    for b in args.avg_bits.split(",")]
    plot({v: [median_point(p) for p in pts] for v, pts in rows.items()},
         [median_point([uniform[s][i] for s in seeds]) for i in range(len(uniform[seeds[0]]))], baseline, args.plot)
    label = "ppl" if base.get("task", "causal-lm") == "causal-lm" else "1 − cosine"
    cmd = "python scripts/bench_frontier.py " + shlex.join(sys.argv[1:])
    widths = lambda r: "/".join(str(r["bits"].get(str(b), 0)) for b in (2, 3, 4, 8))  # noqa: E731
    per_seed = lambda xs: " / ".join(f"{x:.4g}" for x in xs)  # noqa: E731
    quant = " ".join(QUANT_ARGS) or "the defaults"
    lines = [f"\n### Measured frontier vs uniform GPTQ — {date.today()}\n",
             f"`{cmd}`  \nmachine: {platform.machine()}, {os.cpu_count()} cores; model {args.model or 'SmolLM2-135M (embedded)'}; "
             f"`hawqtool quantize` with {quant} (wiki, first 60%; calibration seeds {args.seeds}); formats: the report's options; "
             f"eval {args.eval_windows}×{args.eval_seqlen} windows (last 20%); "
             f"full precision {label} {baseline:.4g}; score = {label} (lower is better), per seed and median. 'uniform at size' = "
             f"the same seed's uniform log-score interpolated in bytes between neighbouring uniform points; 'beats uniform' "
             f"counts the seeds where the mixed point is below it. Plot (medians): "
             f"`{args.plot.relative_to(ROOT) if args.plot.is_relative_to(ROOT) else args.plot}`\n",
             f"| config | MB | avg bits | predicted Ω | {label} per seed | median | uniform at size | beats uniform | widths (2/3/4/8) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i in sorted(range(len(uniform[seeds[0]])), key=lambda i: uniform[seeds[0]][i]["bytes"]):
        pts = [uniform[s][i] for s in seeds]
        r = pts[0]
        lines.append(f"| {r['name']} | {r['bytes']/1e6:.2f} | {r['avg_bits']:.3f} | {r['omega']:.4g} | "
                     f"{per_seed(p['ppl'] for p in pts)} | {median_point(pts)['ppl']:.4g} | – | – | {widths(r)} |")
    for variant, groups in rows.items():
        for pts in sorted(groups, key=lambda g: g[0]["bytes"]):
            r = pts[0]
            us = [interp_uniform(uniform[s], r["bytes"]) for s in seeds]
            verdict = "n/a (outside uniform range)" if None in us else \
                f"{sum(p['ppl'] < u for p, u in zip(pts, us))}/{len(seeds)}"
            lines.append(f"| {r['name']} | {r['bytes']/1e6:.2f} | {r['avg_bits']:.3f} | {r['omega']:.4g} | "
                         f"{per_seed(p['ppl'] for p in pts)} | {median_point(pts)['ppl']:.4g} | "
                         f"{'–' if None in us else per_seed(us)} | {verdict} | {widths(r)} |")
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
