"""Which ‖Q(W)−W‖² the allocator's Ω should use, measured: mixed plans from each signal, quantized the
same way (GPTQ on the searched grid), scored on the validation slice beside uniform at the same bytes.

    python scripts/bench_alloc_signal.py --avg-bits 3.0 --signals weighted,plain --seeds 0 --append
    python scripts/bench_alloc_signal.py --signals weighted --estimator hutchinson --tune-iters 0 --append

`--scale-bits 6` gives every grouped option 6-bit scale codes (one fp16 step per row) instead of fp16 scales.
`--estimator` chooses the trace estimator of the one sensitivity report (the default's choice, issue 14: run the
script once per estimator, same signal and seeds, and compare); `--tune-iters` the quantize stage's tuning steps.

Signals: `weighted` (input-importance-weighted error of the searched grid), `plain` (unweighted
error of the searched grid), `fisher-dir` (ΔWᵀFΔW along the searched grid's real error,
sensitivity/directional.py), `uniform` (no allocation: every layer at
the largest width that fits). One sensitivity report (the `run` defaults: Fisher, self-KL, 8×256
tokens, ≤32 probes) serves all signals; it is cached in --cache, one file per estimator.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
from collections import Counter
from pathlib import Path

import torch

from _record import cpu_name, load_now, record
from hawqtool import artifacts
from hawqtool.artifacts import qerror_key
from hawqtool.allocate.plan import allocate_bits, fixed_plan, plan_specs
from hawqtool.data import EVAL_FRACTION, VALID_FRACTION, calibration_windows, eval_windows
from hawqtool.evaluate import perplexity
from hawqtool.models import load_model, quantizable_layers, weight_matrix
from hawqtool.options import SensitivityOptions
from hawqtool.sensitivity.settings import ESTIMATORS
from hawqtool.quantize.driver import QuantizeOptions, quantize_model
from hawqtool.stages import _qerrors, compute_sensitivity, layer_weights


def sensitivity(args) -> artifacts.SensitivityReport:
    groups = tuple(args.group_sizes)
    est = "" if args.estimator == "auto" else f"_{args.estimator}"
    path = Path(args.sens_file) if args.sens_file else \
        Path(args.cache) / ("sensitivity" + ("" if groups == (128,) else f"_g{'-'.join(map(str, groups))}") + est + ".json")
    if path.exists():
        return artifacts.load(path, "sensitivity")
    loaded = load_model(args.model)
    ids = calibration_windows(loaded.tokenizer, "wiki", 8, 256, seed=1)
    rep = compute_sensitivity(loaded, ids, estimator=args.estimator, max_probes=32, min_probes=8, target_rel_se=0.10,
                              qerror_bits=tuple(args.bits), qerror_groups=groups, qerror_sym=(False,),
                              first_token_weight=QuantizeOptions().first_token_weight)
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.save(rep, path)
    return rep


def directional(args, report) -> dict:
    """ΔWᵀF ΔW per layer and asymmetric g128 width (sensitivity/directional.py), cached."""
    path = Path(args.cache) / f"directional_{args.dir_probes}.json"
    if path.exists():
        return json.loads(path.read_text())
    from hawqtool.inputs import batches_of
    from hawqtool.quantize.importance import input_importance
    from hawqtool.quantize.quantizer import QuantSpec, rtn
    from hawqtool.sensitivity.directional import directional_fisher

    loaded = load_model(args.model)
    layers = quantizable_layers(loaded.model)
    ids = calibration_windows(loaded.tokenizer, "wiki", 8, 256, seed=1)
    batches = batches_of(loaded, ids, 2)
    imp = input_importance(loaded.model, layers, batches, QuantizeOptions().first_token_weight)
    dirs = {}
    for n, m in layers.items():
        W = weight_matrix(m).float()
        dirs[n] = {f"{b}/128/asym": (rtn(W, QuantSpec(b, 128), search=True, d=imp.get(n)).dequantize() - W)
                   .reshape(m.weight.shape).half() for b in report.settings["qerror_bits"]}
    res = directional_fisher(loaded.model, {n: m.weight for n, m in layers.items()}, batches, dirs,
                             probes=args.dir_probes, seed=0)
    path.write_text(json.dumps(res))
    return res


def measured(args, signal: str) -> dict:
    """{layer: {qerror key: error the quantizer leaves}} (quantize/measured.py) on the sensitivity
    calibration windows, every width and group size, asymmetric; cached."""
    path = Path(args.cache) / f"measured_{signal}_g{'-'.join(map(str, args.group_sizes))}.json"
    if path.exists():
        return json.loads(path.read_text())
    from hawqtool.inputs import batches_of
    from hawqtool.quantize.measured import measured_table
    from hawqtool.quantize.quantizer import QuantSpec

    loaded = load_model(args.model)
    ids = calibration_windows(loaded.tokenizer, "wiki", 8, 256, seed=1)
    specs = [QuantSpec(b, g) for b in args.bits for g in args.group_sizes]
    opts = {"gptq": QuantizeOptions(), "gptq-ao": QuantizeOptions(act_order=True, static_groups=True),
            "rtn-h": QuantizeOptions(method="rtn")}[signal]
    res = measured_table(loaded.model, quantizable_layers(loaded.model), batches_of(loaded, ids, 2), specs, opts)
    path.write_text(json.dumps(res))
    return res


def fill_qerrors(args, report) -> artifacts.SensitivityReport:
    """Add the weighted ‖Q(W)−W‖² of widths/group sizes the cached report lacks (same importance d as the
    sensitivity stage: its calibration windows and first-token weight), cached per option set."""
    keys = [(b, g) for b in args.bits for g in args.group_sizes]
    missing = [(b, g) for b, g in keys if qerror_key(b, g, False) not in report.layers[0].qerror]
    if not missing:
        return report
    path = Path(args.cache) / f"qerror_{'-'.join(f'{b}g{g}' for b, g in missing)}.json"
    if path.exists():
        extra = json.loads(path.read_text())
    else:
        from hawqtool.inputs import batches_of
        from hawqtool.quantize.importance import input_importance

        loaded = load_model(args.model)
        layers = quantizable_layers(loaded.model)
        ids = calibration_windows(loaded.tokenizer, "wiki", 8, 256, seed=1)
        imp = input_importance(loaded.model, layers, batches_of(loaded, ids, 2), QuantizeOptions().first_token_weight)
        extra = {n: {k: v for b, g in missing
                     for k, v in _qerrors(weight_matrix(m), (b,), (g,), imp.get(n), (False,)).items()}
                 for n, m in layers.items()}
        path.write_text(json.dumps(extra))
    rep = copy.deepcopy(report)
    for ls in rep.layers:
        ls.qerror = {**ls.qerror, **extra[ls.name]}
    return rep


def with_signal(report, signal: str, weights: dict, args) -> artifacts.SensitivityReport:
    if signal == "weighted":
        return report
    rep = copy.deepcopy(report)
    if signal in ("gptq", "gptq-ao", "rtn-h"):  # the error the quantizer leaves, with each layer's full input H
        table = measured(args, signal)
        for ls in rep.layers:
            ls.qerror = {**ls.qerror, **table[ls.name]}
        return rep
    if signal == "fisher-dir":  # Ω = ΔWᵀFΔW: qerror scaled so that trace/n · qerror gives it
        dirf = directional(args, report)
        for ls in rep.layers:
            ls.qerror = {k: v[0] * ls.n_params / max(ls.trace, 1e-30) for k, v in dirf[ls.name].items()}
        return rep
    for ls in rep.layers:  # plain: the same searched grid without input weights
        ls.qerror = _qerrors(weights[ls.name], tuple(report.settings["qerror_bits"]), tuple(args.group_sizes), None)
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--avg-bits", type=float, default=3.0)
    ap.add_argument("--bits", type=lambda s: [int(b) for b in s.split(",")], default=[2, 3, 4, 8])
    ap.add_argument("--max-bpw", type=float, default=None,
                    help="budget in bits per linear weight, scales and zeros included (instead of --avg-bits)")
    ap.add_argument("--group-sizes", type=lambda s: [int(g) for g in s.split(",")], default=[128])
    ap.add_argument("--signals", default="weighted,plain,uniform")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--cache", default="/tmp/hawq-alloc-signal")
    ap.add_argument("--dir-probes", type=int, default=16, help="probes of the fisher-dir signal")
    ap.add_argument("--act-order", action="store_true", help="quantize with act-order onto static groups")
    ap.add_argument("--slice", choices=["valid", "eval"], default="valid",
                    help="valid (60-80%% of the text: for choosing) or eval (last 20%%: for reporting)")
    ap.add_argument("--sens-file", default=None, help="a cached sensitivity report to use (widths/group sizes it "
                    "lacks are measured with the same input importance)")
    ap.add_argument("--estimator", default=SensitivityOptions().estimator, choices=("auto", *ESTIMATORS),
                    help="the sensitivity report's trace estimator (auto: what the sensitivity stage picks)")
    ap.add_argument("--tune-iters", type=int, default=QuantizeOptions().tune_iters,
                    help="block tuning steps after GPTQ (0: GPTQ alone, about 10x quicker)")
    ap.add_argument("--nsamples", type=int, default=QuantizeOptions().nsamples, help="calibration windows of 512 tokens")
    ap.add_argument("--scale-bits", type=int, default=16, help="16: fp16 group scales; 4..8: scale codes")
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args()
    Path(args.cache).mkdir(parents=True, exist_ok=True)  # also where --sens-file's missing options are cached
    report = fill_qerrors(args, sensitivity(args))
    base = load_model(args.model)
    weights = layer_weights(base)
    windows = eval_windows(base.tokenizer, "wiki", 512, args.windows,
                           fraction=VALID_FRACTION if args.slice == "valid" else EVAL_FRACTION)
    fp = perplexity(base.model, windows)
    rows = []
    for signal in args.signals.split(","):
        if signal.startswith("uniform"):  # uniform[:BITS[:GROUP]]
            _, ub, ug = (signal.split(":") + [str(int(args.avg_bits)), "128"])[:3] if ":" in signal else \
                ("", str(int(args.avg_bits)), "128")
            shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(base.model).items()}
            plan = fixed_plan(shapes, int(ub), group_size=int(ug), scale_bits=args.scale_bits)
        else:
            n_lin = sum(ls.n_params for ls in report.layers)
            plan = allocate_bits(with_signal(report, signal, weights, args), lambda: weights,
                                 avg_bits=None if args.max_bpw else args.avg_bits,
                                 max_bytes=args.max_bpw * n_lin / 8 if args.max_bpw else None,
                                 bit_choices=tuple(args.bits), group_sizes=args.group_sizes, scale_bits=args.scale_bits)
        hist = dict(sorted(Counter(f"{lp.bits}g{lp.group_size}" if len(args.group_sizes) > 1 else lp.bits
                                   for lp in plan.layers).items()))
        ppls = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            loaded = load_model(args.model)
            calib = calibration_windows(loaded.tokenizer, "wiki", args.nsamples, 512, seed=seed)
            quantize_model(loaded.model, plan_specs(plan), calib, QuantizeOptions(
                act_order=args.act_order, static_groups=args.act_order, tune_iters=args.tune_iters))
            ppls.append(perplexity(loaded.model, windows).ppl)
            print(json.dumps(dict(signal=signal, seed=seed, ppl=ppls[-1], avg_bits=plan.avg_bits, bits=hist)), flush=True)
        rows.append(dict(signal=signal, ppls=ppls, avg_bits=plan.avg_bits, bits=hist))
    details = (f"machine: {cpu_name()} ({platform.machine()}), {torch.get_num_threads()} threads, torch {torch.__version__}; "
               + (f"budget {args.max_bpw} bits per linear weight" if args.max_bpw else f"budget avg {args.avg_bits} bits (g128 asym)")
               + f"; sensitivity: {report.settings.get('estimator', args.estimator)} estimator, {report.settings.get('objective', 'self-kl')}"
               + f"; widths {args.bits}, group sizes {args.group_sizes}, asymmetric, "
               + ("fp16 scales" if args.scale_bits == 16 else f"{args.scale_bits}-bit scale codes") + f"; GPTQ{' act-order, static groups' if args.act_order else ''} on the searched grid"
               f" + {args.tune_iters} tuning steps, {args.nsamples}×512 "
               f"calibration tokens (seeds {args.seeds}); scored on the {'validation' if args.slice == 'valid' else 'evaluation'} slice ({fp.tokens} tokens, baseline "
               f"ppl {fp.ppl:.3f}); load: {load_now()}")
    lines = ["| Ω signal | avg bits | layers per width | ppl per seed | median |", "|---|---|---|---|---|"]
    lines += [f"| {r['signal']} | {r['avg_bits']:.3f} | {r['bits']} | {' / '.join(f'{p:.2f}' for p in r['ppls'])} | "
              f"{statistics.median(r['ppls']):.2f} |" for r in rows]
    record("Allocation signal: weighted vs plain ‖Q(W)−W‖² (SmolLM2-135M)", details, lines, args.append)


if __name__ == "__main__":
    main()
