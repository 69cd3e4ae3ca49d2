"""The importance-weighted scale/zero search (quantize/grid.py) in the fused CPU kernel against its tensor loop, on
the real weights of SmolLM2-135M's first block with their real input importances: seconds per searched RTN
(median of repeats, both measured in this run), and how far the two agree (groups with the same scale and zero,
the weighted error's relative difference). Appended to benchmarks/RESULTS.md with --append.

    OMP_NUM_THREADS=1 python scripts/bench_grid_search.py --repeats 3 --append
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import cpu_name, load_now, record  # noqa: E402
from hawqtool.data import calibration_windows  # noqa: E402
from hawqtool.models import load_model, quantizable_layers, weight_matrix  # noqa: E402
from hawqtool.quantize import grid  # noqa: E402
from hawqtool.quantize.importance import input_importance  # noqa: E402
from hawqtool.quantize.quantizer import QuantSpec, rtn  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block", type=int, default=0)
    ap.add_argument("--append", action="store_true")
    a = ap.parse_args()
    if grid._kernel(torch.zeros(1)) is None:
        sys.exit("the CPU extension is not available: nothing to compare")
    loaded = load_model(None)
    layers = {n: m for n, m in quantizable_layers(loaded.model).items() if f"layers.{a.block}." in n}
    d_all = input_importance(loaded.model, layers, [{"input_ids": calibration_windows(loaded.tokenizer, "wiki", 8, 256)}])
    kernel = grid._kernel
    rows, tot = [], {"kernel": 0.0, "torch": 0.0}
    for bits, gs, sym in [(2, 32, False), (3, 128, False), (4, 64, False), (3, 128, True), (8, -1, True)]:
        spec = QuantSpec(bits, gs, sym)
        t_k, t_t, same, n_groups, rel = 0.0, 0.0, 0, 0, []
        for name, layer in layers.items():
            W, d = weight_matrix(layer).detach().float(), d_all[name]
            grid._kernel = kernel
            tk, qk = timed(lambda: rtn(W, spec, search=True, d=d), a.repeats)
            grid._kernel = lambda W: None
            tt, qt = timed(lambda: rtn(W, spec, search=True, d=d), a.repeats)
            grid._kernel = kernel
            t_k, t_t = t_k + tk, t_t + tt
            same += int(((qk.scales == qt.scales) & (qk.zeros == qt.zeros)).sum())
            n_groups += qk.scales.numel()
            ek, et = (float((d * (q.dequantize() - W).pow(2).sum(0)).sum()) for q in (qk, qt))
            rel.append(ek / et - 1)
        tot["kernel"] += t_k
        tot["torch"] += t_t
        rows.append(f"| {bits}-bit {'per channel' if gs == -1 else f'g{gs}'} {'sym' if sym else 'asym'} | {t_t:.3f} | "
                    f"{t_k:.3f} | {t_t / t_k:.1f}× | {same / n_groups:.4%} | {max(rel, key=abs):+.1e} |")
    table = ["| format (7 layers of block %d) | tensor loop s | fused kernel s | speed-up | same (scale, zero) | "
             "weighted error, kernel/loop − 1 (worst layer) |" % a.block, "|---|---|---|---|---|---|", *rows,
             f"| all | {tot['torch']:.3f} | {tot['kernel']:.3f} | {tot['torch'] / tot['kernel']:.1f}× | | |"]
    details = (f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} thread(s); {load_now()}; median of {a.repeats} repeats per layer; "
               f"importances from 8 × 256 calibration tokens")
    record("The grid search: fused CPU kernel against the tensor loop (SmolLM2-135M, real weights)", details, table,
           a.append)


if __name__ == "__main__":
    main()
