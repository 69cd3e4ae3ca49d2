"""GPTQ onto ggml block grids: the recurrence against an unblocked OBS reference on the same fixed grid,
GPTQ below RTN on that grid, exact dequantization, bytes round trip, and the allocator's ggml options."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hawqtool.quantize.ggml_grid import dequantize_grid, fit_grid, grid_codes
from hawqtool.quantize.gptq import gptq_quantize
from hawqtool.quantize.quantizer import QuantSpec, ggml_bytes, ggml_from_bytes, rtn
from test_gptq import correlated_inputs, hessian

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def reference_fixed_grid(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, percdamp: float, act_order: bool):
    """Unblocked OBS recurrence (explicit inverse Hessian, float64) onto a grid fixed before the sweep from the
    dead-zeroed W with d = diag(H) (undamped); codes in original column order."""
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    grid = fit_grid(W.float(), spec.ggml, torch.diag(H).float())
    A, B = (x.double() for x in grid.scale_offset())
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros_like(W)
    for j in range(n):
        g = int(perm[j]) // spec.ggml.group
        a, b = A[:, g], B[:, g]
        c = torch.where(a != 0, torch.clamp(torch.round((W[:, j] - b) / a), 0, spec.maxq), torch.zeros_like(a))
        codes[:, j] = c
        err = W[:, j] - (a * c + b)
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :] / Hinv[j, j]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return codes[:, torch.argsort(perm)].to(torch.int32), grid


def _problem(n_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    X = correlated_inputs(4 * n_in, n_in, seed=seed, dtype=torch.float64)
    W = torch.randn(8, n_in, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) * 0.05
    return W, hessian(X)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "Q3_K", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_unblocked_reference_on_fixed_grid(fmt: str, act_order: bool) -> None:
    spec = QuantSpec.for_ggml(fmt)
    W, H = _problem(256, seed=3)
    H[7, :] = H[:, 7] = 0  # one dead input
    ref_codes, grid = reference_fixed_grid(W, H, spec, 0.01, act_order)
    for blocksize in (32, 128):
        res = gptq_quantize(W, H, spec, blocksize=blocksize, act_order=act_order, search=True)
        assert res.weight.grid is not None
        same = (res.weight.q == ref_codes).float().mean().item()
        assert same > 0.995, (blocksize, same)  # float32 vs float64 recurrences may round a few ties apart
        assert torch.equal(res.dequantized, dequantize_grid(res.weight.q, res.weight.grid))


@pytest.mark.parametrize("fmt", LEGACY + KQUANTS)
def test_gptq_beats_rtn_on_the_same_grid(fmt: str) -> None:
    spec = QuantSpec.for_ggml(fmt)
    W, H = _problem(512, seed=5)
    W, H = W.float(), H.float()
    base = rtn(W, spec, search=True, d=torch.diag(H))
    res = gptq_quantize(W, H, spec, search=True)

    def out_err(Q: torch.Tensor) -> float:
        D = (W - Q).double()
        return float(torch.einsum("oi,ij,oj->", D, H.double(), D))

    assert out_err(res.dequantized) < 0.9 * out_err(base.dequantize()), fmt


@pytest.mark.parametrize("fmt", ["Q4_0", "Q5_1", "Q3_K", "Q4_K"])
def test_diagonal_hessian_gives_rtn_codes(fmt: str) -> None:
    """With uncorrelated inputs nothing propagates: GPTQ's codes are the nearest codes on the same grid."""
    spec = QuantSpec.for_ggml(fmt)
    W = torch.randn(8, 256, generator=torch.Generator().manual_seed(9)) * 0.05
    H = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(10)) + 0.5)
    res = gptq_quantize(W, H, spec, percdamp=0.0, search=True)
    grid = fit_grid(W, spec.ggml, torch.diag(H))
    assert torch.equal(res.weight.q, grid_codes(W, grid))


