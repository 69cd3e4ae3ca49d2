"""Perplexity of uniform RTN / GPTQ quantization on a model, appended to benchmarks/RESULTS.md.

    python scripts/bench_quality.py --configs rtn:4,gptq:4,rtn:3,gptq:3   # embedded SmolLM2-135M

Each config quantizes a fresh copy of the model with every layer at the same bits, then
evaluates it through the packed checkpoint (hawqtool.runtime) with the pinned protocol.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from hawqtool.allocate.plan import fixed_plan
from hawqtool.data import calibration_windows, eval_windows
from hawqtool.evaluate import perplexity
from hawqtool.models import load_model, quantizable_layers, weight_matrix
from hawqtool.quantize.driver import QuantizeOptions
from hawqtool.runtime import load_quantized
from hawqtool.stages import quantize_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--configs", default="rtn:4,gptq:4,rtn:3,gptq:3", help="method:bits[:group] list")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--first-token-weight", type=float, default=QuantizeOptions().first_token_weight)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    windows = eval_windows(tok, "wiki", 512, args.eval_windows)
    calib = calibration_windows(tok, "wiki", args.nsamples, args.seqlen, seed=0)
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(loaded.model).items()}
    rows = []
    if not args.no_baseline:
        r = perplexity(loaded.model, windows)
        rows.append(dict(config="baseline (Q4_1-dequantized fp32)", ppl=r.ppl, tokens=r.tokens, quant_s=0.0,
                         avg_bits=32.0))
    tmp = Path(tempfile.mkdtemp(prefix="hawq-bench-"))
    for cfg in args.configs.split(","):
        method, bits, *g = cfg.split(":")
        group = int(g[0]) if g else 128
        plan = fixed_plan(shapes, int(bits), group_size=group)
        opts = QuantizeOptions(method=method, act_order=args.act_order, first_token_weight=args.first_token_weight)
        fresh = load_model(args.model)
        t0 = time.perf_counter()
        ck = quantize_stage(fresh, plan, calib, opts, tmp / cfg.replace(":", "_"))
        qs = time.perf_counter() - t0
        r = perplexity(load_quantized(ck), windows)
        rows.append(dict(config=f"{method.upper()} {bits}-bit g{group}", ppl=r.ppl, tokens=r.tokens, quant_s=qs,
                         avg_bits=plan.avg_bits))
        print(json.dumps(rows[-1]), flush=True)
        del fresh
    shutil.rmtree(tmp, ignore_errors=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cmd = "python scripts/bench_quality.py " + " ".join(sys.argv[1:])
    lines = [f"\n### Uniform quantization quality — {date.today()}\n",
             f"`{cmd}`  \nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}; calibration {args.nsamples}×{args.seqlen} tokens (wiki, first 60%), "
             f"eval {rows[0]['tokens']} predicted tokens ({args.eval_windows}×512, last 20%); "
             f"first-token weight {args.first_token_weight}, act-order {args.act_order}; peak RSS {rss:.2f} GiB\n",
             "| config | avg bits (incl. scales/zeros) | wiki ppl | quantize s |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['avg_bits']:.3f} | {r['ppl']:.3f} | {r['quant_s']:.0f} |" for r in rows]
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
