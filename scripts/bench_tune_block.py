"""One block's tuning under several settings, on the same GPTQ result: the block's output error over the calibration
batches before and after (what tune.py's keep-or-not rule compares). Blocks before it stay float, so its inputs
are the float model's; calibration data only (no scored text).

    python scripts/bench_tune_block.py 11 --variants "lr=1,lr=0.25,lr=0.1,loss=relative" --iters 50

lr=F: F × the default step (1 / iters); loss=relative: the per-token relative loss; dtype=bfloat16: the descent
under bf16 autocast (QuantizeOptions.tune_dtype). `--repeats N` runs each variant N times (the same result each
time) and reports the median seconds, for a speed comparison in one run:

    python scripts/bench_tune_block.py 5 --variants dtype=float32,dtype=bfloat16 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hawqtool.allocate.plan import fixed_plan, plan_specs
from hawqtool.data import calibration_windows
from hawqtool.models import load_model, quantizable_layers, set_weight_matrix, weight_matrix
from hawqtool.quantize import tune
from hawqtool.quantize.driver import QuantizeOptions, quantize_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("block", type=int)
    ap.add_argument("--variants", default="lr=1,lr=0.25")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="runs per variant; the median seconds is reported")
    a = ap.parse_args()
    variants = []
    for v in a.variants.split(","):
        k, x = v.split("=")
        variants.append({"lr": float(x) / a.iters} if k == "lr" else {"dtype": x} if k == "dtype" else {"loss": x})
    real = tune.tune_block

    def each_variant(block, layers, weights, updated, inputs, targets, **kw):
        start = {n: weight_matrix(m).clone() for n, m in layers.items()}
        for v in variants:
            times = []
            for _ in range(a.repeats):
                for n, m in layers.items():
                    set_weight_matrix(m, start[n])
                t0 = time.perf_counter()
                r = real(block, layers, weights, updated, inputs, targets, **{**kw, **v})
                times.append(time.perf_counter() - t0)
            print(json.dumps(dict(block=a.block, variant=v, before=r.loss_before, after=r.loss_after,
                                  ratio=r.loss_after / r.loss_before, codes_moved=r.changed,
                                  seconds=round(statistics.median(times), 1), runs=[round(t, 1) for t in times],
                                  threads=torch.get_num_threads())), flush=True)
        for n, m in layers.items():
            set_weight_matrix(m, start[n])
        return tune.TuneResult(dict(weights), 0.0, 0.0, True, 0.0, 0.0)  # the block keeps GPTQ's weights

    tune.tune_block = each_variant
    loaded = load_model(None)
    calib = calibration_windows(loaded.tokenizer, "wiki", a.nsamples, 512, seed=a.seed)
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(loaded.model).items()}
    specs = {n: s for n, s in plan_specs(fixed_plan(shapes, a.bits, group_size=128)).items()
             if n.startswith(f"model.layers.{a.block}.")}
    quantize_model(loaded.model, specs, calib, QuantizeOptions(tune_iters=a.iters))


if __name__ == "__main__":
    main()
