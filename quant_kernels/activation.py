"""Dynamic per-token symmetric activation quantization (the A in W8A8).

Each row (token) of x gets its own scale s = max|x_row| / (2^(b−1) − 1); codes are
round(x/s) clamped to ±(2^(b−1) − 1). `fake_quant_per_token` returns s·q in x's dtype, which
is what an int8×int8→int32 kernel followed by the s_x·s_w epilogue computes (exactly, up
to fp32 rounding of the accumulation).
"""
from __future__ import annotations

import torch

__all__ = ["quantize_per_token", "fake_quant_per_token"]


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [..., in], scales fp32 [..., 1]) of x; all-zero rows get scale 1."""
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be in 2..8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(xf / s), -qmax, qmax).to(torch.int8)
    return q, s


def fake_quant_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """x rounded to `bits`-bit per-token codes and scaled back, in x's dtype."""
    q, s = quantize_per_token(x, bits)
    return (q.float() * s).to(x.dtype)
