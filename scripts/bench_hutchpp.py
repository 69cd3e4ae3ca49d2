"""Is Hutch++ worth it for per-layer traces? Error per Hessian-vector product against exact traces.

    python scripts/bench_hutchpp.py [--seeds 30] [--append]

On a tiny Llama (self-KL, float64) small enough to form every diagonal block H_ll exactly, compare
at equal numbers of HVPs (each one forward-mode + backward pass over the whole model):
* Hutchinson as hawqtool runs it: one HVP with a Rademacher vector on all layers gives one sample
  for every layer at once (cross-layer terms H_lk add variance but cost nothing);
* Hutch++ (Meyer et al. 2021) per layer: sketch Q = orth(H_ll S), exact Tr(QᵀH_ll Q), Hutchinson on
  the deflated rest. Its products must be with H_ll alone, i.e. HVPs whose vector is zero outside
  layer l, so m products per layer cost L·m HVPs for L layers.
Reported: relative RMS error of each layer's trace over seeds, median and worst over layers.
"""
from __future__ import annotations

import argparse
import platform
import statistics

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from _record import record



def setup():
    """Tiny Llama in float64 and two calibration batches."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval().double()
    g = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(0, 48, (4, 12), generator=g)}
    params = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    return model, params, batch


def hvp_fn(model, params, batch):
    """v (dict of per-layer tensors) -> Hv, the exact self-KL Hessian product (Gauss-Newton at the own point)."""
    from hawqtool.sensitivity.ggn import ggn_vector_product

    names = {id(p): n for n, p in model.named_parameters()}
    ps = {names[id(p)]: p for p in params.values()}
    key = {n: names[id(p)] for n, p in params.items()}

    def hvp(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = ggn_vector_product(model, ps, batch, {key[n]: v[n] for n in params}, "self-kl")
        return {n: out[key[n]] for n in params}

    return hvp


def exact_blocks(params, hvp) -> dict[str, torch.Tensor]:
    """Dense H_ll for every layer, one layer-restricted HVP per basis vector."""
    blocks = {}
    for n, p in params.items():
        d = p.numel()
        cols = []
        for i in range(d):
            v = {m: torch.zeros_like(q) for m, q in params.items()}
            v[n].view(-1)[i] = 1.0
            cols.append(hvp(v)[n].reshape(-1))
        blocks[n] = torch.stack(cols, dim=1)
    return blocks


def hutchinson(params, hvp, n_hvp: int, gen: torch.Generator) -> dict[str, float]:
    """hawqtool's estimator: n_hvp shared probes, one sample per layer per probe."""
    acc = {n: 0.0 for n in params}
    for _ in range(n_hvp):
        v = {n: (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype) for n, p in params.items()}
        hv = hvp(v)
        for n in params:
            acc[n] += float((v[n] * hv[n]).sum())
    return {n: a / n_hvp for n, a in acc.items()}


def hutchpp(H: torch.Tensor, m: int, gen: torch.Generator) -> float:
    """Hutch++ with m products with H (m/3 sketch, m/3 for Tr(QᵀHQ), m/3 Hutchinson on the rest)."""
    d, k = H.shape[0], max(1, m // 3)
    S = (torch.randint(0, 2, (d, k), generator=gen) * 2 - 1).to(H.dtype)
    G = (torch.randint(0, 2, (d, m - 2 * k), generator=gen) * 2 - 1).to(H.dtype)
    Q, _ = torch.linalg.qr(H @ S)
    G = G - Q @ (Q.T @ G)
    return float(torch.trace(Q.T @ H @ Q) + torch.trace(G.T @ H @ G) / max(1, G.shape[1]))


def rel_rms(est: list[float], true: float) -> float:
    return (statistics.fmean((e - true) ** 2 for e in est)) ** 0.5 / abs(true)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--append", action="store_true", help="Append the table to benchmarks/RESULTS.md.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, params, batch = setup()
    hvp = hvp_fn(model, params, batch)
    blocks = exact_blocks(params, hvp)
    true = {n: float(torch.trace(H)) for n, H in blocks.items()}
    L = len(params)
    rows = []
    for budget in (3 * L, 6 * L, 12 * L):
        hut = {n: [] for n in params}
        hpp_eq = {n: [] for n in params}
        hpp_per = {n: [] for n in params}
        for s in range(args.seeds):
            gen = torch.Generator().manual_seed(1000 + s)
            for n, e in hutchinson(params, hvp, budget, gen).items():
                hut[n].append(e)
            for n, H in blocks.items():
                hpp_eq[n].append(hutchpp(H, budget // L, gen))  # same total HVPs as Hutchinson
                hpp_per[n].append(hutchpp(H, budget, gen))  # budget products per layer: L× the HVPs
        for label, est, cost in (("Hutchinson (shared probes)", hut, budget),
                                 ("Hutch++ per layer, same HVPs", hpp_eq, budget),
                                 ("Hutch++ per layer, same products per layer", hpp_per, budget * L)):
            errs = [rel_rms(est[n], true[n]) for n in params]
            rows.append({"budget": budget, "method": label, "hvps": cost, "median": statistics.median(errs),
                         "worst": max(errs)})
            print(rows[-1], flush=True)
    lines = ["| method | HVPs | median relative RMS error | worst layer |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['hvps']} | {r['median']:.3f} | {r['worst']:.3f} |" for r in rows]
    d = sum(p.numel() for p in params.values())
    record("Hutch++ vs Hutchinson for per-layer traces",
           f"tiny Llama (2 blocks, {L} layers, {d} weights), self-KL in float64, exact H_ll from {d} layer-restricted "
           f"HVPs; {args.seeds} seeds; Python {platform.python_version()}, torch {torch.__version__}", lines, args.append)

if __name__ == "__main__":
    main()
