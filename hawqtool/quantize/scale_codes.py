"""Two-level group scales: each group's scale is a k-bit code times one fp16 step per row.

An fp16 scale per group costs 16 bits; at groups of 64 that is a quarter of a bit per weight, so finer groups
(which lower the error a lot) cost too much. llama.cpp's K-quants store 6-bit sub-block scales under one fp16
super-block scale; this is the same idea for rows of any length: step = fp16(max scale of the row / (2^k − 1)),
scale = fp16(step · c) with c in [1, 2^k − 1]. The quantizer snaps every group's searched scale onto that grid and
refits the integer zero for it (asymmetric), so what it reconstructs onto is exactly what the checkpoint stores.
On SmolLM2 the activation-weighted error of 6-bit codes equals fp16 scales' within 1% at groups of 32 and 64
(scripts/bench_scale_codes.py).
"""
from __future__ import annotations

import torch

from .grid import _weighted_err

MIN_STEP = 2.0**-24  # the smallest positive fp16 (subnormal)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def row_steps(scales: torch.Tensor, scale_bits: int) -> torch.Tensor:
    """fp16-exact step per row [out] for group scales [out, groups]: the top code reaches the largest scale (the
    step rounded up to the next fp16, so the widest group is never clipped by a step rounded down)."""
    top = 2**scale_bits - 1
    need = scales.float().amax(dim=1)
    step = (need / top).clamp(min=MIN_STEP).to(torch.float16)
    short = step.float() * top < need
    up = (step.view(torch.int16) + 1).view(torch.float16)  # positive finite fp16: the next bit pattern is the next value
    return torch.where(short, up, step).float()


def scale_codes(scales: torch.Tensor, step: torch.Tensor, scale_bits: int) -> torch.Tensor:
    """Codes c [out, groups] (int32 in [1, 2^k − 1]) of scales already on the grid, or the nearest for others."""
    top = 2**scale_bits - 1
    return torch.clamp(torch.round(scales.float() / step.float()[:, None]), 1, top).to(torch.int32)


def expand(codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The scales [out, groups] as float32 (fp16-exact): fp16(step · c). The checkpoint's loader and the quantizer
    both form them here, so they agree to the bit."""
    return _fp16(step.float()[:, None] * codes.float())


def snap(W: torch.Tensor, d: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor, step: torch.Tensor,
         scale_bits: int, maxq: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's (scale, zero) [rows] moved onto the two-level grid: of the codes just below and above the
    searched scale, and (asymmetric) the integer zeros z−1, z, z+1, the pair with the least d-weighted error on the
    group's weights W [rows, cols] (d: [cols], or [rows, cols] when each row is its own group)."""
    top = 2**scale_bits - 1
    W = W.float()
    w8 = torch.ones(W.shape[1], device=W.device) if d is None else d.float().to(W.device).clamp(min=0)
    w8 = w8[None, :] if w8.dim() == 1 else w8
    ratio = scale.float() / step.float()
    best = None
    for c in (torch.floor(ratio), torch.ceil(ratio)):
        s = expand(torch.clamp(c, 1, top)[:, None], step)[:, 0]
        for dz in ((0,) if symmetric else (0, -1, 1)):
            z = torch.clamp(zero + dz, 0, maxq)
            e = _weighted_err(W, w8, s, z, maxq)
            if best is None:
                best = (e, s, z)
                continue
            better = e < best[0]
            best = (torch.where(better, e, best[0]), torch.where(better, s, best[1]), torch.where(better, z, best[2]))
    return best[1], best[2]


def stored_scales(codes: torch.Tensor, step: torch.Tensor | None, scale_bits: int, out_features: int,
                  groups: int) -> torch.Tensor:
    """The fp16 scales [out, groups] a checkpoint's packed codes (int32 words per row) and steps (fp16 [out]) give,
    formed as `expand` forms them for the quantizer; ValueError naming what is malformed."""
    from quant_kernels import n_words, unpack

    from .quantizer import MIN_SCALE_CODE_BITS

    if not MIN_SCALE_CODE_BITS <= scale_bits <= 8 or groups < 1:
        raise ValueError(f"scale codes need scale_bits in {MIN_SCALE_CODE_BITS}..8 and groups, got {scale_bits} "
                         f"and {groups} groups")
    if codes.dtype != torch.int32 or tuple(codes.shape) != (out_features, n_words(groups, scale_bits)):
        raise ValueError(f"qscales must be int32 [{out_features}, {n_words(groups, scale_bits)}], got {codes.dtype} "
                         f"{list(codes.shape)}")
    if step is None or step.dtype != torch.float16 or tuple(step.shape) != (out_features,):
        raise ValueError(f"scale_step must be float16 [{out_features}]")
    if codes.device.type == "meta":  # a streamed checkpoint's skeleton: the shape only (formed when read)
        return torch.empty(out_features, groups, dtype=torch.float16, device="meta")
    c = unpack(codes, scale_bits, groups)
    if c.numel() and int(c.min()) < 1:
        raise ValueError("a scale code is 0")
    return expand(c, step).to(torch.float16)


RATIO_ROWS = 256  # rows `added_error` measures on (rows are quantized independently: an evenly spaced sample)


def added_error(W: torch.Tensor, spec) -> float:
    """What scale codes add to a layer's error: the error of `spec` over the same spec with fp16 scales, on up to
    RATIO_ROWS rows of W [out, in], equal input weights (≈ 1 at 2–4 bits with 6-bit codes; several × at 8 bits with
    4-bit codes). The allocator prices a coded option as the report's fp16-scale error times this. One search serves
    both: the coded grid starts from the fp16 one (quantizer.rtn)."""
    from dataclasses import replace

    from .groups import group_qparams
    from .quantizer import on_grid

    if W.shape[0] > RATIO_ROWS:
        W = W[torch.linspace(0, W.shape[0] - 1, RATIO_ROWS).long()]
    W = W.detach().float()
    scales, zeros = group_qparams(W, spec, search=True)

    def err(s) -> float:
        return float((on_grid(W, s, scales, zeros).dequantize() - W).pow(2).sum(dim=0).sum())

    return err(spec) / max(err(replace(spec, scale_bits=16)), 1e-30)
