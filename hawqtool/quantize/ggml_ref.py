"""ggml's plain reference quantizers (quantize_row_*_ref, no importance matrix), vectorised in torch.

The baseline that fit_grid(search=False) reproduces: for the legacy types the same bytes as gguf.quants.quantize
(same float32 operations, same rounding: trunc(x + 8.5) for Q4_0, round-half-away for Q8_0); for the K-quants
the same algorithms as ggml-quants.c (make_qkx2_quants, make_q3_quants, make_qx_quants, then sub-block scales
relative to the super-block maximum), up to float summation order.
"""
from __future__ import annotations

import numpy as np
import torch

from .ggml_pack import GGMLGrid
from .ggml_types import GGMLType

GROUP_MAX_EPS = 1e-15


def _f16(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to float16 (as ggml stores d, dmin, m)."""
    return x.to(torch.float16).float()


def _f32(v: float) -> float:
    """A scalar computed in float32 arithmetic as the C code does (e.g. nmax + 0.1f*is)."""
    return float(np.float32(v))


def _rdiv(num: float, x: torch.Tensor) -> torch.Tensor:
    """num / x as one correctly rounded float32 division (torch's `scalar / tensor` multiplies by 1/x)."""
    return torch.full_like(x, num) / x


def _inv(x: torch.Tensor) -> torch.Tensor:
    """1/x, 0 where x == 0 (ggml's `id = d ? 1/d : 0`)."""
    return torch.where(x == 0, torch.zeros_like(x), _rdiv(1.0, torch.where(x == 0, torch.ones_like(x), x)))


def _signed_absmax(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per last-axis |max| and the signed value attaining it (first occurrence, as ggml's strict `>` scan)."""
    amax, idx = X.abs().max(dim=-1)
    return amax, X.gather(-1, idx[..., None]).squeeze(-1)


def _legacy(X: torch.Tensor, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Codes and fields of the legacy reference rules on blocks X [out, nb, 32] (gguf.quants' exact arithmetic)."""
    if name in ("Q4_0", "Q5_0"):
        half = 8 if name == "Q4_0" else 16
        _, mx = _signed_absmax(X)
        d = mx / -half
        q = torch.trunc(X * _inv(d)[..., None] + (half + 0.5)).clamp(0, 2 * half - 1)
        return q, {"d": _f16(d)}
    if name in ("Q4_1", "Q5_1"):
        maxq = 15 if name == "Q4_1" else 31
        mn, mx = X.amin(-1), X.amax(-1)
        d = (mx - mn) / maxq
        q = torch.trunc((X - mn[..., None]) * _inv(d)[..., None] + 0.5).clamp(0, maxq)
        return q, {"d": _f16(d), "m": _f16(mn)}
    d = X.abs().amax(-1) / 127  # Q8_0: round half away from zero, exactly as gguf's np_roundf
    v = X * _inv(d)[..., None]
    a = v.abs()
    fl = torch.floor(a)
    r = torch.sign(v) * (fl + torch.floor(2 * (a - fl)))
    return r + 128, {"d": _f16(d)}


def _seq(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis in sequential order, as ggml's C loops add (bit-equal float32 results)."""
    acc = x[..., 0].clone()
    for i in range(1, x.shape[-1]):
        acc += x[..., i]
    return acc


def _qkx2(X: torch.Tensor, Wt: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
          use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants per group (last axis): scale, the_min (>= 0; value = scale*L - the_min) and codes L."""
    mn = X.amin(-1).clamp(max=0)
    mx = X.amax(-1)
    sum_w, sum_x = _seq(Wt), _seq(Wt * X)
    flat = mx == mn
    one = torch.ones_like(mx)

    def err(s: torch.Tensor, m: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        diff = s[..., None] * L + m[..., None] - X
        return _seq(Wt * (diff.abs() if use_mad else diff * diff))

    iscale = _rdiv(nmax, torch.where(flat, one, mx - mn))
    scale, the_min = _rdiv(1.0, iscale), mn
    L = torch.clamp(torch.round(iscale[..., None] * (X - mn[..., None])), 0, nmax)
    best = err(scale, the_min, L)
    for i in range(nstep + 1):  # as in ggml, each candidate's range starts at the best min so far
        span = torch.where(flat, one, mx - the_min)
        iscale = _rdiv(_f32(np.float32(rmin) + np.float32(rdelta) * np.float32(i) + np.float32(nmax)), span)
        La = torch.clamp(torch.round(iscale[..., None] * (X - the_min[..., None])), 0, nmax)
        WL = Wt * La
        sl, sl2, sxl = _seq(WL), _seq(WL * La), _seq(WL * X)
        D = sum_w * sl2 - sl * sl
        Ds = torch.where(D > 0, D, torch.ones_like(D))
        s = (sum_w * sxl - sum_x * sl) / Ds
        m = (sl2 * sum_x - sl * sxl) / Ds
        pos = m > 0
        m = torch.where(pos, torch.zeros_like(m), m)
        s = torch.where(pos, sxl / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), s)
        cur = err(s, m, La)
        upd = (D > 0) & (cur < best)
        best = torch.where(upd, cur, best)
        scale, the_min = torch.where(upd, s, scale), torch.where(upd, m, the_min)
        L = torch.where(upd[..., None], La, L)
    zero = torch.zeros_like(scale)
    the_min = torch.where(flat, mn, the_min)
    return torch.where(flat, zero, scale), -the_min, torch.where(flat[..., None], torch.zeros_like(L), L)


def _qx(X: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(rmse_type=1, no weights) per group: signed scale and unsigned codes L (value scale*(L-nmax))."""
    amax, mx = _signed_absmax(X)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = X * X

    def trial(t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lv = torch.clamp(torch.round(_rdiv(-t, mx)[..., None] * X), -nmax, nmax - 1)
        return lv, _seq(w * X * lv), _seq(w * lv * lv)

    L, slx, sl2 = trial(float(nmax))
    scale = torch.where(sl2 != 0, slx / torch.where(sl2 != 0, sl2, torch.ones_like(sl2)), torch.zeros_like(slx))
    best = scale * slx
    for i in [i for i in range(-9, 10) if i]:
        lv, slx, sl2 = trial(_f32(np.float32(nmax) + np.float32(0.1) * np.float32(i)))
        upd = (sl2 > 0) & (slx * slx > best * sl2)
        s = slx / torch.where(sl2 > 0, sl2, torch.ones_like(sl2))
        scale, best = torch.where(upd, s, scale), torch.where(upd, s * slx, best)
        L = torch.where(upd[..., None], lv, L)
    L = torch.where(zero[..., None], torch.zeros_like(L), L + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), L


def _q3(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(nmax=4, do_rmse) per group: signed scale and unsigned codes (value scale*(L-4)); its
    sequential per-weight coordinate descent runs vectorised over groups, one weight position at a time."""
    amax, mx = _signed_absmax(X)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    L = torch.clamp(torch.round(_rdiv(-4.0, mx)[..., None] * X), -4, 3)
    w = X * X
    slx_all, sl2_all = _seq(w * X * L), _seq(w * L * L)
    for _ in range(5):
        for i in range(X.shape[-1]):
            x, wi, li = X[..., i], w[..., i], L[..., i]
            slx = slx_all - wi * x * li
            sl2 = sl2_all - wi * li * li
            ok = slx > 0
            new = torch.clamp(torch.round(x * sl2 / torch.where(ok, slx, torch.ones_like(slx))), -4, 3)
            slx_n, sl2_n = slx + wi * x * new, sl2 + wi * new * new
            acc = ok & (new != li) & (sl2_n > 0) & (slx_n * slx_n * sl2_all > slx_all * slx_all * sl2_n)
            L[..., i] = torch.where(acc, new, li)
            slx_all, sl2_all = torch.where(acc, slx_n, slx_all), torch.where(acc, sl2_n, sl2_all)
    scale = torch.where(sl2_all > 0, slx_all / torch.where(sl2_all > 0, sl2_all, torch.ones_like(sl2_all)),
                        torch.zeros_like(slx_all))
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero[..., None], torch.zeros_like(L), L + 4)


def _sub_codes(X: torch.Tensor, L: torch.Tensor, dq: torch.Tensor, dm: torch.Tensor | None, lo: int,
               hi: int) -> torch.Tensor:
    """ggml's requantization with the stored sub-block scales: nearest_int((x + dm)/dq) clamped (x/dq for
    symmetric types, shifted by -lo), keeping the group's first codes where dq == 0."""
    nz = dq != 0
    num = X if dm is None else X + dm[..., None]
    new = torch.clamp(torch.round(num / torch.where(nz, dq, torch.ones_like(dq))[..., None]), lo, hi) - lo
    return torch.where(nz[..., None], new, L)


def _kquant(X: torch.Tensor, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Codes [out, nb, groups, group] and fields of the K-quant reference rules on X of that shape."""
    if name in ("Q2_K", "Q4_K", "Q5_K"):
        if name == "Q2_K":
            nmax, smax = 3, 15
            scales, mins, L = _qkx2(X, X.abs(), 3, -0.5, 0.1, 15, True)
        else:
            nmax, smax = (15, 63) if name == "Q4_K" else (31, 63)
            av_x = torch.sqrt((_seq(X * X) / X.shape[-1]).double()).float()  # torch's float32 sqrt is inexact
            rmin, nstep = (-1.0, 20) if name == "Q4_K" else (-0.5, 15)
            scales, mins, L = _qkx2(X, av_x[..., None] + X.abs(), nmax, rmin, 0.1, nstep, False)
        max_scale = scales.amax(-1).clamp(min=0) + 0.0  # + 0.0: ggml starts its max at +0, never -0
        max_min = mins.amax(-1).clamp(min=0) + 0.0
        i_s = torch.where(max_scale > 0, _rdiv(smax, torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale))), 0.0)
        i_m = torch.where(max_min > 0, _rdiv(smax, torch.where(max_min > 0, max_min, torch.ones_like(max_min))), 0.0)
        sc = torch.round(i_s[..., None] * scales).clamp(0, smax)
        m = torch.round(i_m[..., None] * mins).clamp(0, smax)
        d, dmin = _f16(max_scale / smax), _f16(max_min / smax)
        q = _sub_codes(X, L, d[..., None] * sc, dmin[..., None] * m, 0, nmax)
        return q, {"d": d, "dmin": dmin, "sc": sc.to(torch.int32), "m": m.to(torch.int32)}
    if name == "Q6_K":
        scales, L = _qx(X, 32)
        amax, mx = _signed_absmax(scales)
        zero = amax < GROUP_MAX_EPS
        iscale = _rdiv(-128.0, torch.where(zero, torch.ones_like(mx), mx))
        d = torch.where(zero, torch.zeros_like(mx), _f16(_rdiv(1.0, iscale)))
        sc = torch.round(iscale[..., None] * scales).clamp(max=127)
        sc = torch.where(zero[..., None], torch.zeros_like(scales), sc)
        q = _sub_codes(X, L, d[..., None] * sc, None, -32, 31)
        q = torch.where(zero[..., None, None], torch.zeros_like(q), q)
        return q, {"d": d, "sc": sc.to(torch.int32)}
    scales, L = _q3(X)  # Q3_K
    _, mx = _signed_absmax(scales)
    zero = mx == 0
    iscale = _rdiv(-32.0, torch.where(zero, torch.ones_like(mx), mx))
    u = torch.clamp(torch.round(iscale[..., None] * scales), -32, 31) + 32
    u = torch.where(zero[..., None], torch.zeros_like(u), u)
    d = torch.where(zero, torch.zeros_like(mx), _f16(_rdiv(1.0, iscale)))
    q = _sub_codes(X, L, d[..., None] * (u - 32), None, -4, 3)
    return q, {"d": d, "sc": u.to(torch.int32)}


def reference_quantize(W: torch.Tensor, t: GGMLType) -> tuple[torch.Tensor, GGMLGrid]:
    """Codes int32 [out, in] and grid of ggml's reference quantizer for type t (no importance weights)."""
    W = W.detach().float()
    out, in_f = W.shape
    if not t.fits(in_f):
        raise ValueError(f"{t.name} needs rows that are a multiple of {t.block}, got {in_f}")
    if t.is_kquant:
        q, fields = _kquant(W.reshape(out, in_f // t.block, t.block // t.group, t.group), t.name)
    else:
        q, fields = _legacy(W.reshape(out, in_f // t.block, t.block), t.name)
    return q.reshape(out, in_f).to(torch.int32), GGMLGrid(t, fields)
