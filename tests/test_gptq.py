"""GPTQ math: blocked algorithm vs an unblocked OBS reference, error vs RTN, act_order, damping."""
from __future__ import annotations

import pytest
import torch

from hawqtool.quantize.gptq import GPTQError, HessianAccumulator, gptq_quantize
from hawqtool.quantize.quantizer import QuantSpec, qparams, quant_codes, rtn


def correlated_inputs(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """n rows of d correlated features (random mixing of a few latent factors plus noise)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d // 4, generator=g, dtype=torch.float64)
    A = torch.randn(d // 4, d, generator=g, dtype=torch.float64)
    X = Z @ A + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return X.to(dtype)


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.t() @ X / X.shape[0]


def reference_gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, percdamp: float, act_order: bool,
                   search: bool = False):
    """Unblocked OBS recurrence with the explicit inverse Hessian; returns (codes, dequantized) in original order.
    search: group parameters by the diag(H)-weighted search (undamped diagonal) at each group's start."""
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    d = torch.diag(H).float().clone()
    H += percdamp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    gw = spec.group_width(n)
    codes, deq = torch.zeros_like(W), torch.zeros_like(W)
    for j in range(n):
        if j % gw == 0:
            s, z = qparams(W[:, j:j + gw], spec, search=search, d=d[j:j + gw])
        codes[:, j] = quant_codes(W[:, j], s, z, spec.maxq)
        deq[:, j] = s * (codes[:, j] - z)
        err = W[:, j] - deq[:, j]
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :] / Hinv[j, j]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]  # drop column j
    inv = torch.argsort(perm)
    return codes[:, inv], deq[:, inv]


@pytest.mark.parametrize("group_size", [-1, 16, 24])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("search", [False, True])
def test_blocked_matches_unblocked_reference(group_size: int, act_order: bool, search: bool) -> None:
    X = correlated_inputs(256, 64, seed=1, dtype=torch.float64)
    X[:, 5] = 0  # one dead input
    H = hessian(X)
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    spec = QuantSpec(bits=3, group_size=group_size)
    ref_codes, ref_deq = reference_gptq(W, H, spec, 0.01, act_order, search)
    for blocksize in (8, 16, 64):
        res = gptq_quantize(W, H, spec, blocksize=blocksize, act_order=act_order, search=search)
        assert torch.equal(res.weight.q, ref_codes.to(torch.int32)), blocksize
        torch.testing.assert_close(res.dequantized.double(), ref_deq, rtol=0, atol=1e-6)
        assert (res.dequantized[:, 5] == 0).all()


def test_float32_close_to_float64() -> None:
    X = correlated_inputs(256, 64, seed=3)
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    spec = QuantSpec(bits=4, group_size=32)
    r32 = gptq_quantize(W, hessian(X), spec, blocksize=16)
    r64 = gptq_quantize(W.double(), hessian(X.double()), spec, blocksize=16)
    assert (r32.weight.q == r64.weight.q).float().mean() > 0.98


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(bits: int, group_size: int, symmetric: bool, act_order: bool) -> None:
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    for seed in range(3):
        X = correlated_inputs(512, 128, seed=10 + seed)
        W = torch.randn(32, 128, generator=torch.Generator().manual_seed(seed))
        res = gptq_quantize(W, hessian(X), spec, blocksize=32, act_order=act_order)
        err_gptq = ((W - res.dequantized) @ X.t()).pow(2).sum()
        err_rtn = ((W - rtn(W, spec).dequantize()) @ X.t()).pow(2).sum()
        assert err_gptq < err_rtn, (seed, float(err_gptq), float(err_rtn))


def test_act_order_g_idx_and_proxy_loss() -> None:
    X = correlated_inputs(256, 96, seed=5)
    X[:, 3] *= 10  # make the order clearly non-trivial
    H, W = hessian(X), torch.randn(8, 96, generator=torch.Generator().manual_seed(6))
    H0, W0 = H.clone(), W.clone()
    spec = QuantSpec(bits=3, group_size=32)
    res = gptq_quantize(W, H, spec, blocksize=16, act_order=True)
    assert torch.equal(H, H0) and torch.equal(W, W0)  # inputs untouched
    g = res.weight.g_idx
    assert g is not None and g.shape == (96,) and g.dtype == torch.int32
    assert torch.bincount(g.long()).tolist() == [32, 32, 32]
    diag = torch.diag(H)
    for k in range(2):  # groups hold columns in descending diag(H) order
        assert diag[g == k].min() >= diag[g == k + 1].max()
    assert int(g[3]) == 0
    assert torch.equal(res.dequantized, res.weight.dequantize())
    assert res.weight.scales.shape == (8, 3) and res.weight.zeros.shape == (8, 3)
    # OBS losses telescope: ½ Σ err²/d² = ½ tr(ΔW H_damped ΔWᵀ)
    Hd = H.double() + res.damp * torch.diag(H).double().mean() * torch.eye(96, dtype=torch.float64)
    D = (W - res.dequantized).double()
    assert res.proxy_loss == pytest.approx(float(torch.einsum("oi,ij,oj->", D, Hd, D) / 2), rel=1e-3)
    static = gptq_quantize(W, H, spec, blocksize=16, act_order=True, static_groups=True)
    assert static.weight.g_idx is None
    assert torch.equal(static.dequantized, static.weight.dequantize())
    assert torch.equal(static.weight.scales, rtn(W, spec).scales)  # static params = original W's


