"""quant_kernels CPU matmul speed vs fp32 torch.matmul and fbgemm dynamic int8, measured in one process.

    python scripts/bench_kernels.py [--repeats 30] [--append]

Weights are RTN-quantized random matrices (group 128, asymmetric) in hawqtool's packed layout and
run through `quant_kernels.qmatmul` (the path a checkpoint uses); the W8A8 and W4A8 columns quantize x
per token to int8 first (`qmatmul_w8a8`, as fbgemm's dynamic int8 does). Times are medians of `--repeats`
calls after a warm-up, on the same inputs; ratios are against the baselines timed in this run.
"""
from __future__ import annotations

import argparse
import platform
import warnings

import torch

from _record import cpu_name, load_now, record
from hawqtool.bench import median_ms

warnings.filterwarnings("ignore")
SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (1, 1536, 576), (1, 576, 1536), (128, 3072, 768), (2048, 768, 768)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--append", action="store_true", help="Append the table to benchmarks/RESULTS.md.")
    args = ap.parse_args()
    from hawqtool.checkpoint import pack_layer
    from hawqtool.quantize.quantizer import QuantSpec, rtn
    from quant_kernels import backend_info, qmatmul, qmatmul_w8a8

    torch.manual_seed(0)
    rows = []
    for m, n, k in SHAPES:  # x [m, k] @ W^T, W [n, k]
        W = torch.randn(n, k) * 0.02
        x = torch.randn(m, k)
        lin = torch.nn.Linear(k, n, bias=False)
        lin.weight.data = W
        dyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        fp = median_ms(lambda: torch.matmul(x, W.T), args.repeats)
        i8 = median_ms(lambda: dyn(x), args.repeats)
        row = {"shape": f"{m}×{n}×{k}", "fp32": fp, "fbgemm": i8}
        w8 = pack_layer(rtn(W, QuantSpec(8, -1, True)))  # the W8A8 weight: symmetric per channel
        row["w8a8"] = median_ms(lambda: qmatmul_w8a8(x, w8), args.repeats)
        for b in map(int, args.bits.split(",")):
            pw = pack_layer(rtn(W, QuantSpec(b, 128, False)))
            row[b] = median_ms(lambda: qmatmul(x, pw), args.repeats)
            if b == 4:  # the same weight with per-token int8 activations (W4A8: the integer kernel)
                row["w4a8"] = median_ms(lambda: qmatmul_w8a8(x, pw), args.repeats)
        rows.append(row)
        print(row, flush=True)
    bits = list(map(int, args.bits.split(",")))
    head = ("| x × W shape (m×n×k) | fp32 ms | fbgemm int8 ms | "
            + " | ".join(f"{b}-bit ms (vs fp32, vs int8)" for b in bits) + " | W8A8 int8 ms (vs fp32, vs fbgemm) | W4A8 int8 ms (vs fp32, vs fbgemm) |")
    lines = [head, "|" + "---|" * (5 + len(bits))]
    for r in rows:
        cells = [f"{r[b]:.3f} ({r['fp32'] / r[b]:.2f}×, {r['fbgemm'] / r[b]:.2f}×)" for b in bits + ["w8a8", "w4a8"] if b in r]
        lines.append(f"| {r['shape']} | {r['fp32']:.3f} | {r['fbgemm']:.3f} | " + " | ".join(cells) + " |")
    record("quant_kernels CPU matmul",
           f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
           f"{platform.python_version()}; kernels: {backend_info()['cpu']}; median of {args.repeats}; "
           f"load at the end: `{load_now()}`", lines, args.append)

if __name__ == "__main__":
    main()
