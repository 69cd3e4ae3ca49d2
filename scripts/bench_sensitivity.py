"""Seconds per Hutchinson probe on SmolLM2-135M: exact Gauss-Newton product (jvp + vjp) vs
double backward through the self-KL loss, same batch, same probes; appended to RESULTS.md.

    python scripts/bench_sensitivity.py --repeats 3 --seqlen 256 --batch 2
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
from hawqtool.sensitivity import hutchinson_traces


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"))
    args = ap.parse_args()
    loaded = load_model(None)
    ids = calibration_windows(loaded.tokenizer, "wiki", args.batch, args.seqlen, seed=1)
    params = {n: m.weight for n, m in quantizable_layers(loaded.model).items()}
    batches = [{"input_ids": ids}]
    times: dict[str, list[float]] = {"ggn": [], "autograd": []}
    est = {}
    for _ in range(args.repeats):
        for hvp in ("ggn", "autograd"):
            t0 = time.perf_counter()
            est[hvp] = hutchinson_traces(loaded.model, params, batches, "self-kl", min_probes=1, max_probes=1,
                                         seed=0, hvp=hvp)
            times[hvp].append(time.perf_counter() - t0)
    worst = max(abs(est["ggn"][n].mean - est["autograd"][n].mean) / (abs(est["autograd"][n].mean) + 1e-30)
                for n in params)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmd = "python scripts/bench_sensitivity.py " + " ".join(sys.argv[1:])
    text = (f"\n### Hessian-vector product cost, SmolLM2-135M self-KL — {date.today()}\n"
            f"`{cmd}`  \nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
            f"one probe over all {len(params)} layers, batch {args.batch}×{args.seqlen} tokens, median of "
            f"{args.repeats}\n\n| product | s / probe | ratio |\n|---|---|---|\n"
            f"| double backward (baseline) | {med['autograd']:.2f} | 1.00 |\n"
            f"| Gauss-Newton jvp+vjp (hawqtool default) | {med['ggn']:.2f} | {med['autograd'] / med['ggn']:.2f}× faster |\n"
            f"\nSame probe vector: largest relative difference of a layer's estimate {worst:.1e}.\n")
    with open(args.results, "a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
