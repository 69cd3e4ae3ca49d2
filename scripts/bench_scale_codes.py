"""What scale codes cost in error and save in bytes: the activation-weighted round-to-nearest error Σ d (w − q)² of
every SmolLM2 linear layer on the searched grid, with fp16 group scales and with k-bit scale codes (one fp16 step
per row, quantize/scale_codes.py), relative to fp16 scales at groups of 128. d = input second moments over
calibration windows (the calibration slice, no scored text).

    python scripts/bench_scale_codes.py --bits 2,3,4 --append
    python scripts/bench_scale_codes.py --qerror-time --append   # the sensitivity error pass: default vs g128 fp16
"""
from __future__ import annotations

import argparse
import platform
import statistics

import torch

from _record import cpu_name, load_now, record
from hawqtool.data import calibration_windows
from hawqtool.models import default_model_path, load_model, quantizable_layers, weight_matrix
from hawqtool.quantize.quantizer import QuantSpec, rtn


def input_moments(model, layers: dict, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ x² per input feature of every layer over the windows `ids`."""
    d: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(_m, a, _o):
            x = a[0].detach().float().reshape(-1, a[0].shape[-1])
            d[name] = d.get(name, 0) + (x * x).sum(0)
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    with torch.no_grad():
        for i in range(0, ids.shape[0], 2):
            model(input_ids=ids[i:i + 2])
    for h in handles:
        h.remove()
    return d


def error(W: torch.Tensor, d: torch.Tensor, spec: QuantSpec) -> float:
    """Σ d (w − q)² of the searched-grid RTN at `spec` (scale codes included)."""
    return float((d[None, :] * (W - rtn(W, spec, search=True, d=d).dequantize()) ** 2).sum())


def qerror_time(layers: dict, moments: dict, repeats: int, append: bool) -> None:
    """Seconds of the sensitivity stage's error pass (`_qerrors`, one grid) over every layer: g128 with fp16 scales
    (the default before 2026-12-06) against the default (groups of 32/64/128 with 6-bit codes), side by side."""
    import time

    from hawqtool.sensitivity.settings import _qerrors

    configs = {"g128, fp16 scales": ((128,), 16), "g32/64/128 + 6-bit codes (default)": ((32, 64, 128), 6)}
    secs = {c: [] for c in configs}
    for _ in range(repeats):
        for c, (groups, k) in configs.items():
            t = time.perf_counter()
            for n, m in layers.items():
                _qerrors(weight_matrix(m).float(), (2, 3, 4, 8), groups, moments[n], (False,), (), k)
            secs[c].append(time.perf_counter() - t)
    base = statistics.median(secs["g128, fp16 scales"])
    lines = ["| error pass (asymmetric, widths 2/3/4/8) | seconds, median | runs | × the g128 pass |", "|---|---|---|---|"]
    lines += [f"| {c} | {statistics.median(s):.1f} | {', '.join(f'{x:.1f}' for x in s)} | "
              f"{statistics.median(s) / base:.2f} |" for c, s in secs.items()]
    details = (f"machine: {cpu_name()} ({platform.machine()}), {torch.get_num_threads()} threads, torch "
               f"{torch.__version__}; {len(layers)} of SmolLM2-135M's linear layers; {repeats} repeats alternating; load: "
               f"{load_now()}")
    record("The sensitivity error pass with the default formats (SmolLM2-135M)", details, lines, append)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--groups", default="64,32")
    ap.add_argument("--scale-bits", default="8,6")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--qerror-time", action="store_true", help="time the sensitivity error pass instead")
    ap.add_argument("--layers", type=int, default=None, help="--qerror-time: the first N layers only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--append", action="store_true")
    a = ap.parse_args()
    loaded = load_model(a.model or str(default_model_path()))
    layers = quantizable_layers(loaded.model)
    moments = input_moments(loaded.model, layers, calibration_windows(loaded.tokenizer, "wiki", a.windows, 512, seed=0))
    if a.qerror_time:
        return qerror_time(dict(list(layers.items())[:a.layers]), moments, a.repeats, a.append)
    configs = [(128, 16)] + [(g, k) for g in map(int, a.groups.split(",")) for k in [16, *map(int, a.scale_bits.split(","))]]
    lines = ["| bits | groups | scales | bits per linear weight | Σ error / g128 fp16 | median layer ratio |",
             "|---|---|---|---|---|---|"]
    for b in map(int, a.bits.split(",")):
        errs = {c: {} for c in configs}
        nbits = dict.fromkeys(configs, 0)
        for n, m in layers.items():
            W = weight_matrix(m).float()
            d = moments[n] / moments[n].mean()
            for g, k in configs:
                spec = QuantSpec(b, g, False, scale_bits=k)
                errs[(g, k)][n] = error(W, d, spec)
                nbits[(g, k)] += spec.storage_bits(*W.shape)
        n_w = sum(weight_matrix(m).numel() for m in layers.values())
        ref = errs[(128, 16)]
        for g, k in configs:
            ratio = [errs[(g, k)][n] / ref[n] for n in layers]
            lines.append(f"| {b} | {g} | {'fp16' if k == 16 else f'{k}-bit codes'} | {nbits[(g, k)] / n_w:.3f} | "
                         f"{sum(errs[(g, k)].values()) / sum(ref.values()):.3f} | {statistics.median(ratio):.3f} |")
            print(lines[-1], flush=True)
    details = (f"machine: {cpu_name()} ({platform.machine()}), {torch.get_num_threads()} threads, torch "
               f"{torch.__version__}; SmolLM2-135M's {len(layers)} linear layers, asymmetric, searched grid (RTN); d from "
               f"{a.windows}×512 calibration tokens; load: {load_now()}")
    record("Scale codes: error and bytes against fp16 group scales (SmolLM2-135M)", details, lines, a.append)


if __name__ == "__main__":
    main()