@pytest.mark.parametrize("fmt", ["Q4_1", "Q5_0", "Q2_K", "Q5_K"])
def test_bytes_round_trip(fmt: str) -> None:
    spec = QuantSpec.for_ggml(fmt)
    W, H = _problem(256, seed=11)
    res = gptq_quantize(W.float(), H.float(), spec, search=True)
    raw = ggml_bytes(res.weight)
    assert raw.dtype == torch.uint8 and raw.shape == (8, 256 // spec.ggml.block * spec.ggml.type_size)
    assert raw.numel() * 8 == spec.storage_bits(8, 256)
    back = ggml_from_bytes(raw, spec, 256)
    assert torch.equal(back.q, res.weight.q)
    assert torch.equal(back.dequantize(), res.dequantized)
    with pytest.raises(ValueError):
        ggml_from_bytes(raw[:, :-1], spec, 256)


def test_kquant_refuses_rows_it_cannot_tile() -> None:
    W, H = _problem(96, seed=1)
    with pytest.raises(ValueError, match="multiple of 256"):
        gptq_quantize(W.float(), H.float(), QuantSpec.for_ggml("Q4_K"))
    assert QuantSpec.for_ggml("q4_0").storage_bits(8, 96) == 8 * 3 * 18 * 8


def test_spec_consistency() -> None:
    with pytest.raises(ValueError):
        QuantSpec(3, 128, False, fmt="Q4_K")
    with pytest.raises(ValueError, match="Q4_K"):
        QuantSpec.for_ggml("Q7_Z")
    s = QuantSpec.for_ggml("Q4_K")
    assert s.key == "Q4_K" and s.to_dict()["fmt"] == "Q4_K"
    assert "fmt" not in QuantSpec(4, 128).to_dict()  # own specs keep their old dict (fingerprints)
    assert np.isclose(s.storage_bits(1, 256) / 256, 4.5)


# ---- the allocator over ggml types ----

def test_allocator_chooses_ggml_types_where_they_tile_the_rows() -> None:
    from hawqtool.allocate.plan import allocate_bits, plan_specs
    from hawqtool.artifacts import LayerSensitivity, SensitivityReport
    from hawqtool.errors import UserError

    g = torch.Generator().manual_seed(0)
    weights = {"wide": torch.randn(32, 512, generator=g), "narrow": torch.randn(32, 96, generator=g) * 2,
               "mid": torch.randn(32, 256, generator=g)}
    traces = {"wide": 1.0, "narrow": 50.0, "mid": 1.0}
    rep = SensitivityReport(model="m", objective="self-kl", estimator="test", settings={}, seconds=0, layers=[
        LayerSensitivity(name=n, shape=list(W.shape), n_params=W.numel(), trace=traces[n], stderr=0.0, probes=8)
        for n, W in weights.items()])
    fmts = ["Q2_K", "Q4_0", "Q4_K", "Q8_0"]
    plan = allocate_bits(rep, lambda: weights, avg_bits=4.5, formats=fmts)
    by = {lp.name: lp for lp in plan.layers}
    assert by["narrow"].ggml_type in ("Q4_0", "Q8_0")  # 96 is no multiple of 256: no K-quant
    assert "Q4_K" not in by["narrow"].omega_by_bits and "Q4_K" in by["wide"].omega_by_bits
    n = sum(W.numel() for W in weights.values())
    assert plan.total_bytes <= 4.5 * n / 8 * (1 + 1e-9)  # --avg-bits: bits per linear weight, all bytes counted
    assert plan.avg_bits == pytest.approx(8 * plan.total_bytes / n)
    specs = plan_specs(plan)
    for name, lp in by.items():
        assert specs[name].fmt == lp.ggml_type and lp.storage_bytes == specs[name].storage_bits(32, weights[name].shape[1]) / 8
    assert by["narrow"].ggml_type == "Q8_0"  # by far the most sensitive layer gets the most bits
    with pytest.raises(UserError, match="none of the ggml types"):
        allocate_bits(rep, lambda: weights, avg_bits=4.5, formats=["Q4_K"])
    with pytest.raises(UserError, match="at least --avg-bits"):
        allocate_bits(rep, lambda: weights, avg_bits=2.0, formats=fmts)
    from hawqtool.allocate.plan import uniform_ggml_plan

    u = uniform_ggml_plan(rep, lambda: weights, fmts, plan.budget["max_bytes"])
    assert {lp.ggml_type for lp in u.layers} == {"Q4_0"}  # Q8_0 is too large; K-quants do not fit "narrow"
    assert uniform_ggml_plan(rep, lambda: weights, ["Q2_K", "Q4_0"], 4.0 * n / 8) is None  # Q4_0 alone is 4.5