def test_indefinite_hessian_retries_then_nan_raises() -> None:
    n = 32
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(7)))
    lam = torch.linspace(1, 2, n)
    lam[-1] = -0.05 * lam[:-1].mean()  # damping 0.01·mean fails, 0.1·mean succeeds
    H = Q @ torch.diag(lam) @ Q.t()
    assert (torch.diag(H) > 0).all()
    W = torch.randn(4, n, generator=torch.Generator().manual_seed(8))
    spec = QuantSpec(bits=4, group_size=-1)
    res = gptq_quantize(W, H, spec)
    assert res.retries == 1 and res.damp == pytest.approx(0.1)
    assert len(res.notes) == 1 and "0.01" in res.notes[0] and "0.1" in res.notes[0]
    assert torch.isfinite(res.dequantized).all()
    with pytest.raises(GPTQError, match="failed 1 times"):
        gptq_quantize(W, H, spec, max_retries=0)
    singular = torch.ones(n, n)  # rank 1 but damping alone makes it PD
    assert gptq_quantize(W, singular, spec).retries == 0
    with pytest.raises(GPTQError):
        gptq_quantize(W, torch.full((n, n), float("nan")), spec)


def test_hessian_accumulator_uneven_batches() -> None:
    d = 12
    g = torch.Generator().manual_seed(9)
    batches = [torch.randn(3, 5, d, generator=g), torch.randn(7, d, generator=g),
               torch.randn(1, 2, 4, d, generator=g), torch.randn(0, d)]
    acc = HessianAccumulator(d)
    with pytest.raises(RuntimeError):
        acc.H
    for b in batches:
        acc.add_batch(b)
    X = torch.cat([b.reshape(-1, d) for b in batches]).double()
    assert acc.n_samples == 30
    assert acc.H.dtype == torch.float32
    torch.testing.assert_close(acc.H.double(), 2 * X.t() @ X / 30, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        acc.add_batch(torch.randn(2, d + 1))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_layer_in_row_slices_equals_whole(monkeypatch, act_order, method):
    """quantize_layer splits a layer with more than quantizer.ROW_SLICE rows into slices: the same codes, scales, zeros and
    error sums as the whole layer at once (rows are independent given H)."""
    from hawqtool.quantize import quantizer
    from hawqtool.quantize.driver import QuantizeOptions, quantize_layer

    g = torch.Generator().manual_seed(5)
    X = torch.randn(300, 48, generator=g) @ torch.randn(48, 48, generator=g)
    H = 2 * X.t() @ X / 300
    W = torch.randn(23, 48, generator=g)
    opts = QuantizeOptions(method=method, act_order=act_order)
    spec = QuantSpec(3, 16)
    whole = quantize_layer("w", W, H, spec, opts)
    monkeypatch.setattr(quantizer, "ROW_SLICE", 5)
    sliced = quantize_layer("w", W, H, spec, opts)
    assert torch.equal(sliced.weight.q, whole.weight.q) and torch.equal(sliced.weight.zeros, whole.weight.zeros)
    assert torch.equal(sliced.weight.scales, whole.weight.scales)
    assert (sliced.weight.g_idx is None) == (whole.weight.g_idx is None)
    assert sliced.error == pytest.approx(whole.error, rel=1e-9) and sliced.rtn_error == pytest.approx(whole.rtn_error, rel=1e-9)


def test_dequantize_in_row_slices_equals_whole(monkeypatch):
    from hawqtool.quantize import quantizer

    W = torch.randn(21, 40, generator=torch.Generator().manual_seed(2))
    qw = rtn(W, QuantSpec(3, 16))
    whole = qw.dequantize()
    monkeypatch.setattr(quantizer, "ROW_SLICE", 4)
    assert torch.equal(qw.dequantize(), whole)
