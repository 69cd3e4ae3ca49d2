"""Quantizer grid and method, side by side: uniform RTN / GPTQ with min-max or searched grids.

    python scripts/bench_grid.py --configs rtn:3:128:asym:minmax,rtn:3:128:asym:search,gptq:3:128:asym:search \
        --slice valid --seeds 0,1,2 --append

Each config (method:bits:group:sym|asym:minmax|search[:static]) quantizes a fresh copy of the model
with every layer at the same format (or `plan=PATH`: a plan from `hawqtool allocate`/`run`, GPTQ on the
searched grid, each layer at its planned format) and is scored by perplexity on the chosen slice: `valid`
(60-80% of the text; the slice on which defaults are chosen) or `eval` (last 20%, for reporting).
Several calibration seeds give the spread. The quantized weights are scored in memory (fake-quant,
fp32): the packed checkpoint gives the same logits (tests/test_runtime.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

import platform

from _record import cpu_name, load_now, record, seed_rows
from hawqtool import artifacts
from hawqtool.allocate.plan import fixed_plan, plan_specs
from hawqtool.data import EVAL_FRACTION, VALID_FRACTION, calibration_windows, eval_windows
from hawqtool.evaluate import perplexity
from hawqtool.models import load_model, quantizable_layers, weight_matrix
from hawqtool.quantize.driver import QuantizeOptions, quantize_model


def parse_config(cfg: str) -> tuple[str, int, int, bool, str, bool]:
    """method:bits[:group[:sym|asym[:minmax|search[:static]]]]"""
    parts = cfg.split(":")
    method, bits = parts[0], int(parts[1])
    group = int(parts[2]) if len(parts) > 2 else 128
    sym = len(parts) > 3 and parts[3] == "sym"
    grid = parts[4] if len(parts) > 4 else "minmax"
    static = len(parts) > 5 and parts[5] == "static"
    return method, bits, group, sym, grid, static


def run_config(model_ref, cfg: str, seed: int, args, windows) -> dict:
    loaded = load_model(model_ref)
    calib = calibration_windows(loaded.tokenizer, args.data, args.nsamples, args.seqlen, seed=seed)
    if cfg.startswith("plan="):
        method, grid, static, plan = "gptq", "search", False, artifacts.load(Path(cfg[5:]), "plan")
    else:
        method, bits, group, sym, grid, static = parse_config(cfg)
        shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(loaded.model).items()}
        plan = fixed_plan(shapes, bits, group_size=group, symmetric=sym)
    opts = QuantizeOptions(method=method, grid=grid, static_groups=static, act_order=args.act_order,
                           percdamp=args.percdamp,
                           first_token_weight=args.first_token_weight, float_target=args.float_target,
                           tune_iters=args.tune_iters, tune_lr=args.tune_lr,
                           tune_scale_lr=args.tune_scale_lr, tune_loss=args.tune_loss,
                           tune_dtype=args.tune_dtype)
    t0 = time.perf_counter()
    res = quantize_model(loaded.model, plan_specs(plan), calib, opts)
    qs = time.perf_counter() - t0
    r = perplexity(loaded.model, windows)
    errs = [r_.error / r_.rtn_error for r_ in res.values() if r_.rtn_error > 0]
    return dict(config=cfg, seed=seed, ppl=r.ppl, tokens=r.tokens, avg_bits=plan.avg_bits, quant_s=qs,
                median_err_vs_rtn=statistics.median(errs) if errs else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default="wiki")
    ap.add_argument("--configs", default="rtn:3:128:asym:minmax,rtn:3:128:asym:search,gptq:3:128:asym:minmax,"
                                          "gptq:3:128:asym:search")
    ap.add_argument("--slice", choices=["valid", "eval"], default="valid")
    ap.add_argument("--windows", type=int, default=20, help="512-token windows scored")
    ap.add_argument("--seeds", default="0", help="calibration seeds, comma-separated")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--first-token-weight", type=float, default=QuantizeOptions().first_token_weight)
    ap.add_argument("--percdamp", type=float, default=QuantizeOptions().percdamp,
                    help="GPTQ's damping, a fraction of mean(diag H)")
    ap.add_argument("--act-order", action="store_true", help="GPTQ columns in order of decreasing diag(H)")
    ap.add_argument("--float-target", action="store_true", help="fit layers to the float model's outputs (GPTAQ)")
    ap.add_argument("--tune-iters", type=int, default=QuantizeOptions().tune_iters,
                    help="block tuning steps after GPTQ (quantize/tune.py); 0 = off")
    ap.add_argument("--tune-lr", type=float, default=QuantizeOptions().tune_lr, help="0 = 1 / tune-iters")
    ap.add_argument("--tune-scale-lr", type=float, default=QuantizeOptions().tune_scale_lr)
    ap.add_argument("--tune-loss", choices=["mse", "relative", "weighted"], default=QuantizeOptions().tune_loss)
    ap.add_argument("--tune-dtype", choices=["float32", "bfloat16", "float16"], default=QuantizeOptions().tune_dtype,
                    help="the tuning steps' autocast dtype")
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # block tuning logs each block
    logging.getLogger().handlers[0].addFilter(lambda r: r.name == "hawqtool" and "tuned" in r.getMessage())
    torch.manual_seed(0)
    base = load_model(args.model)
    frac = VALID_FRACTION if args.slice == "valid" else EVAL_FRACTION
    windows = eval_windows(base.tokenizer, args.data, 512, args.windows, fraction=frac)
    fp = perplexity(base.model, windows)
    del base
    print(json.dumps(dict(config="baseline", ppl=fp.ppl, tokens=fp.tokens)), flush=True)
    rows = seed_rows(args.configs.split(","), [int(s) for s in args.seeds.split(",")],
                     lambda cfg, seed: run_config(args.model, cfg, seed, args, windows))
    details = (f"machine: {cpu_name()} ({platform.machine()}), {torch.get_num_threads()} threads, torch {torch.__version__}; "
               f"calibration {args.nsamples}×{args.seqlen} tokens ({args.data}, first 60%, seeds "
             f"{args.seeds}); scored on the {args.slice} slice: {fp.tokens} predicted tokens ({args.windows}×512); "
             f"first-token weight {args.first_token_weight}; damping {args.percdamp}; act-order {args.act_order}; float target {args.float_target}; tune iters {args.tune_iters} (lr {args.tune_lr or '1/iters'}, scale lr ×{args.tune_scale_lr}, loss {args.tune_loss}, {args.tune_dtype}); baseline ppl {fp.ppl:.3f}; load: {load_now()}")
    lines = ["| config (method:bits:group:sym:grid) | avg bits | ppl per seed | median | GPTQ/RTN output error (median layer) | quantize s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['avg_bits']:.3f} | {' / '.join(f'{p:.2f}' for p in r['ppls'])} | "
              f"{r['median']:.2f} | {r['median_err_vs_rtn']:.3f} | {r['quant_s']:.0f} |" for r in rows]
    record("Quantizer grid: min-max vs weighted search, RTN vs GPTQ (SmolLM2-135M)", details, lines, args.append)


if __name__ == "__main__":
    main()
