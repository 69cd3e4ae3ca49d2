"""Importance-weighted fitting of ggml block grids (the scales and mins a GGUF layer stores).

fit_grid chooses, per row and block, the stored quantities of a ggml type so that Σ_j d_j (w_j − ŵ_j)² is
small, d = per-input importance (diag of the input second moments, llama.cpp's imatrix). The search does what
llama.cpp's imatrix quantizers do, on our objective directly: per group many candidate step sizes (and, for
types with a min, three anchorings of the range), each refitted by weighted least squares with the rounded
codes; for the K-quants then the super-block scale(s) by a weighted search over the quantized 6-/4-/8-bit
sub-block scales, and finally alternating refinements with the stored (quantized) values: per group the best
nearby integer sub-scale (and min), per super-block the least-squares d (and dmin), each kept only where the
weighted error drops. Everything is vectorised over rows and blocks (loops run over candidates only).
search=False gives ggml's own reference rule instead (ggml_ref.py). Byte layout and exact dequantization:
ggml_pack.py (re-exported here).
"""
from __future__ import annotations

import torch

from .ggml_pack import SHIFT, SUB_RANGE, GGMLGrid, dequantize_grid, grid_codes, is_symmetric, pack_grid, unpack_grid
from .ggml_ref import reference_quantize
from .ggml_types import GGMLType

__all__ = ["GGMLGrid", "fit_grid", "grid_codes", "dequantize_grid", "pack_grid", "unpack_grid", "quantize_rtn"]

CHUNK = {"cpu": 1 << 18, "cuda": 1 << 24}  # weights per row chunk: CPU caches like small ones, GPUs big ones
REFINE = 3       # alternating refinement rounds


def _lin(a: float, b: float, n: int) -> list[float]:
    """n evenly spaced candidate values from a to b."""
    return torch.linspace(a, b, n, device="cpu").tolist()


# candidate grids per type: (fine, broad). fine: step counts maxq + δ (code units) across the range from its
# low end (affine) or with the largest weight on the wider side (symmetric); broad: step counts maxq * r
# (r > 1 clips the extremes), anchored low, centred and high (affine) or on either side (symmetric)
GROUP_CANDIDATES = {"Q8_0": (_lin(-0.5, 1.5, 5), []), "Q5_0": (_lin(-1, 1, 11), _lin(0.9, 1.5, 7)),
                    "Q4_0": (_lin(-1, 1, 11), _lin(0.85, 1.6, 8)), "Q5_1": (_lin(-1.5, 1.5, 31), _lin(0.9, 1.4, 11)),
                    "Q4_1": (_lin(-1, 1, 11), _lin(0.85, 1.5, 14)), "Q6_K": (_lin(-1, 1, 11), _lin(0.9, 1.3, 5)),
                    "Q5_K": (_lin(-1.5, 1.5, 16), _lin(0.9, 1.4, 11)), "Q4_K": (_lin(-1, 1, 11), _lin(0.85, 1.5, 14)),
                    "Q3_K": (_lin(-1, 1, 11), _lin(0.75, 1.8, 12)), "Q2_K": (_lin(-0.9, 0.9, 10), _lin(0.7, 2.0, 12))}
SUPER_CANDIDATES = sorted(_lin(0.75, 1.3, 24) + [1.0])  # super-block scale: the largest sub-scale at hi * r steps


def _f16(x: torch.Tensor) -> torch.Tensor:
    """float32 values as stored in float16 (finite)."""
    return x.clamp(-65504.0, 65504.0).to(torch.float16).float()


def _ident(x: torch.Tensor) -> torch.Tensor:
    """No rounding (K-quant group scales are quantized later, relative to their super-block)."""
    return x


def _nz(x: torch.Tensor) -> torch.Tensor:
    """x with zeros replaced by ones (safe divisor; callers mask those entries)."""
    return torch.where(x == 0, torch.ones_like(x), x)


