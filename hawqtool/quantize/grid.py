"""Per-group scale/zero chosen by an importance-weighted search (the quantizer grid).

Min-max ranges waste levels on outliers and ignore which inputs matter. Here each group's
scale (and integer zero) minimises Σ_j d_j (w_j − s(q_j − z))², d = diag(H) (the input second
moments GPTQ collects; llama.cpp's importance matrix is the same quantity), over candidate
step counts, each refined by weighted least squares for s given the rounded codes (the idea
of llama.cpp's make_qx_quants, written here for our grid: fp16 scale, integer zero). The
min-max grid is always one candidate, so the weighted error never exceeds min-max's.
On CPU the search runs fused per group in the quant_kernels extension (csrc/grid_search.cpp); the
tensor loop here runs elsewhere and is that kernel's reference (tests/test_grid_kernel.py).
"""
from __future__ import annotations

import torch

N_CANDIDATES = 32  # step counts tried per group


def _fp16(s: torch.Tensor) -> torch.Tensor:
    """Scales as stored (float16), kept positive."""
    return s.clamp(min=2**-14, max=65504.0).to(torch.float16).to(torch.float32)


def _codes(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(W / s[:, None]) + z[:, None], 0, maxq)


def _ls_scale(dW: torch.Tensor, d: torch.Tensor, c: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """argmin_s Σ d (w − s c)² per row for fixed integer offsets c = q − z (fallback where Σ d c² = 0); dW = d·W."""
    num = (dW * c).sum(dim=1)
    den = (d * c * c).sum(dim=1)
    s = torch.where(den > 0, num / den.clamp(min=1e-30), fallback)
    return torch.where(s > 0, s, fallback)


def _weighted_err(W: torch.Tensor, d: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    q = _codes(W, s, z, maxq)
    return (d * (W - s[:, None] * (q - z[:, None])) ** 2).sum(dim=1)


def search_qparams(W: torch.Tensor, d: torch.Tensor | None, bits: int, symmetric: bool,
                   start: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale [rows] (fp16-exact) and zero [rows] of one group W [rows, cols] minimising the
    d-weighted squared error; `start` is the min-max (scale, zero), kept where nothing beats it. d: [cols], or
    [rows, cols] when each row is its own group (groups.py); a row whose weights are all 0 gets equal ones."""
    W = W.float()
    d = torch.ones(W.shape[1], device=W.device) if d is None else d.float().to(W.device).clamp(min=0)
    d = d[None, :] if d.dim() == 1 else d
    d = torch.where(d.sum(dim=1, keepdim=True) == 0, torch.ones_like(d), d)
    maxq = 2**bits - 1
    steps = _steps(maxq, symmetric)
    ext = _kernel(W)
    if ext is not None:
        t = torch.tensor(steps, dtype=torch.float32, device=W.device)
        return tuple(ext.grid_search(W.contiguous(), d.contiguous(), start[0].float().contiguous(),
                                     start[1].float().contiguous(), t, maxq, symmetric))
    return _search_torch(W, d, maxq, symmetric, start, steps)


def _steps(maxq: int, symmetric: bool) -> list[float]:
    """The candidate step counts (float32 values) across a group's range."""
    if symmetric:
        half = (maxq + 1) // 2
        return torch.linspace(max(half - 1, 0.5), 2.0 * half, N_CANDIDATES, device="cpu").tolist()
    return torch.linspace(max(maxq - 1, 0.5), 1.75 * maxq + 1, N_CANDIDATES, device="cpu").tolist()


def _kernel(W: torch.Tensor):
    """The CPU extension for a CPU tensor (quant_kernels/csrc/grid_search.cpp: the same search fused), else None:
    other devices, or no extension (quant_kernels warns once why)."""
    if W.device.type != "cpu":
        return None
    from quant_kernels.fast_cpu import extension

    return extension()


def _search_torch(W: torch.Tensor, d: torch.Tensor, maxq: int, symmetric: bool,
                  start: tuple[torch.Tensor, torch.Tensor], steps: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """search_qparams in tensor operations on any device (and the fused kernel's reference)."""
    best_s, best_z = start
    best_s, best_z = best_s.float().clone(), best_z.float().clone()
    best_e = _weighted_err(W, d, best_s, best_z, maxq)
    wmin = W.min(dim=1).values.clamp(max=0)
    wmax = W.max(dim=1).values.clamp(min=0)
    if symmetric:
        half = (maxq + 1) // 2
        amax = torch.maximum(-wmin, wmax).clamp(min=1e-12)
        z = torch.full_like(amax, float(half))
    else:
        span = (wmax - wmin).clamp(min=1e-12)
    dW = d * W  # loop-invariant sums of the fits below, formed once
    sw, sx = d.sum(dim=1), dW.sum(dim=1)
    for t in steps:
        if symmetric:
            s0 = amax / t
            c = _codes(W, s0, z, maxq) - z[:, None]
            s = _fp16(_ls_scale(dW, d, c, s0))
            zc = z
        else:
            # codes from a range of `t` steps centred on the data, then a joint weighted LS fit of
            # w ≈ s·L + m, then the integer zero nearest −m/s and a last LS fit of s for that zero
            s0 = span / t
            m0 = (wmin + wmax) / 2 - s0 * maxq / 2
            L = torch.clamp(torch.round((W - m0[:, None]) / s0[:, None]), 0, maxq)
            dL = d * L
            sl, sll, slx = dL.sum(dim=1), (dL * L).sum(dim=1), (dL * W).sum(dim=1)
            det = sw * sll - sl * sl
            ok = det > 1e-12 * sw * sll.clamp(min=1e-30)
            s1 = torch.where(ok, (sw * slx - sl * sx) / det.clamp(min=1e-30), s0)
            m1 = torch.where(ok, (sll * sx - sl * slx) / det.clamp(min=1e-30), m0)
            s1 = torch.where(s1 > 0, s1, s0)
            zc = torch.clamp(torch.round(-m1 / s1), 0, maxq)
            s1 = _fp16(s1)
            c = _codes(W, s1, zc, maxq) - zc[:, None]
            s = _fp16(_ls_scale(dW, d, c, s1))
        e = _weighted_err(W, d, s, zc, maxq)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, zc, best_z)
    return best_s, best_z
