"""Forward latency of a quantized vision checkpoint vs its full-precision model, measured in one process.

    python scripts/bench_vision.py CKPT [CKPT ...] [--batch 8] [--repeats 7] [--compile] [--append]

Each checkpoint runs twice: as loaded (A8 layers through quant_kernels' integer kernels where one exists)
and with every layer forced onto the fake-quantized float path (same arithmetic, float convolutions), so
the integer kernels' share of the speed is visible. The models take turns in every repeat (drift on a
shared host hits them alike); medians of --repeats after one untimed round, on the pinned eval images.
--compile: the fp32 model and each checkpoint as loaded run torch.compile'd (hawqtool.compiled; the
quantized layers' kernels are torch ops), no fake-quant rows.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch

from _record import cpu_name, load_now, record

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--compile", action="store_true", help="torch.compile every model (no fake-quant rows).")
    ap.add_argument("--append", action="store_true", help="Append the table to benchmarks/RESULTS.md.")
    args = ap.parse_args()
    from hawqtool.checkpoint import read_manifest
    from hawqtool.compiled import compile_model, graph_breaks
    from hawqtool.models import load_model
    from hawqtool.runtime import load_quantized
    from hawqtool.evaluate_stage import vision_eval_images
    from quant_kernels import backend_info

    ref_name = read_manifest(args.checkpoints[0]).get("source_model")
    fp32 = load_model(ref_name).model
    x = vision_eval_images(fp32, n_fashion=args.batch)[0][:args.batch]
    models = {"fp32": fp32}
    for ck in args.checkpoints:
        models[ck] = load_quantized(ck)
        if args.compile:
            continue
        fq = load_quantized(ck)
        n_int8 = sum(bool(getattr(m, "int8", False)) for m in fq.modules())
        for m in fq.modules():
            if hasattr(m, "int8"):
                m.int8 = False
        models[f"{ck} (fake-quant)"] = fq
        print(f"{ck}: {n_int8} layers on integer kernels", flush=True)
    if args.compile:
        models = {f"{k} (compiled)": compile_model(m) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for rep in range(args.repeats + 1):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                if rep:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    base = statistics.median(times["fp32 (compiled)" if args.compile else "fp32"])
    lines = [f"| model | batch {args.batch} forward ms | vs fp32 |", "|---|---|---|"]
    for name, t in times.items():
        med = statistics.median(t)
        lines.append(f"| {name} | {med:.1f} | {base / med:.2f}× |")
    mode = f"; torch.compile, {graph_breaks()} graph breaks" if args.compile else ""
    record("Vision forward latency", f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch "
           f"{torch.__version__}, {platform.python_version()}; reference {ref_name}; kernels: "
           f"{backend_info()['cpu']}; median of {args.repeats}{mode}; load at the end: `{load_now()}`",
           lines, args.append)


if __name__ == "__main__":
    main()
