"""What scale codes cost in error and save in bytes: the activation-weighted round-to-nearest error Σ d (w − q)² of
every SmolLM2 linear layer on the searched grid, with fp16 group scales and with k-bit scale codes (one fp16 step
per row, quantize/scale_codes.py), relative to fp16 scales at groups of 128. d = input second moments over
calibration windows (the calibration slice, no scored text).

    python scripts/bench_scale_codes.py --bits 2,3,4 --append
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--groups", default="64,32")
    ap.add_argument("--scale-bits", default="8,6")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--append", action="store_true")
    a = ap.parse_args()
    loaded = load_model(a.model or str(default_model_path()))
    layers = quantizable_layers(loaded.model)
    moments = input_moments(loaded.model, layers, calibration_windows(loaded.tokenizer, "wiki", a.windows, 512, seed=0))
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
