"""Scale refit after GPTQ (quantize/refit.py): the scales equal an independent per-row float64 least-squares
solve under H (fp16-rounded), with act-order's interleaved groups too, and the output error never rises."""
from __future__ import annotations

import pytest
import torch

from hawqtool.quantize.gptq import gptq_quantize
from hawqtool.quantize.quantizer import QuantSpec, rtn
from hawqtool.quantize.refit import refit_scales


def _problem(seed: int, n: int = 600, i: int = 64, o: int = 8):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, i, generator=g) @ torch.randn(i, i, generator=g) * 0.3 + torch.randn(i, generator=g)
    return torch.randn(o, i, generator=g), 2 * X.t() @ X / n


def _reference(W, H, qw):
    """Per row: argmin_s (w − A s)ᵀ H (w − A s), A[:, k] = (q − z) on group k's columns; via Cholesky + lstsq."""
    g = qw.group_index()
    L = torch.linalg.cholesky(H.double())
    rows = []
    for r in range(W.shape[0]):
        b = qw.q[r].double() - qw.zeros[r].double()[g]
        A = torch.stack([b * (g == k) for k in range(qw.scales.shape[1])], dim=1)
        rows.append(torch.linalg.lstsq(L.t() @ A, L.t() @ W[r].double()).solution)
    return torch.stack(rows).half().double()


def _loss(W, H, Q):
    D = (W - Q).double()
    return float(((D @ H.double()) * D).sum())


@pytest.mark.parametrize("act_order", [False, True])
def test_scales_are_the_least_squares_fit(act_order):
    W, H = _problem(0)
    qw = gptq_quantize(W, H, QuantSpec(3, 16), act_order=act_order).weight
    if act_order:
        assert qw.g_idx is not None  # groups interleaved over the columns
    new = refit_scales(W, H, qw)
    assert torch.equal(new.q, qw.q) and torch.equal(new.zeros, qw.zeros)
    assert torch.allclose(new.scales.double(), _reference(W, H, qw), rtol=2e-3, atol=0)
    assert _loss(W, H, new.dequantize()) < _loss(W, H, qw.dequantize())


@pytest.mark.parametrize("seed", range(4))
def test_error_never_rises(seed):
    W, H = _problem(seed, n=30)  # fewer samples than inputs: H singular, the solve barely determined
    for spec in (QuantSpec(2, 32), QuantSpec(4, -1), QuantSpec(3, 16, symmetric=True)):
        qw = rtn(W, spec)
        assert _loss(W, H, refit_scales(W, H, qw).dequantize()) <= _loss(W, H, qw.dequantize()) * (1 + 1e-12)