def _codes(X: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """Nearest integer c in [lo, hi] per weight for value a*c - b per group (0 where a = 0)."""
    ia = torch.where(a == 0, torch.zeros_like(a), 1 / _nz(a))[..., None]
    num = X if b is None else X + b[..., None]
    return torch.clamp(torch.round(num * ia), lo, hi)


def _err(X: torch.Tensor, D: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, c: torch.Tensor) -> torch.Tensor:
    """Σ D (x − (a c − b))² per group."""
    r = X - a[..., None] * c
    if b is not None:
        r = r + b[..., None]
    return (D * r * r).sum(-1)


def _sums(X: torch.Tensor, D: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Σ D c, Σ D c², Σ D x c per group (the least-squares statistics of codes c)."""
    Dc = D * c
    return Dc.sum(-1), (Dc * c).sum(-1), (Dc * X).sum(-1)


def _ls_affine(X: torch.Tensor, D: torch.Tensor, c: torch.Tensor, nonneg_b: bool,
               fallback: tuple[torch.Tensor, torch.Tensor], stats: tuple | None = None):
    """Weighted least squares a, b of x ≈ a c − b per group (b ≥ 0 if nonneg_b), the fallback where it is not
    solvable or a ≤ 0, and the weighted error of (quant-rounded) a, b with these codes in closed form."""
    sw, sx, sxx = stats if stats is not None else (D.sum(-1), (D * X).sum(-1), (D * X * X).sum(-1))
    sw = sw.expand(c.shape[:-1])
    sl, sll, sxl = _sums(X, D, c)
    det = sw * sll - sl * sl
    ok = det > 1e-12 * sw * sll
    a = (sw * sxl - sx * sl) / _nz(det)
    m = (sll * sx - sl * sxl) / _nz(det)  # the additive offset
    if nonneg_b:
        pos = m > 0
        a = torch.where(pos, sxl / _nz(sll), a)
        m = torch.where(pos, torch.zeros_like(m), m)
        ok = ok | (pos & (sll > 0))
    ok = ok & (a > 0) & torch.isfinite(a) & torch.isfinite(m)
    a, b = torch.where(ok, a, fallback[0]), torch.where(ok, -m, fallback[1])

    def err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sxx + a * a * sll + b * b * sw - 2 * a * sxl + 2 * b * sx - 2 * a * b * sl
    return a, b, ok, err


def _ls_scale(X: torch.Tensor, D: torch.Tensor, c: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Weighted least squares a of x ≈ a c per group (fallback where Σ D c² = 0)."""
    Dc = D * c
    den = (Dc * c).sum(-1)
    return torch.where(den > 0, (Dc * X).sum(-1) / _nz(den), fallback)


def _fit_groups(X: torch.Tensor, D: torch.Tensor, t: GGMLType, quant, nonneg_b: bool):
    """Per-group (a, b) (b None for symmetric types) of value a*c − b minimising the weighted error over the
    candidate grids, each refitted by least squares; quant rounds (a, b) to what is stored (float16 or nothing).
    Candidates are scored in closed form from their codes' least-squares sums."""
    fine, broad = GROUP_CANDIDATES[t.name]
    sxx = (D * X * X).sum(-1)
    if is_symmetric(t):
        z = SHIFT[t.name]
        amax, idx = X.abs().max(dim=-1)
        xm = X.gather(-1, idx[..., None]).squeeze(-1)
        xm = torch.where(amax > 0, xm, torch.ones_like(xm))
        best_a, best_e = torch.zeros_like(xm), sxx
        taus = ([-(z + f) for f in fine] + [z - 1 + f for f in fine]
                + [-z * r for r in broad] + [(z - 1) * r for r in broad])
        for tau in taus:  # the largest weight at code tau
            ia = tau / xm
            c = torch.clamp(torch.round(X * ia[..., None]), -z, z - 1)
            _, scc, sxc = _sums(X, D, c)
            a = quant(torch.where(scc > 0, sxc / _nz(scc), 1 / ia))
            e = sxx - 2 * a * sxc + a * a * scc
            upd = (e < best_e) & (amax > 0)
            best_a, best_e = torch.where(upd, a, best_a), torch.where(upd, e, best_e)
        return best_a, None
    maxq = t.maxq
    lo = X.amin(-1).clamp(max=0) if nonneg_b else X.amin(-1)
    span = X.amax(-1) - lo
    flat = span <= 0
    span = torch.where(flat, torch.ones_like(span), span)
    a, b = quant(torch.where(flat, torch.zeros_like(span), span / maxq)), quant(-lo)
    best_a, best_b = a, b
    best_e = _err(X, D, a, b, _codes(X, a, b, 0, maxq))
    stats = (D.sum(-1), (D * X).sum(-1), sxx)
    Xs = (X - lo[..., None]) / span[..., None]
    cands = [(0.0, 1 + f / maxq) for f in fine] + [(anchor, r) for anchor in (0.0, 0.5, 1.0) for r in broad]
    for anchor, r in cands:
        c = torch.clamp(torch.round(Xs * (maxq * r) + anchor * maxq * (1 - r)), 0, maxq)
        a, b, ok, err = _ls_affine(X, D, c, nonneg_b, (best_a, best_b), stats)
        a, b = quant(a), quant(b)
        e = err(a, b)
        upd = ok & (e < best_e) & ~flat
        best_a, best_b, best_e = (torch.where(upd, a, best_a), torch.where(upd, b, best_b),
                                  torch.where(upd, e, best_e))
    return best_a, best_b


def _refine_groups(X: torch.Tensor, D: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, lo: int, hi: int,
                   quant, nonneg_b: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Alternate nearest codes and a least-squares (a, b) refit rounded by quant, per group where it helps."""
    e = _err(X, D, a, b, _codes(X, a, b, lo, hi))
    for _ in range(REFINE):
        c = _codes(X, a, b, lo, hi)
        if b is None:
            a2, b2 = quant(_ls_scale(X, D, c, a)), None
        else:
            a2, b2, _, _ = _ls_affine(X, D, c, nonneg_b, (a, b))
            a2, b2 = quant(a2), quant(b2)
        e2 = _err(X, D, a2, b2, _codes(X, a2, b2, lo, hi))
        upd = e2 < e
        a, e = torch.where(upd, a2, a), torch.where(upd, e2, e)
        if b is not None:
            b = torch.where(upd, b2, b)
    return a, b


def _super_scale(v: torch.Tensor, A: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 super-block scale S [..] and integer sub-scales l in [lo, hi] [.., groups] minimising
    Σ A (v − S l)² (v: the groups' ideal scales or mins, A: how much each group's error grows with them)."""
    amax, idx = v.abs().max(dim=-1)
    vm = v.gather(-1, idx[..., None]).squeeze(-1)
    nz = amax > 0
    vm = torch.where(nz, vm, torch.ones_like(vm))
    best_S, best_l, best_e = torch.zeros_like(vm), torch.zeros_like(v), (A * v * v).sum(-1)
    taus = [hi * r for r in SUPER_CANDIDATES] + ([lo * r for r in SUPER_CANDIDATES] if lo < 0 else [])
    for tau in taus:
        S = _f16(vm / tau)
        for it in range(2):
            l = torch.clamp(torch.round(v / _nz(S)[..., None]), lo, hi)
            e = (A * (v - S[..., None] * l) ** 2).sum(-1)
            upd = (e < best_e) & nz & (S != 0)
            best_S, best_l, best_e = (torch.where(upd, S, best_S), torch.where(upd[..., None], l, best_l),
                                      torch.where(upd, e, best_e))
            if it == 0:
                S = _f16(_ls_scale(v, A, l, S))
    return best_S, best_l


def _fit_kquant(X: torch.Tensor, D: torch.Tensor, t: GGMLType) -> dict[str, torch.Tensor]:
    """Fields of a K-quant for X [R, NB, NG, GS] with importance D [NB, NG, GS]."""
    sym = is_symmetric(t)
    lo, hi = (-SHIFT[t.name], SHIFT[t.name] - 1) if sym else (0, t.maxq)
    slo, shi = SUB_RANGE[t.name]
    if t.name == "Q3_K":
        slo, shi = -32, 31  # stored sc - 32
    a, b = _fit_groups(X, D, t, _ident, nonneg_b=True)
    a, b = _refine_groups(X, D, a, b, lo, hi, _ident, True)
    c = _codes(X, a, b, lo, hi)
    S1, l1 = _super_scale(a, (D * c * c).sum(-1), slo, shi)
    S2, l2 = (None, None) if sym else _super_scale(b, D.sum(-1).expand_as(b), 0, shi)

    def params(S1, l1, S2, l2):
        """Per-group multiplier d*sc and subtracted min dmin*m (float32 products, as ggml forms them)."""
        return S1[..., None] * l1, (None if sym else S2[..., None] * l2)

    for _ in range(REFINE):
        # per group: the best of the current and the nearest integer sub-scales (and mins) to the LS optimum
        ga, gb = params(S1, l1, S2, l2)
        c = _codes(X, ga, gb, lo, hi)
        if sym:
            opt = _ls_scale(X, D, c, ga)
            f1 = torch.floor(opt / _nz(S1)[..., None])
            cands = [(l1, None)] + [(torch.clamp(f1 + k, slo, shi), None) for k in (0, 1)]
        else:
            oa, ob, _, _ = _ls_affine(X, D, c, True, (ga, gb))
            f1, f2 = torch.floor(oa / _nz(S1)[..., None]), torch.floor(ob / _nz(S2)[..., None])
            cands = [(l1, l2)] + [(torch.clamp(f1 + i, slo, shi), torch.clamp(f2 + k, 0, shi))
                                  for i in (0, 1) for k in (0, 1)]
        errs = []
        for c1, c2 in cands:
            pa, pb = params(S1, c1, S2, c2)
            errs.append(_err(X, D, pa, pb, _codes(X, pa, pb, lo, hi)))
        best = torch.stack(errs).argmin(0)
        l1 = torch.stack([c1 for c1, _ in cands]).gather(0, best[None]).squeeze(0)
        if not sym:
            l2 = torch.stack([c2 for _, c2 in cands]).gather(0, best[None]).squeeze(0)
        # per super-block: the least-squares d (and dmin) for these sub-scales and codes
        ga, gb = params(S1, l1, S2, l2)
        c = _codes(X, ga, gb, lo, hi)
        e = _err(X, D, ga, gb, c).sum(-1)
        u = l1[..., None] * c
        Du = D * u
        Suu, Sxu = (Du * u).sum((-1, -2)), (Du * X).sum((-1, -2))
        if sym:
            n1, n2 = _f16(torch.where(Suu > 0, Sxu / _nz(Suu), S1)), None
        else:
            Dsum, DX = D.sum(-1), (D * X).sum(-1)
            Suv, Svv = (Du.sum(-1) * l2).sum(-1), (Dsum * l2 * l2).sum(-1)
            Sxv = (DX * l2).sum(-1)
            det = Suu * Svv - Suv * Suv
            ok = det > 1e-12 * Suu * Svv
            n1 = torch.where(ok, (Sxu * Svv - Sxv * Suv) / _nz(det), Sxu / _nz(Suu))
            n2 = torch.where(ok, (Suv * Sxu - Suu * Sxv) / _nz(det), S2)
            ok2 = (n1 > 0) & (n2 >= 0)
            n1, n2 = _f16(torch.where(ok2, n1, S1)), _f16(torch.where(ok2, n2, S2))
        pa, pb = params(n1, l1, n2, l2)
        upd = _err(X, D, pa, pb, _codes(X, pa, pb, lo, hi)).sum(-1) < e
        S1 = torch.where(upd, n1, S1)
        if not sym:
            S2 = torch.where(upd, n2, S2)
    l1 = torch.where(S1[..., None] == 0, torch.zeros_like(l1), l1)
    if sym:
        return {"d": S1, "sc": (l1 + (32 if t.name == "Q3_K" else 0)).to(torch.int32)}
    l2 = torch.where(S2[..., None] == 0, torch.zeros_like(l2), l2)
    return {"d": S1, "dmin": S2, "sc": l1.to(torch.int32), "m": l2.to(torch.int32)}


def _fit_legacy(X: torch.Tensor, D: torch.Tensor, t: GGMLType) -> dict[str, torch.Tensor]:
    """Fields of a legacy type for blocks X [R, NB, 32] with importance D [NB, 32]."""
    sym = is_symmetric(t)
    lo, hi = (-SHIFT[t.name], SHIFT[t.name] - 1) if sym else (0, t.maxq)
    a, b = _fit_groups(X, D, t, _f16, nonneg_b=False)
    a, b = _refine_groups(X, D, a, b, lo, hi, _f16, False)
    return {"d": a} if sym else {"d": a, "m": -b}


def _importance(d: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Per-input weights: d clamped at 0 (NaN -> 0); all ones when None or all zero."""
    if d is None:
        return torch.ones(n, device=device)
    d = torch.nan_to_num(d.detach().float().to(device).reshape(-1), nan=0.0, posinf=0.0).clamp(min=0)
    if d.numel() != n:
        raise ValueError(f"importance d has {d.numel()} entries for rows of {n} weights")
    return d if float(d.sum()) > 0 else torch.ones_like(d)


def _row_chunks(W: torch.Tensor) -> list[slice]:
    """Row ranges of about CHUNK weights each."""
    step = max(1, CHUNK.get(W.device.type, CHUNK["cpu"]) // W.shape[1])
    return [slice(r, r + step) for r in range(0, W.shape[0], step)]


def _reference(W: torch.Tensor, t: GGMLType) -> tuple[torch.Tensor, GGMLGrid]:
    """ggml's reference quantizer (ggml_ref.py) over row chunks."""
    parts = [reference_quantize(W[rows], t) for rows in _row_chunks(W)]
    fields = {k: torch.cat([g.fields[k] for _, g in parts]) for k in parts[0][1].fields}
    return torch.cat([q for q, _ in parts]), GGMLGrid(t, fields)


def _check(W: torch.Tensor, t: GGMLType) -> torch.Tensor:
    """W as a float32 matrix whose rows tile into t's blocks (ValueError otherwise)."""
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {list(W.shape)}")
    if not t.fits(W.shape[1]):
        raise ValueError(f"{t.name} needs rows that are a multiple of {t.block}, got {W.shape[1]}")
    return W.detach().float()


def fit_grid(W: torch.Tensor, t: GGMLType, d: torch.Tensor | None = None, *, search: bool = True) -> GGMLGrid:
    """The grid (stored scales/mins) of type t for W [out, in] minimising Σ_j d_j (w_j − ŵ_j)² per row
    (d [in] per-input importance, None = equal); search=False: ggml's reference rule (no importance)."""
    W = _check(W, t)
    if not search:
        return _reference(W, t)[1]
    nb = W.shape[1] // t.block
    shape = (nb, t.block // t.group, t.group) if t.is_kquant else (nb, t.block)
    D = _importance(d, W.shape[1], W.device).reshape(shape)
    fit = _fit_kquant if t.is_kquant else _fit_legacy
    parts = [fit(W[rows].reshape((-1,) + shape), D, t) for rows in _row_chunks(W)]
    return GGMLGrid(t, {k: torch.cat([p[k] for p in parts]) for k in parts[0]})


def quantize_rtn(W: torch.Tensor, t: GGMLType, d: torch.Tensor | None = None, *,
                 search: bool = True) -> tuple[torch.Tensor, GGMLGrid]:
    """Codes int32 [out, in] and grid of round-to-nearest onto the fitted grid (RTN, the allocator's error
    table); search=False gives ggml's reference quantizer exactly (its own code rounding included)."""
    W = _check(W, t)
    if not search:
        return _reference(W, t)
    grid = fit_grid(W, t, d)
    return grid_codes(W, grid), grid
