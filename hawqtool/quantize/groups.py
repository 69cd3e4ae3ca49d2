"""Every group of a layer at once: the per-group searches (grid.py) and scale-code snaps (scale_codes.py) run on all
of a layer's groups as the rows of one batch instead of a Python loop over groups.

A group is quantized independently of the others, so a layer [out, in] in groups of `gw` is the same problem as
[out · in/gw, gw] with each row's own input importances; one batched call per layer does the work of in/gw calls
(the sensitivity stage's error pass measures 4 widths × 3 group sizes per layer; the loop's overhead was most of it).
"""
from __future__ import annotations

from typing import Callable

import torch

CHUNK = 1 << 22  # weights per batched call: bounds the search's temporaries (a few × 16 MB) on large layers


def map_groups(W: torch.Tensor, gw: int, d: torch.Tensor | None,
               fn: Callable[..., tuple[torch.Tensor, ...]], *per_group: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fn(W_rows [n, width], d_rows [n, width] or None, *args [n]) -> tensors [n], applied to every group of W
    [out, in] (groups of `gw` columns; the last may be shorter) with `per_group` args [out, groups]; the results as
    [out, groups] each."""
    out_f, in_f = W.shape
    full = in_f // gw * gw
    G = full // gw
    pieces: list[tuple[torch.Tensor, ...]] = []
    if G:
        dg = None if d is None else d[:full].float().to(W.device).reshape(1, G, gw)
        chunks = []
        step = max(1, CHUNK // full)
        for r in range(0, out_f, step):
            Wr = W[r:r + step, :full]
            n = Wr.shape[0]
            dr = None if dg is None else dg.expand(n, G, gw).reshape(n * G, gw)
            args = [a[r:r + step, :G].reshape(n * G) for a in per_group]
            chunks.append(tuple(t.reshape(n, G) for t in fn(Wr.reshape(n * G, gw), dr, *args)))
        pieces.append(tuple(torch.cat(ts, dim=0) for ts in zip(*chunks)))
    if full < in_f:  # a shorter last group
        dt = None if d is None else d[full:].float().to(W.device)
        pieces.append(tuple(t[:, None] for t in fn(W[:, full:], dt, *[a[:, G] for a in per_group])))
    return tuple(torch.cat(ts, dim=1) for ts in zip(*pieces))


def group_qparams(W: torch.Tensor, spec, *, search: bool = False,
                  d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros [out, groups] of every group of W [out, in] at `spec` (quantizer.qparams per group; d [in]:
    the per-input importances of the weighted search)."""
    from .quantizer import qparams

    return map_groups(W.float(), spec.group_width(W.shape[1]), d,
                      lambda w, dw: qparams(w, spec, search=search, d=dw))


def snap_groups(W: torch.Tensor, d: torch.Tensor | None, scales: torch.Tensor, zeros: torch.Tensor,
                step: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group's (scale, zero) [out, groups] moved onto the row's scale-code grid (scale_codes.snap)."""
    from .scale_codes import snap

    steps = step.float()[:, None].expand_as(scales)
    return map_groups(W.float(), spec.group_width(W.shape[1]), d,
                      lambda w, dw, s, z, st: snap(w, dw, s, z, st, spec.scale_bits, spec.maxq, spec.symmetric),
                      scales.float(), zeros.float(), steps)


def column_params(x: torch.Tensor, gw: int, in_features: int) -> torch.Tensor:
    """Per-group values [out, groups] spread over the columns they cover: [out, in_features]."""
    return x.repeat_interleave(gw, dim=1)[:, :in_features]
