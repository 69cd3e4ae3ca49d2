"""Embeddings and head in the budget: SmolLM2-135M with only its tied embedding/head quantized.

    python scripts/bench_embed.py --bits 8,6,4 --append

For each width the fp32 model's input embedding (and the lm_head tied to it: one copy of the codes) is
quantized by the code `hawqtool quantize` runs for a plan made with `--embed-bits B` (quantize/embedding.py:
RTN on the searched grid, one fp16 scale per row unless --group-size, weighted by the head's input second
moments on the calibration windows), written as a real checkpoint (checkpoint.save_checkpoint; every linear
layer stays fp32) and scored through the runtime (runtime.load_quantized: QuantEmbedding lookups, the
head's logits through quant_kernels.qmatmul) on the evaluation slice. Whole-file bits per parameter and the
file size come from the checkpoint's own safetensors header (sizes.checkpoint_sizes); the last column
predicts (sizes.predict_file, exact without act-order) the whole-file bits of the same embedding beside
uniform 3-bit g128 asymmetric linear layers, the size of the default `hawqtool run --avg-bits 3.0`.

`--importance equal` weights every hidden unit alike instead (the ablation behind the default), and
`--slice valid` scores on the validation slice (60-80% of the text), where such choices are made.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from _record import cpu_name, load_now, record
from hawqtool.allocate.plan import fixed_plan
from hawqtool.checkpoint import save_checkpoint
from hawqtool.data import EVAL_FRACTION, VALID_FRACTION, calibration_windows, eval_windows
from hawqtool.embedding import embedding_plan
from hawqtool.evaluate import perplexity
from hawqtool.models import load_model, quantizable_layers, tied_head_name, weight_matrix
from hawqtool.quantize.driver import _batches
from hawqtool.quantize.embedding import head_importance, quantize_embedding
from hawqtool.runtime import load_quantized
from hawqtool.sizes import checkpoint_sizes, model_sizes, predict_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default="wiki")
    ap.add_argument("--bits", default="8,6,4", help="embedding widths, comma-separated")
    ap.add_argument("--group-size", type=int, default=-1, help="-1: one fp16 scale per row")
    ap.add_argument("--sym", action="store_true", help="symmetric codes (default asymmetric, as `run`)")
    ap.add_argument("--windows", type=int, default=40, help="512-token windows of the evaluation slice")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (`run`'s default)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--importance", choices=["head", "equal"], default="head",
                    help="grid weighting: the tied head's input second moments (what quantize does), or equal")
    ap.add_argument("--slice", choices=["eval", "valid"], default="eval")
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    base = load_model(args.model)
    tok = base.tokenizer
    windows = eval_windows(tok, args.data, 512, args.windows,
                           fraction=VALID_FRACTION if args.slice == "valid" else EVAL_FRACTION)
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(base.model).items()}
    lin3 = fixed_plan(shapes, 3, group_size=128, symmetric=args.sym)
    t0 = time.perf_counter()
    fp = perplexity(base.model, windows)
    rows = [dict(bits="fp32 (kept)", ppl=fp.ppl, sizes=model_sizes(base.model), file_mb=None,
                 with3=predict_file(base.model, lin3)["file_bits_per_param"], emb_mb=None, rel=0.0,
                 seconds=time.perf_counter() - t0)]
    print(json.dumps(dict(bits="fp32", ppl=fp.ppl, tokens=fp.tokens)), flush=True)
    batches = _batches(calibration_windows(tok, args.data, args.nsamples, args.seqlen, seed=0), 8)
    head = tied_head_name(base.model)
    t0 = time.perf_counter()
    original = base.model.get_input_embeddings().weight.detach().clone()
    d = None
    if head is not None:  # equal weights: the same search with d = 1 everywhere
        d = head_importance(base.model, head, batches) if args.importance == "head" else torch.ones(original.shape[1])
    d_seconds = time.perf_counter() - t0
    for bits in [int(b) for b in args.bits.split(",")]:
        t0 = time.perf_counter()
        with torch.no_grad():
            base.model.get_input_embeddings().weight.copy_(original)
        ep = embedding_plan(base.model, bits, args.group_size, args.sym)
        res = quantize_embedding(base.model, ep, batches, importance=d)
        with tempfile.TemporaryDirectory() as tmp:
            ck = Path(tmp) / "ckpt"
            save_checkpoint(ck, base.model, {}, layer_info={}, extra={"source_model": base.source}, tokenizer=tok,
                            embedding=res)
            sizes = checkpoint_sizes(ck)
            r = perplexity(load_quantized(ck), windows)
        lin3.embedding = ep
        rows.append(dict(bits=f"{bits}-bit", ppl=r.ppl, sizes=sizes, file_mb=sizes["file_bytes"] / 1e6,
                         with3=predict_file(base.model, lin3)["file_bits_per_param"], emb_mb=ep.storage_bytes / 1e6,
                         rel=res.rel_error, seconds=time.perf_counter() - t0))
        print(json.dumps(dict(bits=bits, ppl=r.ppl, rel_error=res.rel_error, **sizes)), flush=True)
    scales = "one fp16 scale per row" if args.group_size == -1 else f"fp16 scales per {args.group_size} hidden units"
    details = (f"machine: {cpu_name()} ({platform.machine()}), {torch.get_num_threads()} threads, torch "
               f"{torch.__version__}; embedding {'sym' if args.sym else 'asym'}, {scales}, tied head {head}; "
               + (f"importance: head inputs over {args.nsamples}×{args.seqlen} calibration tokens ({args.data}, "
                  f"first 60%, seed 0; {d_seconds:.0f} s)" if args.importance == "head" else "importance: equal")
               + f"; scored on the {args.slice} slice: {fp.tokens} predicted "
               f"tokens ({args.windows}×512), fp32 linear layers; load: {load_now()}")
    lines = ["| embedding / tied head | wiki ppl | Δ vs fp32 | rel. weighted error | whole-file bits/param (linears fp32) "
             "| safetensors MB | embedding MB (codes + scales + zeros) | whole-file bits/param beside uniform 3-bit g128 linears | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['ppl']:.3f} | {r['ppl'] - fp.ppl:+.3f} | {r['rel']:.2e} | "
                     f"{r['sizes']['file_bits_per_param']:.3f} | "
                     f"{'%.1f' % r['file_mb'] if r['file_mb'] is not None else '%.1f' % (r['sizes']['tensor_bytes'] / 1e6)} | "
                     f"{'%.2f' % r['emb_mb'] if r['emb_mb'] is not None else '%.2f' % (original.numel() * 4 / 1e6)} | "
                     f"{r['with3']:.3f} | {r['seconds']:.0f} |")
    record("Embeddings and head in the budget: SmolLM2-135M, only the tied embedding/head quantized", details, lines,
           args.append)


if __name__ == "__main__":
    main()
